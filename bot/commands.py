"""Platform-neutral commands: /start, /help, /reset, /forget, /settings.

Adapters hand the core "/name args" text (Telegram's "/reset@bot" and Discord's "@bot reset"
already normalised). Who counts as admin: configured ids (DIALOGBOT_ADMIN_IDS) or what the
platform says (chat administrator, Manage Messages); in a direct message the user owns it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal, Protocol

from pydantic import TypeAdapter, ValidationError

from bot.characters import DEFAULT, Cast
from bot.config import Config
from bot.conversation import SCOPES, TALK, Conversation
from bot.events import DECODING_FIELDS, DecodingSettings, Incoming
from bot.ports import Generator, Store
from bot.rankers import parse_rankers

COMMAND_NAMES = ("start", "help", "reset", "forget", "settings")
CHANNEL_SETTINGS = ("context", "talk")  # not decoding: who and what the bot answers here
CHARACTER = "character"  # the /settings key of the channel's character (None = the default)

HELP = """I'm a DialoGPT chat bot. Talk to me and I'll answer{where}.
/help - this message
/reset - {reset}
/forget - delete every message you sent me, everywhere
/settings - show how I talk here; admins change it, e.g. /settings temperature=0.7 top_k=40,
  /settings context=chain|user|channel, /settings talk=mentions|all, /settings default"""

SCOPE_HELP = {
    "chain": "Here I follow reply chains: reply to one of my messages to go on with that "
             "conversation; a message that replies to nothing goes on with your last one. "
             "Reply /reset to one of my messages to clear that conversation; admins: /reset "
             "clears the whole chat.",
    "user": "Here everyone has their own conversation with me. /reset clears yours; admins: "
            "/reset all clears the whole chat.",
    "channel": "Here everyone shares one conversation with me; admins can /reset it.",
}
TELEGRAM_TALK_ALL = ("To let me answer every message in a group (/settings talk=all), turn my "
                     "privacy mode off with @BotFather (/setprivacy) or make me an admin.")

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

    async def conversation_for(self, event: Incoming) -> Conversation: ...

    async def settings_for(self, platform: str, channel: str,
                           parent: str | None = None) -> dict[str, Any]: ...

    def settings_changed(self, platform: str, channel: str) -> None: ...

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
        self._validators["context"] = TypeAdapter(Literal[SCOPES])  # type: ignore[valid-type]
        self._validators["talk"] = TypeAdapter(Literal[TALK])  # type: ignore[valid-type]
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
            return await self.help(event)
        if command.name == "reset":
            return await self.reset(command.args, event, may_administer)
        if command.name == "forget":
            return await self.forget(event)
        if command.name == "settings":
            return await self.settings(command.args, event, may_administer)
        return CommandResult(f"Unknown command /{command.name[:32]}. Try /help.", refused=True)

    async def help(self, event: Incoming) -> CommandResult:
        if event.is_direct:
            return CommandResult(HELP.format(where="", reset="forget our conversation")
                                 + self.characters_help())
        conversation = await self.control.conversation_for(event)
        text = HELP.format(where=" when you mention me or reply to me",
                           reset="forget a conversation here (see below)")
        text += "\n" + SCOPE_HELP[conversation.scope]
        if event.platform == "telegram":
            text += "\n" + TELEGRAM_TALK_ALL
        return CommandResult(text + self.characters_help())

    # --- /reset and /forget -----------------------------------------------------------------
    async def reset(self, args: str, event: Incoming,
                    may_administer: Callable[[], Awaitable[bool]]) -> CommandResult:
        """DM: the chat. Group: `all`, or channel scope: the whole chat (admins); user scope:
        the author's own conversation; chain scope: a reply to one of the bot's messages clears
        that branch (its author or admins), a plain /reset the whole chat (admins)."""
        conversation = await self.control.conversation_for(event)
        everything = args.strip().lower() in ("all", "everything", "chat", "channel")
        if event.is_direct:
            return await self._reset_channel(event, conversation)
        if conversation.scope == "chain" and event.reply_to and not everything:
            return await self._reset_branch(event, conversation, may_administer)
        if conversation.scope == "user" and not everything:
            async with self.control.exclusive(conversation.key,
                                              lambda f: f.conversation.key == conversation.key):
                removed = await self.store.reset(event.platform, event.channel,
                                                 conversation.sub)
                self.generator.forget_channel(conversation.key)
            return CommandResult(f"Done: I've forgotten our conversation here ({_n(removed)}). "
                                 "Admins: /reset all clears the whole chat.")
        if not await may_administer():
            hint = (" Reply /reset to one of my messages to clear that conversation."
                    if conversation.scope == "chain" else "")
            return CommandResult("Only admins of this chat can reset its conversation." + hint,
                                 refused=True)
        return await self._reset_channel(event, conversation)

    async def _reset_channel(self, event: Incoming, conversation: Conversation
                             ) -> CommandResult:
        here = event.channel_key
        async with self.control.exclusive(conversation.key,
                                          lambda f: f.conversation.channel_key == here):
            removed = await self.store.reset(event.platform, event.channel)
            self.generator.forget_channel(here)
        return CommandResult(f"Done: I've forgotten this chat's conversation ({_n(removed)}).")

    async def _reset_branch(self, event: Incoming, conversation: Conversation,
                            may_administer: Callable[[], Awaitable[bool]]) -> CommandResult:
        target = await self.store.find_message(event.platform, event.channel,
                                               event.reply_to or "")
        if target is None:
            return CommandResult("I don't remember that conversation (nothing to clear).")
        owner = target.conversation
        if owner != conversation.sub and not await may_administer():
            return CommandResult("Only the person I was talking with there, or an admin, can "
                                 "clear that conversation.", refused=True)
        key = f"{event.channel_key}#{owner}" if owner else event.channel_key
        async with self.control.exclusive(conversation.key,
                                          lambda f: target.id in f.turn_ids):
            removed = await self.store.reset_branch(target.id)
            self.generator.forget_channel(key)
        return CommandResult(f"Done: I've forgotten that conversation ({_n(removed)}).")

    async def forget(self, event: Incoming) -> CommandResult:
        def mine(flight: Any) -> bool:
            return (flight.conversation.platform == event.platform
                    and event.author_id in flight.authors)

        conversation = await self.control.conversation_for(event)
        async with self.control.exclusive(conversation.key, mine):
            gone = await self.store.forget(event.platform, event.author_id)
            for channel in {*gone.channels, event.channel}:
                self.generator.forget_channel(f"{event.platform}:{channel}")
        removed = gone.removed
        return CommandResult(f"Done: I deleted {removed} of your message"
                             f"{'s' * (removed != 1)} and my replies to them.")

    # --- /settings --------------------------------------------------------------------------
    async def settings(self, args: str, event: Incoming,
                       may_administer: Callable[[], Awaitable[bool]]) -> CommandResult:
        if not args:
            return CommandResult(await self.describe_for(event))
        if not await may_administer():
            return CommandResult("Only admins of this chat can change its settings.",
                                 refused=True)
        clear = args.strip().lower() in ("default", "defaults", "reset")
        try:
            changes = {} if clear else self.parse_changes(args)
        except ValueError as exc:
            return CommandResult(str(exc), refused=True)
        conversation = await self.control.conversation_for(event)
        async with self.control.exclusive(conversation.key, lambda f: False):
            await self.store.update_settings(event.platform, event.channel, changes,
                                             clear=clear)
            self.control.settings_changed(event.platform, event.channel)
            self.generator.forget_channel(event.channel_key)
        head = "Settings are back to the defaults." if clear else "Settings updated."
        return CommandResult(head + "\n" + await self.describe_for(event))

    def parse_changes(self, args: str) -> dict[str, Any]:
        changes: dict[str, Any] = {}
        names = (*DECODING_FIELDS, *CHANNEL_SETTINGS)
        for item in args.replace(",", " ").split():
            name, sep, raw = item.partition("=")
            name = name.strip().lower()
            if sep and name == CHARACTER and self.cast is not None:
                changes[name] = self.parse_character(raw)
                continue
            if not sep or name not in self._validators:
                raise ValueError(f"Can't set {item[:40]!r}. Use name=value with one of: "
                                 + ", ".join(names + (CHARACTER,) * bool(self.cast))
                                 + ".")
            try:
                changes[name] = self._validators[name].validate_python(raw.strip().lower()
                                                                      if name in
                                                                      CHANNEL_SETTINGS
                                                                      else raw.strip())
            except ValidationError as exc:
                msg = exc.errors(include_url=False)[0]["msg"]
                raise ValueError(f"{name}: {msg} (got {raw[:20]!r}).") from None
            if name == "candidates" and changes[name] > self.config.max_candidates:
                raise ValueError(f"candidates: at most {self.config.max_candidates} here "
                                 f"(got {changes[name]}).")
        return changes

    def parse_character(self, raw: str) -> str:
        """A /settings character= value: a name of DIALOGBOT_CHARACTERS, or "default"
        (back to DIALOGBOT_MODEL's character)."""
        wanted = raw.strip().lower()
        if wanted == DEFAULT:
            return DEFAULT  # stored, so a Discord thread can go back to the default
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

    async def describe_for(self, event: Incoming) -> str:
        own = await self.store.get_settings(event.platform, event.channel)
        merged = await self.control.settings_for(event.platform, event.channel, event.parent)
        return self.describe(merged, own, event)

    def describe(self, overrides: dict[str, Any], own: dict[str, Any] | None = None,
                 event: Incoming | None = None) -> str:
        """One line per setting; * = set in this chat, ^ = inherited from the parent channel."""
        own = overrides if own is None else own
        settings = self.effective(overrides)

        def mark(name: str) -> str:
            return "*" if name in own else ("^" if name in overrides else "")

        lines = ["Settings for this chat (* = changed here, ^ = from the parent channel):"]
        if event is not None and not event.is_direct:
            lines.append(f"context = {overrides.get('context', self.config.context)}"
                         f"{mark('context')} (chain, user or channel)")
            talk = overrides.get("talk", "all" if event.free_talk else "mentions")
            lines.append(f"talk = {talk}{mark('talk')} (mentions or all)")
        for name in DECODING_FIELDS:
            note = (f" (at most {self.config.max_candidates}; used when do_sample is on)"
                    if name == "candidates" else "")
            lines.append(f"{name} = {getattr(settings, name)}{mark(name)}{note}")
        if self.cast is not None:
            lines.append(f"character = {self.character(overrides)}{mark(CHARACTER)} "
                         f"(of {', '.join(self.cast.names)})")
        lines.append(f"rankers = {self.rankers}")
        lines.append(f"word filter = {'on' if self.config.blocklist else 'off'}")
        return "\n".join(lines)


def _n(count: int) -> str:
    return f"{count} message{'s' * (count != 1)}"
