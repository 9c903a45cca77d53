"""Shared state for several bot instances, in Redis: rate limits and per-channel locks.

`RedisLimiter` is the `bot.ports.Limiter` on the `limits` library's async Redis storage
(redis-py client, moving-window strategy): every instance counts against the same windows, so
a user's burst is limited across all of them together. `RedisChannelLock` is the
`bot.ports.ChannelLock` on redis-py's asyncio `Lock`: at most one generation per channel
across instances. Its lease (`lease` seconds) is renewed while held, so a long generation
keeps it; the lease of a killed instance expires by itself and the channel is served again.

Keys: every key starts with `prefix` (DIALOGBOT_REDIS_PREFIX), so several bots (or tests) can
share one Redis database. Both classes may share one connection pool (`RedisState`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator

from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis import asyncio as aioredis
from redis.exceptions import LockError, RedisError

from bot.limits import MemoryChannelLock

log = logging.getLogger(__name__)


def _limits_uri(url: str) -> str:
    """redis://... -> async+redis://... (the `limits` storage scheme)."""
    return url if url.startswith("async+") else "async+" + url


def _item(rate: float, period: float) -> RateLimitItemPerSecond:
    """`limits` counts whole hits in whole seconds: rate is rounded down (at least 1) and the
    period up, which is never more permissive than asked."""
    return RateLimitItemPerSecond(max(1, int(rate)), max(1, math.ceil(period)))


class RedisState:
    """One connection pool for the limiter and the lock; `close()` releases it."""

    def __init__(self, url: str, prefix: str = "dialogbot"):
        self.url = url
        self.prefix = prefix
        self.client = aioredis.Redis.from_url(url, health_check_interval=30)

    async def ping(self) -> bool:
        return bool(await self.client.ping())

    async def close(self) -> None:
        await self.client.aclose()


class RedisLimiter:
    """`bot.ports.Limiter` shared by every instance (moving window per key)."""

    def __init__(self, state: RedisState, *, min_sleep: float = 0.05):
        self.state = state
        self.min_sleep = min_sleep
        self._storage = RedisStorage(_limits_uri(state.url), implementation="redispy",
                                     key_prefix=f"{state.prefix}:limits",
                                     connection_pool=state.client.connection_pool)
        self._limiter = MovingWindowRateLimiter(self._storage)

    async def start(self) -> None:
        """Fails early (redis.exceptions.ConnectionError) when Redis cannot be reached."""
        await self.state.ping()

    async def stop(self) -> None:
        """Closes the shared pool: stop the limiter last (after every lock holder)."""
        await self.state.close()

    async def admit(self, key: str, rate: float, period: float) -> bool:
        return await self._limiter.hit(_item(rate, period), key)

    async def pace(self, key: str, rate: float, period: float) -> None:
        """Wait until one more hit fits in the window, sleeping until the window's oldest hit
        expires (`get_window_stats().reset_time`) between tries."""
        item = _item(rate, period)
        while not await self._limiter.hit(item, key):
            stats = await self._limiter.get_window_stats(item, key)
            await asyncio.sleep(max(self.min_sleep, stats.reset_time - time.time()))

    async def clear(self, key: str, rate: float, period: float) -> None:
        await self._limiter.clear(_item(rate, period), key)


class RedisChannelLock:
    """`bot.ports.ChannelLock` across instances: an in-process lock per key first (tasks of
    one instance queue in order without polling Redis), then a Redis lock with a lease.

    The lease is renewed every `lease / 3` seconds while held (`reacquire`). If renewal finds
    the lock lost (Redis flushed, or this process was frozen longer than the lease), a warning
    is logged and the holder keeps running: the reply still goes out, at worst next to
    another instance's."""

    def __init__(self, state: RedisState, lease: float = 30.0, poll: float = 0.05):
        self.state = state
        self.lease = lease
        self.poll = poll
        self._local = MemoryChannelLock()

    def key(self, channel_key: str) -> str:
        return f"{self.state.prefix}:lock:{channel_key}"

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        async with self._local.hold(key):
            lock = self.state.client.lock(self.key(key), timeout=self.lease, sleep=self.poll)
            await lock.acquire()
            log.debug("lock %s acquired", key)
            done = asyncio.Event()
            keeper = asyncio.create_task(self._renew(lock, key, done), name=f"lease-{key}")
            try:
                yield
            finally:
                # stopped by an event, not cancelled: a redis command cut off by cancellation
                # can swallow it, and the keeper would renew a finished holder's lease forever
                done.set()
                try:
                    await asyncio.wait_for(keeper, self.lease)
                except TimeoutError:
                    log.warning("lease keeper for %s did not stop", key)
                await self._release(lock, key)
                log.debug("lock %s released", key)

    async def _renew(self, lock, key: str, done: asyncio.Event) -> None:  # noqa: ANN001
        """Every lease/3 seconds until `done`: reset the lease (redis-py `reacquire`)."""
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(done.wait(), self.lease / 3)
            if done.is_set():
                return
            try:
                await lock.reacquire()
            except LockError:
                log.warning("lock for %s was lost (lease %gs ran out)", key, self.lease)
                return
            except RedisError as exc:
                log.warning("could not renew the lock for %s: %s", key, type(exc).__name__)

    @staticmethod
    async def _release(lock, key: str) -> None:  # noqa: ANN001
        try:
            await lock.release()
        except LockError:
            log.warning("lock for %s had already expired when released", key)
        except RedisError as exc:  # the lease expires by itself
            log.warning("could not release the lock for %s: %s", key, type(exc).__name__)
