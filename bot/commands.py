"""Platform-neutral commands: /start, /help, /reset, /forget, /settings.

Adapters hand the core "/name args" text (Telegram's "/reset@bot" and Discord's "@bot reset"
already normalised). Who counts as admin: configured ids (DIALOGBOT_ADMIN_IDS) or what the
platform says (chat administrator, Manage Messages); in a direct message the user owns it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any

from pydantic import TypeAdapter, ValidationError

from bot.characters import DEFAULT, Cast
from bot.config import Config
from bot.events import DECODING_FIELDS, DecodingSettings, Incoming
from bot.ports import Generator, Store
from bot.rankers import parse_rankers

COMMAND_NAMES = ("start", "help", "reset", "forget", "settings")
CHARACTER = "character"  # the /settings key of the channel's character (None = the default)

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


class Commands:
    def __init__(self, config: Config, store: Store, generator: Generator):
        self.config = config
        self.store = store
        self.generator = generator
        self._validators = {name: _field_validator(name) for name in DECODING_FIELDS}
        self.rankers = ", ".join(map(str, parse_rankers(config.rankers))) or "none"
        self.cast = Cast.from_config(config) if config.characters else None

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
            return CommandResult(HELP.format(where=where) + self.characters_help())
        if command.name == "reset":
            if not await may_administer():
                return CommandResult("Only admins of this chat can reset its conversation.",
                                     refused=True)
            removed = await self.store.reset(event.platform, event.channel)
            self.generator.forget_channel(event.channel_key)
            return CommandResult(f"Done: I've forgotten this chat's conversation "
                                 f"({removed} message{'s' * (removed != 1)}).")
        if command.name == "forget":
            removed = await self.store.forget(event.platform, event.author_id)
            self.generator.forget_channel(event.channel_key)
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
        if args.strip().lower() in ("default", "defaults", "reset"):
            await self.store.set_settings(event.platform, event.channel, {})
            self.generator.forget_channel(event.channel_key)
            return CommandResult("Settings are back to the defaults.\n" + self.describe({}))
        try:
            changes = self.parse_changes(args)
        except ValueError as exc:
            return CommandResult(str(exc), refused=True)
        merged = {**current, **changes}
        await self.store.set_settings(event.platform, event.channel, merged)
        self.generator.forget_channel(event.channel_key)
        return CommandResult("Settings updated.\n" + self.describe(merged))

    def parse_changes(self, args: str) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        for item in args.replace(",", " ").split():
            name, sep, raw = item.partition("=")
            name = name.strip().lower()
            if sep and name == CHARACTER and self.cast is not None:
                changes[name] = self.parse_character(raw)
                continue
            if not sep or name not in self._validators:
                raise ValueError(f"Can't set {item[:40]!r}. Use name=value with one of: "
                                 + ", ".join(DECODING_FIELDS + (CHARACTER,) * bool(self.cast))
                                 + ".")
            try:
                changes[name] = self._validators[name].validate_python(raw.strip())
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(f"{name}: {msg} (got {raw[:20]!r}).") from None
            if name == "candidates" and changes[name] > self.config.max_candidates:
                raise ValueError(f"candidates: at most {self.config.max_candidates} here "
                                 f"(got {changes[name]}).")
        return changes

    def parse_character(self, raw: str) -> str | None:
        """A /settings character= value: a name of DIALOGBOT_CHARACTERS, or None for
        "default" (back to DIALOGBOT_MODEL's character)."""
        wanted = raw.strip().lower()
        if wanted == DEFAULT:
            return None
        if wanted not in self.cast.names:
            raise ValueError(f"character: one of {', '.join(self.cast.names)} or default "
                             f"(got {raw[:20]!r}).")
        return wanted

    def character(self, overrides: dict[str, Any]) -> str | None:
        """Who answers in a channel with these settings; None when there are no characters.
        A name no longer configured falls back to the default character."""
        return self.cast.resolve(overrides.get(CHARACTER)) if self.cast else None

    def characters_help(self) -> str:
        if self.cast is None:
            return ""
        return (f"\nCharacters: {', '.join(self.cast.names)} (default {self.cast.default}); "
                "admins: /settings character=NAME, /settings character=default")

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
        if self.cast is not None:
            lines.append(f"character = {self.character(overrides)}"
                         f"{'*' if overrides.get(CHARACTER) else ''} "
                         f"(of {', '.join(self.cast.names)})")
        lines.append(f"rankers = {self.rankers}")
        lines.append(f"word filter = {'on' if self.config.blocklist else 'off'}")
        return "\n".join(lines)
