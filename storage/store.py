"""`SQLAlchemyStore`: the `bot.ports.Store` on SQLAlchemy 2 async (SQLite via aiosqlite,
PostgreSQL via asyncpg).

Contract (beyond `bot.ports.Store`):
- `start()` creates a SQLite file's folder, sets WAL / busy_timeout / synchronous=NORMAL /
  foreign_keys on every SQLite connection, and applies the Alembic migrations to head (under a
  PostgreSQL advisory lock, so instances starting together do not race). Idempotent, as is
  `stop()`.
- Every method runs in one transaction that is committed before it returns. Transient failures
  (SQLite "database is locked", a refused or dropped PostgreSQL connection) are retried up to
  `retries` times with exponential backoff (`backoff`, 2x, 4x ...), one warning each; then,
  like every other failure, they surface as `StoreError` with a one-line message in which the
  URL's password is hidden.
- Rows leave this module only as `bot.events.Turn` values and plain dicts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import operator
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, AsyncIterator, TypeVar
from urllib.parse import quote
from weakref import WeakKeyDictionary

from sqlalchemy import (bindparam, delete, event, func, insert, literal, or_, select, text,
                        update)
from sqlalchemy.engine import URL, Connection, Row, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bot.errors import StoreError
from bot.events import Forgotten, Outgoing, Role, Turn, TurnState, utcnow
from storage.models import UTCDateTime, channel_settings, sent_parts, turns

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x6469616C6F67  # "dialog": pg advisory lock id held while migrating
_WRITE = "dialogbot_write"  # execution option: take SQLite's write lock at BEGIN
_READ = "dialogbot_read"  # execution option: a read on SQLite, no BEGIN (autocommit SELECTs)
# PostgreSQL SQLSTATEs worth retrying: connection exceptions (08xxx), shutdown / starting up,
# too many connections, serialization failure, deadlock.
_PG_TRANSIENT = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"}
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")
_SETTINGS_VALUES = channel_settings.c["values"]
_ROLES = {role.value: role for role in Role}
_COLUMN = {column.name: index for index, column in enumerate(turns.c)}  # select(turns) order
# the row values `_turn` needs, in `Turn`'s field order
_TURN_FIELDS = operator.itemgetter(*(_COLUMN[name] for name in (
    "platform", "channel", "role", "text", "author_id", "author_name", "message_id",
    "token_ids", "in_reply_to", "state", "created_at", "id", "conversation", "seq",
    "parent_id", "reply_to", "quote", "quote_role")))
_STATES = {state.value: state for state in TurnState}


def _comparable(text: str) -> str:
    """Text as a platform shows it, for matching a quoted bot message: no word joiners (the
    bot's defused @mentions), whitespace collapsed."""
    return " ".join(text.replace("\u2060", "").split())


def _chain_query() -> Any:
    """Turn `:leaf` and its ancestors through parent_id, at most `:limit`, root first: one
    recursive CTE (SQLite and PostgreSQL), each step a primary-key lookup."""
    walk = (select(turns.c.id, turns.c.parent_id, literal(1).label("depth"))
            .where(turns.c.id == bindparam("leaf")).cte("chain", recursive=True))
    up = turns.alias("up")
    walk = walk.union_all(select(up.c.id, up.c.parent_id, (walk.c.depth + 1).label("depth"))
                          .where(up.c.id == walk.c.parent_id, walk.c.depth < bindparam("limit")))
    return select(turns).join(walk, turns.c.id == walk.c.id).order_by(walk.c.depth.desc())


_CHAIN = _chain_query()


def redact_url(url: str | URL) -> str:
    """The URL with its password (and any password query parameter) shown as ***."""
    try:
        parsed = make_url(url)
    except Exception:
        return _URL_PASSWORD.sub(r"\1***@", str(url))
    secret_keys = [k for k in parsed.query if k.lower() in ("password", "passwd", "pass")]
    if secret_keys:
        parsed = parsed.update_query_dict({k: "***" for k in secret_keys})
    return parsed.render_as_string(hide_password=True).replace("%2A%2A%2A", "***")


def prepare_engine(engine: AsyncEngine, busy_timeout_ms: int = 5000) -> None:
    """On SQLite: pragmas on every new connection, and SQLAlchemy (not the sqlite3 module)
    emits BEGIN, so reads, writes and DDL are really transactional; BEGIN IMMEDIATE for
    writes, so a transaction never has to upgrade a read lock. No-op on other backends."""
    if engine.dialect.name != "sqlite":
        return

    @event.listens_for(engine.sync_engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        dbapi_connection.isolation_level = None  # no implicit BEGIN from sqlite3
        cursor = dbapi_connection.cursor()
        try:
            cursor.execute("PRAGMA journal_mode=WAL")
            cursor.execute(f"PRAGMA busy_timeout={int(busy_timeout_ms)}")
            cursor.execute("PRAGMA synchronous=NORMAL")
            cursor.execute("PRAGMA foreign_keys=ON")
        finally:
            cursor.close()

    @event.listens_for(engine.sync_engine, "begin")
    def _on_begin(conn: Connection) -> None:
        options = conn.get_execution_options()
        if options.get(_READ, False):
            return  # a read: each SELECT is atomic on its own, no BEGIN round trip
        conn.exec_driver_sql("BEGIN IMMEDIATE" if options.get(_WRITE, False) else "BEGIN")


_migration_locks: "WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock]" = \
    WeakKeyDictionary()


def _process_migration_lock() -> asyncio.Lock:
    return _migration_locks.setdefault(asyncio.get_running_loop(), asyncio.Lock())


def _preload(url: URL) -> None:
    """The slow first imports (dialect, driver, Alembic) and a SQLite file's folder."""
    import alembic.command  # noqa: F401
    import alembic.config  # noqa: F401

    url.get_dialect().import_dbapi()
    if url.get_backend_name() == "sqlite":
        SQLAlchemyStore._make_parent(url.database)


def _upgrade_to_head(connection: Connection) -> None:
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS))
    config.attributes["connection"] = connection
    command.upgrade(config, "head")


class SQLAlchemyStore:
    """Conversation history and channel settings in a SQL database (see module docstring)."""

    def __init__(self, url: str, *, retries: int = 5, backoff: float = 0.2,
                 busy_timeout_ms: int = 5000):
        self._url = url
        self._safe_url = redact_url(url)
        self._retries = max(0, retries)
        self._backoff = max(0.0, backoff)
        self._busy_timeout_ms = busy_timeout_ms
        self._engine: AsyncEngine | None = None
        self._sqlite = False
        self._secrets = self._url_secrets(url)

    def __repr__(self) -> str:
        return f"SQLAlchemyStore({self._safe_url!r})"

    # --- lifecycle ------------------------------------------------------------------------
    async def start(self) -> None:
        if self._engine is not None:
            return
        try:
            url = make_url(self._url)
        except Exception as exc:
            raise StoreError(f"invalid database URL {self._safe_url}: "
                             f"{self._describe(exc)}") from None
        self._sqlite = url.get_backend_name() == "sqlite"
        try:
            await asyncio.to_thread(_preload, url)  # imports and mkdir, off the loop
            engine = create_async_engine(url, **({} if self._sqlite else {"pool_pre_ping": True}))
        except Exception as exc:
            raise StoreError(f"cannot open database {self._safe_url}: "
                             f"{self._describe(exc)}") from None
        prepare_engine(engine, self._busy_timeout_ms)
        self._engine = engine
        try:
            await self._run("start (migrate)", self._migrate)
        except BaseException:
            self._engine = None
            await engine.dispose()
            raise
        log.info("store ready at %s", self._safe_url)

    async def stop(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await engine.dispose()

    @staticmethod
    def _make_parent(database: str | None) -> None:
        if database and database != ":memory:" and not database.startswith("file:"):
            Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)

    @staticmethod
    async def _migrate(conn: AsyncConnection) -> None:
        # Alembic keeps its context in module globals: one upgrade at a time per process.
        async with _process_migration_lock():
            if conn.dialect.name == "postgresql":
                # held until this transaction commits: another instance waits, then finds head
                await conn.execute(text("SELECT pg_advisory_xact_lock(:key)"),
                                   {"key": MIGRATION_LOCK_KEY})
            await conn.run_sync(_upgrade_to_head)

    # --- history --------------------------------------------------------------------------
    async def append(self, turn: Turn) -> Turn:
        """Store a turn. A user turn's seq is its own id; a bot turn's, unless given, the seq of
        the turn it answers (or its own id). A user turn whose platform message id is already
        stored in that channel (the platform delivered it again, e.g. after a restart) is not
        stored twice: the stored turn comes back."""
        values = self._values(turn)
        known = (turn.role is Role.USER and turn.message_id is not None)

        async def work(conn: AsyncConnection) -> tuple[int, int] | Turn:
            if known:
                row = (await conn.execute(select(turns).where(
                    turns.c.platform == turn.platform, turns.c.channel == turn.channel,
                    turns.c.message_id == turn.message_id, turns.c.role == Role.USER.value)
                    .limit(1))).first()
                if row is not None:
                    return self._turn(row)
            if turn.role is Role.USER and turn.parent_id is None:
                values.update(await self._place_in_chain(conn, turn))
            result = await conn.execute(insert(turns).values(**values, seq=turn.seq or 0))
            new_id = int(result.inserted_primary_key[0])
            seq = turn.seq
            if seq is None and turn.in_reply_to is not None and turn.role is Role.BOT:
                seq = await conn.scalar(select(turns.c.seq).where(turns.c.id == turn.in_reply_to))
            seq = int(seq) if seq is not None else new_id
            await conn.execute(update(turns).where(turns.c.id == new_id).values(seq=seq))
            return new_id, seq

        stored = await self._run("append", work)
        if isinstance(stored, Turn):
            log.info("%s/%s: message %s was delivered again; it is stored once", turn.platform,
                     turn.channel, turn.message_id)
            return stored
        new_id, seq = stored
        return replace(turn, id=new_id, seq=seq, created_at=values["created_at"],
                       parent_id=values["parent_id"], quote=values["quote"],
                       quote_role=Role(values["quote_role"]) if values["quote_role"] else None)

    async def add_reply(self, reply: Turn, answers: Sequence[int], *, owner: str | None = None,
                        context: Sequence[int] = (), lease: float = 0.0) -> Turn:
        """Append a bot turn and mark the user turns it answers ANSWERED, in one transaction.

        The reply's `in_reply_to` is the last of `answers` and its seq that turn's seq (it sorts
        right after it). Nothing is stored, and the reply comes back with `id` None, when
        - a turn of `answers` or of `context` (the turns its prompt was built from) no longer
          exists (/reset or /forget ran while the reply was generated), or
        - `owner` is given and a turn of `answers` is no longer PENDING and claimed by `owner`
          (its claim expired and another instance took it over, or it was answered already).
        With `owner` and `lease`, the new bot turn is claimed by `owner` for `lease` seconds
        (a reply in state SENDING is then not resent by anyone else while it is delivered).
        """
        answered = [int(i) for i in answers]
        needed = sorted(set(answered) | {int(i) for i in context})
        target = answered[-1] if answered else None
        values = self._values(reply) | {"in_reply_to": target}
        if owner is not None and lease > 0:
            values |= {"claimed_by": owner, "claim_until": utcnow() + timedelta(seconds=lease)}

        values["parent_id"] = target if target is not None else reply.parent_id

        async def work(conn: AsyncConnection) -> tuple[int, int] | None:
            seq = None
            if needed:
                found = await self._count_ids(conn, needed)
                if found != len(needed):
                    return None
            if target is not None:
                seq = await conn.scalar(select(turns.c.seq).where(turns.c.id == target))
                mine = (turns.c.id.in_(answered), turns.c.role == Role.USER.value)
                if owner is not None:
                    still = await conn.scalar(select(func.count()).select_from(turns).where(
                        *mine, turns.c.state == TurnState.PENDING.value,
                        turns.c.claimed_by == owner))
                    if int(still or 0) != len(set(answered)):
                        return None
                await conn.execute(update(turns).where(*mine).values(
                    state=TurnState.ANSWERED.value, claimed_by=None, claim_until=None))
            result = await conn.execute(insert(turns).values(**values, seq=seq or 0))
            new_id = int(result.inserted_primary_key[0])
            if seq is None:
                seq = new_id
                await conn.execute(update(turns).where(turns.c.id == new_id).values(seq=seq))
            return new_id, int(seq)

        stored = await self._run("add_reply", work)
        if stored is None:
            log.info("reply not stored: what it answers changed meanwhile")
            return replace(reply, id=None, in_reply_to=target)
        return replace(reply, id=stored[0], seq=stored[1], in_reply_to=target,
                       created_at=values["created_at"])

    @staticmethod
    async def _count_ids(conn: AsyncConnection, ids: Sequence[int]) -> int:
        found = 0
        for start in range(0, len(ids), 500):
            found += int(await conn.scalar(select(func.count()).select_from(turns).where(
                turns.c.id.in_(ids[start:start + 500]))) or 0)
        return found

    async def _place_in_chain(self, conn: AsyncConnection, turn: Turn) -> dict[str, Any]:
        """Where a new user message goes in its reply chain: after the message it replies to
        when that is stored (a user turn by its message id, a bot turn by the id of any of its
        parts), else, with a quote, at the start of a new chain (the quote is its context),
        else after the author's own latest turn in this conversation."""
        if turn.reply_to:
            found = await self._turn_of_message(conn, turn.platform, turn.channel, turn.reply_to)
            if found is None and turn.quote and turn.quote_role is Role.BOT:
                found = await self._bot_turn_quoted(conn, turn.platform, turn.channel,
                                                    turn.quote)
            if found is not None:
                return {"parent_id": found, "quote": None, "quote_role": None}
            if turn.quote:
                return {"parent_id": None}
        latest = await conn.scalar(
            select(turns.c.id).where(turns.c.platform == turn.platform,
                                     turns.c.channel == turn.channel,
                                     turns.c.conversation == turn.conversation)
            .order_by(turns.c.seq.desc(), turns.c.id.desc()).limit(1))
        return {"parent_id": int(latest) if latest is not None else None}

    @staticmethod
    async def _bot_turn_quoted(conn: AsyncConnection, platform: str, channel: str,
                               quote: str) -> int | None:
        """A recent bot turn of the channel whose text holds `quote` (the text of one of its
        parts as the platform showed it): for a reply to a bot message whose platform id is
        not recorded (yet: the reply came within milliseconds of the send; or at all: sent
        before the ids were kept)."""
        wanted = _comparable(quote)
        if not wanted:
            return None
        rows = (await conn.execute(select(turns.c.id, turns.c.text).where(
            turns.c.platform == platform, turns.c.channel == channel,
            turns.c.role == Role.BOT.value).order_by(turns.c.id.desc()).limit(20))).all()
        for row in rows:
            if wanted in _comparable(row.text):
                return int(row.id)
        return None

    @staticmethod
    async def _turn_of_message(conn: AsyncConnection, platform: str, channel: str,
                               message_id: str) -> int | None:
        found = await conn.scalar(select(turns.c.id).where(
            turns.c.platform == platform, turns.c.channel == channel,
            turns.c.message_id == message_id, turns.c.role == Role.USER.value).limit(1))
        if found is None:
            found = await conn.scalar(select(sent_parts.c.turn_id).where(
                sent_parts.c.platform == platform, sent_parts.c.channel == channel,
                sent_parts.c.message_id == message_id).limit(1))
        return int(found) if found is not None else None

    async def find_message(self, platform: str, channel: str, message_id: str) -> Turn | None:
        """The stored turn of a platform message: a user message, or any part of a bot reply."""
        async def work(conn: AsyncConnection) -> Turn | None:
            found = await self._turn_of_message(conn, platform, channel, message_id)
            if found is None:
                return None
            row = (await conn.execute(select(turns).where(turns.c.id == found))).first()
            return self._turn(row) if row is not None else None

        return await self._run("find_message", work, write=False)

    async def chain(self, leaf_id: int, limit: int) -> list[Turn]:
        """The reply chain that leads to turn `leaf_id`: at most `limit` turns, root first
        (one recursive query; each step is a primary-key lookup)."""
        if limit <= 0:
            return []

        async def work(conn: AsyncConnection) -> list[Turn]:
            rows = (await conn.execute(_CHAIN, {"leaf": leaf_id, "limit": limit})).all()
            return [self._turn(row) for row in rows]

        return await self._run("chain", work, write=False)

    async def reset_branch(self, leaf_id: int) -> int:
        """Remove the branch that leads to turn `leaf_id`: it and its ancestors in the same
        conversation (the branch author's messages and the bot's answers to them). Later
        messages that followed a removed turn start a new chain."""
        async def work(conn: AsyncConnection) -> int:
            row = (await conn.execute(select(turns.c.platform, turns.c.channel,
                                             turns.c.conversation)
                                      .where(turns.c.id == leaf_id))).first()
            if row is None:
                return 0
            ids, current = [], leaf_id
            while current is not None and len(ids) < 100_000:
                step = (await conn.execute(select(turns.c.parent_id, turns.c.conversation)
                                           .where(turns.c.id == current))).first()
                if step is None:
                    break
                if step.conversation == row.conversation:
                    ids.append(current)
                current = step.parent_id
            removed = 0
            for start in range(0, len(ids), 500):
                part = ids[start:start + 500]
                # answers first: rows removed by ON DELETE CASCADE are not counted by SQLite
                removed += await self._rowcount(conn, delete(turns).where(
                    turns.c.in_reply_to.in_(part)))
                removed += await self._rowcount(conn, delete(turns).where(turns.c.id.in_(part)))
            await self._orphan(conn, row.platform, [row.channel])
            return removed

        return await self._run("reset_branch", work)

    @staticmethod
    async def _orphan(conn: AsyncConnection, platform: str, channels: Sequence[str]) -> None:
        """Turns whose parent was deleted start a new chain (ids may be reused by SQLite)."""
        gone = turns.alias("gone")
        for channel in channels:
            await conn.execute(update(turns).where(
                turns.c.platform == platform, turns.c.channel == channel,
                turns.c.parent_id.is_not(None),
                ~select(gone.c.id).where(gone.c.id == turns.c.parent_id).exists())
                .values(parent_id=None))

    async def recent(self, platform: str, channel: str, limit: int,
                     conversation: str | None = None, until_seq: int | None = None
                     ) -> list[Turn]:
        """The newest `limit` turns of the channel (or of one conversation in it), in
        conversation order (by seq, then id), oldest first; with `until_seq`, only turns up
        to that seq (what came before a message and the replies to it)."""
        if limit <= 0:
            return []
        where = [turns.c.platform == platform, turns.c.channel == channel]
        if conversation is not None:
            where.append(turns.c.conversation == conversation)
        if until_seq is not None:
            where.append(turns.c.seq <= until_seq)
        query = (select(turns).where(*where)
                 .order_by(turns.c.seq.desc(), turns.c.id.desc()).limit(limit))

        async def work(conn: AsyncConnection) -> list[Turn]:
            rows = (await conn.execute(query)).all()
            return [self._turn(row) for row in reversed(rows)]

        return await self._run("recent", work, write=False)

    async def channels(self, platform: str) -> list[str]:
        """Every channel of `platform` that has stored turns, sorted."""
        query = (select(turns.c.channel).where(turns.c.platform == platform).distinct()
                 .order_by(turns.c.channel))

        async def work(conn: AsyncConnection) -> list[str]:
            return [str(name) for name in (await conn.scalars(query)).all()]

        return await self._run("channels", work, write=False)

    async def reset(self, platform: str, channel: str, conversation: str | None = None) -> int:
        """Remove the channel's turns (or one conversation's); settings stay."""
        here = [turns.c.platform == platform, turns.c.channel == channel]
        if conversation is not None:
            here.append(turns.c.conversation == conversation)

        async def work(conn: AsyncConnection) -> int:
            # answers first: rows removed by ON DELETE CASCADE are not counted by SQLite
            answers = await self._rowcount(conn, delete(turns).where(
                *here, turns.c.in_reply_to.is_not(None)))
            removed = answers + await self._rowcount(conn, delete(turns).where(*here))
            if conversation is not None:
                await self._orphan(conn, platform, [channel])
            return removed

        return await self._run("reset", work)

    async def forget(self, platform: str, author_id: str) -> Forgotten:
        """Delete one user's turns on one platform, in every channel, and the bot turns that
        answered them; says how many of their messages went and in which channels."""
        mine = (turns.c.platform == platform, turns.c.author_id == author_id,
                turns.c.role == Role.USER.value)
        their_ids = select(turns.c.id).where(*mine)
        their_answers = delete(turns).where(turns.c.platform == platform,
                                            turns.c.in_reply_to.in_(their_ids))

        async def work(conn: AsyncConnection) -> Forgotten:
            channels = (await conn.execute(select(turns.c.channel).where(*mine).distinct())).all()
            touched = sorted(row[0] for row in channels)
            await conn.execute(their_answers)
            removed = await self._rowcount(conn, delete(turns).where(*mine))
            await self._orphan(conn, platform, touched)
            return Forgotten(removed, tuple(touched))

        return await self._run("forget", work)

    async def count(self, platform: str | None = None, channel: str | None = None) -> int:
        query = select(func.count()).select_from(turns)
        if platform is not None:
            query = query.where(turns.c.platform == platform)
        if channel is not None:
            query = query.where(turns.c.channel == channel)

        async def work(conn: AsyncConnection) -> int:
            return int(await conn.scalar(query) or 0)

        return await self._run("count", work, write=False)

    async def pending(self) -> list[Turn]:
        """Every user turn still PENDING (never answered nor skipped), oldest first."""
        query = (select(turns).where(turns.c.role == Role.USER.value,
                                     turns.c.state == TurnState.PENDING.value)
                 .order_by(turns.c.id))

        async def work(conn: AsyncConnection) -> list[Turn]:
            return [self._turn(row) for row in (await conn.execute(query)).all()]

        return await self._run("pending", work, write=False)

    async def mark(self, turn_ids: Sequence[int], state: str) -> None:
        """Set the state of these turns (and drop their claims)."""
        try:
            value = TurnState(state).value
        except ValueError:
            raise StoreError(f"mark: unknown turn state {state!r}") from None
        ids = [int(i) for i in turn_ids]
        if not ids:
            return

        async def work(conn: AsyncConnection) -> None:
            for start in range(0, len(ids), 500):
                await conn.execute(update(turns).where(turns.c.id.in_(ids[start:start + 500]))
                                   .values(state=value, claimed_by=None, claim_until=None))

        await self._run("mark", work)

    # --- exactly once: claims -----------------------------------------------------------
    @staticmethod
    def _claimable(now: datetime, dead: Sequence[str] = ()) -> Any:
        """Nobody holds it: unclaimed, the claim expired, or its owner is known dead."""
        free = [turns.c.claimed_by.is_(None), turns.c.claim_until < now]
        if dead:
            free.append(turns.c.claimed_by.in_(list(dead)))
        return or_(*free)

    async def claim_owners(self) -> list[str]:
        """The owners of live claims on pending or sending turns (for dead-owner checks)."""
        query = (select(turns.c.claimed_by).where(
            turns.c.claimed_by.is_not(None), turns.c.claim_until >= utcnow(),
            turns.c.state.in_([TurnState.PENDING.value, TurnState.SENDING.value])).distinct())

        async def work(conn: AsyncConnection) -> list[str]:
            return sorted(row[0] for row in (await conn.execute(query)).all())

        return await self._run("claim_owners", work, write=False)

    async def claim(self, platform: str, channel: str, conversation: str | None, owner: str,
                    lease: float, *, dead: Sequence[str] = ()) -> list[Turn]:
        """Claim, atomically, every PENDING user turn of the channel (or of one conversation
        in it) that nobody holds (unclaimed, expired, or held by one of the `dead` owners)
        for `lease` seconds; returns the claimed turns in conversation order. Two claims at
        once (tasks or instances) never both get a turn."""
        now = utcnow()
        where = [turns.c.platform == platform, turns.c.channel == channel,
                 turns.c.role == Role.USER.value, turns.c.state == TurnState.PENDING.value]
        if conversation is not None:
            where.append(turns.c.conversation == conversation)
        until = now + timedelta(seconds=lease)

        async def work(conn: AsyncConnection) -> list[Turn]:
            await conn.execute(update(turns).where(*where, self._claimable(now, dead))
                               .values(claimed_by=owner, claim_until=until))
            rows = (await conn.execute(select(turns).where(
                *where, turns.c.claimed_by == owner, turns.c.claim_until == until)
                .order_by(turns.c.seq, turns.c.id))).all()
            return [self._turn(row) for row in rows]

        return await self._run("claim", work)

    async def renew(self, turn_ids: Sequence[int], owner: str, lease: float) -> int:
        """Extend `owner`'s claims on these turns; returns how many are still its own."""
        ids = [int(i) for i in turn_ids]
        if not ids:
            return 0
        until = utcnow() + timedelta(seconds=lease)

        async def work(conn: AsyncConnection) -> int:
            return await self._rowcount(conn, update(turns).where(
                turns.c.id.in_(ids), turns.c.claimed_by == owner).values(claim_until=until))

        return await self._run("renew", work)

    async def release(self, turn_ids: Sequence[int], owner: str) -> None:
        """Drop `owner`'s claims on these turns (they may be claimed again at once)."""
        ids = [int(i) for i in turn_ids]
        if not ids:
            return

        async def work(conn: AsyncConnection) -> None:
            await conn.execute(update(turns).where(turns.c.id.in_(ids), turns.c.claimed_by == owner)
                               .values(claimed_by=None, claim_until=None))

        await self._run("release", work)

    async def unclaimed(self, platforms: Sequence[str], older_than: float = 0.0, *,
                        dead: Sequence[str] = ()) -> list[Turn]:
        """PENDING user turns on these platforms that nobody holds (unclaimed or expired),
        stored at least `older_than` seconds ago, oldest first: what recovery answers."""
        now = utcnow()
        query = (select(turns).where(
            turns.c.role == Role.USER.value, turns.c.state == TurnState.PENDING.value,
            turns.c.platform.in_(list(platforms)), self._claimable(now, dead),
            turns.c.created_at <= now - timedelta(seconds=older_than))
            .order_by(turns.c.id))

        async def work(conn: AsyncConnection) -> list[Turn]:
            return [self._turn(row) for row in (await conn.execute(query)).all()]

        return await self._run("unclaimed", work, write=False)

    # --- the outbox ---------------------------------------------------------------------
    async def claim_outbox(self, platforms: Sequence[str], owner: str, lease: float,
                           older_than: float = 0.0, *, dead: Sequence[str] = ()
                           ) -> list[Outgoing]:
        """Claim the bot turns still SENDING on these platforms that nobody holds, stored at
        least `older_than` seconds ago; each with the platform ids of the parts already
        delivered and the message it replies to."""
        now = utcnow()
        where = (turns.c.role == Role.BOT.value, turns.c.state == TurnState.SENDING.value,
                 turns.c.platform.in_(list(platforms)),
                 turns.c.created_at <= now - timedelta(seconds=older_than))
        until = now + timedelta(seconds=lease)
        answered = turns.alias("answered")

        async def work(conn: AsyncConnection) -> list[Outgoing]:
            await conn.execute(update(turns).where(*where, self._claimable(now, dead))
                               .values(claimed_by=owner, claim_until=until))
            rows = (await conn.execute(
                select(turns, answered.c.message_id.label("answers_message"))
                .select_from(turns.outerjoin(answered, answered.c.id == turns.c.in_reply_to))
                .where(*where, turns.c.claimed_by == owner, turns.c.claim_until == until)
                .order_by(turns.c.id))).all()
            out = []
            for row in rows:
                parts = (await conn.execute(select(sent_parts.c.message_id)
                                            .where(sent_parts.c.turn_id == row.id)
                                            .order_by(sent_parts.c.part))).all()
                out.append(Outgoing(self._turn(row), tuple(p[0] for p in parts),
                                    row.answers_message))
            return out

        return await self._run("claim_outbox", work)

    async def confirm_part(self, turn_id: int, part: int, message_id: str, *,
                           last: bool) -> None:
        """Record that the platform confirmed part `part` of bot turn `turn_id` under
        `message_id`; with `last`, the turn leaves the outbox (state DONE)."""

        async def work(conn: AsyncConnection) -> None:
            row = (await conn.execute(select(turns.c.platform, turns.c.channel)
                                      .where(turns.c.id == turn_id))).first()
            if row is None:
                return  # reset or forgotten meanwhile
            await conn.execute(insert(sent_parts).values(
                turn_id=turn_id, part=part, platform=row.platform, channel=row.channel,
                message_id=str(message_id), sent_at=utcnow()))
            if last:
                await conn.execute(update(turns).where(turns.c.id == turn_id).values(
                    state=TurnState.DONE.value, claimed_by=None, claim_until=None))

        await self._run("confirm_part", work)

    async def sent_ids(self, turn_id: int) -> list[str]:
        """The platform message ids of the delivered parts of a bot turn, in order."""
        query = (select(sent_parts.c.message_id).where(sent_parts.c.turn_id == turn_id)
                 .order_by(sent_parts.c.part))

        async def work(conn: AsyncConnection) -> list[str]:
            return [row[0] for row in (await conn.execute(query)).all()]

        return await self._run("sent_ids", work, write=False)

    # --- settings -------------------------------------------------------------------------
    async def get_settings(self, platform: str, channel: str) -> dict[str, Any]:
        query = select(_SETTINGS_VALUES).where(channel_settings.c.platform == platform,
                                               channel_settings.c.channel == channel)

        async def work(conn: AsyncConnection) -> dict[str, Any]:
            stored = await conn.scalar(query)
            return dict(json.loads(stored)) if stored else {}

        return await self._run("get_settings", work, write=False)

    async def set_settings(self, platform: str, channel: str, values: dict[str, Any]) -> None:
        """Replace the channel's settings with `values`; an empty dict clears them."""
        key = (channel_settings.c.platform == platform, channel_settings.c.channel == channel)
        try:
            payload = json.dumps(dict(values), sort_keys=True, ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"set_settings: values are not JSON: {exc}") from None

        async def work(conn: AsyncConnection) -> None:
            if not values:
                await conn.execute(delete(channel_settings).where(*key))
                return
            row = {"platform": platform, "channel": channel, "values": payload,
                   "updated_at": datetime.now(timezone.utc)}
            await conn.execute(self._upsert(conn.dialect.name, row))

        await self._run("set_settings", work)

    async def update_settings(self, platform: str, channel: str, changes: dict[str, Any], *,
                              clear: bool = False) -> dict[str, Any]:
        """Merge `changes` into the channel's settings atomically (a key set to None is
        removed; `clear` starts from nothing) and return the result. Two admins changing
        different settings at once both keep their change: the read and the write happen in
        one transaction holding the row (SQLite: BEGIN IMMEDIATE; PostgreSQL: FOR UPDATE)."""
        key = (channel_settings.c.platform == platform, channel_settings.c.channel == channel)
        try:
            json.dumps(dict(changes), ensure_ascii=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"update_settings: values are not JSON: {exc}") from None

        async def work(conn: AsyncConnection) -> dict[str, Any]:
            query = select(_SETTINGS_VALUES).where(*key)
            if conn.dialect.name == "postgresql":
                # make sure a row exists to lock, then lock it
                await conn.execute(self._upsert(conn.dialect.name, {
                    "platform": platform, "channel": channel, "values": "{}",
                    "updated_at": datetime.now(timezone.utc)}, keep=True))
                query = query.with_for_update()
            stored = await conn.scalar(query)
            current = {} if clear or not stored else dict(json.loads(stored))
            merged = {k: v for k, v in {**current, **changes}.items() if v is not None}
            if not merged:
                await conn.execute(delete(channel_settings).where(*key))
                return {}
            row = {"platform": platform, "channel": channel,
                   "values": json.dumps(merged, sort_keys=True, ensure_ascii=False),
                   "updated_at": datetime.now(timezone.utc)}
            await conn.execute(self._upsert(conn.dialect.name, row))
            return merged

        return await self._run("update_settings", work)

    @staticmethod
    def _upsert(dialect: str, row: dict[str, Any], keep: bool = False) -> Any:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(channel_settings).values(**row)
        if keep:
            return stmt.on_conflict_do_nothing(index_elements=["platform", "channel"])
        return stmt.on_conflict_do_update(
            index_elements=["platform", "channel"],
            set_={"values": stmt.excluded["values"], "updated_at": stmt.excluded.updated_at})

    # --- plumbing -------------------------------------------------------------------------
    async def _run(self, what: str, work: Callable[[AsyncConnection], Awaitable[T]], *,
                   write: bool = True) -> T:
        """Run `work` in one transaction, retrying transient failures; errors -> StoreError."""
        attempt = 0
        while True:
            engine = self._engine
            if engine is None:
                raise StoreError(f"store {what}: the store is not started")
            try:
                async with self._transaction(engine, write) as conn:
                    return await work(conn)
            except StoreError:
                raise
            except Exception as exc:
                reason = self._describe(exc)
                if attempt >= self._retries or not self._transient(exc):
                    tried = f" after {attempt + 1} attempts" if attempt else ""
                    raise StoreError(f"store {what} failed{tried} on {self._safe_url}: "
                                     f"{reason}") from None
                delay = self._backoff * (2 ** attempt)
                attempt += 1
                log.warning("store %s on %s failed (%s); retry %d of %d in %.2fs",
                            what, self._safe_url, reason, attempt, self._retries, delay)
                await asyncio.sleep(delay)

    @asynccontextmanager
    async def _transaction(self, engine: AsyncEngine, write: bool
                           ) -> AsyncIterator[AsyncConnection]:
        async with engine.connect() as conn:
            if self._sqlite:
                conn = await conn.execution_options(**{_WRITE if write else _READ: True})
            async with conn.begin():
                yield conn

    @staticmethod
    async def _rowcount(conn: AsyncConnection, query: Any) -> int:
        return int((await conn.execute(query)).rowcount)

    def _transient(self, exc: BaseException) -> bool:
        if isinstance(exc, DBAPIError):
            if exc.connection_invalidated:
                return True
            if self._sqlite:
                message = str(exc.orig).lower()
                return isinstance(exc, OperationalError) and ("locked" in message
                                                              or "busy" in message)
            sqlstate = str(getattr(exc.orig, "sqlstate", "") or "")
            return (isinstance(exc, OperationalError) or sqlstate.startswith("08")
                    or sqlstate in _PG_TRANSIENT)
        return isinstance(exc, OSError)

    def _describe(self, exc: BaseException) -> str:
        """`Type: message` on one line, without SQL, parameters or the URL's password."""
        cause = exc.orig if isinstance(exc, DBAPIError) and exc.orig is not None else exc
        message = " ".join(f"{type(cause).__name__}: {cause}".split())
        for secret in self._secrets:
            message = message.replace(secret, "***")
        return message[:300]

    @staticmethod
    def _url_secrets(url: str) -> list[str]:
        try:
            password = make_url(url).password
        except Exception:
            found = _URL_PASSWORD.search(url)
            password = found.group(2) if found else None
        if not password:
            return []
        return sorted({str(password), quote(str(password), safe="")}, key=len, reverse=True)

    @staticmethod
    def _values(turn: Turn) -> dict[str, Any]:
        created = UTCDateTime().process_bind_param(turn.created_at, None)
        return {
            "platform": turn.platform, "channel": turn.channel, "role": Role(turn.role).value,
            "text": turn.text, "author_id": turn.author_id, "author_name": turn.author_name,
            "message_id": turn.message_id,
            "token_ids": tuple(turn.token_ids) if turn.token_ids is not None else None,
            "in_reply_to": turn.in_reply_to, "state": TurnState(turn.state).value,
            "created_at": created, "conversation": turn.conversation,
            "parent_id": turn.parent_id, "reply_to": turn.reply_to, "quote": turn.quote,
            "quote_role": Role(turn.quote_role).value if turn.quote_role else None,
        }

    @staticmethod
    def _turn(row: Row[Any]) -> Turn:
        """A row that starts with the `turns` columns (in table order) as a Turn; read by
        position, several times faster than by name for the long contexts of busy chats."""
        (platform, channel, role, text, author_id, author_name, message_id, token_ids,
         in_reply_to, state, created_at, id_, conversation, seq, parent_id, reply_to, quote,
         quote_role) = _TURN_FIELDS(row)
        return Turn(platform, channel, _ROLES[role], text, author_id, author_name, message_id,
                    token_ids, in_reply_to, _STATES[state], created_at, int(id_),
                    conversation, int(seq), parent_id, reply_to, quote,
                    _ROLES[quote_role] if quote_role else None)
