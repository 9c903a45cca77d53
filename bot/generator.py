"""The generator: DialoGPT replies produced off the event loop, in exactly one worker thread.

`LocalGenerator` is the async facade (the `Generator` seam): it queues a job and awaits its
future. `GenerationWorker` is the only place where model and tokenizer work runs. A `Backend`
does the model-specific work synchronously inside the worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from bot.errors import BusyError, GenerationError, GenerationTimeout
from bot.events import DecodingSettings, Generated, GenerationRequest, Role
from bot.prompt import build_prompt, prompt_budget, text_tail
from bot.quality import Blocklist, ReplyRules, earlier_lines, is_repeat

if TYPE_CHECKING:
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)


class Backend(Protocol):
    """Synchronous model access; every method is called from the worker thread only.

    `generate` returns the new token ids (the end-of-text token not included) and stops early
    when `cancel` is set. `generate_candidates` returns `n` such replies to one prompt from one
    batched model call (sampling); it is only called with n > 1.
    """

    eos_token_id: int
    n_positions: int

    def load(self) -> None: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def generate(self, prompt: list[int], settings: DecodingSettings,
                 cancel: threading.Event) -> list[int]: ...

    def generate_candidates(self, prompt: list[int], settings: DecodingSettings,
                            cancel: threading.Event, n: int) -> list[list[int]]: ...


@dataclass(slots=True)
class _Job:
    request: GenerationRequest
    future: asyncio.Future[Generated]
    loop: asyncio.AbstractEventLoop
    cancel: threading.Event = field(default_factory=threading.Event)
    queued_at: float = field(default_factory=time.monotonic)


class GenerationWorker:
    """One thread that loads the backend (and rankers, word list) and serves jobs from a
    queue, one at a time. `bot.batching.BatchWorker` overrides `_run` to batch them."""

    thread_name = "dialogbot-generator"

    def __init__(self, backend: Backend, fallback_reply: str, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None):
        self.backend = backend
        self.fallback_reply = fallback_reply
        self.rules = rules or ReplyRules()
        self.rankers = rankers
        self.blocklist: Blocklist | None = None
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Start the thread; the returned future resolves once the model is loaded."""
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._run, args=(loop, loaded),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return loaded

    def stop(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join(timeout)
            self._thread = None

    # --- inside the worker thread -----------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            self.load()
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, thread ends
            _resolve(loop, loaded, exc=exc)
            return
        _resolve(loop, loaded, result=None)
        while (job := self.jobs.get()) is not None:
            if job.cancel.is_set() or job.future.done():
                continue
            try:
                result = self.produce(job.request, job.cancel)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                log.exception("generation failed for %s", job.request.channel_key)
                _resolve(job.loop, job.future, exc=GenerationError(str(exc) or type(exc).__name__))
            else:
                _resolve(job.loop, job.future, result=result)

    def load(self) -> None:
        self.backend.load()
        if self.rankers is not None:
            self.rankers.load(self.backend.eos_token_id)
        if self.rules.blocklist is not None:
            self.blocklist = Blocklist.from_file(self.rules.blocklist)
            log.info("word filter on: %d entries", len(self.blocklist))

    def encode_turns(self, request: GenerationRequest) -> list[list[int]]:
        budget = self.budget(request.settings)
        out = []
        for turn in request.turns:
            if turn.role is Role.BOT and turn.token_ids:
                out.append(list(turn.token_ids))
            else:
                out.append(self.backend.encode(text_tail(turn.text, budget)))
        return out

    def budget(self, settings: DecodingSettings) -> int:
        return prompt_budget(self.backend.n_positions, settings.max_new_tokens)

    def produce(self, request: GenerationRequest, cancel: threading.Event) -> Generated:
        """Prompt, candidates, choice.

        `count` candidates come from one model call; empty ones, repeats of the bot's recent
        replies or of the user's message, and (filter on) ones with a listed word are dropped.
        If none is left, candidates are generated once more with sampling; if still none, the
        neutral line (the word filter dropped one) or the fallback line is used, never an
        empty message. Of several left, the rankers pick (without rankers: the first)."""
        settings = request.settings
        prompt = build_prompt(self.encode_turns(request), self.budget(settings),
                              self.backend.eos_token_id)
        earlier = earlier_lines(request.turns, self.rules.repeat_window)
        kept, blocked = self.candidates(prompt, settings, earlier, cancel)
        if not kept and not cancel.is_set():
            retry = replace(settings, do_sample=True) if not settings.do_sample else settings
            kept, blocked = self.candidates(prompt, retry, earlier, cancel)
        if not kept:
            text = self.rules.neutral_reply if blocked else self.fallback_reply
            return Generated(text, (), len(prompt), fallback=True)
        best = 0
        if self.rankers is not None and len(kept) > 1 and not cancel.is_set():
            best = self.rankers.best(prompt, [ids for ids, _ in kept])
        ids, text = kept[best]
        return Generated(text, tuple(ids), len(prompt))

    def count(self, settings: DecodingSettings) -> int:
        """Candidates per call: the channel's number within the maximum; 1 when greedy."""
        if not settings.do_sample:
            return 1
        return max(1, min(settings.candidates, self.rules.max_candidates))

    def candidates(self, prompt: list[int], settings: DecodingSettings,
                   earlier: tuple[str, ...], cancel: threading.Event,
                   ) -> tuple[list[tuple[list[int], str]], int]:
        """(kept (ids, text) pairs without duplicates, how many the word filter dropped)."""
        n = self.count(settings)
        if n == 1:
            batch = [self.backend.generate(prompt, settings, cancel)]
        else:
            batch = self.backend.generate_candidates(prompt, settings, cancel, n)
        kept: list[tuple[list[int], str]] = []
        seen: set[str] = set()
        blocked = 0
        for ids in batch:
            text = self.backend.decode(ids).strip()
            if not text or text in seen or is_repeat(text, earlier):
                continue
            seen.add(text)
            if self.blocklist is not None and self.blocklist.blocks(text):
                blocked += 1
                continue
            kept.append((ids, text))
        if n > 1:
            log.debug("%d candidates, %d kept, %d blocked", len(batch), len(kept), blocked)
        return kept, blocked


def _resolve(loop: asyncio.AbstractEventLoop, future: asyncio.Future, *, result=None,
             exc: BaseException | None = None) -> None:
    def settle() -> None:
        if future.done():
            return
        if exc is not None:
            future.set_exception(exc)
        else:
            future.set_result(result)

    try:
        loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the loop is closed: nobody is waiting any more
        pass


class LocalGenerator:
    """The `Generator` seam over a local backend: a bounded queue in front of one worker."""

    def __init__(self, backend: Backend, *, queue_size: int = 64, timeout: float = 120.0,
                 fallback_reply: str = "I'm not sure what to say to that.",
                 rules: ReplyRules | None = None, rankers: "Ensemble | None" = None,
                 worker: GenerationWorker | None = None):
        # `worker` lets another scheduler (bot.batching.BatchWorker) sit behind this facade
        self.worker = worker or GenerationWorker(backend, fallback_reply, rules, rankers)
        self.queue_size = queue_size
        self.timeout = timeout
        self._waiting = 0

    @property
    def backend(self) -> Backend:
        return self.worker.backend

    @property
    def queue_depth(self) -> int:
        return self._waiting

    async def start(self) -> None:
        await self.worker.start(asyncio.get_running_loop())

    async def stop(self) -> None:
        await asyncio.to_thread(self.worker.stop, 30.0)

    def forget_channel(self, channel_key: str) -> None:
        """Nothing is cached per channel by this generator."""

    async def reply(self, request: GenerationRequest) -> Generated:
        if self._waiting >= self.queue_size:
            raise BusyError(f"generation queue full ({self.queue_size})")
        loop = asyncio.get_running_loop()
        job = _Job(request, loop.create_future(), loop)
        self._waiting += 1
        try:
            self.worker.jobs.put(job)
            return await asyncio.wait_for(asyncio.shield(job.future), self.timeout)
        except TimeoutError:
            raise GenerationTimeout(f"no reply within {self.timeout:g}s") from None
        finally:
            job.cancel.set()  # stops (or drops from the batch) at the next step if running
            self._waiting -= 1
