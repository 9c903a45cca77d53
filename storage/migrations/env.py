"""Alembic environment.

The bot applies migrations itself: `SQLAlchemyStore.start` runs `alembic upgrade head` on an
open connection passed in `config.attributes["connection"]` (the cookbook "asyncio" pattern),
inside the caller's transaction. Run by hand (`alembic -c storage/alembic.ini ...`), the URL is
`-x url=...` or the bot's configured DIALOGBOT_DATABASE_URL, on an async engine.
"""

from __future__ import annotations

import asyncio

from alembic import context
from sqlalchemy.engine import Connection, make_url
from sqlalchemy.ext.asyncio import create_async_engine

from storage.models import metadata

config = context.config


def _configure(connection: Connection) -> None:
    context.configure(connection=connection, target_metadata=metadata,
                      render_as_batch=connection.dialect.name == "sqlite",
                      compare_type=True)
    with context.begin_transaction():
        context.run_migrations()


def _url() -> str:
    url = context.get_x_argument(as_dictionary=True).get("url")
    if url:
        return url
    from bot.config import load_config

    return load_config().database_url


async def _run_async() -> None:
    from storage.store import SQLAlchemyStore, prepare_engine

    url = make_url(_url())
    if url.get_backend_name() == "sqlite":
        SQLAlchemyStore._make_parent(url.database)
    engine = create_async_engine(url)
    prepare_engine(engine)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(_configure)
    finally:
        await engine.dispose()


def run_migrations_offline() -> None:
    context.configure(url=_url(), target_metadata=metadata, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    connection = config.attributes.get("connection")
    if connection is not None:
        _configure(connection)
    else:
        asyncio.run(_run_async())


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
