"""Keys and values for the batching generator: one buffer per sequence, kept between turns.

Layout. Every sequence the worker decodes (a row) owns one buffer `[layers, 2, heads,
capacity, head_dim]` (`RowKV`; capacity = the model's positions) in the storage dtype
(DIALOGBOT_KV_DTYPE: `auto` by default, see `kv_dtype_for`; float32 for bit-exact parity
with `generate`). The
buffer is allocated with `torch.empty` and advised to stay at small pages (transparent huge
pages would make whole 2 MiB regions resident), so on a CPU the operating system backs only
the pages that were written: a row of 150 tokens costs 150 tokens of memory, not 1,024.

- A row joins: its prefill writes its own new tokens into its own buffer, the buffer the
  conversation's previous turn left in the prefix cache when there is one. Nothing else is
  copied (candidates of one request copy the prompt once each).
- A decode step writes one position per row. A row leaves: its buffer goes to the prefix
  cache as it is (the first candidate of a request) or is freed. Nothing is written.
- Attention (`RowsCache.attend`, plugged into transformers' attention interface as
  "dialogbot_rows") runs each row over its own length: no padding, no mask, no batch-wide
  buffer to rebuild. Keys and values stored in half precision are attended as stored where
  that measures faster (`attends_as_stored`: a GPU; float16 on an Intel Xeon without bf16;
  bfloat16 on one with AMX), so a decode step reads half the bytes; elsewhere they are
  widened to the model's dtype one row at a time in a scratch buffer that stays in the
  CPU's cache. Decode steps over float16 on a CPU go through `bot.decode_kernel` instead
  where that measures faster still (`decode_kernel_for`: one call per layer for all rows,
  no widening copy; an AMD EPYC with AVX2 only).

`PrefixCache` keeps, per conversation key, the token ids the model saw and the row buffer
holding their keys/values, least recently used evicted first to stay within a byte bound,
and counts hits and misses. It also keeps each conversation's window anchor (the first
tokens of its last prompt, see `bot.prompt.build_window`). It is thread-safe: the worker takes
and puts, the event loop calls `forget` on /reset, /forget and settings changes.
"""

from __future__ import annotations

import functools
import itertools
import logging
import statistics
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import AttentionInterface, Cache
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from bot.memory import no_huge_pages

ANCHOR_TOKENS = 32
MAX_ANCHORS = 10_000
KV_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
ATTENTION = "dialogbot_rows"

log = logging.getLogger(__name__)


HALF = (torch.float16, torch.bfloat16)


def native_bf16(device: torch.device) -> bool:
    """True when `device` runs bf16 math natively: CUDA, or a CPU with AVX512-BF16 / AMX."""
    if device.type == "cuda":
        return True
    from bot.quant import cpu_supports_bf16

    return device.type == "cpu" and cpu_supports_bf16()


def time_attention(heads: int, head_dim: int, dtype: torch.dtype,
                   lengths: Sequence[int] = (256, 768), reps: int = 25) -> tuple[float, float]:
    """Seconds for decode-shaped attention (one query over each of `lengths` keys/values, a
    short and a long history) on `dtype` buffers run as stored (the query rounded to
    `dtype`), and widened to fp32 first (the copy included): medians over `reps`, the two
    paths interleaved so that both see the same moments of a shared host. About 40-80 ms."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    longest = max(lengths)
    buf = torch.randn((2, 1, heads, longest, head_dim)).to(dtype)
    scratch = torch.empty((2, 1, heads, longest, head_dim))
    query = torch.randn((1, heads, 1, head_dim))

    def as_stored():
        for n in lengths:
            sdpa(query.to(dtype), buf[0, :, :, :n], buf[1, :, :, :n])

    def widened():
        for n in lengths:
            wide = scratch[:, :, :, :n].copy_(buf[:, :, :, :n])
            sdpa(query, wide[0], wide[1])

    return tuple(_interleaved_medians((as_stored, widened), reps))


def _interleaved_medians(runs: Sequence, reps: int) -> list[float]:
    """Median seconds of each of `runs` over `reps` rounds (after two unmeasured ones), the
    runs taking turns within a round so that all see the same moments of a shared host."""
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(reps + 2):
        for run, seen in zip(runs, times):
            start = time.perf_counter()
            run()
            seen.append(time.perf_counter() - start)
    return [statistics.median(seen[2:]) for seen in times]


@functools.cache
def attention_times(heads: int, head_dim: int, dtype: torch.dtype) -> tuple[float, float]:
    """`time_attention` for this shape and half dtype, measured once per process and logged;
    (inf, 0) when attention cannot run on `dtype` here."""
    try:
        as_stored, widened = time_attention(heads, head_dim, dtype)
    except RuntimeError as exc:  # no kernel for the dtype on this device
        log.info("attention on %s keys/values: not available (%s)", _name(dtype), exc)
        return float("inf"), 0.0
    log.info("attention on %s keys/values: %.0f us as stored, %.0f us widened to fp32",
             _name(dtype), as_stored * 1e6, widened * 1e6)
    return as_stored, widened


def time_decode_kernel(kernel, heads: int, head_dim: int, lengths: Sequence[int] = (256, 768),
                       reps: int = 25) -> tuple[float, float]:
    """Seconds for one row's decode attention over float16 keys/values of `lengths` tokens
    through `kernel` (`bot.decode_kernel`) and through the faster of torch's two ways (as
    stored, widened to fp32): medians over `reps`, the three interleaved as in
    `time_attention`."""
    sdpa = torch.nn.functional.scaled_dot_product_attention
    longest = max(lengths)
    buf = torch.randn((1, 2, heads, longest, head_dim)).to(torch.float16)
    scratch = torch.empty((2, 1, heads, longest, head_dim))
    query = torch.randn((1, heads, head_dim))
    new = torch.randn((2, 1, heads, head_dim))
    scale = head_dim ** -0.5

    def by_kernel():
        for n in lengths:
            kernel.decode_attention(query, new, [buf], 0, [n - 1], scale)

    def as_stored():
        for n in lengths:
            sdpa(query.unsqueeze(2).half(), buf[:, 0, :, :n], buf[:, 1, :, :n], scale=scale)

    def widened():
        for n in lengths:
            wide = scratch[:, :, :, :n].copy_(buf[0, :, :, :n].unsqueeze(1))
            sdpa(query.unsqueeze(2), wide[0], wide[1], scale=scale)

    ours, stored, wide = _interleaved_medians((by_kernel, as_stored, widened), reps)
    return ours, min(stored, wide)


@functools.cache
def decode_kernel_times(heads: int, head_dim: int) -> tuple[float, float] | None:
    """`time_decode_kernel` for this shape, measured once per process and logged; None where
    the kernel does not load or fails its timing run."""
    from bot import decode_kernel

    kernel = decode_kernel.load()
    if kernel is None:
        return None
    try:
        ours, torch_way = time_decode_kernel(kernel, heads, head_dim)
    except RuntimeError as exc:
        log.warning("decode kernel: failed its timing run, not used (%s)", exc)
        return None
    log.info("attention on float16 keys/values: %.0f us in the decode kernel, %.0f us the "
             "torch way", ours * 1e6, torch_way * 1e6)
    return ours, torch_way


def decode_kernel_for(heads: int, head_dim: int):
    """The decode kernel where it attends float16 keys/values of this shape at least 10%
    faster than torch's faster way (`decode_kernel_times`); None otherwise."""
    from bot import decode_kernel

    times = decode_kernel_times(heads, head_dim)
    if times is None or times[0] > 0.9 * times[1]:
        return None
    return decode_kernel.load()


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def attends_as_stored(device: torch.device, dtype: torch.dtype, heads: int,
                      head_dim: int) -> bool:
    """Whether attention should run on stored half-precision (`dtype`) keys/values directly,
    with no widening copy: always on CUDA; on a CPU when that measures at least 10% faster
    than widening to fp32 (`attention_times`), and for bfloat16 only on a CPU with native bf16.

    Measured because it differs from CPU to CPU, and a decode step does it for every row and
    layer. One row of DialoGPT-medium's shape over 800 tokens, torch 2.13: an AMD EPYC with
    AVX512-BF16 and no AMX took 774 us in bf16 against 171 us widened; an Intel Xeon (Ice Lake,
    no bf16) 259 us in float16 against 399 us widened (a 16-row step over 800 tokens 392 against
    497 ms); on an Intel Xeon with AMX a warm 16-row step took 154 ms in bf16 against 249 ms
    widened."""
    if device.type == "cuda":
        return True
    if dtype not in HALF or (dtype == torch.bfloat16 and not native_bf16(device)):
        return False
    as_stored, widened = attention_times(heads, head_dim, dtype)
    return as_stored <= 0.9 * widened


def kv_dtype_for(name: str, device: torch.device, heads: int, head_dim: int) -> torch.dtype:
    """The storage dtype for DIALOGBOT_KV_DTYPE `name` on `device`. `auto`: half precision
    (half the bytes of fp32), bfloat16 only where attending on it directly measures at least
    10% faster than the faster float16 path (as stored or widened: `attends_as_stored`), and
    on CUDA; float16 elsewhere (8x bf16's precision)."""
    if name != "auto":
        return KV_DTYPES[name]
    if device.type == "cuda":
        return torch.bfloat16
    if attends_as_stored(device, torch.bfloat16, heads, head_dim):
        bf16 = attention_times(heads, head_dim, torch.bfloat16)[0]
        stored, widened = attention_times(heads, head_dim, torch.float16)
        fp16 = stored if attends_as_stored(device, torch.float16, heads, head_dim) else widened
        if device.type == "cpu" and decode_kernel_for(heads, head_dim) is not None:
            fp16 = min(fp16, decode_kernel_times(heads, head_dim)[0])
        if bf16 <= 0.9 * fp16:
            return torch.bfloat16
    return torch.float16


@dataclass(frozen=True, slots=True)
class KVLayout:
    """The shape of one row's keys/values for a model, and the dtype they are stored in."""

    layers: int
    heads: int
    head_dim: int
    capacity: int
    dtype: torch.dtype
    device: torch.device

    @classmethod
    def of(cls, model, dtype: torch.dtype = torch.float16) -> "KVLayout":
        config = model.config
        heads = config.n_head
        return cls(config.n_layer, heads, config.n_embd // heads, config.n_positions, dtype,
                   next(model.parameters()).device)

    @property
    def token_bytes(self) -> int:
        """Bytes of keys and values per token of history."""
        return self.layers * 2 * self.heads * self.head_dim * self.dtype.itemsize

    def resident_bytes(self, tokens: int) -> int:
        """Memory a row of `tokens` occupies: on a CPU only written pages are resident."""
        if self.device.type == "cpu":
            return tokens * self.token_bytes
        return self.capacity * self.token_bytes

    def new_row(self) -> "RowKV":
        return RowKV(_row_buffer(torch.empty(
            (self.layers, 2, self.heads, self.capacity, self.head_dim), dtype=self.dtype,
            device=self.device)))

    def attends_natively(self) -> bool:
        """Half-precision keys/values where attending on them directly is faster
        (`attends_as_stored`): attention runs in the storage dtype on the stored buffers (the
        query is rounded to it, scores and softmax accumulate in fp32 inside the kernel), with
        no widening copy."""
        return self.dtype in HALF and attends_as_stored(self.device, self.dtype, self.heads,
                                                        self.head_dim)

    def decode_kernel(self, dtype: torch.dtype):
        """The kernel a decode step attends with (`decode_kernel_for`): float16 keys/values
        on a CPU, a model computing in fp32 (or int8: fp32 activations), and the kernel
        measured faster than torch's ways; None otherwise (`RowsCache` attends with torch)."""
        if self.dtype != torch.float16 or self.device.type != "cpu" or dtype != torch.float32:
            return None
        return decode_kernel_for(self.heads, self.head_dim)

    def scratch(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The buffer `RowsCache.attend` widens one row's keys/values into, for a model
        computing in `dtype` (None when attention runs on the stored buffers: the storage
        dtype is the model's, or attending as stored pays). A bf16 model on a CPU where bf16
        attention is slow (`attends_as_stored`) attends in fp32 too."""
        if self.attends_natively():
            return None
        if dtype == torch.bfloat16 and not attends_as_stored(self.device, torch.bfloat16,
                                                             self.heads, self.head_dim):
            dtype = torch.float32
        if dtype == self.dtype:
            return None
        return torch.empty((2, self.heads, self.capacity, self.head_dim), dtype=dtype,
                           device=self.device)


def _row_buffer(buf: torch.Tensor) -> torch.Tensor:
    """A fresh row buffer, kept at small pages so only the written tokens are resident
    (`bot.memory.no_huge_pages`)."""
    no_huge_pages(buf)
    return buf


class RowKV:
    """One sequence's keys/values; the first `length` positions are filled."""

    __slots__ = ("buf", "length")

    def __init__(self, buf: torch.Tensor):
        self.buf = buf
        self.length = 0

    def copy(self, n: int) -> "RowKV":
        """A new row holding this row's first `n` positions (a candidate's own copy)."""
        other = RowKV(_row_buffer(torch.empty_like(self.buf)))
        other.buf[:, :, :, :n] = self.buf[:, :, :, :n]
        other.length = n
        return other


class RowsCache(Cache):
    """What one forward pass sees: each row's buffer and the position its new tokens start at.

    Two shapes of input: one token per row (a decode step: input [rows, 1]), or the new
    tokens of several rows packed one after another in a single sequence (prefills: input
    [1, sum(lengths)], each row's `lengths[i]` tokens in turn). Passed to the model as `cache`
    (transformers hands each layer's new keys/values to `update`) and as `dialogbot_rows` (the
    attention function calls `attend`); the model's config must use the "dialogbot_rows"
    attention (`use_rows_attention`)."""

    def __init__(self, rows: Sequence[RowKV], starts: Sequence[int],
                 scratch: torch.Tensor | None = None, lengths: Sequence[int] | None = None,
                 kernel=None):
        super().__init__(layers=[])
        self.rows = rows
        self.starts = starts
        self.scratch = scratch
        self.lengths = lengths  # None: one token per row (decode)
        self.kernel = kernel  # decode only: `bot.decode_kernel` over float16 buffers
        self._new: torch.Tensor | None = None
        self._views: list | None = None  # decode with torch: per row, views over all layers

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, layer_idx: int,
               *args, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
        """Keep the layer's new keys/values; `attend` (called next, for the same layer)
        writes each row's into its buffer as it attends."""
        self._new = torch.stack((key_states, value_states))  # [2, batch, heads, q, dim]
        return key_states, value_states

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return max(self.starts, default=0)

    def attend(self, layer: int, query: torch.Tensor, scaling: float | None,
               ) -> torch.Tensor:
        """Write each row's new keys/values into its buffer, then attend its new tokens over
        its own keys/values (causal among several new tokens).
        query [batch, heads, q, dim] -> [batch, q, heads, dim]."""
        if self.lengths is None:
            return self._attend_decode(layer, query, scaling)
        new, self._new = self._new, None
        outs, offset = [], 0
        for row, n, start in zip(self.rows, self.lengths, self.starts):  # packed: batch 1
            end = start + n
            row.buf[layer, :, :, start:end] = new[:, 0, :, offset:offset + n]
            kv = row.buf[layer, :, :, :end]
            if self.scratch is not None:  # stored in half precision: widen in the CPU's cache
                kv = self.scratch[:, :, :end].copy_(kv)
            mask = None
            if n > 1:
                mask = torch.ones((n, end), dtype=torch.bool, device=query.device).tril(start)
            outs.append(torch.nn.functional.scaled_dot_product_attention(
                query[:, :, offset:offset + n].to(kv.dtype), kv[0:1], kv[1:2],
                attn_mask=mask, scale=scaling))
            offset += n
        out = torch.cat(outs, dim=2).transpose(1, 2)
        return out.to(query.dtype)  # no-op unless attention ran in the storage dtype

    def _attend_decode(self, layer: int, query: torch.Tensor, scaling: float | None,
                       ) -> torch.Tensor:
        """`attend` for a decode step (one new token per row), each row's buffer indexed once
        per step instead of once per layer (a 16-row step of a 24-layer model makes 384 of
        these calls; on DialoGPT-medium this saved 3-5% of the step). With the decode kernel,
        one call writes and attends every row of the layer."""
        if self.kernel is not None:
            new, self._new = self._new, None
            out = self.kernel.decode_attention(
                query[:, :, 0].contiguous(), new[:, :, :, 0].contiguous(),
                [row.buf for row in self.rows], layer, self.starts,
                scaling if scaling is not None else query.shape[-1] ** -0.5)
            return out.unsqueeze(1)  # [rows, 1, heads, dim]
        if self._views is None:  # per row: the new token's slot, the history, keys, values
            self._views = [(row.buf[:, :, :, start], row.buf[:, :, :, :start + 1],
                            row.buf[:, 0:1, :, :start + 1], row.buf[:, 1:2, :, :start + 1])
                           for row, start in zip(self.rows, self.starts)]
        new, self._new = self._new, None
        dtype = (self.scratch if self.scratch is not None else self.rows[0].buf).dtype
        outs = []
        for (slot, both, keys, values), q, kv in zip(self._views, query.to(dtype).split(1),
                                                     new.unbind(1)):
            slot[layer].copy_(kv[:, :, 0])
            if self.scratch is None:
                k, v = keys[layer], values[layer]
            else:  # stored in half precision: widen in the CPU's cache
                wide = self.scratch[:, :, :both.shape[3]].copy_(both[layer])
                k, v = wide[0:1], wide[1:2]
            outs.append(torch.nn.functional.scaled_dot_product_attention(q, k, v,
                                                                         scale=scaling))
        return torch.cat(outs).transpose(1, 2).to(query.dtype)


def _rows_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                    **kwargs):
    cache = kwargs.get(ATTENTION)
    if cache is None:  # any other call (generate, the bench's bare forward): transformers' sdpa
        return sdpa_attention_forward(module, query, key, value, attention_mask,
                                      scaling=scaling, dropout=dropout, **kwargs)
    return cache.attend(module.layer_idx, query, scaling), None


def use_rows_attention(model) -> None:
    """Make `model` run `RowsCache.attend` when a forward pass is given `dialogbot_rows`
    (and transformers' sdpa attention otherwise)."""
    AttentionInterface.register(ATTENTION, _rows_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    model.config._attn_implementation = ATTENTION


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def conversation_channel(key: str) -> str:
    """"platform:channel" of a conversation key "platform:channel#sub"."""
    return key.split("#", 1)[0]


@dataclass(slots=True)
class _Entry:
    ids: tuple[int, ...]
    row: RowKV
    nbytes: int


@dataclass(frozen=True, slots=True)
class CacheStats:
    hits: int
    misses: int
    reused_tokens: int
    entries: int
    bytes_used: int
    max_bytes: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class PrefixCache:
    """Per-conversation (ids, row buffer) of the last generation, bounded in bytes, least
    recently used evicted first. `max_bytes <= 0` disables it (nothing is stored).

    `take` hands the buffer over to the new turn's row (the entry leaves the cache; the row
    writes its new tokens into it) and `put` takes a finished row's buffer back: a turn
    reuses its conversation's keys/values without copying them."""

    def __init__(self, max_bytes: int, layout: KVLayout | None = None):
        self.max_bytes = max_bytes
        self.layout = layout
        self.bytes_used = 0
        self.hits = self.misses = self.reused_tokens = 0
        self._entries: OrderedDict[str, _Entry] = OrderedDict()
        self._anchors: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._forgotten: dict[str, int] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def ids(self, key: str) -> tuple[int, ...] | None:
        with self._lock:
            entry = self._entries.get(key)
            return entry.ids if entry else None

    def stats(self) -> CacheStats:
        with self._lock:
            return CacheStats(self.hits, self.misses, self.reused_tokens, len(self._entries),
                              self.bytes_used, self.max_bytes)

    def ticket(self) -> int:
        """Taken when a request starts; `put` and `set_anchor` refuse results of requests that
        started before their conversation (or its channel) was forgotten."""
        return next(self._clock)

    def take(self, key: str, prompt: Sequence[int]) -> tuple[int, RowKV | None]:
        """How many leading tokens of `prompt` have cached keys/values (always leaving at
        least one token to run, for the next token's logits) and the buffer holding them,
        which now belongs to the caller; (0, None) on a miss. An entry sharing no token with
        `prompt` is dropped at once (a conversation's prompts only extend its latest one, so
        it can never be reused): its buffer is freed before this prompt's is filled, instead
        of both being held until `put`."""
        with self._lock:
            entry = self._entries.get(key)
            shared = 0 if entry is None else common_prefix(entry.ids, prompt)
            reuse = min(shared, len(prompt) - 1)
            if reuse <= 0:
                self.misses += 1
                if entry is not None and shared == 0:  # the window slid: never a prefix again
                    self._drop(key)
                return 0, None
            self._drop(key)
            self.hits += 1
            self.reused_tokens += reuse
        entry.row.length = reuse
        return reuse, entry.row

    def put(self, key: str, ids: Sequence[int], row: RowKV, ticket: int) -> bool:
        """Keep `row` (not copied) as the conversation's prefix, evicting the least recently
        used; False (and nothing kept) when it does not fit or the conversation was forgotten
        after `ticket` was taken."""
        nbytes = self._nbytes(len(ids))
        with self._lock:
            self._drop(key)
            if nbytes > self.max_bytes or not ids or self._forgotten_since(key, ticket):
                return False
            while self._entries and self.bytes_used + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = _Entry(tuple(ids), row, nbytes)
            self.bytes_used += nbytes
        return True

    def _nbytes(self, tokens: int) -> int:
        return self.layout.resident_bytes(tokens) if self.layout is not None else tokens

    def anchor(self, key: str) -> tuple[int, ...]:
        with self._lock:
            return self._anchors.get(key, ())

    def set_anchor(self, key: str, prompt: Sequence[int], ticket: int) -> None:
        with self._lock:
            if self._forgotten_since(key, ticket):
                return
            self._anchors[key] = tuple(prompt[:ANCHOR_TOKENS])
            self._anchors.move_to_end(key)
            while len(self._anchors) > MAX_ANCHORS:
                self._anchors.popitem(last=False)

    def forget(self, key: str) -> None:
        """Drop the conversation `key`'s entry and anchor; for a channel key
        ("platform:channel") every conversation inside it ("platform:channel#...") too."""
        inside = key + "#"
        with self._lock:
            for name in [k for k in self._entries if k == key or k.startswith(inside)]:
                self._drop(name)
            for name in [k for k in self._anchors if k == key or k.startswith(inside)]:
                del self._anchors[name]
            self._forgotten[key] = next(self._clock)

    def prune(self, oldest_open_ticket: int | None) -> None:
        """Forget the forget times no request in flight can be older than (the worker calls
        this with the oldest ticket it still holds, None when it holds none)."""
        with self._lock:
            if not self._forgotten:
                return
            if oldest_open_ticket is None:
                self._forgotten.clear()
            else:
                self._forgotten = {k: t for k, t in self._forgotten.items()
                                   if t > oldest_open_ticket}

    def _forgotten_since(self, key: str, ticket: int) -> bool:
        channel = conversation_channel(key)
        return (self._forgotten.get(key, 0) > ticket
                or (channel != key and self._forgotten.get(channel, 0) > ticket))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes
