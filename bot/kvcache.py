"""KV caches for the batching generator: each channel's prefix kept between turns, and the
growable left-padded cache one decode batch shares.

`PrefixCache` keeps, per channel, the token ids the model last saw and their keys/values
(one `[1, heads, len, head_dim]` pair per layer), LRU-evicted to stay within a byte bound. It
also keeps each channel's window anchor (the first tokens of its last prompt, see
`bot.prompt.build_window`). It is thread-safe: the worker reads and writes it, the event loop
calls `forget` on /reset, /forget and settings changes.

`BatchCache` is a transformers `DynamicCache` whose layers write new tokens into
preallocated buffers (no copy of the whole cache per decode step); rows are left-padded and
the batch is rebuilt only when a row joins or leaves.
"""

from __future__ import annotations

import itertools
import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import Cache, DynamicCache, DynamicLayer

KV = tuple[tuple[torch.Tensor, torch.Tensor], ...]  # per layer (keys, values), [B, H, T, D]
ANCHOR_TOKENS = 32
MAX_ANCHORS = 10_000


def kv_nbytes(kv: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in kv)


@dataclass(frozen=True, slots=True)
class CachedPrefix:
    ids: tuple[int, ...]
    kv: KV  # [1, H, len(ids), D] per layer, contiguous, owned by the cache
    nbytes: int


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class PrefixCache:
    """Per-channel (ids, KV) of the last generation, bounded in bytes, least recently used
    evicted first. `max_bytes <= 0` disables it (nothing is stored)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes_used = 0
        self._entries: OrderedDict[str, CachedPrefix] = OrderedDict()
        self._anchors: OrderedDict[str, tuple[int, ...]] = OrderedDict()
        self._forgotten: dict[str, int] = {}
        self._clock = itertools.count(1)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: str) -> bool:
        return key in self._entries

    def ticket(self) -> int:
        """Taken when a request starts; `store` refuses results of requests that started
        before the channel was forgotten."""
        return next(self._clock)

    def lookup(self, key: str, prompt: Sequence[int]) -> tuple[int, KV | None]:
        """How many leading tokens of `prompt` have cached keys/values (always leaving at
        least one token to run, for the next token's logits) and those keys/values."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return 0, None
            self._entries.move_to_end(key)
        reuse = min(common_prefix(entry.ids, prompt), len(prompt) - 1)
        if reuse <= 0:
            return 0, None
        return reuse, tuple((k[:, :, :reuse], v[:, :, :reuse]) for k, v in entry.kv)

    def store(self, key: str, ids: Sequence[int], kv: KV, ticket: int) -> bool:
        """Keep `kv` (copied) as the channel's prefix, evicting the least recently used."""
        nbytes = kv_nbytes(kv)
        if nbytes > self.max_bytes or not ids:
            with self._lock:
                self._drop(key)
            return False
        entry = CachedPrefix(tuple(ids), tuple((k.contiguous().clone(), v.contiguous().clone())
                                               for k, v in kv), nbytes)
        with self._lock:
            if self._forgotten.get(key, 0) > ticket:
                return False
            self._drop(key)
            while self._entries and self.bytes_used + nbytes > self.max_bytes:
                self._drop(next(iter(self._entries)))
            self._entries[key] = entry
            self.bytes_used += nbytes
        return True

    def anchor(self, key: str) -> tuple[int, ...]:
        with self._lock:
            return self._anchors.get(key, ())

    def set_anchor(self, key: str, prompt: Sequence[int], ticket: int) -> None:
        with self._lock:
            if self._forgotten.get(key, 0) > ticket:
                return
            self._anchors[key] = tuple(prompt[:ANCHOR_TOKENS])
            self._anchors.move_to_end(key)
            while len(self._anchors) > MAX_ANCHORS:
                self._anchors.popitem(last=False)

    def forget(self, key: str) -> None:
        with self._lock:
            self._drop(key)
            self._anchors.pop(key, None)
            self._forgotten[key] = next(self._clock)

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key, None)
        if entry is not None:
            self.bytes_used -= entry.nbytes


class _BufferLayer(DynamicLayer):
    """A `DynamicLayer` over a preallocated `[B, H, capacity, D]` buffer: `update` writes the
    new tokens in place; `keys`/`values` are views of the filled part."""

    def __init__(self, keys: torch.Tensor, values: torch.Tensor, length: int):
        super().__init__()
        self.kbuf, self.vbuf, self.length = keys, values, length
        self.dtype, self.device = keys.dtype, keys.device
        self.is_initialized = True
        self._view()

    def _view(self) -> None:
        self.keys = self.kbuf[:, :, :self.length]
        self.values = self.vbuf[:, :, :self.length]

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        end = self.length + key_states.shape[-2]
        if end > self.kbuf.shape[2]:
            self.kbuf = _grow(self.kbuf, end)
            self.vbuf = _grow(self.vbuf, end)
        self.kbuf[:, :, self.length:end] = key_states
        self.vbuf[:, :, self.length:end] = value_states
        self.length = end
        self._view()
        return self.keys, self.values


def _grow(buf: torch.Tensor, needed: int) -> torch.Tensor:
    bigger = buf.new_zeros((*buf.shape[:2], max(needed, 2 * buf.shape[2]), buf.shape[3]))
    bigger[:, :, :buf.shape[2]] = buf
    return bigger


class BatchCache(DynamicCache):
    """The decode batch's cache: rows left-padded to a common length `length`, `mask` [B,
    capacity] marks real positions (1) and padding (0)."""

    def __init__(self, layers: list[_BufferLayer], mask: torch.Tensor):
        Cache.__init__(self, layers=layers)
        self.mask = mask

    @property
    def length(self) -> int:
        return self.layers[0].length

    @classmethod
    def from_rows(cls, rows: Sequence[KV], lengths: Sequence[int], headroom: int) -> "BatchCache":
        """Left-pad each row's `[1, H, len, D]` (or `[H, len, D]`) keys/values to the longest
        and stack them, with room for `headroom` more tokens before the buffer grows."""
        longest = max(lengths)
        capacity = longest + max(headroom, 1)
        first = rows[0][0][0]
        heads, dim = first.shape[-3], first.shape[-1]
        mask = torch.zeros((len(rows), capacity), dtype=torch.long, device=first.device)
        layers = []
        for layer in range(len(rows[0])):
            kbuf = first.new_zeros((len(rows), heads, capacity, dim))
            vbuf = first.new_zeros((len(rows), heads, capacity, dim))
            for i, (kv, n) in enumerate(zip(rows, lengths)):
                k, v = kv[layer]
                kbuf[i, :, longest - n:longest] = k.reshape(heads, n, dim)
                vbuf[i, :, longest - n:longest] = v.reshape(heads, n, dim)
            layers.append(_BufferLayer(kbuf, vbuf, longest))
        for i, n in enumerate(lengths):
            mask[i, longest - n:longest] = 1
        return cls(layers, mask)

    def row(self, index: int, n: int) -> KV:
        """Row `index`'s last `n` positions (its real tokens), as `[1, H, n, D]` views."""
        end = self.length
        return tuple((layer.kbuf[index:index + 1, :, end - n:end],
                      layer.vbuf[index:index + 1, :, end - n:end]) for layer in self.layers)

    def step_mask(self) -> torch.Tensor:
        """Mark the next column real for every row and return the mask up to it."""
        end = self.length
        if end + 1 > self.mask.shape[1]:
            grown = self.mask.new_zeros((self.mask.shape[0], max(end + 1, 2 * end)))
            grown[:, :self.mask.shape[1]] = self.mask
            self.mask = grown
        self.mask[:, end] = 1
        return self.mask[:, :end + 1]
