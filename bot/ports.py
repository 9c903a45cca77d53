"""The seams. The pipeline knows only these Protocols and the value types in `bot.events`.

Each has async `start`/`stop`; implementations live in adapters/, storage/ and bot/ itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot.events import (Forgotten, Generated, GenerationRequest, Incoming, Outgoing, Reply,
                        Turn)

if TYPE_CHECKING:
    from bot.pipeline import Pipeline


@runtime_checkable
class Adapter(Protocol):
    """A platform connection.

    Contract:
    - `name` is the platform name put in every `Incoming.platform` it produces.
    - `start(pipeline)` connects and begins delivering events with `pipeline.submit(event)`
      (each event then runs in its own task); it returns once the adapter is running.
    - `stop()` stops intake, lets `send_part` calls in flight finish, and disconnects.
      Idempotent.
    - `split(text)` is the text as the platform will show it (inert plain text: no markup, no
      pings), cut into parts within `max_message_length`. Pure and deterministic: the same text
      always gives the same parts, so a reply interrupted after some parts resumes where it
      stopped, even after a restart.
    - `send_part(reply, index, part)` delivers one part (part 0 as a reply to `reply.reply_to`
      where the platform supports it) and returns the platform's id of the message it created
      (None where the platform gives none). It waits out platform rate limits (429
      retry-after) rather than failing; it raises `UndeliverableError` when the platform
      refuses for good (chat gone, bot blocked) and any other error when a retry may work.
    - `is_admin(event)` says whether the author may administer the event's channel on the
      platform (chat admin, Manage Messages). Configured admin ids are checked by the core.
    - `typing(event)` is an async context manager that shows "typing..." until it exits.
    - `rate_limited` is False only for a local console: inbound limits do not apply.
    - `outbound_rate` is (messages, seconds) per channel the core paces replies to before
      each part, or None when the platform library already paces.
    """

    name: str
    max_message_length: int
    rate_limited: bool
    outbound_rate: tuple[int, float] | None

    async def start(self, pipeline: "Pipeline") -> None: ...

    async def stop(self) -> None: ...

    def split(self, text: str) -> list[str]: ...

    async def send_part(self, reply: Reply, index: int, part: str) -> str | None: ...

    async def is_admin(self, event: Incoming) -> bool: ...

    def typing(self, event: Incoming) -> AbstractAsyncContextManager[None]: ...


class Store(Protocol):
    """Conversation history, claims, the outbox and per-channel settings, keyed by
    (platform, channel[, conversation]). `storage.store.SQLAlchemyStore` documents each method.

    Contract: every method commits before it returns (a turn appended is durable); `recent`
    returns turns in conversation order (by seq, then id), oldest first; `append` places a user
    message in its reply chain (`parent_id`) and `chain` walks it back; `forget` removes one
    user's turns on one platform in every channel, together with the bot turns that answered
    them; `reset` removes a channel's (or one conversation's) turns and keeps its settings;
    `claim` is atomic across instances; `add_reply` stores nothing when what it answers
    changed meanwhile. Errors surface as `bot.errors.StoreError`.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def append(self, turn: Turn) -> Turn: ...

    async def add_reply(self, reply: Turn, answers: Sequence[int], *, owner: str | None = None,
                        context: Sequence[int] = (), lease: float = 0.0) -> Turn: ...

    async def recent(self, platform: str, channel: str, limit: int,
                     conversation: str | None = None, until_seq: int | None = None
                     ) -> list[Turn]: ...

    async def channels(self, platform: str) -> list[str]:
        """Every channel of `platform` that has stored turns, sorted."""
        ...

    async def reset(self, platform: str, channel: str,
                    conversation: str | None = None) -> int: ...

    async def chain(self, leaf_id: int, limit: int) -> list[Turn]: ...

    async def find_message(self, platform: str, channel: str,
                           message_id: str) -> Turn | None: ...

    async def reset_branch(self, leaf_id: int) -> int: ...

    async def forget(self, platform: str, author_id: str) -> Forgotten: ...

    async def count(self, platform: str | None = None, channel: str | None = None) -> int: ...

    async def pending(self) -> list[Turn]: ...

    async def mark(self, turn_ids: Sequence[int], state: str) -> None: ...

    async def claim_owners(self) -> list[str]: ...

    async def claim(self, platform: str, channel: str, conversation: str | None, owner: str,
                    lease: float, *, dead: Sequence[str] = ()) -> list[Turn]: ...

    async def renew(self, turn_ids: Sequence[int], owner: str, lease: float) -> int: ...

    async def release(self, turn_ids: Sequence[int], owner: str) -> None: ...

    async def unclaimed(self, platforms: Sequence[str], older_than: float = 0.0, *,
                        dead: Sequence[str] = ()) -> list[Turn]: ...

    async def claim_outbox(self, platforms: Sequence[str], owner: str, lease: float,
                           older_than: float = 0.0, *, dead: Sequence[str] = ()
                           ) -> list[Outgoing]: ...

    async def confirm_part(self, turn_id: int, part: int, message_id: str, *,
                           last: bool) -> None: ...

    async def get_settings(self, platform: str, channel: str) -> dict[str, Any]: ...

    async def set_settings(self, platform: str, channel: str, values: dict[str, Any]) -> None: ...

    async def update_settings(self, platform: str, channel: str, changes: dict[str, Any], *,
                              clear: bool = False) -> dict[str, Any]: ...


class Generator(Protocol):
    """Turns a conversation's history into DialoGPT's reply.

    Contract: `reply` never blocks the event loop (all model and tokenizer work runs in the
    generator's worker); it returns non-empty text (a short fallback line when the model
    gives nothing); raises `GenerationTimeout` after the configured timeout, `BusyError` when
    its queue is full, `GenerationError` for anything else. `forget_channel(key)` drops
    whatever the generator keeps for the conversation `key` (caches) after /reset, /forget or
    a settings change; for a channel key ("platform:channel") it also drops every
    conversation inside it ("platform:channel#..."), and a request that started before the
    call never stores state for them afterwards. `ready` is True while the generator can
    serve (started, its worker alive); /readyz reports it.
    """

    @property
    def ready(self) -> bool: ...

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def reply(self, request: GenerationRequest) -> Generated: ...

    def forget_channel(self, channel_key: str) -> None: ...

    @property
    def queue_depth(self) -> int: ...


class Limiter(Protocol):
    """Inbound admission and outbound pacing.

    Contract: `admit(key)` is True when the key (e.g. "telegram:42" user or channel) has
    capacity and consumes one unit; it never waits. `pace(key, rate, period)` waits until one
    more message may go out on that key at `rate` per `period` seconds.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def admit(self, key: str, rate: float, period: float) -> bool: ...

    async def pace(self, key: str, rate: float, period: float) -> None: ...


class ChannelLock(Protocol):
    """At most one generation per channel: `hold(key)` is an async context manager."""

    def hold(self, key: str) -> AbstractAsyncContextManager[None]: ...
