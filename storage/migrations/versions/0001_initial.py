"""Initial schema: turns and channel_settings.

Revision ID: 0001
Revises:
Create Date: 2025-01-01
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    op.create_table(
        "turns",
        sa.Column("id", BigId, primary_key=True, autoincrement=True),
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("text", sa.Text(), nullable=False),
        sa.Column("author_id", sa.String(128), nullable=False),
        sa.Column("author_name", sa.Text(), nullable=False),
        sa.Column("message_id", sa.String(128), nullable=True),
        sa.Column("token_ids", sa.Text(), nullable=True),
        sa.Column("in_reply_to", BigId, nullable=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_turns"),
        sa.ForeignKeyConstraint(["in_reply_to"], ["turns.id"], ondelete="CASCADE",
                                name="fk_turns_in_reply_to_turns"),
    )
    op.create_index("ix_turns_platform_channel_id", "turns", ["platform", "channel", "id"])
    op.create_index("ix_turns_platform_author_id", "turns", ["platform", "author_id"])
    op.create_index("ix_turns_state", "turns", ["state"])
    op.create_index("ix_turns_in_reply_to", "turns", ["in_reply_to"])
    op.create_table(
        "channel_settings",
        sa.Column("platform", sa.String(32), nullable=False),
        sa.Column("channel", sa.String(128), nullable=False),
        sa.Column("values", sa.Text(), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.PrimaryKeyConstraint("platform", "channel", name="pk_channel_settings"),
    )


def downgrade() -> None:
    op.drop_table("channel_settings")
    op.drop_index("ix_turns_in_reply_to", table_name="turns")
    op.drop_index("ix_turns_state", table_name="turns")
    op.drop_index("ix_turns_platform_author_id", table_name="turns")
    op.drop_index("ix_turns_platform_channel_id", table_name="turns")
    op.drop_table("turns")
