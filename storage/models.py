"""Database schema: the `turns` history (with claims and the outbox state), `sent_parts` (the
platform ids of every delivered part of a bot turn) and per-channel `channel_settings`.

These tables are private to `storage/`: rows are turned into `bot.events.Turn` values before
they leave it. The schema is created by the Alembic migrations in `storage/migrations`; keep
the two in step (tests compare them).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from sqlalchemy import (BigInteger, Column, DateTime, ForeignKey, Index, Integer, MetaData,
                        String, Table, Text)
from sqlalchemy.types import TypeDecorator

# Stable constraint names, so migrations can refer to them on every backend.
metadata = MetaData(naming_convention={
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
})

# BIGINT on PostgreSQL; on SQLite only "INTEGER PRIMARY KEY" is the autoincrementing rowid.
BigId = BigInteger().with_variant(Integer(), "sqlite")


class UTCDateTime(TypeDecorator[datetime]):
    """A timezone-aware UTC datetime on every backend.

    Values are converted to UTC before they are stored (naive ones are taken as UTC); SQLite
    keeps no zone, so what comes back naive is marked UTC again.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)

    def process_result_value(self, value: datetime | None, dialect: Any) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            return value.replace(tzinfo=timezone.utc)
        return value.astimezone(timezone.utc)


class TokenIds(TypeDecorator[tuple[int, ...]]):
    """A tuple of token ids stored as JSON text ("[15496, 995]")."""

    impl = Text()
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Any) -> str | None:
        if value is None:
            return None
        return json.dumps([int(v) for v in value], separators=(",", ":"))

    def process_result_value(self, value: str | None, dialect: Any) -> tuple[int, ...] | None:
        if value is None:
            return None
        return tuple(int(v) for v in json.loads(value))


turns = Table(
    "turns", metadata,
    Column("id", BigId, primary_key=True, autoincrement=True),
    Column("platform", String(32), nullable=False),
    Column("channel", String(128), nullable=False),
    # the conversation inside the channel a turn belongs to: "u:<author id>" for a user's turn
    # and the bot's answers to it (bot.conversation), "" where nobody in particular
    Column("conversation", String(160), nullable=False, server_default=""),
    # conversation order: a user turn's own id; a bot turn's = the seq of the last user turn
    # it answers, so a reply sorts right after what it answers (ties: by id)
    Column("seq", BigId, nullable=False),
    Column("role", String(16), nullable=False),
    Column("text", Text, nullable=False),
    Column("author_id", String(128), nullable=False),
    Column("author_name", Text, nullable=False),
    Column("message_id", String(128), nullable=True),
    Column("token_ids", TokenIds, nullable=True),
    # the user turn a bot turn answers; deleting that turn deletes the answer too
    Column("in_reply_to", BigId, ForeignKey("turns.id", ondelete="CASCADE"), nullable=True),
    Column("state", String(16), nullable=False),
    # reply chains (issue 14): the turn this one follows (no foreign key: see migration 0003;
    # the store clears ids of deleted turns), the platform message id a user message replies
    # to, and the text (and role) of that message when the bot never stored it
    Column("parent_id", BigId, nullable=True),
    Column("reply_to", String(128), nullable=True),
    Column("quote", Text, nullable=True),
    Column("quote_role", String(16), nullable=True),
    # exactly once: the instance answering (or sending) this turn, and until when its claim
    # holds unless renewed; an expired claim may be taken over
    Column("claimed_by", String(80), nullable=True),
    Column("claim_until", UTCDateTime, nullable=True),
    Column("created_at", UTCDateTime, nullable=False),
    Index(None, "platform", "channel", "seq", "id"),
    Index(None, "platform", "channel", "conversation", "seq", "id"),
    Index(None, "platform", "channel", "message_id"),
    Index(None, "platform", "author_id"),
    Index(None, "state"),
    Index(None, "in_reply_to"),
    Index(None, "parent_id"),
)

# the outbox's receipts: one row per part of a bot turn the platform confirmed, with the
# platform's message id (a reply is "sending" until every part has one)
sent_parts = Table(
    "sent_parts", metadata,
    Column("turn_id", BigId, ForeignKey("turns.id", ondelete="CASCADE"), primary_key=True),
    Column("part", Integer, primary_key=True),
    Column("platform", String(32), nullable=False),
    Column("channel", String(128), nullable=False),
    Column("message_id", String(128), nullable=False),
    Column("sent_at", UTCDateTime, nullable=False),
    Index(None, "platform", "channel", "message_id"),
)

channel_settings = Table(
    "channel_settings", metadata,
    Column("platform", String(32), primary_key=True),
    Column("channel", String(128), primary_key=True),
    Column("values", Text, nullable=False),  # a JSON object
    Column("updated_at", UTCDateTime, nullable=False),
)
