"""SQLAlchemyStore against SQLite (always) and PostgreSQL (when TEST_DATABASE_URL is set)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import sqlite3
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from bot.errors import StoreError
from bot.events import Forgotten, Role, Turn, TurnState
from storage.store import SQLAlchemyStore, redact_url

PG_URL = os.environ.get("TEST_DATABASE_URL", "")
PG_SKIP = ("PostgreSQL variant: set TEST_DATABASE_URL "
           "(e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test) to run it")


async def empty_postgres(url: str) -> None:
    """Drop what the migrations create, so the next store migrates from nothing."""
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.execute(text(
                "DROP TABLE IF EXISTS sent_parts, turns, channel_settings, alembic_version CASCADE"))
    finally:
        await engine.dispose()


async def fresh_url(kind: str, tmp_path: Path) -> str:
    if kind == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'db' / 'store.db'}"
    if not PG_URL:
        pytest.skip(PG_SKIP)
    await empty_postgres(PG_URL)
    return PG_URL


@pytest.fixture(params=["sqlite", "postgresql"])
async def store(request: pytest.FixtureRequest, tmp_path: Path):
    s = SQLAlchemyStore(await fresh_url(request.param, tmp_path), retries=2, backoff=0.01)
    await s.start()
    yield s
    await s.stop()


_message_ids = itertools.count(1)


def user(text: str, channel: str = "c1", author: str = "u1", platform: str = "telegram",
         author_name: str | None = None, **kw) -> Turn:
    kw.setdefault("message_id", f"m-{next(_message_ids)}")
    return Turn(platform, channel, Role.USER, text, author, author_name or f"name-{author}",
                state=TurnState.PENDING, **kw)


def bot(text: str, channel: str = "c1", platform: str = "telegram", **kw) -> Turn:
    return Turn(platform, channel, Role.BOT, text, **kw)


async def texts(store: SQLAlchemyStore, platform: str, channel: str) -> list[str]:
    return [t.text for t in await store.recent(platform, channel, 1000)]


# --- history ---------------------------------------------------------------------------------
async def test_recent_returns_newest_turns_oldest_first_up_to_limit(store):
    for i in range(7):
        await store.append(user(f"t{i}") if i % 2 == 0 else bot(f"t{i}"))
    got = await store.recent("telegram", "c1", 3)
    assert [t.text for t in got] == ["t4", "t5", "t6"]
    assert [t.role for t in got] == [Role.USER, Role.BOT, Role.USER]
    assert all(isinstance(t, Turn) for t in got)
    assert await texts(store, "telegram", "c1") == [f"t{i}" for i in range(7)]
    assert await store.recent("telegram", "c1", 0) == []


async def test_append_returns_the_turn_with_its_new_id_and_every_field_round_trips(store):
    sent = user("hello", author="42", message_id="9001")
    stored = await store.append(sent)
    assert stored.id is not None and stored.text == "hello"
    [back] = await store.recent("telegram", "c1", 5)
    assert back == stored
    assert (back.author_id, back.author_name, back.message_id, back.state) == (
        "42", "name-42", "9001", TurnState.PENDING)


async def test_channels_and_platforms_are_isolated(store):
    await store.append(user("tg-100", channel="100", platform="telegram"))
    await store.append(user("dc-100", channel="100", platform="discord"))
    await store.append(user("tg-200", channel="200", platform="telegram"))
    assert await texts(store, "telegram", "100") == ["tg-100"]
    assert await texts(store, "discord", "100") == ["dc-100"]
    assert await texts(store, "telegram", "200") == ["tg-200"]
    assert await texts(store, "discord", "200") == []


async def test_reset_clears_only_its_channel_and_keeps_its_settings(store):
    first = await store.append(user("a", channel="100"))
    await store.add_reply(bot("b", channel="100"), [first.id])
    await store.append(user("other channel", channel="200"))
    await store.append(user("other platform", channel="100", platform="discord"))
    await store.set_settings("telegram", "100", {"temperature": 0.5})

    assert await store.reset("telegram", "100") == 2
    assert await texts(store, "telegram", "100") == []
    assert await texts(store, "telegram", "200") == ["other channel"]
    assert await texts(store, "discord", "100") == ["other platform"]
    assert await store.get_settings("telegram", "100") == {"temperature": 0.5}
    assert await store.reset("telegram", "100") == 0


async def test_forget_removes_one_users_turns_everywhere_on_one_platform_and_the_replies_to_them(
        store):
    async def exchange(author, channel, platform="telegram"):
        asked = await store.append(
            user(f"{author}@{platform}/{channel}", channel, author, platform))
        await store.add_reply(bot(f"re {author}@{platform}/{channel}", channel, platform),
                              [asked.id])

    await exchange("alice", "c1")
    await exchange("bob", "c1")
    await exchange("alice", "c2")
    await exchange("alice", "c1", platform="discord")  # same author id, other platform
    await store.append(bot("bot says hi unprompted", "c1"))

    assert await store.forget("telegram", "alice") == Forgotten(2, ("c1", "c2"))
    assert await texts(store, "telegram", "c1") == [
        "bob@telegram/c1", "re bob@telegram/c1", "bot says hi unprompted"]
    assert await texts(store, "telegram", "c2") == []
    assert await texts(store, "discord", "c1") == ["alice@discord/c1", "re alice@discord/c1"]
    assert await store.forget("telegram", "alice") == Forgotten(0)


async def test_count_by_platform_and_channel(store):
    assert await store.count() == 0
    for platform, channel in [("telegram", "1"), ("telegram", "1"), ("telegram", "2"),
                              ("discord", "1")]:
        await store.append(user("x", channel, platform=platform))
    assert await store.count() == 4
    assert await store.count("telegram") == 3
    assert await store.count("telegram", "1") == 2
    assert await store.count("discord", "1") == 1
    assert await store.count("discord", "2") == 0


async def test_pending_mark_and_add_reply(store):
    a = await store.append(user("a", channel="1"))
    b = await store.append(user("b", channel="2"))
    c = await store.append(user("c", channel="1"))
    await store.append(bot("not a user turn", channel="1", state=TurnState.DONE))
    assert [t.id for t in await store.pending()] == [a.id, b.id, c.id]

    reply = await store.add_reply(bot("answer to a and c", channel="1"), [a.id, c.id])
    assert reply.id is not None and reply.in_reply_to == c.id
    assert [t.id for t in await store.pending()] == [b.id]
    by_id = {t.id: t for t in await store.recent("telegram", "1", 10)}
    assert by_id[a.id].state == by_id[c.id].state == TurnState.ANSWERED
    assert by_id[reply.id].in_reply_to == c.id and by_id[reply.id].state == TurnState.DONE

    await store.mark([b.id], TurnState.SKIPPED)
    assert await store.pending() == []
    [skipped] = await store.recent("telegram", "2", 1)
    assert skipped.state == TurnState.SKIPPED
    await store.mark([b.id], "pending")
    assert [t.id for t in await store.pending()] == [b.id]
    await store.mark([], "answered")  # nothing to do
    with pytest.raises(StoreError):
        await store.mark([b.id], "bogus")


async def test_add_reply_without_answers_appends_a_plain_bot_turn(store):
    reply = await store.add_reply(bot("hello"), [])
    assert reply.id is not None and reply.in_reply_to is None
    assert await texts(store, "telegram", "c1") == ["hello"]


async def test_reply_to_a_turn_deleted_while_generating_is_not_stored(store):
    asked = await store.append(user("secret"))
    await store.reset("telegram", "c1")
    reply = await store.add_reply(bot("answer"), [asked.id])
    assert reply.id is None
    assert await store.count() == 0


async def test_token_ids_round_trip(store):
    ids = (15496, 995, 0, 50255)
    await store.append(bot("Hello world", token_ids=ids))
    await store.append(bot("no ids"))
    await store.append(bot("empty ids", token_ids=()))
    got = await store.recent("telegram", "c1", 3)
    assert [t.token_ids for t in got] == [ids, None, ()]


async def test_timestamps_come_back_timezone_aware_utc(store):
    plus5 = timezone(timedelta(hours=5))
    when = datetime(2024, 3, 1, 17, 30, 15, 123456, tzinfo=plus5)
    naive = datetime(2024, 3, 1, 12, 0, 0)
    await store.append(user("zoned", created_at=when))
    await store.append(user("naive", created_at=naive))
    zoned_back, naive_back = await store.recent("telegram", "c1", 2)
    assert zoned_back.created_at == when
    assert zoned_back.created_at.utcoffset() == timedelta(0)
    assert zoned_back.created_at.hour == 12
    assert naive_back.created_at == naive.replace(tzinfo=timezone.utc)
    [pending_back, _] = await store.pending()
    assert pending_back.created_at.tzinfo is not None


@pytest.mark.parametrize("body", [
    "x" * 19_990 + " end.",
    "🙂👍🏽 👨‍👩‍👧 שלום עולם مرحبا بالعالم ‏RTL‎ e\u0301 ☃\n\ttabs and\nlines 𝕏 \u200d",
])
async def test_long_and_unicode_text_round_trips_exactly(store, body):
    sent = await store.append(user(body, author="אבי", author_name="🙂 Ави"))
    [back] = await store.recent("telegram", "c1", 1)
    assert back.text == body and back.author_id == "אבי" and back.author_name == "🙂 Ави"
    assert back == sent


async def test_settings_replace_and_clear(store):
    assert await store.get_settings("telegram", "1") == {}
    await store.set_settings("telegram", "1", {"temperature": 0.5, "top_k": 10, "note": "é🙂"})
    await store.set_settings("telegram", "1", {"top_k": 3})
    await store.set_settings("discord", "1", {"top_p": 0.7})
    assert await store.get_settings("telegram", "1") == {"top_k": 3}
    assert await store.get_settings("discord", "1") == {"top_p": 0.7}
    await store.set_settings("telegram", "1", {})
    assert await store.get_settings("telegram", "1") == {}
    assert await store.get_settings("discord", "1") == {"top_p": 0.7}
    with pytest.raises(StoreError):
        await store.set_settings("telegram", "1", {"bad": object()})


async def test_concurrent_appends_all_land_with_distinct_ids(store):
    made = await asyncio.gather(*(store.append(user(f"m{i}", channel=str(i % 3)))
                                  for i in range(30)))
    assert len({t.id for t in made}) == 30
    assert await store.count() == 30


# --- lifecycle and SQLite specifics ----------------------------------------------------------
async def test_start_and_stop_are_idempotent_and_methods_need_start(tmp_path):
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{tmp_path / 'x.db'}")
    with pytest.raises(StoreError, match="not started"):
        await s.count()
    await s.start()
    await s.start()
    await s.append(user("kept"))
    await s.stop()
    await s.stop()
    with pytest.raises(StoreError, match="not started"):
        await s.recent("telegram", "c1", 5)
    await s.start()
    assert await texts(s, "telegram", "c1") == ["kept"]
    await s.stop()


async def test_sqlite_folder_is_created_relative_to_cwd(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    s = SQLAlchemyStore("sqlite+aiosqlite:///data/nested/bot.db")
    await s.start()
    await s.append(user("hi"))
    await s.stop()
    assert (tmp_path / "data" / "nested" / "bot.db").is_file()


async def test_sqlite_runs_in_wal_mode_with_pragmas(tmp_path):
    path = tmp_path / "wal.db"
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{path}")
    await s.start()
    await s.append(user("hi"))
    async with s._engine.connect() as conn:  # the store's own connections
        pragmas = {name: await conn.scalar(text(f"PRAGMA {name}"))
                   for name in ("journal_mode", "busy_timeout", "synchronous", "foreign_keys")}
    await s.stop()
    assert pragmas == {"journal_mode": "wal", "busy_timeout": 5000, "synchronous": 1,
                       "foreign_keys": 1}
    with sqlite3.connect(path) as raw:  # WAL is recorded in the file itself
        assert raw.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def lock_exclusively(path: Path) -> sqlite3.Connection:
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    return blocker


async def test_a_brief_lock_is_waited_out(tmp_path, caplog):
    path = tmp_path / "lock.db"
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{path}")  # busy_timeout 5 s
    await s.start()
    blocker = lock_exclusively(path)
    asyncio.get_running_loop().call_later(0.3, blocker.execute, "COMMIT")
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        stored = await s.append(user("after the lock"))
    assert stored.id is not None and not caplog.records
    blocker.close()
    await s.stop()


async def test_a_locked_database_is_retried_until_it_frees(tmp_path, caplog):
    path = tmp_path / "lock.db"
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{path}", retries=8, backoff=0.05,
                        busy_timeout_ms=50)
    await s.start()
    blocker = lock_exclusively(path)
    asyncio.get_running_loop().call_later(0.4, blocker.execute, "COMMIT")
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        stored = await s.append(user("after the lock"))
    retries = [r for r in caplog.records if "retry" in r.getMessage()]
    assert 1 <= len(retries) <= 8 and "locked" in retries[0].getMessage()
    assert await texts(s, "telegram", "c1") == ["after the lock"] and stored.id is not None
    blocker.close()
    await s.stop()


async def test_a_database_locked_past_the_retries_raises_store_error(tmp_path, caplog):
    path = tmp_path / "lock.db"
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{path}", retries=2, backoff=0.01,
                        busy_timeout_ms=50)
    await s.start()
    blocker = lock_exclusively(path)
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        with pytest.raises(StoreError) as err:
            await s.append(user("never"))
    message = str(err.value)
    assert "locked" in message and "after 3 attempts" in message and "\n" not in message
    assert len([r for r in caplog.records if "retry" in r.getMessage()]) == 2
    blocker.execute("ROLLBACK")
    blocker.close()
    await s.append(user("works again"))
    assert await texts(s, "telegram", "c1") == ["works again"]
    await s.stop()


async def test_a_non_transient_error_is_not_retried(tmp_path, caplog):
    path = tmp_path / "x.db"
    s = SQLAlchemyStore(f"sqlite+aiosqlite:///{path}", retries=3, backoff=0.01)
    await s.start()
    with sqlite3.connect(path) as raw:
        raw.execute("DROP TABLE channel_settings")
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        with pytest.raises(StoreError, match="no such table"):
            await s.get_settings("telegram", "1")
    assert not caplog.records
    await s.stop()


# --- PostgreSQL specifics --------------------------------------------------------------------
async def test_unreachable_postgres_raises_store_error_without_the_password(caplog):
    s = SQLAlchemyStore("postgresql+asyncpg://bot:Sup3r-Secret-pw@127.0.0.1:1/dialogbot",
                        retries=1, backoff=0.01)
    with caplog.at_level(logging.WARNING, logger="storage.store"):
        with pytest.raises(StoreError) as err:
            await s.start()
    message = str(err.value)
    assert "Sup3r-Secret-pw" not in message and "Sup3r-Secret-pw" not in caplog.text
    assert "bot:***@127.0.0.1:1" in message and "\n" not in message
    assert len(caplog.records) == 1 and "retry 1 of 1" in caplog.records[0].getMessage()
    with pytest.raises(StoreError, match="not started"):
        await s.count()


async def test_a_dropped_postgres_connection_is_replaced(tmp_path):
    if not PG_URL:
        pytest.skip(PG_SKIP)
    await empty_postgres(PG_URL)
    s = SQLAlchemyStore(PG_URL, retries=2, backoff=0.01)
    await s.start()
    await s.append(user("before"))
    async with s._engine.connect() as conn:
        pid = await conn.scalar(text("SELECT pg_backend_pid()"))
    killer = create_async_engine(PG_URL)
    async with killer.begin() as conn:
        assert await conn.scalar(text("SELECT pg_terminate_backend(:pid)"), {"pid": pid})
    await killer.dispose()
    await s.append(user("after"))
    assert await texts(s, "telegram", "c1") == ["before", "after"]
    await s.stop()


async def test_bad_urls_raise_store_error_on_start():
    for url in ["not a url", "nosuchdb+driver://u:pw123456@h/x", "mysql+aiomysql://u:pw123456@h/x"]:
        with pytest.raises(StoreError) as err:
            await SQLAlchemyStore(url).start()
        assert "pw123456" not in str(err.value) and "\n" not in str(err.value)


def test_redact_url_hides_passwords():
    assert (redact_url("postgresql+asyncpg://bot:pw@db:5432/x")
            == "postgresql+asyncpg://bot:***@db:5432/x")
    assert "s3cr3t" not in redact_url("postgresql://bot@db/x?password=s3cr3t")
    assert redact_url("sqlite+aiosqlite:///data/bot.db") == "sqlite+aiosqlite:///data/bot.db"
    assert redact_url("not a url://u:pw@h") == "not a url://u:***@h"


# --- exactly once: claims, the outbox, settings merges (issue 13) ----------------------------
async def test_claims_at_once_never_share_a_turn(store):
    for i in range(6):
        await store.append(user(f"q{i}", "c9"))
    got = await asyncio.gather(*(store.claim("telegram", "c9", None, f"owner-{i}", 30)
                                 for i in range(4)))
    ids = [t.id for batch in got for t in batch]
    assert len(ids) == len(set(ids)) == 6  # every turn claimed exactly once
    assert await store.claim("telegram", "c9", None, "late", 30) == []


async def test_an_expired_or_dead_claim_is_taken_over_and_add_reply_checks_the_owner(store):
    asked = await store.append(user("hello?", "c8"))
    [mine] = await store.claim("telegram", "c8", None, "a", 0.05)
    assert mine.id == asked.id
    assert await store.claim("telegram", "c8", None, "b", 30) == []  # still a's
    await asyncio.sleep(0.1)
    [taken] = await store.claim("telegram", "c8", None, "b", 30)  # a's lease ran out
    lost = await store.add_reply(bot("from a"), [asked.id], owner="a")
    assert lost.id is None and await store.count("telegram", "c8") == 1
    assert await store.claim("telegram", "c8", None, "c", 30, dead=["b"]) != []
    kept = await store.add_reply(bot("from c", state=TurnState.SENDING), [asked.id], owner="c",
                                 lease=30)
    assert kept.id is not None and kept.seq == asked.seq


async def test_the_outbox_keeps_a_reply_until_every_part_is_confirmed(store):
    asked = await store.append(user("long question", "c7", message_id="41"))
    [claimed] = await store.claim("telegram", "c7", None, "a", 30)
    reply = await store.add_reply(bot("answer", "c7", state=TurnState.SENDING), [claimed.id],
                                  owner="a", lease=0.05)
    await store.confirm_part(reply.id, 0, "900", last=False)
    await asyncio.sleep(0.1)  # the sender died: its lease ran out
    [out] = await store.claim_outbox(["telegram"], "b", 30)
    assert out.turn.id == reply.id and out.sent == ("900",) and out.reply_to == "41"
    assert await store.claim_outbox(["telegram"], "c", 30) == []  # b holds it now
    await store.confirm_part(reply.id, 1, "901", last=True)
    assert await store.sent_ids(reply.id) == ["900", "901"]
    assert (await store.recent("telegram", "c7", 5))[1].state is TurnState.DONE
    assert await store.claim_outbox(["telegram"], "c", 30) == []
    assert asked.id == claimed.id


async def test_a_message_delivered_twice_is_stored_once(store):
    first = await store.append(user("hi", "c6", message_id="77"))
    again = await store.append(user("hi", "c6", message_id="77"))
    assert again.id == first.id and await store.count("telegram", "c6") == 1
    other = await store.append(user("hi", "c5", message_id="77"))  # another chat's 77
    assert other.id != first.id


async def test_settings_changed_at_once_are_merged_not_lost(store):
    await asyncio.gather(*(store.update_settings("telegram", "c4", {f"k{i}": i})
                           for i in range(8)))
    assert await store.get_settings("telegram", "c4") == {f"k{i}": i for i in range(8)}
    assert await store.update_settings("telegram", "c4", {"k0": None}) == {
        f"k{i}": i for i in range(1, 8)}
    assert await store.update_settings("telegram", "c4", {"x": 1}, clear=True) == {"x": 1}


# --- reply chains (issue 14) -----------------------------------------------------------------
async def test_chains_follow_replies_parts_and_the_authors_last_turn(store):
    a1 = await store.append(user("a1", "g", "a", conversation="u:a"))
    r1 = await store.add_reply(bot("r1", "g", conversation="u:a"), [a1.id])
    await store.confirm_part(r1.id, 0, "p0", last=False)
    await store.confirm_part(r1.id, 1, "p1", last=True)
    a2 = await store.append(user("a2", "g", "a", conversation="u:a"))  # replies to nothing
    assert a2.parent_id == r1.id
    b1 = await store.append(user("b1", "g", "b", conversation="u:b", reply_to="p1"))
    assert b1.parent_id == r1.id  # the second part of r1 is r1
    q = await store.append(user("q", "g", "b", conversation="u:b", reply_to="unknown",
                                quote="someone else's words", quote_role=Role.USER))
    assert q.parent_id is None and q.quote == "someone else's words"
    assert [t.text for t in await store.chain(b1.id, 10)] == ["a1", "r1", "b1"]
    assert [t.text for t in await store.chain(b1.id, 2)] == ["r1", "b1"]  # newest within limit
    assert (await store.find_message("telegram", "g", "p0")).id == r1.id
    # forgetting a's turns cuts b's chain where it followed them
    await store.forget("telegram", "a")
    assert [t.text for t in await store.chain(b1.id, 10)] == ["b1"]


async def test_a_reply_to_a_bot_message_without_a_recorded_id_is_found_by_its_text(store):
    asked = await store.append(user("hi", "g2", "a", conversation="u:a"))
    said = await store.add_reply(bot("hello @\u2060ann, long\nreply here", "g2",
                                     conversation="u:a"), [asked.id])
    quick = await store.append(user("go on", "g2", "a", conversation="u:a", reply_to="999",
                                    quote="long reply here", quote_role=Role.BOT))
    assert quick.parent_id == said.id and quick.quote is None
    other = await store.append(user("hm", "g2", "a", conversation="u:a", reply_to="998",
                                    quote="not something the bot said", quote_role=Role.BOT))
    assert other.parent_id is None and other.quote == "not something the bot said"
