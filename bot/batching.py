"""The batching generator: every channel's requests share one worker thread that decodes them
together (continuous batching), and each conversation's keys/values are kept between turns.

Design (why this and not transformers' `init_continuous_batching` manager: in transformers
5.23 only temperature/top_k/top_p are per request there, `do_sample` is per manager,
`min_new_tokens` was ignored and repetition penalty / no-repeat n-grams are not known to
apply; the bot needs every `DecodingSettings` field per channel, so the scheduler is ours, a
few hundred lines over the model's own forward):

- `BatchingGenerator` is `QueuedGenerator` (the `Generator` seam: bounded queue, timeout,
  cancellation, supervision) with `BatchWorker` behind it; the reply rules (candidates,
  repeats, word filter, one retry with sampling, fallback, rankers) are `GenerationWorker`'s.
- `BatchWorker` (one thread) loops: take the requests waiting in the queue (up to
  `max_batch_size` rows; when idle it waits up to `max_wait` for company), prefill each new
  request ON ITS OWN (prefill is compute-bound on a CPU: a padded batch pays for its padding),
  then run ONE decode step for all rows together (decode is memory-bound: reading the weights
  once serves every row). A request that arrives while others decode joins at the next step;
  a finished one leaves at once and is answered at once.
- Each row owns its keys/values (`bot.kvcache`: one buffer per row, attention per row over
  its own length), so a join writes only the joining row and a leave writes nothing. Each
  row's position ids count only its own tokens (GPT-2 has absolute positions): every fp32
  greedy row equals a solo `generate` run.
- Each row keeps its own settings and `max_new_tokens`; rows that share settings get their
  next tokens together (`bot.sampling.choose`).
- Between turns, `PrefixCache` keeps each conversation's ids and their keys/values (LRU,
  bounded in bytes); a prompt that starts with them prefills only the new tokens. The prompt
  is built with `bot.prompt.build_window`, which slides the window in steps of `window_step`
  tokens so the prefix stays the same for many turns.
- Failures stay with their request: a failed prefill, judgement (rankers) or retry fails its
  own request; a decode step that raises is rerun row by row and only the row that fails
  again is failed; anything else fails the rows in flight and the worker goes on.
"""

from __future__ import annotations

import logging
import queue
import time
from collections import deque
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch

from bot.errors import GenerationError
from bot.events import DecodingSettings, GenerationRequest
from bot.generator import Backend, GenerationWorker, QueuedGenerator, _Job, retry_settings
from bot.kvcache import ATTENTION, KV_DTYPES, KVLayout, PrefixCache, RowKV, RowsCache, \
    kv_dtype_for, use_rows_attention
from bot.memory import release_freed_memory
from bot.prompt import build_window
from bot.quality import ReplyRules, earlier_lines
from bot.quant import activation_dtype
from bot.sampling import NGramBans, choice_key, choose

if TYPE_CHECKING:
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)

# Every this many decode steps, and whenever the batch runs empty, the heap memory the steps'
# temporaries left free goes back to the operating system (`release_freed_memory`): glibc
# keeps it otherwise, fragmented across the threads' arenas, and the process grows from burst
# to burst. A few ms each (DialoGPT-medium: 9 calls, 20 ms in all).
RELEASE_EVERY = 32


@dataclass(slots=True)
class BatchStats:
    """Counters for tests and the benchmark (written by the worker thread only)."""

    prefill_tokens: int = 0  # tokens run through the model in prefills
    prefill_passes: int = 0  # forward passes that ran them (several prompts packed in one)
    prefill_seconds: float = 0.0  # time spent in those prefills (model call and first token)
    reused_tokens: int = 0  # prompt tokens whose keys/values came from the prefix cache
    decode_steps: int = 0
    decode_rows: int = 0  # sum of batch sizes over decode steps
    decode_seconds: float = 0.0  # time spent in decode steps
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
    left: int = 0
    results: list[list[int]] = field(default_factory=list)
    failed: bool = False


@dataclass(slots=True, eq=False)
class _Row:
    group: _Group
    bans: NGramBans | None  # when the settings ask for no-repeat n-grams
    kv: RowKV | None  # its keys/values (given to the prefix cache or freed when it leaves)
    tokens: list[int] = field(default_factory=list)  # prompt + generated, as generate sees it
    generated: list[int] = field(default_factory=list)  # without the end-of-text token
    kv_len: int = 0  # leading `tokens` whose keys/values are in `kv`
    done: bool = False

    @property
    def job(self) -> _Job:
        return self.group.job

    @property
    def settings(self) -> DecodingSettings:
        return self.group.settings


class BatchWorker(GenerationWorker):
    """One thread: prefill new requests one by one, decode all rows together, step by step.

    Thread lifecycle, loading and the reply rules are `GenerationWorker`'s; only `serve`
    (the loop), the prompt window and the model calls differ."""

    thread_name = "dialogbot-batcher"

    def __init__(self, backend: Backend, fallback_reply: str, *, max_batch_size: int = 16,
                 max_wait: float = 0.002, cache_bytes: int | None = 512 * 2**20,
                 window_step: int = 256, kv_dtype: str = "auto",
                 prefill_tokens: int = 512, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None):
        super().__init__(backend, fallback_reply, rules, rankers)
        self.max_batch_size = max(1, max_batch_size)
        self.prefill_tokens = prefill_tokens  # most new tokens run in one packed prefill
        self.max_wait = max(0.0, max_wait)
        self.window_step = window_step
        if kv_dtype != "auto" and kv_dtype not in KV_DTYPES:
            raise ValueError(f"kv_dtype: {kv_dtype!r} is not auto, {', '.join(KV_DTYPES)}")
        self.kv_dtype_name = kv_dtype
        self.kv_dtype: torch.dtype | None = None  # resolved for the model's device in load()
        self.cache_bytes = cache_bytes  # None: sized from the memory left after loading
        self.prefix = PrefixCache(cache_bytes or 0)
        self.layout: KVLayout | None = None
        self.stats = BatchStats()
        self._scratch: torch.Tensor | None = None
        self._kernel = None  # bot.decode_kernel, where it attends the decode steps
        self._no_mask: torch.Tensor | None = None
        self._rows: list[_Row] = []  # in batch order
        self._joining: list[_Row] = []  # prefilled, not yet in the batch
        self._stopping = False

    def load(self) -> None:
        super().load()
        model = self.backend.model
        use_rows_attention(model)
        self.layout = KVLayout.of(model)
        self.kv_dtype = kv_dtype_for(self.kv_dtype_name, self.layout.device, self.layout.heads,
                                     self.layout.head_dim)
        self.layout = replace(self.layout, dtype=self.kv_dtype)
        dtype = activation_dtype(model)
        self._scratch = self.layout.scratch(dtype)
        self._kernel = self.layout.decode_kernel(dtype)
        self._no_mask = torch.ones((1, 1, 1, 1), dtype=torch.bool, device=self.layout.device)
        if self.cache_bytes is None:
            from bot.memory import default_cache_bytes

            self.cache_bytes = default_cache_bytes()
        self.prefix.max_bytes = self.cache_bytes
        self.prefix.layout = self.layout
        log.info("KV cache: %s keys/values, %.0f KB a token, budget %.0f MiB (~%d tokens)",
                 str(self.kv_dtype).removeprefix("torch."), self.layout.token_bytes / 1024,
                 self.cache_bytes / 2**20, self.cache_bytes // self.layout.token_bytes)

    # --- supervision --------------------------------------------------------------------------
    def abandon(self, exc: GenerationError) -> None:
        super().abandon(exc)
        self._fail_rows(self._rows + self._joining, exc)
        self._rows, self._joining = [], []

    def _fail_rows(self, rows: list[_Row], exc: BaseException) -> None:
        for row in rows:
            self._fail(row.group, exc)

    def _fail(self, group: _Group, exc: BaseException) -> None:
        if not group.failed:
            group.failed = True
            group.job.fail(exc)
        for row in [r for r in self._rows + self._joining if r.group is group]:
            row.done, row.kv = True, None

    # --- inside the worker thread -----------------------------------------------------------
    def serve(self) -> None:
        self._stopping = False
        steps: int | None = None  # decode steps since freed memory went back; None: idle
        with torch.inference_mode():
            while not self._stopping:
                try:
                    self._admit(self._take())
                    self._regroup()
                    if self._rows:
                        self._step()
                        steps = (steps or 0) + 1
                        if steps == RELEASE_EVERY:
                            steps = 0
                            release_freed_memory()
                    elif steps is not None and not self._joining:  # the batch ran empty
                        steps = None
                        release_freed_memory()
                except Exception as exc:  # noqa: BLE001 - the rows' state is unknown
                    log.exception("batch failed for %d rows", len(self._rows) + len(self._joining))
                    self.abandon(GenerationError(str(exc) or type(exc).__name__))
        self.abandon(GenerationError("the generator stopped"))

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

    def _admit(self, jobs: list[_Job]) -> None:
        """Build the new requests' prompts and prefill them (a failure fails its request)."""
        groups = []
        for job in jobs:
            if job.abandoned:
                continue
            self.stats.admissions.append((job.queued_at, time.monotonic()))
            try:
                ticket = self.prefix.ticket()
                prompt = self.prompt_for(job.request, ticket)
                earlier = earlier_lines(job.request.turns, self.rules.repeat_window)
                groups.append(_Group(job, prompt, job.request.settings, ticket, False, earlier))
            except Exception as exc:  # noqa: BLE001 - every failure goes back to the caller
                log.exception("generation failed for %s", job.request.channel_key)
                job.fail(exc)
        if groups:
            self._prefill(groups)

    def prompt_for(self, request: GenerationRequest, ticket: int = 0) -> list[int]:
        """The conversation's prompt: turns encoded, windowed so its start stays put."""
        if self.window_step <= 0:
            return super().prompt_for(request, ticket)
        key = request.channel_key
        prompt = build_window(self.encode_turns(request), self.budget(request.settings),
                              self.backend.eos_token_id, self.window_step,
                              self.prefix.anchor(key))
        self.prefix.set_anchor(key, prompt, ticket)
        return prompt

    def _forward(self, rows: list[RowKV], starts: list[int], ids: list[list[int]],
                 packed: bool) -> torch.Tensor:
        """The model over each row's new `ids` (row i's start at `starts[i]`): one token per
        row (a decode step) or, `packed`, every row's tokens one after another in a single
        sequence (prefills). Each row's last logits, as float [rows, vocab]."""
        device = self.layout.device
        if packed:
            lengths = [len(x) for x in ids]
            cache = RowsCache(rows, starts, self._scratch, lengths)
            flat = [token for x in ids for token in x]
            positions = [p for s, n in zip(starts, lengths) for p in range(s, s + n)]
            last = torch.tensor(lengths, device=device).cumsum(0) - 1
            out = self.backend.model(
                input_ids=torch.tensor([flat], dtype=torch.long, device=device),
                position_ids=torch.tensor([positions], device=device),
                attention_mask=self._no_mask, cache=cache, use_cache=True,
                logits_to_keep=last, **{ATTENTION: cache})
            return out.logits[0].float()
        cache = RowsCache(rows, starts, self._scratch, kernel=self._kernel)
        out = self.backend.model(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            position_ids=torch.tensor([[s] for s in starts], device=device),
            attention_mask=self._no_mask, cache=cache, use_cache=True, logits_to_keep=1,
            **{ATTENTION: cache})
        return out.logits[:, -1, :].float()

    def _prefill(self, groups: list[_Group]) -> None:
        """Run the prompts' new tokens (each conversation's cached keys/values taken from the
        prefix cache), packed into forwards of up to `prefill_tokens` tokens, and pick each
        candidate's first token; the rows join the batch at the next regroup unless they are
        already finished. If a packed forward raises, its prompts are run one by one and only
        one that fails again fails its request."""
        started = time.monotonic()
        items = []
        for group in groups:
            reuse, kv = self.prefix.take(group.job.request.channel_key, group.prompt)
            items.append((group, reuse, kv or self.layout.new_row()))
        pack: list = []
        for item in items:
            if pack and sum(len(g.prompt) - r for g, r, _ in pack) + len(item[0].prompt) - \
                    item[1] > self.prefill_tokens:
                self._prefill_pack(pack)
                pack = []
            pack.append(item)
        self._prefill_pack(pack)
        self.stats.prefill_seconds += time.monotonic() - started

    def _prefill_pack(self, pack: list) -> None:
        self.stats.prefill_passes += 1
        try:
            logits = self._forward([kv for _, _, kv in pack], [r for _, r, _ in pack],
                                   [g.prompt[r:] for g, r, _ in pack], packed=True)
        except Exception as exc:  # noqa: BLE001
            if len(pack) == 1:
                log.exception("prefill failed for %s", pack[0][0].job.request.channel_key)
                self._fail(pack[0][0], exc)
                return
            log.exception("a prefill of %d prompts failed; running them one by one", len(pack))
            for item in pack:
                self._prefill_pack([item])
            return
        for (group, reuse, kv), scores in zip(pack, logits):
            try:
                self._start(group, reuse, kv, scores)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("generation failed for %s", group.job.request.channel_key)
                self._fail(group, exc)

    def _start(self, group: _Group, reuse: int, kv: RowKV, scores: torch.Tensor) -> None:
        """The group's candidate rows from its prefilled prompt; their first tokens."""
        prompt = group.prompt
        kv.length = len(prompt)
        self.stats.prefill_tokens += len(prompt) - reuse
        self.stats.reused_tokens += reuse
        group.left = n = self.count(group.settings)
        size = group.settings.no_repeat_ngram_size
        bans = NGramBans(size, prompt) if size > 0 else None
        rows = [_Row(group, bans.copy() if bans and i else bans,
                     kv if i == 0 else kv.copy(len(prompt)), tokens=list(prompt),
                     kv_len=len(prompt)) for i in range(n)]
        chosen = self._choose(rows, scores.unsqueeze(0).repeat(n, 1))
        self._joining += rows
        self._advance(rows, chosen)

    def _regroup(self) -> None:
        """Drop finished and abandoned rows (their buffers are already kept or freed), add
        the prefilled ones. Nothing is copied."""
        self._rows = [r for r in self._rows if not r.done and not r.job.abandoned]
        joining, self._joining = self._joining, []
        for row in joining:
            if row.done or row.job.abandoned:
                continue
            try:
                self._join(row)
            except Exception as exc:  # noqa: BLE001 - this request fails, the others go on
                log.exception("joining the batch failed for %s", row.job.request.channel_key)
                self._fail(row.group, exc)
        self.stats.max_batch = max(self.stats.max_batch, len(self._rows))
        tickets = [r.group.ticket for r in self._rows]
        self.prefix.prune(min(tickets, default=None))

    def _join(self, row: _Row) -> None:
        if row.kv is None or row.kv.length != row.kv_len:
            raise GenerationError("a row joined without its keys/values")
        self._rows.append(row)

    def _step(self) -> None:
        """One decode step for every row; finished rows are answered at once. If the step
        raises, each row is stepped alone and only a row that fails again is failed."""
        rows = self._rows
        started = time.monotonic()
        try:
            chosen = self._decode(rows)
        except Exception:  # noqa: BLE001
            log.exception("decode step failed for %d rows; stepping them one by one",
                          len(rows))
            for row in rows:
                try:
                    self._advance([row], self._decode([row]))
                except Exception as exc:  # noqa: BLE001 - this request fails, others go on
                    self._fail(row.group, exc)
            return
        seconds = time.monotonic() - started
        self.stats.decode_steps += 1
        self.stats.decode_rows += len(rows)
        self.stats.decode_seconds += seconds
        self.stats.steps.append((started, len(rows), seconds))
        self._advance(rows, chosen)

    def _decode(self, rows: list[_Row]) -> list[int]:
        logits = self._forward([r.kv for r in rows], [r.kv_len for r in rows],
                               [[r.tokens[-1]] for r in rows], packed=False)
        chosen = self._choose(rows, logits)
        for row in rows:
            row.kv_len += 1
            row.kv.length = row.kv_len
        return chosen

    def _choose(self, rows: list[_Row], scores: torch.Tensor) -> list[int]:
        """Each row's next token from its `scores` row; rows sharing settings together."""
        groups: dict[tuple, list[int]] = {}
        for index, row in enumerate(rows):
            groups.setdefault(choice_key(row.settings), []).append(index)
        chosen = [0] * len(rows)
        for indices in groups.values():
            part = scores if len(indices) == len(rows) else scores[indices]
            picked = choose(part, rows[indices[0]].settings, [rows[i].tokens for i in indices],
                            [rows[i].bans for i in indices])
            for index, token in zip(indices, picked):
                chosen[index] = token
        return chosen

    def _advance(self, rows: list[_Row], chosen: list[int]) -> None:
        """Append each row's token; finish the rows that are done."""
        for row, token in zip(rows, chosen):
            if row.done:
                continue
            if token == self.backend.eos_token_id:
                row.done = True
            else:
                row.generated.append(token)
                row.tokens.append(token)
                if row.bans is not None:
                    row.bans.add(token)
                row.done = len(row.generated) >= row.settings.max_new_tokens
            if row.done:
                try:
                    self._finish(row)
                except Exception as exc:  # noqa: BLE001 - this request fails, others go on
                    log.exception("finishing the reply failed for %s",
                                  row.job.request.channel_key)
                    self._fail(row.group, exc)

    def _finish(self, row: _Row) -> None:
        """Keep the conversation's keys/values (the first candidate done: its buffer, not a
        copy); when the group is complete, judge."""
        row.done = True
        group = row.group
        kv, row.kv = row.kv, None
        if not group.results and kv is not None:
            self.prefix.put(group.job.request.channel_key, row.tokens[:row.kv_len], kv,
                            group.ticket)
        group.results.append(row.generated)
        group.left -= 1
        if group.left == 0 and not group.failed:
            self._judge(group)

    def _judge(self, group: _Group) -> None:
        """The reply rules (`screen`); none left -> one more attempt with sampling, then the
        neutral or fallback line (`decide`); several -> the rankers pick."""
        job = group.job
        kept, blocked = self.screen(group.results, group.earlier)
        if not kept and not group.retried and not job.abandoned:
            self._prefill([_Group(job, group.prompt, retry_settings(group.settings),
                                  group.ticket, True, group.earlier)])
            return
        job.succeed(self.decide(group.prompt, kept, blocked, job.abandoned))


class BatchingGenerator(QueuedGenerator):
    """The `Generator` seam over a transformers backend, with continuous batching and
    per-conversation KV cache reuse.

        BatchingGenerator(TransformersBackend(model_dir), queue_size=64, timeout=120,
                          max_batch_size=16, max_wait_ms=2, kv_cache_mb=None,
                          kv_dtype="auto", window_step=256)

    The backend must expose, once loaded, `model` (a transformers GPT-2 causal LM), `encode`,
    `decode`, `eos_token_id` and `n_positions`. `kv_cache_mb=None` sizes the cache from the
    memory left after loading (`bot.memory.default_cache_bytes`), `0` turns reuse off;
    `kv_dtype` is how keys/values are stored (auto, float16, bfloat16, float32: see
    `bot.kvcache.kv_dtype_for`); `window_step=0`
    builds prompts exactly as `QueuedGenerator` does. `rules` and `rankers` are the reply
    rules (candidates per request become rows of the batch). `worker.stats` counts the work
    done, `cache_stats()` the prefix cache's hits and misses.
    """

    def __init__(self, backend: Backend, *, queue_size: int = 64, timeout: float = 120.0,
                 fallback_reply: str = "I'm not sure what to say to that.",
                 max_batch_size: int = 16, max_wait_ms: float = 2.0,
                 kv_cache_mb: float | None = None, kv_dtype: str = "auto",
                 window_step: int = 256, rules: ReplyRules | None = None,
                 rankers: "Ensemble | None" = None, watchdog: float = 1.0):
        worker = BatchWorker(backend, fallback_reply, max_batch_size=max_batch_size,
                             max_wait=max_wait_ms / 1000,
                             cache_bytes=None if kv_cache_mb is None else int(kv_cache_mb * 2**20),
                             window_step=window_step, kv_dtype=kv_dtype, rules=rules,
                             rankers=rankers)
        super().__init__(backend, queue_size=queue_size, timeout=timeout, worker=worker,
                         watchdog=watchdog)

    def forget_channel(self, channel_key: str) -> None:
        """Drop the conversation's (for a channel key: every conversation of the channel's)
        cached keys/values and window anchor; requests in flight store nothing for them."""
        self.worker.prefix.forget(channel_key)

    def cache_stats(self):
        return self.worker.prefix.stats()
