"""How long fetching a group message's context takes in a busy channel (issue 14).

A SQLite database (the default store) with one channel of 100,000 turns from 200 users, who
each talk to the bot in their own reply chains, plus one chain 200 replies deep. Timed through
the real `SQLAlchemyStore` (SQLAlchemy + aiosqlite, what the bot runs):

- chain:    walking the 200-deep chain from its newest message (`store.chain`, one recursive
            query), the context of a message in `chain` scope;
- user:     a user's latest 64 turns in the channel (`store.recent(conversation=...)`),
            the context in `user` scope;
- channel:  the channel's latest 64 turns (`store.recent`), the context in `channel` scope.

    .venv/bin/python bench/bench_context.py [--turns 100000] [--depth 200] [--runs 500]

Target: p99 under 5 ms for each.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from sqlalchemy import insert  # noqa: E402

from storage.models import turns  # noqa: E402
from storage.store import SQLAlchemyStore  # noqa: E402


async def fill(store: SQLAlchemyStore, count: int, depth: int, users: int) -> int:
    """`count` turns in channel "bench": exchanges of `users` users, each user's turns chained
    (user -> bot answer -> user ...), and one chain `depth` turns deep at the end. Returns the
    id of that chain's newest turn."""
    now = datetime.now(timezone.utc)
    rng = random.Random(0)
    last: dict[int, int] = {}
    rows = []
    next_id = 1
    for i in range(count - depth):
        author = rng.randrange(users)
        role = "user" if i % 2 == 0 else "bot"
        rows.append(dict(id=next_id, platform="telegram", channel="bench",
                         conversation=f"u:{author}", seq=next_id, role=role,
                         text=f"turn {next_id} " + "words " * 8, author_id=str(author),
                         author_name=f"user{author}", message_id=str(next_id), token_ids=None,
                         in_reply_to=None, state="answered" if role == "user" else "done",
                         parent_id=last.get(author), created_at=now))
        last[author] = next_id
        next_id += 1
    parent = None
    for _ in range(depth):
        rows.append(dict(id=next_id, platform="telegram", channel="bench",
                         conversation="u:deep", seq=next_id, role="user",
                         text=f"deep {next_id}", author_id="deep", author_name="deep",
                         message_id=str(next_id), token_ids=None, in_reply_to=None,
                         state="answered", parent_id=parent, created_at=now))
        parent = next_id
        next_id += 1

    async def work(conn) -> None:
        for start in range(0, len(rows), 5000):
            await conn.execute(insert(turns), rows[start:start + 5000])

    await store._run("bench fill", work)
    return parent


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


async def timed(runs: int, call) -> dict[str, float]:
    for _ in range(20):  # warm caches and the connection pool
        await call()
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        await call()
        times.append((time.perf_counter() - start) * 1000)
    return {"p50_ms": round(statistics.median(times), 3), "p99_ms": round(percentile(times, 0.99), 3),
            "max_ms": round(max(times), 3)}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--turns", type=int, default=100_000)
    parser.add_argument("--depth", type=int, default=200)
    parser.add_argument("--users", type=int, default=200)
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        store = SQLAlchemyStore(f"sqlite+aiosqlite:///{folder}/bench.db")
        await store.start()
        try:
            started = time.perf_counter()
            leaf = await fill(store, args.turns, args.depth, args.users)
            filled = time.perf_counter() - started
            assert len(await store.chain(leaf, args.depth)) == args.depth
            results = {
                "chain": await timed(args.runs, lambda: store.chain(leaf, args.depth)),
                "user": await timed(args.runs, lambda: store.recent(
                    "telegram", "bench", 64, conversation="u:7")),
                "channel": await timed(args.runs, lambda: store.recent("telegram", "bench",
                                                                       64)),
            }
        finally:
            await store.stop()
    print(f"context fetch, SQLite, {args.turns:,} turns in one channel "
          f"({args.users} users), {args.runs} runs each (filled in {filled:.1f} s)")
    print(f"{'context':<10} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}")
    labels = {"chain": f"chain ({args.depth} deep)", "user": "user (64)",
              "channel": "channel (64)"}
    for name, figures in results.items():
        print(f"{labels[name]:<10} {figures['p50_ms']:>8.2f} {figures['p99_ms']:>8.2f} "
              f"{figures['max_ms']:>8.2f}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"turns": args.turns, "depth": args.depth,
                                         "results": results}, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
