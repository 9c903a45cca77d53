"""Which conversation a message belongs to, and which turns are its context.

A channel (a Telegram chat, a Discord channel or thread, a console session) holds one or more
conversations. `Conversation` names one: the whole channel (`sub` None) or one user's exchange
with the bot inside it (`sub` "u:<author id>"). Its `key` is what the pipeline locks and
coalesces bursts by and what the generator keys its KV cache by:

    "telegram:-100"          the channel's one shared history
    "telegram:-100#u:42"     user 42's conversation in that channel

The context scope (`DIALOGBOT_CONTEXT`, `/settings context=`) decides the context of a group
message; a direct chat is one conversation whatever the scope:

- "chain":   the chain of replies that leads to the message, root first. A message that replies
             to nothing continues its author's own latest exchange with the bot in the channel;
             a reply to an old bot message continues that branch (see `storage.store.append`).
- "user":    the author's own turns in the channel and the bot's answers to them.
- "channel": everything said to the bot in the channel, by everyone.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from bot.events import Incoming, Role, Turn

SCOPES = ("chain", "user", "channel")
TALK = ("mentions", "all")


@dataclass(frozen=True, slots=True)
class Conversation:
    platform: str
    channel: str
    sub: str | None = None  # None = the whole channel
    scope: str = "channel"

    @property
    def channel_key(self) -> str:
        return f"{self.platform}:{self.channel}"

    @property
    def key(self) -> str:
        return self.channel_key if self.sub is None else f"{self.channel_key}#{self.sub}"


def user_conversation(author_id: str) -> str:
    """The `Turn.conversation` of a user's group turns (and of the bot's answers to them)."""
    return f"u:{author_id}"


def scope_of(settings: dict[str, Any], default: str) -> str:
    scope = settings.get("context", default)
    return scope if scope in SCOPES else default


def talks_freely(settings: dict[str, Any], event: Incoming) -> bool:
    """True when the bot answers every message in the event's channel (`talk=all`); the
    platform configuration's free-talk channels are "all" unless set otherwise."""
    return settings.get("talk", "all" if event.free_talk else "mentions") == "all"


def conversation_of(platform: str, channel: str, conversation: str, scope: str) -> Conversation:
    """The conversation a stored turn (its `Turn.conversation`) belongs to under `scope`.
    Direct chats store "" and are one conversation whatever the scope."""
    if not conversation or scope == "channel":
        return Conversation(platform, channel, None, "channel")
    return Conversation(platform, channel, conversation, scope)


def for_event(event: Incoming, scope: str) -> Conversation:
    if event.is_direct:
        return Conversation(event.platform, event.channel, None, "channel")
    return conversation_of(event.platform, event.channel, user_conversation(event.author_id),
                           scope)


def with_quotes(turns: list[Turn]) -> list[Turn]:
    """The turns as the model sees them: a message that replies to a message the bot never
    stored is preceded by that message's text (as a turn of whoever wrote it)."""
    out: list[Turn] = []
    for turn in turns:
        if turn.quote:
            out.append(replace(turn, role=turn.quote_role or Role.USER, text=turn.quote,
                               author_id="", author_name="", message_id=None, token_ids=None,
                               id=None, quote=None, quote_role=None, reply_to=None))
        out.append(turn)
    return out
