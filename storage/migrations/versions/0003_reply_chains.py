"""Reply chains for group conversations (issue 14).

- turns.parent_id: the turn a turn follows in its reply chain: for a user message, the message
  it replies to (a stored user turn, or a bot turn through `sent_parts`), else the author's own
  latest turn in the channel; for a bot reply, the last message it answers. Walking parent_id
  from a message to the root gives its context in `chain` scope. Existing history gets chains
  that follow each author's own exchange with the bot.
- turns.reply_to: the platform message id a user message replies to.
- turns.quote / quote_role: the text of a replied-to message the bot never stored (another
  person's message, or a bot message from before), shown to the model just before the message.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-27
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None

BigId = sa.BigInteger().with_variant(sa.Integer(), "sqlite")


def upgrade() -> None:
    # plain ADD COLUMN, no table rebuild. parent_id has no foreign key: SQLite cannot add one
    # without rebuilding the table (whose self-references would cascade while it is dropped);
    # the store clears parent ids that point at deleted turns instead.
    op.add_column("turns", sa.Column("parent_id", BigId, nullable=True))
    op.add_column("turns", sa.Column("reply_to", sa.String(128), nullable=True))
    op.add_column("turns", sa.Column("quote", sa.Text(), nullable=True))
    op.add_column("turns", sa.Column("quote_role", sa.String(16), nullable=True))
    # a reply follows the message it answers; a message follows its author's previous turn
    op.execute("UPDATE turns SET parent_id = in_reply_to WHERE role = 'bot'")
    op.execute(
        "UPDATE turns SET parent_id = (SELECT p.id FROM turns p WHERE p.platform = "
        "turns.platform AND p.channel = turns.channel AND p.conversation = turns.conversation "
        "AND (p.seq < turns.seq OR (p.seq = turns.seq AND p.id < turns.id)) "
        "ORDER BY p.seq DESC, p.id DESC LIMIT 1) WHERE role = 'user'")
    op.create_index("ix_turns_parent_id", "turns", ["parent_id"])


def downgrade() -> None:
    op.drop_index("ix_turns_parent_id", table_name="turns")
    for column in ("quote_role", "quote", "reply_to", "parent_id"):
        op.drop_column("turns", column)
