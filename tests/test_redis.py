"""RedisLimiter and RedisChannelLock against the machine's real Redis (TEST_REDIS_URL).

Each "instance" is its own RedisState (its own connection pool), as two processes would be.
Every test writes under a unique key prefix and deletes only those keys."""

from __future__ import annotations

import asyncio
import os
import time
import uuid

import pytest

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
pytestmark = pytest.mark.skipif(not REDIS_URL, reason=(
    "needs Redis: set TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15) to run it"))


@pytest.fixture
async def states():
    """make() -> a new RedisState on the test prefix; the prefix's keys are deleted after."""
    from storage.redis import RedisState

    prefix = f"dialogbot-test-{uuid.uuid4().hex[:12]}"
    made: list[RedisState] = []

    def make() -> RedisState:
        made.append(RedisState(REDIS_URL, prefix))
        return made[-1]

    yield make
    cleaner = RedisState(REDIS_URL, prefix)
    keys = [k async for k in cleaner.client.scan_iter(match=f"{prefix}*")]
    if keys:
        await cleaner.client.delete(*keys)
    for state in [*made, cleaner]:
        await state.close()


async def test_limits_are_shared_by_instances(states):
    from storage.redis import RedisLimiter

    one, two = RedisLimiter(states()), RedisLimiter(states())
    await one.start()
    await two.start()
    admitted = [await (one if i % 2 else two).admit("telegram:42", 3, 60) for i in range(8)]
    assert admitted == [True] * 3 + [False] * 5
    assert await one.admit("telegram:43", 3, 60)  # another key has its own window
    # a different rate on the same key is a different limit
    assert await two.admit("telegram:42", 10, 60)


async def test_pace_waits_for_the_window_across_instances(states):
    from storage.redis import RedisLimiter

    one, two = RedisLimiter(states()), RedisLimiter(states())
    start = time.monotonic()
    await one.pace("out:telegram:1", 2, 1)
    await two.pace("out:telegram:1", 2, 1)
    assert time.monotonic() - start < 0.9  # within the rate: no wait
    await one.pace("out:telegram:1", 2, 1)  # the third must wait for the window to move
    assert time.monotonic() - start >= 0.9


async def test_lock_excludes_other_instances_and_other_tasks(states):
    from storage.redis import RedisChannelLock

    locks = [RedisChannelLock(states(), lease=5, poll=0.01) for _ in range(2)]
    inside: list[str] = []
    overlaps = 0
    active = 0

    async def work(lock: RedisChannelLock, name: str) -> None:
        nonlocal active, overlaps
        async with lock.hold("telegram:1"):
            active += 1
            overlaps += active > 1
            inside.append(name)
            await asyncio.sleep(0.05)
            active -= 1

    await asyncio.gather(*(work(locks[i % 2], f"w{i}") for i in range(8)))
    assert overlaps == 0 and sorted(inside) == sorted(f"w{i}" for i in range(8))
    # other channels are not blocked by a held lock
    async with locks[0].hold("telegram:1"):
        async with asyncio.timeout(2):
            async with locks[1].hold("telegram:2"):
                pass


async def test_lease_is_renewed_while_held(states):
    from storage.redis import RedisChannelLock

    holder = RedisChannelLock(states(), lease=1.0, poll=0.02)
    other = RedisChannelLock(states(), lease=1.0, poll=0.02)
    got_it = asyncio.Event()

    async def wait_for_it() -> None:
        async with other.hold("discord:9"):
            got_it.set()

    async with holder.hold("discord:9"):
        waiter = asyncio.create_task(wait_for_it())
        await asyncio.sleep(2.5)  # 2.5 leases: only renewal keeps the lock
        assert not got_it.is_set()
        assert await holder.state.client.pttl(holder.key("discord:9")) > 0
    await asyncio.wait_for(waiter, 2)
    assert got_it.is_set()


async def test_a_dead_holders_lease_expires(states):
    """An instance killed while holding the lock never releases it: its key (what redis-py's
    Lock writes: a token with a millisecond expiry) just runs out."""
    from storage.redis import RedisChannelLock

    lock = RedisChannelLock(states(), lease=30, poll=0.02)
    await lock.state.client.set(lock.key("telegram:5"), "dead-instance-token", px=800)
    start = time.monotonic()
    async with lock.hold("telegram:5"):
        waited = time.monotonic() - start
    assert waited >= 0.6
    assert await lock.state.client.exists(lock.key("telegram:5")) == 0  # released after
