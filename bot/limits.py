"""In-process rate limits (aiolimiter) and per-channel locks: the default `Limiter` and
`ChannelLock`. Both keep a bounded number of keys (least recently used are dropped)."""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiolimiter import AsyncLimiter


class MemoryLimiter:
    """Leaky-bucket limits per key with aiolimiter; at most `max_keys` buckets are kept."""

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._buckets: OrderedDict[tuple[str, float, float], AsyncLimiter] = OrderedDict()

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        self._buckets.clear()

    def _bucket(self, key: str, rate: float, period: float) -> AsyncLimiter:
        ident = (key, rate, period)
        bucket = self._buckets.get(ident)
        if bucket is None:
            bucket = self._buckets[ident] = AsyncLimiter(rate, period)
            while len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(ident)
        return bucket

    async def admit(self, key: str, rate: float, period: float) -> bool:
        bucket = self._bucket(key, rate, period)
        if not bucket.has_capacity():
            return False
        await bucket.acquire()  # has capacity: returns at once
        return True

    async def pace(self, key: str, rate: float, period: float) -> None:
        await self._bucket(key, rate, period).acquire()


class MemoryChannelLock:
    """One asyncio.Lock per channel key, dropped when nobody holds or waits for it."""

    def __init__(self) -> None:
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}

    @asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(key, (None, 0))
        if lock is None:
            lock = asyncio.Lock()
        self._locks[key] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[key]
            if users <= 1:
                del self._locks[key]
            else:
                self._locks[key] = (lock, users - 1)

    def __len__(self) -> int:
        return len(self._locks)


class NoticeOnce:
    """Remembers who was already told they are limited, so they are told once, not per message.

    `should_notify(key)` is True the first time a key is refused; `clear(key)` once the key is
    admitted again. At most `max_keys` keys are remembered.
    """

    def __init__(self, max_keys: int = 100_000):
        self.max_keys = max_keys
        self._told: OrderedDict[str, None] = OrderedDict()

    def should_notify(self, key: str) -> bool:
        if key in self._told:
            return False
        self._told[key] = None
        while len(self._told) > self.max_keys:
            self._told.popitem(last=False)
        return True

    def clear(self, key: str) -> None:
        self._told.pop(key, None)
