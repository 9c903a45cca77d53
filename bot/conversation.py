"""Which conversation a message belongs to.

A channel (a Telegram chat, a Discord channel or thread, a console session) holds one or more
conversations. `Conversation` names one: the whole channel (`sub` None) or one conversation
inside it (`sub` "u:<author id>", a user's own exchange with the bot). Its `key` is what the
pipeline locks, the generator caches by and the store filters on:

    "telegram:-100"          the channel's one shared history
    "telegram:-100#u:42"     user 42's conversation in that channel
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Conversation:
    platform: str
    channel: str
    sub: str | None = None  # None = the whole channel

    @property
    def channel_key(self) -> str:
        return f"{self.platform}:{self.channel}"

    @property
    def key(self) -> str:
        return self.channel_key if self.sub is None else f"{self.channel_key}#{self.sub}"


def user_conversation(author_id: str) -> str:
    """The `Turn.conversation` value of a user's turns (and of the bot's answers to them)."""
    return f"u:{author_id}"
