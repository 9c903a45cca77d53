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
import re
from collections.abc import Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, AsyncIterator, TypeVar
from urllib.parse import quote
from weakref import WeakKeyDictionary

from sqlalchemy import delete, event, func, insert, select, text, update
from sqlalchemy.engine import URL, Connection, Row, make_url
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

from bot.errors import StoreError
from bot.events import Role, Turn, TurnState
from storage.models import UTCDateTime, channel_settings, turns

log = logging.getLogger(__name__)
T = TypeVar("T")

MIGRATIONS = Path(__file__).resolve().parent / "migrations"
MIGRATION_LOCK_KEY = 0x6469616C6F67  # "dialog": pg advisory lock id held while migrating
_WRITE = "dialogbot_write"  # execution option: take SQLite's write lock at BEGIN
# PostgreSQL SQLSTATEs worth retrying: connection exceptions (08xxx), shutdown / starting up,
# too many connections, serialization failure, deadlock.
_PG_TRANSIENT = {"57P01", "57P02", "57P03", "53300", "40001", "40P01"}
_URL_PASSWORD = re.compile(r"(://[^:/@\s]*:)([^@\s]*)@")
_SETTINGS_VALUES = channel_settings.c["values"]


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
        immediate = conn.get_execution_options().get(_WRITE, False)
        conn.exec_driver_sql("BEGIN IMMEDIATE" if immediate else "BEGIN")


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
        values = self._values(turn)

        async def work(conn: AsyncConnection) -> int:
            result = await conn.execute(insert(turns).values(**values))
            return int(result.inserted_primary_key[0])

        new_id = await self._run("append", work)
        return replace(turn, id=new_id, created_at=values["created_at"])

    async def add_reply(self, reply: Turn, answers: Sequence[int]) -> Turn:
        """Append a bot turn and mark the user turns it answers ANSWERED, in one transaction.

        The reply's `in_reply_to` is the last of `answers`. If that turn no longer exists
        (/reset or /forget ran while the reply was generated) nothing is stored and the reply
        comes back with `id` None.
        """
        answered = [int(i) for i in answers]
        target = answered[-1] if answered else None
        values = self._values(reply) | {"in_reply_to": target}

        async def work(conn: AsyncConnection) -> int | None:
            if target is not None:
                still_there = await conn.scalar(select(turns.c.id).where(turns.c.id == target))
                if still_there is None:
                    return None
                await conn.execute(update(turns)
                                   .where(turns.c.id.in_(answered), turns.c.role == Role.USER.value)
                                   .values(state=TurnState.ANSWERED.value))
            result = await conn.execute(insert(turns).values(**values))
            return int(result.inserted_primary_key[0])

        new_id = await self._run("add_reply", work)
        if new_id is None:
            log.info("reply not stored: the turn it answers was deleted meanwhile")
        return replace(reply, id=new_id, in_reply_to=target, created_at=values["created_at"])

    async def recent(self, platform: str, channel: str, limit: int) -> list[Turn]:
        if limit <= 0:
            return []
        query = (select(turns).where(turns.c.platform == platform, turns.c.channel == channel)
                 .order_by(turns.c.id.desc()).limit(limit))

        async def work(conn: AsyncConnection) -> list[Turn]:
            rows = (await conn.execute(query)).all()
            return [self._turn(row) for row in reversed(rows)]

        return await self._run("recent", work, write=False)

    async def channels(self, platform: str) -> list[str]:
        query = (select(turns.c.channel).where(turns.c.platform == platform).distinct()
                 .order_by(turns.c.channel))

        async def work(conn: AsyncConnection) -> list[str]:
            return [str(name) for name in (await conn.scalars(query)).all()]

        return await self._run("channels", work, write=False)

    async def reset(self, platform: str, channel: str) -> int:
        here = (turns.c.platform == platform, turns.c.channel == channel)

        async def work(conn: AsyncConnection) -> int:
            # answers first: rows removed by ON DELETE CASCADE are not counted by SQLite
            answers = await self._rowcount(conn, delete(turns).where(
                *here, turns.c.in_reply_to.is_not(None)))
            return answers + await self._rowcount(conn, delete(turns).where(*here))

        return await self._run("reset", work)

    async def forget(self, platform: str, author_id: str) -> int:
        mine = (turns.c.platform == platform, turns.c.author_id == author_id,
                turns.c.role == Role.USER.value)
        their_ids = select(turns.c.id).where(*mine)
        their_answers = delete(turns).where(turns.c.platform == platform,
                                            turns.c.in_reply_to.in_(their_ids))

        async def work(conn: AsyncConnection) -> int:
            await conn.execute(their_answers)
            return await self._rowcount(conn, delete(turns).where(*mine))

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
                                   .values(state=value))

        await self._run("mark", work)

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

    @staticmethod
    def _upsert(dialect: str, row: dict[str, Any]) -> Any:
        if dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as dialect_insert
        else:
            from sqlalchemy.dialects.sqlite import insert as dialect_insert
        stmt = dialect_insert(channel_settings).values(**row)
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
            if write and self._sqlite:
                conn = await conn.execution_options(**{_WRITE: True})
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
            "created_at": created,
        }

    @staticmethod
    def _turn(row: Row[Any]) -> Turn:
        return Turn(platform=row.platform, channel=row.channel, role=Role(row.role),
                    text=row.text, author_id=row.author_id, author_name=row.author_name,
                    message_id=row.message_id, token_ids=row.token_ids,
                    in_reply_to=row.in_reply_to, state=TurnState(row.state),
                    created_at=row.created_at, id=int(row.id))
