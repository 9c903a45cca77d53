"""Persistence: `SQLAlchemyStore` implements `bot.ports.Store` on SQLite or PostgreSQL.

Only the composition root imports this package; `bot/` knows the `Store` Protocol alone.
"""

from storage.store import SQLAlchemyStore, redact_url

__all__ = ["SQLAlchemyStore", "redact_url"]
