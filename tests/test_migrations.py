"""Alembic migrations: idempotent, in step with storage.models, safe to race at start-up."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import inspect, text
from sqlalchemy.ext.asyncio import create_async_engine

from storage.models import metadata
from storage.store import SQLAlchemyStore, _upgrade_to_head
from tests.test_store import fresh_url, user

pytestmark = pytest.mark.parametrize("kind", ["sqlite", "postgresql"])
TABLES = {"alembic_version", "channel_settings", "turns", "sent_parts"}


def head_revision() -> str:
    from alembic.config import Config
    from alembic.script import ScriptDirectory

    from storage.store import MIGRATIONS

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    return ScriptDirectory.from_config(config).get_current_head()


HEAD = head_revision()


def _schema(sync_conn) -> dict:
    inspector = inspect(sync_conn)
    tables = set(inspector.get_table_names()) & TABLES
    return {t: (sorted(c["name"] for c in inspector.get_columns(t)),
                sorted(i["name"] for i in inspector.get_indexes(t))) for t in tables}


async def _version_and_schema(store: SQLAlchemyStore):
    async with store._engine.connect() as conn:
        versions = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
        return [v[0] for v in versions], await conn.run_sync(_schema)


async def test_migrations_applied_twice_are_a_noop(kind, tmp_path):
    url = await fresh_url(kind, tmp_path)
    first = SQLAlchemyStore(url)
    await first.start()
    await first.append(user("survives"))
    await first.set_settings("telegram", "c1", {"top_k": 5})
    before = await _version_and_schema(first)
    async with first._engine.begin() as conn:  # upgrade again on a migrated database
        await conn.run_sync(_upgrade_to_head)
    await first.stop()

    second = SQLAlchemyStore(url)  # and again through a fresh start
    await second.start()
    assert await _version_and_schema(second) == before
    assert before[0] == [HEAD] and set(before[1]) == TABLES
    assert [t.text for t in await second.recent("telegram", "c1", 5)] == ["survives"]
    assert await second.get_settings("telegram", "c1") == {"top_k": 5}
    await second.stop()


async def test_models_match_the_migrated_schema(kind, tmp_path):
    store = SQLAlchemyStore(await fresh_url(kind, tmp_path))
    await store.start()

    def diff(sync_conn):
        return compare_metadata(MigrationContext.configure(sync_conn), metadata)

    async with store._engine.connect() as conn:
        assert await conn.run_sync(diff) == []
    await store.stop()


async def test_concurrent_starts_on_an_empty_database_both_succeed(kind, tmp_path):
    url = await fresh_url(kind, tmp_path)
    stores = [SQLAlchemyStore(url, retries=2, backoff=0.05) for _ in range(2)]  # two engines
    await asyncio.wait_for(asyncio.gather(*(s.start() for s in stores)), 30)
    await stores[0].append(user("from one"))
    await stores[1].append(user("from two"))
    for s in stores:
        assert [t.text for t in await s.recent("telegram", "c1", 5)] == ["from one", "from two"]
    versions, schema = await _version_and_schema(stores[0])
    assert versions == [HEAD] and set(schema) == TABLES
    await asyncio.gather(*(s.stop() for s in stores))


STARTER = """
import asyncio, sys
from storage.store import SQLAlchemyStore

async def main():
    store = SQLAlchemyStore(sys.argv[1], retries=2, backoff=0.05)
    print("ready", flush=True)
    sys.stdin.readline()  # everything is imported: wait for the starting gun
    await store.start()
    await store.append(__import__("tests.test_store").test_store.user(
        sys.argv[2], message_id=sys.argv[2]))
    await store.stop()

asyncio.run(main())
"""


async def test_two_processes_starting_together_on_an_empty_database_both_succeed(kind, tmp_path):
    url = await fresh_url(kind, tmp_path)
    root = Path(__file__).resolve().parents[1]
    procs = [await asyncio.create_subprocess_exec(
        sys.executable, "-c", STARTER, url, f"p{i}", cwd=root, stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE) for i in range(2)]
    for proc in procs:  # both have imported everything
        assert await asyncio.wait_for(proc.stdout.readline(), 60) == b"ready\n"
    done = await asyncio.wait_for(asyncio.gather(*(p.communicate(b"go\n") for p in procs)), 60)
    for proc, (_, err) in zip(procs, done):
        assert proc.returncode == 0, err.decode()[-2000:]
    store = SQLAlchemyStore(url)
    await store.start()
    assert sorted(t.text for t in await store.recent("telegram", "c1", 5)) == ["p0", "p1"]
    assert (await _version_and_schema(store))[0] == [HEAD]
    await store.stop()


async def test_alembic_command_line_upgrades_and_downgrades(kind, tmp_path):
    url = await fresh_url(kind, tmp_path)
    ini = Path(__file__).resolve().parents[1] / "storage" / "alembic.ini"

    def alembic(*args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "alembic", "-c", str(ini), "-x", f"url={url}",
                               *args], capture_output=True, text=True, timeout=60)
        assert done.returncode == 0, done.stderr
        return done.stdout + done.stderr

    async def state() -> tuple[list[str], set[str]]:
        engine = create_async_engine(url)
        try:
            async with engine.connect() as conn:
                schema = await conn.run_sync(_schema)
                if "alembic_version" not in schema:
                    return [], set(schema)
                rows = (await conn.execute(text("SELECT version_num FROM alembic_version"))).all()
                return [r[0] for r in rows], set(schema)
        finally:
            await engine.dispose()

    await asyncio.to_thread(alembic, "upgrade", "head")
    assert await state() == ([HEAD], TABLES)
    await asyncio.to_thread(alembic, "downgrade", "base")
    assert await state() == ([], {"alembic_version"})
    store = SQLAlchemyStore(url)  # the store migrates the emptied database back up
    await store.start()
    await store.append(user("back"))
    assert await store.count() == 1
    await store.stop()


OLD_HISTORY = [  # (id, channel, role, text, author, message id, in_reply_to, state) at 0001
    (1, "c1", "user", "first question", "7", "m1", None, "answered"),
    (2, "c1", "user", "asked while the reply was generated", "8", "m2", None, "answered"),
    (3, "c1", "bot", "reply to the first", "", None, 1, "done"),
    (4, "c1", "bot", "reply to the second", "", None, 2, "done"),
    (5, "c2", "user", "another chat", "7", "m3", None, "pending"),
]


async def _at_revision(url: str, revision: str) -> None:
    """Migrate an empty database to `revision` and write OLD_HISTORY into it."""
    from alembic import command
    from alembic.config import Config

    from storage.store import MIGRATIONS, prepare_engine

    def upgrade(connection) -> None:
        config = Config()
        config.set_main_option("script_location", str(MIGRATIONS))
        config.attributes["connection"] = connection
        command.upgrade(config, revision)

    from sqlalchemy.engine import make_url

    if make_url(url).get_backend_name() == "sqlite":
        SQLAlchemyStore._make_parent(make_url(url).database)
    engine = create_async_engine(url)
    prepare_engine(engine)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(upgrade)
            extra = ("", "")
            if revision != "0001":  # 0002 added the conversation order and conversations
                extra = (", seq, conversation", ", :seq, :conversation")
            for row in OLD_HISTORY:
                values = dict(zip(("id", "channel", "role", "text", "author", "mid", "irt",
                                   "state"), row))
                values.update(seq=values["irt"] or values["id"],
                              conversation=f"u:{values['author']}" if values["author"] else
                              f"u:{OLD_HISTORY[values['irt'] - 1][4]}")
                await conn.execute(text(
                    "INSERT INTO turns (id, platform, channel, role, text, author_id, "
                    f"author_name, message_id, token_ids, in_reply_to, state, created_at"
                    f"{extra[0]}) VALUES (:id, 'telegram', :channel, :role, :text, :author, "
                    f"'n', :mid, NULL, :irt, :state, CURRENT_TIMESTAMP{extra[1]})"), values)
            if engine.dialect.name == "postgresql":
                await conn.execute(text("SELECT setval(pg_get_serial_sequence('turns', 'id'), "
                                        "(SELECT max(id) FROM turns))"))
    finally:
        await engine.dispose()


@pytest.mark.parametrize("revision", ["0001", "0002"])
async def test_upgrading_a_database_with_history_keeps_every_turn_in_conversation_order(
        kind, revision, tmp_path):
    """A database made by an earlier revision (0001: with a reply stored after a message that
    arrived while it was generated, the old row-id order) is brought to head: every turn is
    still there, each reply sorts right after what it answers, every turn is in a reply chain
    that follows its author's exchange with the bot, and the bot keeps working on it."""
    url = await fresh_url(kind, tmp_path)
    await _at_revision(url, revision)
    store = SQLAlchemyStore(url)
    await store.start()  # migrates to head
    try:
        turns = await store.recent("telegram", "c1", 10)
        assert [t.text for t in turns] == ["first question", "reply to the first",
                                           "asked while the reply was generated",
                                           "reply to the second"]
        assert [t.conversation for t in turns] == ["u:7", "u:7", "u:8", "u:8"]
        assert [t.id for t in await store.pending()] == [5]
        assert [t.text for t in await store.chain(4, 50)] == [
            "asked while the reply was generated", "reply to the second"]
        asked = await store.append(user("new after the upgrade", "c1", author="7",
                                        conversation="u:7"))
        assert asked.id == 6 and asked.seq == 6 and asked.parent_id == 3
        assert (await store.recent("telegram", "c1", 10))[-1].text == "new after the upgrade"
        assert [t.text for t in await store.chain(asked.id, 50)] == [
            "first question", "reply to the first", "new after the upgrade"]
        assert (await _version_and_schema(store))[0] == [HEAD]
    finally:
        await store.stop()
