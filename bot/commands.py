"""Platform-neutral commands: /start, /help, /reset, /forget, /settings.

Adapters hand the core "/name args" text (Telegram's "/reset@bot" and Discord's "@bot reset"
already normalised). Who counts as admin: configured ids (DIALOGBOT_ADMIN_IDS) or what the
platform says (chat administrator, Manage Messages); in a direct message the user owns it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Annotated, Any, Protocol

from pydantic import TypeAdapter, ValidationError

from bot.config import Config
from bot.conversation import Conversation
from bot.events import DECODING_FIELDS, DecodingSettings, Incoming
from bot.ports import Generator, Store
from bot.rankers import parse_rankers

COMMAND_NAMES = ("start", "help", "reset", "forget", "settings")

HELP = """I'm a DialoGPT chat bot. Talk to me and I'll answer{where}.
/help - this message
/reset - forget this chat's conversation (admins only in groups)
/forget - delete every message you sent me, everywhere
/settings - show how I pick words; admins: /settings temperature=0.7 top_k=40, /settings default"""


@dataclass(frozen=True, slots=True)
class Command:
    name: str
    args: str


@dataclass(frozen=True, slots=True)
class CommandResult:
    text: str
    refused: bool = False


def parse_command(text: str) -> Command | None:
    """"/name@bot args" -> Command("name", "args"); None when the text is not a command."""
    if not text.startswith("/") or len(text) < 2 or text[1].isspace():
        return None
    head, _, args = text[1:].partition(" ")
    name = head.split("@", 1)[0].lower()
    return Command(name, args.strip()) if name else None


def _field_validator(name: str) -> TypeAdapter:
    """Validate a /settings value with the same type and bounds as the DIALOGBOT_ setting."""
    field = Config.model_fields[name]
    if field.metadata:
        return TypeAdapter(Annotated[(field.annotation, *field.metadata)])
    return TypeAdapter(field.annotation)


class Control(Protocol):
    """What commands need from the pipeline (`bot.pipeline.Pipeline`)."""

    def conversation_for(self, event: Incoming) -> Conversation: ...

    def exclusive(self, key: str, affects: Callable[[Any], bool]
                  ) -> AbstractAsyncContextManager[None]:
        """Invalidate the generations in flight that `affects` selects (an `Inflight` with
        `conversation` and `authors`), then hold the conversation lock `key`."""
        ...


class Commands:
    def __init__(self, config: Config, store: Store, generator: Generator, control: Control):
        self.config = config
        self.store = store
        self.generator = generator
        self.control = control
        self._validators = {name: _field_validator(name) for name in DECODING_FIELDS}
        self.rankers = ", ".join(map(str, parse_rankers(config.rankers))) or "none"

    def is_configured_admin(self, event: Incoming) -> bool:
        return event.user_key in self.config.admin_ids

    async def dispatch(self, command: Command, event: Incoming,
                       platform_admin: Callable[[], Awaitable[bool]]) -> CommandResult:
        async def may_administer() -> bool:
            if event.is_direct or self.is_configured_admin(event):
                return True
            if event.platform_admin is not None:
                return event.platform_admin
            return await platform_admin()

        if command.name in ("start", "help"):
            where = "" if event.is_direct else " when you mention me or reply to me"
            return CommandResult(HELP.format(where=where))
        if command.name == "reset":
            if not await may_administer():
                return CommandResult("Only admins of this chat can reset its conversation.",
                                     refused=True)
            here = event.channel_key
            async with self.control.exclusive(self.control.conversation_for(event).key,
                                              lambda f: f.conversation.channel_key == here):
                removed = await self.store.reset(event.platform, event.channel)
                self.generator.forget_channel(here)
            return CommandResult(f"Done: I've forgotten this chat's conversation "
                                 f"({removed} message{'s' * (removed != 1)}).")
        if command.name == "forget":
            def mine(flight: Any) -> bool:
                return (flight.conversation.platform == event.platform
                        and event.author_id in flight.authors)

            async with self.control.exclusive(self.control.conversation_for(event).key, mine):
                gone = await self.store.forget(event.platform, event.author_id)
                for channel in {*gone.channels, event.channel}:
                    self.generator.forget_channel(f"{event.platform}:{channel}")
            removed = gone.removed
            return CommandResult(f"Done: I deleted {removed} of your message"
                                 f"{'s' * (removed != 1)} and my replies to them.")
        if command.name == "settings":
            return await self.settings(command.args, event, may_administer)
        return CommandResult(f"Unknown command /{command.name[:32]}. Try /help.", refused=True)

    async def settings(self, args: str, event: Incoming,
                       may_administer: Callable[[], Awaitable[bool]]) -> CommandResult:
        current = await self.store.get_settings(event.platform, event.channel)
        if not args:
            return CommandResult(self.describe(current))
        if not await may_administer():
            return CommandResult("Only admins of this chat can change its settings.",
                                 refused=True)
        clear = args.strip().lower() in ("default", "defaults", "reset")
        try:
            changes = {} if clear else self.parse_changes(args)
        except ValueError as exc:
            return CommandResult(str(exc), refused=True)
        async with self.control.exclusive(self.control.conversation_for(event).key,
                                          lambda f: False):
            merged = await self.store.update_settings(event.platform, event.channel, changes,
                                                      clear=clear)
            self.generator.forget_channel(event.channel_key)
        if clear:
            return CommandResult("Settings are back to the defaults.\n" + self.describe({}))
        return CommandResult("Settings updated.\n" + self.describe(merged))

    def parse_changes(self, args: str) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for item in args.replace(",", " ").split():
            name, sep, raw = item.partition("=")
            name = name.strip().lower()
            if not sep or name not in self._validators:
                raise ValueError(f"Can't set {item[:40]!r}. Use name=value with one of: "
                                 + ", ".join(DECODING_FIELDS) + ".")
            try:
                changes[name] = self._validators[name].validate_python(raw.strip())
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(f"{name}: {msg} (got {raw[:20]!r}).") from None
            if name == "candidates" and changes[name] > self.config.max_candidates:
                raise ValueError(f"candidates: at most {self.config.max_candidates} here "
                                 f"(got {changes[name]}).")
        return changes

    def effective(self, overrides: dict[str, Any]) -> DecodingSettings:
        settings = self.config.decoding.merged(overrides)
        if settings.candidates > self.config.max_candidates:  # the maximum was lowered since
            settings = replace(settings, candidates=self.config.max_candidates)
        return settings

    def describe(self, overrides: dict[str, Any]) -> str:
        settings = self.effective(overrides)
        lines = ["Settings for this chat (* = changed here):"]
        for name in DECODING_FIELDS:
            mark = "*" if name in overrides else ""
            note = (f" (at most {self.config.max_candidates}; used when do_sample is on)"
                    if name == "candidates" else "")
            lines.append(f"{name} = {getattr(settings, name)}{mark}{note}")
        lines.append(f"rankers = {self.rankers}")
        lines.append(f"word filter = {'on' if self.config.blocklist else 'off'}")
        return "\n".join(lines)
