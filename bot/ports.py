"""The seams. The pipeline knows only these Protocols and the value types in `bot.events`.

Each has async `start`/`stop`; implementations live in adapters/, storage/ and bot/ itself.
"""

from __future__ import annotations

from collections.abc import Sequence
from contextlib import AbstractAsyncContextManager
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from bot.events import Generated, GenerationRequest, Incoming, Reply, Turn

if TYPE_CHECKING:
    from bot.pipeline import Pipeline


@runtime_checkable
class Adapter(Protocol):
    """A platform connection.

    Contract:
    - `name` is the platform name put in every `Incoming.platform` it produces.
    - `start(pipeline)` connects and begins delivering events with `pipeline.submit(event)`
      (each event then runs in its own task); it returns once the adapter is running.
    - `stop()` stops intake, lets `send` calls in flight finish, and disconnects. Idempotent.
    - `send(reply)` delivers the text as inert plain text (no markup, no pings), split to
      `max_message_length`, as a reply to `reply.reply_to` where the platform supports it;
      it waits out platform rate limits (429 retry-after) rather than failing.
    - `is_admin(event)` says whether the author may administer the event's channel on the
      platform (chat admin, Manage Messages). Configured admin ids are checked by the core.
    - `typing(event)` is an async context manager that shows "typing..." until it exits.
    - `rate_limited` is False only for a local console: inbound limits do not apply.
    - `outbound_rate` is (messages, seconds) per channel the core paces replies to before
      calling `send`, or None when the platform library already paces (PTB AIORateLimiter).
    """

    name: str
    max_message_length: int
    rate_limited: bool
    outbound_rate: tuple[int, float] | None

    async def start(self, pipeline: "Pipeline") -> None: ...

    async def stop(self) -> None: ...

    async def send(self, reply: Reply) -> None: ...

    async def is_admin(self, event: Incoming) -> bool: ...

    def typing(self, event: Incoming) -> AbstractAsyncContextManager[None]: ...


class Store(Protocol):
    """Per-channel conversation history and per-channel settings, keyed by (platform, channel).

    Contract: every method commits before it returns (a turn appended is durable); `recent`
    returns turns oldest first; `forget` removes one user's turns on one platform in every
    channel, together with the bot turns that answered them; `reset` removes a channel's
    turns (and keeps its settings). Errors surface as `bot.errors.StoreError`.
    """

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def append(self, turn: Turn) -> Turn: ...

    async def add_reply(self, reply: Turn, answers: Sequence[int]) -> Turn:
        """Append a bot turn and mark the user turns it answers ANSWERED, in one transaction."""
        ...

    async def recent(self, platform: str, channel: str, limit: int) -> list[Turn]: ...

    async def channels(self, platform: str) -> list[str]:
        """Every channel of `platform` that has stored turns, sorted."""
        ...

    async def reset(self, platform: str, channel: str) -> int: ...

    async def forget(self, platform: str, author_id: str) -> int: ...

    async def count(self, platform: str | None = None, channel: str | None = None) -> int: ...

    async def pending(self) -> list[Turn]:
        """Every user turn still PENDING (never answered nor skipped), oldest first."""
        ...

    async def mark(self, turn_ids: Sequence[int], state: str) -> None: ...

    async def get_settings(self, platform: str, channel: str) -> dict[str, Any]: ...

    async def set_settings(self, platform: str, channel: str, values: dict[str, Any]) -> None: ...


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
