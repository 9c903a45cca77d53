"""The batching generator: every channel's requests share one worker thread that decodes them
together (continuous batching), and each channel's KV cache is kept between turns.

Design (why this and not transformers' `init_continuous_batching` manager: in transformers
5.23 only temperature/top_k/top_p are per request there, `do_sample` is per manager,
`min_new_tokens` was ignored and repetition penalty / no-repeat n-grams are not known to
apply; the bot needs every `DecodingSettings` field per channel, so the scheduler is ours, a
few hundred lines over the model's own forward):

- `BatchingGenerator` is the `Generator` seam, with `LocalGenerator`'s contract: a bounded
  queue (`BusyError`), a timeout (`GenerationTimeout`; the request's cancel flag drops it from
  the batch at the next step), an empty reply retried once with sampling then the fallback
  line, `forget_channel`, `queue_depth`.
- `BatchWorker` (one thread) loops: take the requests waiting in the queue (up to
  `max_batch_size` rows; when idle it waits up to `max_wait` for company), prefill each new
  request ON ITS OWN (prefill is compute-bound on a CPU: a padded batch pays for its padding),
  then run ONE decode step for all rows together (decode is memory-bound: reading the weights
  once serves every row). A request that arrives while others decode joins at the next step;
  a finished one leaves at once and is answered at once.
- Rows are left-padded in a shared `BatchCache` (preallocated buffers, so a step does not
  copy the cache); the attention mask marks padding and each row's position ids count only
  its real tokens (GPT-2 has absolute positions), so every fp32 greedy row equals a solo run.
- Each row keeps its own settings and `max_new_tokens`; rows that share settings get their
  next tokens together (`bot.sampling.choose`: transformers' processors over the group, an
  incremental no-repeat n-gram map per row, one argmax or multinomial).
- Between turns, `PrefixCache` keeps each channel's ids the model saw and their keys/values
  (LRU, bounded in bytes); a prompt that starts with them prefills only the new tokens. The
  prompt is built with `bot.prompt.build_window`, which slides the window in steps of
  `window_step` tokens so the prefix stays the same for many turns.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from bot.errors import GenerationError
from bot.events import DecodingSettings, Generated, GenerationRequest, Role
from bot.generator import Backend, GenerationWorker, LocalGenerator, _Job, _resolve
from bot.kvcache import KV, BatchCache, PrefixCache
from bot.prompt import build_window, prompt_budget, text_tail
from bot.quality import ReplyRules, earlier_lines, is_repeat
from bot.sampling import NGramBans, choice_key, choose

if TYPE_CHECKING:
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)


@dataclass(slots=True)
class BatchStats:
    """Counters for tests and the benchmark (written by the worker thread only)."""

    prefill_tokens: int = 0  # tokens run through the model in prefills
    prefill_seconds: float = 0.0  # time spent in those prefills (model call and first token)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    max_batch: int = 0
    # the last 1,000 of: (arrival in the queue, start of its prefill) per request and
    # (start, rows, seconds) per decode step, on the `time.monotonic` clock
    admissions: deque[tuple[float, float]] = field(default_factory=lambda: deque(maxlen=1000))
    steps: deque[tuple[float, int, float]] = field(default_factory=lambda: deque(maxlen=1000))


@dataclass(slots=True)
class _Group:
    """One attempt at a request's reply: `n` candidate rows over the same prompt."""

    job: _Job
    prompt: list[int]
    settings: DecodingSettings
    ticket: int
    retried: bool
    earlier: tuple[str, ...]
    left: int
    results: list[list[int]] = field(default_factory=list)


@dataclass(slots=True)
class _Row:
    group: _Group
    bans: NGramBans | None  # when the settings ask for no-repeat n-grams
    tokens: list[int] = field(default_factory=list)  # prompt + generated, as generate sees it
    generated: list[int] = field(default_factory=list)  # without the end-of-text token
    kv_len: int = 0  # leading `tokens` whose keys/values are in the cache
    kv: KV | None = None  # its own cache until it joins the batch
    done: bool = False

    @property
    def job(self) -> _Job:
        return self.group.job

    @property
    def settings(self) -> DecodingSettings:
        return self.group.settings


class BatchWorker(GenerationWorker):
    """One thread: prefill new requests one by one, decode all rows together, step by step.

    Thread lifecycle, loading (backend, rankers, word list) and the reply rules (candidates,
    repeats, filter) are `GenerationWorker`'s; only the serving loop differs."""

    thread_name = "dialogbot-batcher"

    def __init__(self, backend: Backend, fallback_reply: str, *, max_batch_size: int = 16,
                 max_wait: float = 0.002, cache_bytes: int = 512 * 2**20,
                 window_step: int = 256, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None):
        super().__init__(backend, fallback_reply, rules, rankers)
        self.max_batch_size = max(1, max_batch_size)
        self.max_wait = max(0.0, max_wait)
        self.window_step = window_step
        self.prefix = PrefixCache(cache_bytes)
        self.stats = BatchStats()
        self._rows: list[_Row] = []  # in batch order
        self._joining: list[_Row] = []  # prefilled, not yet in the batch
        self._batch: BatchCache | None = None
        self._stopping = False

    # --- inside the worker thread -----------------------------------------------------------
    def _run(self, loop: asyncio.AbstractEventLoop, loaded: asyncio.Future[None]) -> None:
        try:
            self.load()
        except BaseException as exc:  # noqa: BLE001 - reported to the loop, thread ends
            _resolve(loop, loaded, exc=exc)
            return
        _resolve(loop, loaded, result=None)
        with torch.inference_mode():
            while not self._stopping:
                for job in self._take():
                    self._admit(job)
                self._regroup()
                if self._rows:
                    self._step()
        self._fail_all(GenerationError("the generator stopped"))

    def _take(self) -> list[_Job]:
        """Jobs waiting now (blocking only while idle), up to the free rows."""
        room = self.max_batch_size - len(self._rows) - len(self._joining)
        taken: list[_Job] = []
        idle = not self._rows and not self._joining
        deadline = None
        while len(taken) < room:
            try:
                if idle and not taken:
                    job = self.jobs.get()
                    deadline = time.monotonic() + self.max_wait
                elif deadline is not None and (left := deadline - time.monotonic()) > 0:
                    job = self.jobs.get(timeout=left)
                else:
                    job = self.jobs.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self._stopping = True
                break
            taken.append(job)
        return taken

    def _admit(self, job: _Job) -> None:
        if job.cancel.is_set() or job.future.done():
            return
        self.stats.admissions.append((job.queued_at, time.monotonic()))
        try:
            ticket = self.prefix.ticket()
            prompt = self.prompt_for(job.request, ticket)
            earlier = earlier_lines(job.request.turns, self.rules.repeat_window)
            self._prefill(_Group(job, prompt, job.request.settings, ticket, False, earlier, 0))
        except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
            log.exception("generation failed for %s", job.request.channel_key)
            _resolve(job.loop, job.future, exc=GenerationError(str(exc) or type(exc).__name__))

    def prompt_for(self, request: GenerationRequest, ticket: int = 0) -> list[int]:
        """The channel's prompt: turns encoded (bot turns by their generated ids), windowed."""
        backend, settings = self.backend, request.settings
        budget = prompt_budget(backend.n_positions, settings.max_new_tokens)
        turns = [list(t.token_ids) if t.role is Role.BOT and t.token_ids
                 else backend.encode(text_tail(t.text, budget)) for t in request.turns]
        key = request.channel_key
        prompt = build_window(turns, budget, backend.eos_token_id, self.window_step,
                              self.prefix.anchor(key) if self.window_step > 0 else ())
        if self.window_step > 0:
            self.prefix.set_anchor(key, prompt, ticket)
        return prompt

    def _prefill(self, group: _Group) -> None:
        """Run the prompt's new tokens alone, pick each candidate's first token; the rows join
        the batch at the next regroup unless they are already finished."""
        model, device, prompt = self.backend.model, self.backend.device, group.prompt
        started = time.monotonic()
        reuse, past = self.prefix.lookup(group.job.request.channel_key, prompt)
        cache = BatchCache.from_rows([past], [reuse], len(prompt) - reuse) if past else None
        new = torch.tensor([prompt[reuse:]], dtype=torch.long, device=device)
        out = model(input_ids=new, past_key_values=cache, use_cache=True,
                    attention_mask=torch.ones((1, len(prompt)), dtype=torch.long, device=device),
                    position_ids=torch.arange(reuse, len(prompt), device=device).unsqueeze(0),
                    logits_to_keep=1)
        self.stats.prefill_tokens += len(prompt) - reuse
        self.stats.reused_tokens += reuse
        kv = tuple((layer.keys, layer.values) for layer in out.past_key_values.layers)
        group.left = n = self.count(group.settings)
        size = group.settings.no_repeat_ngram_size
        bans = NGramBans(size, prompt) if size > 0 else None
        rows = [_Row(group, bans.copy() if bans and i else bans, tokens=list(prompt),
                     kv_len=len(prompt), kv=kv) for i in range(n)]
        self._pick(rows, out.logits[:, -1, :].float().repeat(n, 1))
        self.stats.prefill_seconds += time.monotonic() - started
        for row in rows:
            if row.done:
                self._finish(row, kv)
            else:
                self._joining.append(row)

    def _regroup(self) -> None:
        """Drop finished and abandoned rows, add prefilled ones: rebuild the batch cache."""
        for row in self._rows + self._joining:
            if row.job.cancel.is_set() or row.job.future.done():
                row.done = True
        if not self._joining and all(not r.done for r in self._rows):
            return
        kept = [(i, r) for i, r in enumerate(self._rows) if not r.done]
        joining = [r for r in self._joining if not r.done]
        self._joining = []
        parts = [self._batch.row(i, r.kv_len) for i, r in kept] + [r.kv for r in joining]
        self._rows = [r for _, r in kept] + joining
        for row in joining:
            row.kv = None
        if not self._rows:
            self._batch = None
            return
        headroom = max(r.settings.max_new_tokens - len(r.generated) for r in self._rows)
        self._batch = BatchCache.from_rows(parts, [r.kv_len for r in self._rows], headroom)
        self.stats.max_batch = max(self.stats.max_batch, len(self._rows))

    def _step(self) -> None:
        """One decode step for every row; finished rows are answered at once."""
        rows, batch, device = self._rows, self._batch, self.backend.device
        started = time.monotonic()
        try:
            out = self.backend.model(
                input_ids=torch.tensor([[r.tokens[-1]] for r in rows], device=device),
                position_ids=torch.tensor([[r.kv_len] for r in rows], device=device),
                attention_mask=batch.step_mask(), past_key_values=batch, use_cache=True)
            self.stats.decode_steps += 1
            self.stats.decode_rows += len(rows)
            for row in rows:
                row.kv_len += 1
            self._pick(rows, out.logits[:, -1, :].float())
            self.stats.steps.append((started, len(rows), time.monotonic() - started))
            for i, row in enumerate(rows):
                if row.done:
                    self._finish(row, batch.row(i, row.kv_len))
        except Exception as exc:  # noqa: BLE001 - the batch is lost; every row is told
            log.exception("decode step failed for %d rows", len(rows))
            self._fail_all(GenerationError(str(exc) or type(exc).__name__))

    def _pick(self, rows: list[_Row], scores: torch.Tensor) -> None:
        """Each row's next token from its `scores` row; rows sharing settings together."""
        groups: dict[tuple, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(choice_key(row.settings), []).append(index)
        for indices in groups.values():
            part = scores if len(indices) == len(rows) else scores[indices]
            chosen = choose(part, rows[indices[0]].settings, [rows[i].tokens for i in indices],
                            [rows[i].bans for i in indices])
            for index, token in zip(indices, chosen):
                self._take_token(rows[index], token)

    def _take_token(self, row: _Row, token: int) -> None:
        if token == self.backend.eos_token_id:
            row.done = True
            return
        row.generated.append(token)
        row.tokens.append(token)
        if row.bans is not None:
            row.bans.add(token)
        if len(row.generated) >= row.settings.max_new_tokens:
            row.done = True

    def _finish(self, row: _Row, kv: KV) -> None:
        """Keep the channel's cache (first candidate done); when the group is complete, judge."""
        row.done = True
        group = row.group
        if not group.results:
            self.prefix.store(group.job.request.channel_key, row.tokens[:row.kv_len], kv,
                              group.ticket)
        group.results.append(row.generated)
        group.left -= 1
        if group.left == 0:
            self._judge(group)

    def _judge(self, group: _Group) -> None:
        """`GenerationWorker.produce`'s rules: empty, repeated and (filter on) blocked
        candidates are dropped; none left -> one more attempt with sampling, then the neutral
        or fallback line; several -> the rankers pick (without rankers: the first)."""
        job, judge = group.job, self
        kept: list[tuple[list[int], str]] = []
        seen: set[str] = set()
        blocked = 0
        for ids in group.results:
            text = self.backend.decode(ids).strip()
            if not text or text in seen or is_repeat(text, group.earlier):
                continue
            seen.add(text)
            if judge.blocklist is not None and judge.blocklist.blocks(text):
                blocked += 1
                continue
            kept.append((ids, text))
        cancelled = job.cancel.is_set() or job.future.done()
        if not kept and not group.retried and not cancelled:
            retry = replace(group.settings, do_sample=True)
            self._prefill(_Group(job, group.prompt, retry, group.ticket, True, group.earlier, 0))
            return
        if not kept:
            text = judge.rules.neutral_reply if blocked else self.fallback_reply
            result = Generated(text, (), len(group.prompt), fallback=True)
        else:
            best = 0
            if judge.rankers is not None and len(kept) > 1 and not cancelled:
                best = judge.rankers.best(group.prompt, [ids for ids, _ in kept])
            ids, text = kept[best]
            result = Generated(text, tuple(ids), len(group.prompt))
        _resolve(job.loop, job.future, result=result)

    def _fail_all(self, exc: GenerationError) -> None:
        for row in self._rows + self._joining:
            if not row.done:
                _resolve(row.job.loop, row.job.future, exc=exc)
        self._rows, self._joining, self._batch = [], [], None
        if self._stopping:
            while True:
                try:
                    job = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    _resolve(job.loop, job.future, exc=exc)


class BatchingGenerator(LocalGenerator):
    """The `Generator` seam over a transformers backend, with continuous batching and
    per-channel KV cache reuse.

        BatchingGenerator(TransformersBackend(model_dir), queue_size=64, timeout=120,
                          max_batch_size=16, max_wait_ms=2, kv_cache_mb=512, window_step=256)

    The backend must expose, once loaded, `model` (a transformers causal LM taking
    `past_key_values`, `attention_mask`, `position_ids`), `device`, `encode`, `decode`,
    `eos_token_id` and `n_positions`. `kv_cache_mb=0` turns cache reuse off; `window_step=0`
    builds prompts exactly as `LocalGenerator` does. `rules` and `rankers` are
    `LocalGenerator`'s (candidates per request become rows of the batch). `worker.stats`
    counts the work done. The async side (bounded queue, timeout, cancellation) is
    `LocalGenerator`'s; only the worker differs.
    """

    def __init__(self, backend: Backend, *, queue_size: int = 64, timeout: float = 120.0,
                 fallback_reply: str = "I'm not sure what to say to that.",
                 max_batch_size: int = 16, max_wait_ms: float = 2.0, kv_cache_mb: float = 512,
                 window_step: int = 256, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None):
        worker = BatchWorker(backend, fallback_reply, max_batch_size=max_batch_size,
                             max_wait=max_wait_ms / 1000, cache_bytes=int(kv_cache_mb * 2**20),
                             window_step=window_step, rules=rules, rankers=rankers)
        super().__init__(backend, queue_size=queue_size, timeout=timeout, worker=worker)

    def forget_channel(self, channel_key: str) -> None:
        """Drop the channel's cached keys/values and window anchor."""
        self.worker.prefix.forget(channel_key)
