"""`CharacterRouter`: the `Generator` seam over one generator per character (bot.characters).

Each character's generator is built by a factory (the composition root's, for one model), so
whatever one model gets today (continuous batching, KV cache reuse, int8, packed weights, a
remote server) each character gets. Requests for different loaded characters run at the same
time, each in its own generator's worker.

Loading and unloading:
- A character's model is loaded on its first request (the default one at `start`); requests
  for it wait meanwhile (the pipeline shows typing), for at most `timeout` seconds. Loads run
  one at a time.
- At most `max_loaded` models stay loaded (None = no limit: remote characters hold no model).
  To load another, the least recently used idle one is unloaded: its worker is stopped and
  its memory given back (`release_memory`). A model with requests waiting or running is never
  unloaded under them: if every loaded model is busy, the least recently used one is drained
  (new requests for it wait; it is unloaded once its requests are answered, then loaded again
  for the waiting ones after the load that needed the room).
- A request always goes to its own character's generator: nothing falls back to another
  character. An unknown name (a channel chose a character that was since removed from
  DIALOGBOT_CHARACTERS) is answered by the default character.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from bot.characters import Cast, check_cast
from bot.errors import BusyError, GenerationError, GenerationTimeout
from bot.events import Generated, GenerationRequest
from bot.memory import release_freed_memory
from bot.metrics import Metrics
from bot.ports import Generator

if TYPE_CHECKING:
    from bot.config import Config
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)


@dataclass(slots=True, eq=False)
class _Slot:
    name: str
    model: str
    generator: Generator | None = None
    loading: asyncio.Task | None = None
    pinned: int = 0  # requests waiting for or running on this character
    used: int = 0  # logical clock of the last request, for least-recently-used
    draining: bool = False  # being unloaded: new requests wait until it is done
    idle: asyncio.Event = field(default_factory=asyncio.Event)  # set while pinned == 0
    open: asyncio.Event = field(default_factory=asyncio.Event)  # set while not draining

    def __post_init__(self) -> None:
        self.idle.set()
        self.open.set()


class CharacterRouter:
    """The `Generator` seam over one generator per character (see the module docstring).

        CharacterRouter(cast, build=lambda model: make_model_generator(...), max_loaded=2)

    `build(model)` returns an unstarted generator for one model of `cast`; `check()` runs
    once in a thread at `start` (the cheap start-up check); `metrics` (a `bot.metrics.Metrics`)
    hears of every load and unload."""

    def __init__(self, cast: Cast, build: Callable[[str], Generator], *,
                 max_loaded: int | None = 2, timeout: float = 120.0, queue_size: int = 64,
                 check: Callable[[], None] | None = None, preload: bool = True):
        self.cast = cast
        self.build = build
        self.max_loaded = max_loaded
        self.timeout = timeout
        self.queue_size = queue_size
        self.check = check
        self.preload = preload
        self.metrics = Metrics()  # the composition root sets its own
        self.slots = {name: _Slot(name, model) for name, model in cast.entries}
        self._load_lock = asyncio.Lock()
        self._clock = itertools.count(1)
        self._waiting = 0  # requests waiting for their character's model
        self._started = False

    @classmethod
    def from_config(cls, config: "Config", build: Callable[["Config"], Generator]
                    ) -> "CharacterRouter":
        """A router over DIALOGBOT_CHARACTERS; `build(config)` makes one model's generator
        from a copy of `config` whose DIALOGBOT_MODEL (torch, ct2) or
        DIALOGBOT_GENERATOR_MODEL (openai) is the character's model."""
        cast = Cast.from_config(config)
        field_name = "generator_model" if cast.remote else "model"

        def one(model: str) -> Generator:
            return build(config.model_copy(update={field_name: model, "characters": ""}))

        return cls(cast, one, max_loaded=None if cast.remote else config.max_models,
                   timeout=config.generation_timeout, queue_size=config.queue_size,
                   check=lambda: check_cast(cast))

    # --- the Generator seam -------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self._started and all(s.generator.ready
                                     for s in self.slots.values() if s.generator is not None)

    @property
    def queue_depth(self) -> int:
        return self._waiting + sum(s.generator.queue_depth for s in self.slots.values()
                                   if s.generator is not None)

    @property
    def loaded(self) -> list[str]:
        return [s.name for s in self.slots.values() if s.generator is not None]

    async def start(self) -> None:
        if self.check is not None:
            await asyncio.to_thread(self.check)
        self._started = True
        if self.preload:
            slot = self.slots[self.cast.default]
            try:
                await self._pin(slot)
            except BaseException:
                self._started = False
                raise
            self._unpin(slot)

    async def stop(self) -> None:
        self._started = False
        for slot in self.slots.values():
            if slot.loading is not None:
                await asyncio.wait([slot.loading])
        loaded = [s for s in self.slots.values() if s.generator is not None]
        if loaded:
            await asyncio.gather(*(self._unload(s, "stopping") for s in loaded),
                                 return_exceptions=True)

    def forget_channel(self, channel_key: str) -> None:
        for slot in self.slots.values():
            if slot.generator is not None:
                slot.generator.forget_channel(channel_key)

    async def reply(self, request: GenerationRequest) -> Generated:
        if not self._started:
            raise GenerationError("the generator is not running")
        slot = self.slots[self.cast.resolve(request.character)]
        generator = await self._pin(slot)
        started = time.monotonic()
        try:
            generated = await generator.reply(request)
        finally:
            self._unpin(slot)
        log.debug("character %s answered %s: %d tokens in %.2fs", slot.name,
                  request.channel_key, len(generated.token_ids), time.monotonic() - started)
        return generated

    # --- loading and unloading ----------------------------------------------------------------
    async def _pin(self, slot: _Slot) -> Generator:
        """Wait until the slot's model is loaded (loading it if needed) and pin it: it is not
        unloaded until `_unpin`."""
        if self._waiting >= self.queue_size:
            raise BusyError(f"{self._waiting} requests wait for a character's model")
        self._waiting += 1
        pinned = False
        try:
            async with asyncio.timeout(self.timeout):
                while slot.draining:
                    await slot.open.wait()
                slot.pinned += 1
                slot.idle.clear()
                pinned = True
                while slot.generator is None:
                    if slot.loading is None:
                        slot.loading = asyncio.create_task(self._load(slot),
                                                           name=f"load-{slot.name}")
                        slot.loading.add_done_callback(_retrieve)
                    await asyncio.shield(slot.loading)
        except TimeoutError:
            if pinned:
                self._unpin(slot)
            raise GenerationTimeout(f"character {slot.name!r} was not loaded within "
                                    f"{self.timeout:g}s") from None
        except BaseException:
            if pinned:
                self._unpin(slot)
            raise
        finally:
            self._waiting -= 1
        slot.used = next(self._clock)
        return slot.generator

    def _unpin(self, slot: _Slot) -> None:
        slot.pinned -= 1
        if slot.pinned == 0:
            slot.idle.set()

    async def _load(self, slot: _Slot) -> None:
        try:
            async with self._load_lock:
                if not self._started:
                    raise GenerationError("the generator is stopping")
                await self._make_room()
                started = time.monotonic()
                generator = self.build(slot.model)
                try:
                    await generator.start()
                except BaseException:
                    await asyncio.shield(_stop_quietly(generator))
                    raise
                slot.generator = generator
                seconds = time.monotonic() - started
                log.info("character %s loaded (%s) in %.1fs; loaded: %s", slot.name,
                         slot.model, seconds, ", ".join(self.loaded))
                self.metrics.character_loaded(slot.name, seconds)
                self.metrics.characters_loaded(len(self.loaded))
        finally:
            slot.loading = None

    async def _make_room(self) -> None:
        """Unload least recently used models until one more fits (see the module docstring)."""
        while self.max_loaded is not None:
            loaded = [s for s in self.slots.values() if s.generator is not None]
            if len(loaded) < self.max_loaded:
                return
            idle = [s for s in loaded if s.pinned == 0]
            victim = min(idle or loaded, key=lambda s: s.used)
            if victim.pinned:
                log.info("character %s: waiting for %d requests before unloading it",
                         victim.name, victim.pinned)
            victim.draining = True
            victim.open.clear()
            try:
                await victim.idle.wait()
            except BaseException:
                victim.draining = False
                victim.open.set()
                raise
            await self._unload(victim, "least recently used")

    async def _unload(self, slot: _Slot, why: str) -> None:
        generator, slot.generator = slot.generator, None
        try:
            if generator is not None:
                await _stop_quietly(generator)
                del generator
                await asyncio.to_thread(release_memory)
                log.info("character %s unloaded (%s); loaded: %s", slot.name, why,
                         ", ".join(self.loaded) or "none")
                self.metrics.characters_loaded(len(self.loaded))
        finally:
            slot.draining = False
            slot.open.set()


class SharedRankers:
    """One DialogRPT `Ensemble` for every character's worker: loaded by the first worker that
    loads, kept while the bot runs (unloading a character does not unload it). Scoring from
    several workers at once is safe: the rankers only run forward passes."""

    def __init__(self, ensemble: "Ensemble"):
        self.ensemble = ensemble
        self._lock = threading.Lock()
        self._loaded = False

    def load(self, eos_token_id: int | None = None) -> None:
        with self._lock:
            if not self._loaded:
                self.ensemble.load(eos_token_id)
                self._loaded = True

    def best(self, context: Sequence[int], candidates: Sequence[Sequence[int]]) -> int:
        return self.ensemble.best(context, candidates)

    def scores(self, context: Sequence[int], candidates: Sequence[Sequence[int]]
               ) -> list[float]:
        return self.ensemble.scores(context, candidates)

    def describe(self) -> str:
        return self.ensemble.describe()


def release_memory() -> None:
    """Give freed model memory back to the system: collect cycles, then ask glibc to return
    free heap pages (freed tensors below its mmap threshold stay in the heap otherwise)."""
    gc.collect()
    release_freed_memory()


async def _stop_quietly(generator: Generator) -> None:
    try:
        await generator.stop()
    except Exception:  # noqa: BLE001 - unloading goes on; the memory is released anyway
        log.exception("error while stopping a character's generator")


def _retrieve(task: asyncio.Task) -> None:
    """A load nobody waits for any more (its requests timed out) must not log 'exception
    never retrieved'; its failure was already raised to the requests that waited."""
    if not task.cancelled():
        task.exception()
