"""Conversation order, claims and the outbox.

- turns.seq: explicit conversation order. A user turn's seq is its id; a bot turn's is the seq
  of the user turn it answers (in_reply_to), so a reply sorts right after what it answers
  even when other messages arrived while it was generated. Existing history gets the same
  values (this also puts replies stored under the old row-id order back in place).
- turns.conversation: "u:<author id>" for user turns and the bot turns answering them.
- turns.claimed_by / claim_until: which instance answers a pending message (or sends a reply)
  and until when, so each message is answered once across restarts and instances.
- sent_parts: the platform's message id of every delivered part of a bot reply; a reply stays
  in state "sending" until all its parts are confirmed (the outbox).

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-26
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # plain ADD COLUMN (with defaults where NOT NULL): no table rebuild, history stays in place
    op.add_column("turns", sa.Column("conversation", sa.String(160), nullable=False,
                                     server_default=""))
    op.add_column("turns", sa.Column("seq", BigId, nullable=False, server_default="0"))
    op.add_column("turns", sa.Column("claimed_by", sa.String(80), nullable=True))
    op.add_column("turns", sa.Column("claim_until", sa.DateTime(timezone=True), nullable=True))
    op.execute("UPDATE turns SET seq = COALESCE(in_reply_to, id)")
    op.execute("UPDATE turns SET conversation = 'u:' || author_id WHERE role = 'user'")
    op.execute("UPDATE turns SET conversation = COALESCE((SELECT q.conversation FROM turns q "
               "WHERE q.id = turns.in_reply_to), '') WHERE role = 'bot'")
    if op.get_context().dialect.name != "sqlite":
        op.alter_column("turns", "seq", server_default=None)
    op.create_index("ix_turns_platform_channel_seq_id", "turns",
                    ["platform", "channel", "seq", "id"])
    op.create_index("ix_turns_platform_channel_conversation_seq_id", "turns",
                    ["platform", "channel", "conversation", "seq", "id"])
    op.create_index("ix_turns_platform_channel_message_id", "turns",
                    ["platform", "channel", "message_id"])
    op.drop_index("ix_turns_platform_channel_id", table_name="turns")
    op.create_table(
        "sent_parts",
        sa.Column("turn_id", BigId, nullable=False),
        sa.Column("part", sa.Integer(), nullable=False),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=False),
        sa.Column("sent_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("turn_id", "part", name="pk_sent_parts"),
        sa.ForeignKeyConstraint(["turn_id"], ["turns.id"], ondelete="CASCADE",
                                name="fk_sent_parts_turn_id_turns"),
    )
    op.create_index("ix_sent_parts_platform_channel_message_id", "sent_parts",
                    ["platform", "channel", "message_id"])


def downgrade() -> None:
    op.drop_index("ix_sent_parts_platform_channel_message_id", table_name="sent_parts")
    op.drop_table("sent_parts")
    op.create_index("ix_turns_platform_channel_id", "turns", ["platform", "channel", "id"])
    op.drop_index("ix_turns_platform_channel_message_id", table_name="turns")
    op.drop_index("ix_turns_platform_channel_conversation_seq_id", table_name="turns")
    op.drop_index("ix_turns_platform_channel_seq_id", table_name="turns")
    for column in ("claim_until", "claimed_by", "seq", "conversation"):
        op.drop_column("turns", column)  # SQLite >= 3.35 drops unindexed columns in place
