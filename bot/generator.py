"""The generator: DialoGPT replies produced off the event loop, in exactly one worker thread.

`QueuedGenerator` is the async facade (the `Generator` seam): it queues a job and awaits its
future, and supervises the worker (a dead worker thread is restarted with the model it had
already loaded). `GenerationWorker` is the only place where model and tokenizer work runs; it
serves one job at a time, `bot.batching.BatchWorker` serves many together. Both share the
load, the prompt and the reply rules (candidates, repeats, word filter, fallback) defined
here. A `Backend` does the model-specific work synchronously inside the worker.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Protocol

from bot.errors import BusyError, GenerationError, GenerationTimeout
from bot.events import DecodingSettings, Generated, GenerationRequest, Role
from bot.prompt import build_prompt, prompt_budget, text_tail
from bot.quality import Blocklist, ReplyRules, earlier_lines, is_repeat

if TYPE_CHECKING:
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)

Candidate = tuple[list[int], str]  # token ids, decoded text


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

    @property
    def abandoned(self) -> bool:
        return self.cancel.is_set() or self.future.done()

    def succeed(self, result: Generated) -> None:
        _resolve(self.loop, self.future, result=result)

    def fail(self, exc: BaseException) -> None:
        if not isinstance(exc, GenerationError):
            exc = GenerationError(str(exc) or type(exc).__name__)
        _resolve(self.loop, self.future, exc=exc)


def retry_settings(settings: DecodingSettings) -> DecodingSettings:
    """The second attempt after every candidate was dropped: the same settings, sampled."""
    return settings if settings.do_sample else replace(settings, do_sample=True)


class GenerationWorker:
    """One thread that loads the backend (and rankers, word list) once and serves jobs from a
    queue, one at a time. `bot.batching.BatchWorker` overrides `serve` to batch them.

    Supervision: an exception while serving one job fails that job only; if the thread dies
    anyway, `restart` fails the jobs it held and starts a new thread on the loaded model."""

    thread_name = "dialogbot-generator"

    def __init__(self, backend: Backend, fallback_reply: str, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None):
        self.backend = backend
        self.fallback_reply = fallback_reply
        self.rules = rules or ReplyRules()
        self.rankers = rankers
        self.blocklist: Blocklist | None = None
        self.jobs: queue.Queue[_Job | None] = queue.Queue()
        self.loaded = False
        self.restarts = 0
        self._thread: threading.Thread | None = None
        self._current: _Job | None = None

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """Start the thread; the returned future resolves once the model is loaded."""
        loaded: asyncio.Future[None] = loop.create_future()
        self._thread = threading.Thread(target=self._main, args=(loop, loaded),
                                        name=self.thread_name, daemon=True)
        self._thread.start()
        return loaded

    def restart(self, loop: asyncio.AbstractEventLoop) -> None:
        """The thread died: fail what it held, serve the queue with a new thread."""
        if self.alive:
            return
        self.restarts += 1
        self.abandon(GenerationError("the generator's worker stopped; it was restarted"))
        self.start(loop)

    def stop(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self.jobs.put(None)
            self._thread.join(timeout)
            self._thread = None
        self.abandon(GenerationError("the generator stopped"))
        self.drain(GenerationError("the generator stopped"))

    def drain(self, exc: GenerationError) -> None:
        """Fail every job still queued."""
        while True:
            try:
                job = self.jobs.get_nowait()
            except queue.Empty:
                return
            if job is not None:
                job.fail(exc)

    def abandon(self, exc: GenerationError) -> None:
        """Fail the jobs the (dead or stopped) thread was serving."""
        job, self._current = self._current, None
        if job is not None:
            job.fail(exc)

    # --- inside the worker thread -----------------------------------------------------------
    def _main(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        if not self.loaded:
            try:
                self.load()
            except BaseException as exc:  # noqa: BLE001 - reported to the loop, thread ends
                _resolve(loop, loaded, exc=exc)
                return
            self.loaded = True
        _resolve(loop, loaded, result=None)
        try:
            self.serve()
        except BaseException:  # noqa: BLE001 - the thread ends; the facade restarts it
            log.critical("the generator's worker thread died", exc_info=True)

    def serve(self) -> None:
        while (job := self.jobs.get()) is not None:
            if job.abandoned:
                continue
            self._current = job
            try:
                result = self.produce(job.request, job.cancel)
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                log.exception("generation failed for %s", job.request.channel_key)
                job.fail(exc)
            else:
                job.succeed(result)
            self._current = None

    def load(self) -> None:
        self.backend.load()
        if self.rankers is not None:
            self.rankers.load(self.backend.eos_token_id)
        if self.rules.blocklist is not None:
            self.blocklist = Blocklist.from_file(self.rules.blocklist)
            log.info("word filter on: %d entries", len(self.blocklist))

    # --- the prompt -------------------------------------------------------------------------
    def encode_turns(self, request: GenerationRequest) -> list[list[int]]:
        """Each turn's ids: bot turns by the ids the model generated, others encoded."""
        budget = self.budget(request.settings)
        return [list(t.token_ids) if t.role is Role.BOT and t.token_ids
                else self.backend.encode(text_tail(t.text, budget)) for t in request.turns]

    def budget(self, settings: DecodingSettings) -> int:
        return prompt_budget(self.backend.n_positions, settings.max_new_tokens)

    def prompt_for(self, request: GenerationRequest, ticket: int = 0) -> list[int]:
        """The newest turns that fit the budget, each followed by end-of-text."""
        return build_prompt(self.encode_turns(request), self.budget(request.settings),
                            self.backend.eos_token_id)

    # --- the reply rules --------------------------------------------------------------------
    def produce(self, request: GenerationRequest, cancel: threading.Event) -> Generated:
        """Prompt, candidates from one model call, the rules (`screen`), one retry with
        sampling when none is left, the choice (`decide`)."""
        settings = request.settings
        prompt = self.prompt_for(request)
        earlier = earlier_lines(request.turns, self.rules.repeat_window)
        kept, blocked = self.screen(self.sample(prompt, settings, cancel), earlier)
        if not kept and not cancel.is_set():
            kept, blocked = self.screen(self.sample(prompt, retry_settings(settings), cancel),
                                        earlier)
        return self.decide(prompt, kept, blocked, cancel.is_set())

    def count(self, settings: DecodingSettings) -> int:
        """Candidates per call: the channel's number within the maximum; 1 when greedy."""
        if not settings.do_sample:
            return 1
        return max(1, min(settings.candidates, self.rules.max_candidates))

    def sample(self, prompt: list[int], settings: DecodingSettings,
               cancel: threading.Event) -> list[list[int]]:
        n = self.count(settings)
        if n == 1:
            return [self.backend.generate(prompt, settings, cancel)]
        return self.backend.generate_candidates(prompt, settings, cancel, n)

    def screen(self, batch: Sequence[list[int]], earlier: tuple[str, ...],
               ) -> tuple[list[Candidate], int]:
        """(kept (ids, text) pairs without duplicates, how many the word filter dropped):
        empty candidates, repeats of the bot's recent replies or of the user's message, and
        (filter on) ones with a listed word are dropped."""
        kept: list[Candidate] = []
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
            kept.append((list(ids), text))
        if len(batch) > 1:
            log.debug("%d candidates, %d kept, %d blocked", len(batch), len(kept), blocked)
        return kept, blocked

    def decide(self, prompt: list[int], kept: list[Candidate], blocked: int,
               cancelled: bool) -> Generated:
        """None left: the neutral line (the word filter dropped one) or the fallback line,
        never an empty message. Several: the rankers pick (without rankers: the first)."""
        if not kept:
            text = self.rules.neutral_reply if blocked else self.fallback_reply
            return Generated(text, (), len(prompt), fallback=True)
        best = 0
        if self.rankers is not None and len(kept) > 1 and not cancelled:
            best = self.rankers.best(prompt, [ids for ids, _ in kept])
        ids, text = kept[best]
        return Generated(text, tuple(ids), len(prompt))


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


class QueuedGenerator:
    """The `Generator` seam: a bounded queue in front of one worker thread.

        QueuedGenerator(backend, queue_size=64, timeout=120, watchdog=1.0)

    The default worker serves one request at a time with `backend.generate` (a transformers,
    CTranslate2 or remote backend); `bot.batching.BatchingGenerator` puts its batching worker
    behind the same facade. Supervision: `ready` is False while the worker thread is not
    running; a dead thread is noticed by the next `reply` or by the watchdog (every `watchdog`
    seconds) and restarted with the already loaded model; only the requests it was serving
    fail. More than `max_restarts` restarts within a minute: it stays down (not ready) and
    every request fails at once.
    """

    def __init__(self, backend: Backend, *, queue_size: int = 64, timeout: float = 120.0,
                 fallback_reply: str = "I'm not sure what to say to that.",
                 rules: ReplyRules | None = None, rankers: "Ensemble | None" = None,
                 worker: GenerationWorker | None = None, watchdog: float = 1.0,
                 max_restarts: int = 5):
        self.worker = worker or GenerationWorker(backend, fallback_reply, rules, rankers)
        self.queue_size = queue_size
        self.timeout = timeout
        self.watchdog = watchdog
        self.max_restarts = max_restarts
        self._waiting = 0
        self._started = False
        self._restarts: deque[float] = deque()
        self._watchdog: asyncio.Task | None = None

    @property
    def backend(self) -> Backend:
        return self.worker.backend

    @property
    def queue_depth(self) -> int:
        return self._waiting

    @property
    def ready(self) -> bool:
        return self._started and self.worker.alive

    async def start(self) -> None:
        await self.worker.start(asyncio.get_running_loop())
        self._started = True
        if self.watchdog > 0:
            self._watchdog = asyncio.create_task(self._watch(), name="generator-watchdog")

    async def stop(self) -> None:
        self._started = False
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None
        await asyncio.to_thread(self.worker.stop, 30.0)

    def forget_channel(self, channel_key: str) -> None:
        """Nothing is cached per conversation by this generator."""

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self.watchdog)
            self._supervise()

    def _supervise(self) -> None:
        """Restart a dead worker thread (within the restart budget)."""
        if not self._started or self.worker.alive:
            return
        now = time.monotonic()
        while self._restarts and now - self._restarts[0] > 60:
            self._restarts.popleft()
        if len(self._restarts) >= self.max_restarts:
            self.worker.drain(GenerationError("the generator's worker keeps failing"))
            return
        self._restarts.append(now)
        log.error("the generator's worker thread is not running: restarting it")
        self.worker.restart(asyncio.get_running_loop())

    async def reply(self, request: GenerationRequest) -> Generated:
        if self._waiting >= self.queue_size:
            raise BusyError(f"generation queue full ({self.queue_size})")
        self._supervise()
        if self._started and not self.worker.alive:
            raise GenerationError("the generator's worker keeps failing")
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
