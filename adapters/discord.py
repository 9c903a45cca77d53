"""Discord through discord.py 2.x: DMs, server channels and threads, slash commands.

Which messages reach the core (`to_event`, pure):
- DMs always (the user owns the conversation).
- In a server, every message, marked `is_to_me` when addressed to the bot: mentioning it (its
  user or its managed role) or replying to one of its messages. The core answers the others
  only where the channel's `talk` setting is "all"; channels in DIALOGBOT_DISCORD_CHANNELS
  (and their threads) start as "all" (`free_talk`). Threads are their own conversation
  (channel = the thread id) and inherit their parent channel's settings (`parent`).
- A reply carries the replied-to message's text (`quote`), from the payload or a fetch.
- Never the bot's own messages, other bots', webhooks' or system messages.
The mention is stripped from what the model sees; "@bot reset" becomes "/reset".

Slash commands /reset, /forget, /help, /settings (synced in `setup_hook`) reach the core as
"/name args" events whose `platform_admin` comes from the interaction's resolved permissions
(Manage Messages or Administrator), checked at run time because a server can override who sees
a command. They are answered through the interaction (ephemeral when the reply is private); a
reply that takes longer than `DEFER_AFTER` seconds is deferred first (ephemeral "thinking").

Everything sent is inert: `AllowedMentions.none()` on the client and on every message, so a
reply can never ping @everyone, @here, a role or a user. Rate limits (429) are discord.py's:
it waits them out and retries; the core adds per-channel pacing (`outbound_rate`).
"""

from __future__ import annotations

import asyncio
import logging
import re
import time
from collections import OrderedDict
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import discord
from discord import app_commands

from bot.commands import COMMAND_NAMES
from bot.config import Config
from bot.errors import PlatformError, UndeliverableError
from bot.events import Incoming, Reply
from bot.text import clean_incoming, clean_outgoing, split_message

if TYPE_CHECKING:
    from bot.pipeline import Pipeline

log = logging.getLogger(__name__)

PLATFORM = "discord"
MAX_LENGTH = 2000
INTERACTION_PREFIX = "interaction:"
DEFER_AFTER = 2.0  # Discord wants an interaction answered within 3 s
INTERACTION_TTL = 15 * 60.0  # an interaction token is valid for 15 minutes
NO_PINGS = discord.AllowedMentions.none()

PRIVILEGED_INTENTS_HELP = (
    "Discord refused the Message Content intent: enable it in the Discord developer portal "
    "(your application -> Bot -> Privileged Gateway Intents -> Message Content Intent), "
    "then start again")
TOKEN_REJECTED = "DIALOGBOT_DISCORD_TOKEN was rejected by Discord (check the bot token)"

_USER_MENTION = re.compile(r"<@!?(\d+)>")
_ROLE_MENTION = re.compile(r"<@&(\d+)>")
_LEADING_JUNK = re.compile(r"^[\s,:;]+")
_SPACES = re.compile(r"[ \t]{2,}")


# --- pure: discord objects -> Incoming ------------------------------------------------------
def to_event(message: discord.Message, bot_user_id: int, bot_role_ids: set[int],
             free_channels: set[int]) -> Incoming | None:
    """The common event for a message, or None when the bot must never see it."""
    author = message.author
    if (author.id == bot_user_id or author.bot or message.webhook_id is not None
            or message.is_system()):
        return None
    content = message.content or ""
    is_direct = message.guild is None
    own_mention = re.compile(rf"<@!?{bot_user_id}>"
                             + "".join(f"|<@&{rid}>" for rid in sorted(bot_role_ids)))
    named = bool(own_mention.search(content))
    mentioned = (named or any(u.id == bot_user_id for u in message.mentions)
                 or bool(set(message.raw_role_mentions) & bot_role_ids))

    reply_to = quote = None
    replied_to_bot = False
    ref = message.reference
    if ref is not None and ref.message_id is not None:
        reply_to = str(ref.message_id)
        target = ref.resolved if isinstance(ref.resolved, discord.Message) else ref.cached_message
        replied_to_bot = target is not None and target.author.id == bot_user_id
        if target is not None and target.content:
            quote = clean_incoming(_strip_mentions(target, target.content, re.compile(
                rf"<@!?{bot_user_id}>"))) or None

    text = _strip_mentions(message, content, own_mention) if content else ""
    if named and text and not text.startswith("/"):
        word, *rest = text.split(maxsplit=1)
        word = word.lower().rstrip(":,.!?")
        if word in COMMAND_NAMES:
            text = " ".join([f"/{word}", *rest])

    thread_parent = (getattr(message.channel, "parent_id", None)
                     if isinstance(message.channel, discord.Thread) else None)
    return Incoming(
        platform=PLATFORM, channel=str(message.channel.id), message_id=str(message.id),
        author_id=str(author.id), author_name=author.display_name, text=clean_incoming(text),
        is_direct=is_direct, is_to_me=is_direct or mentioned or replied_to_bot,
        reply_to=reply_to, quote=quote, quote_from_bot=replied_to_bot,
        parent=str(thread_parent) if thread_parent is not None else None,
        free_talk=_is_free(message.channel, free_channels),
        time=message.created_at, has_attachments=bool(message.attachments or message.stickers))


def _is_free(channel: Any, free_channels: set[int]) -> bool:
    if channel.id in free_channels:
        return True
    parent_id = getattr(channel, "parent_id", None) if isinstance(channel, discord.Thread) else None
    return parent_id is not None and parent_id in free_channels


def _strip_mentions(message: discord.Message, content: str, own: re.Pattern[str]) -> str:
    """Drop the bot's mentions; show other people's and roles' mentions as @name."""
    names = {u.id: u.display_name for u in message.mentions}
    roles = {r.id: r.name for r in message.role_mentions}
    text = own.sub(" ", content)
    text = _USER_MENTION.sub(lambda m: "@" + names.get(int(m[1]), "someone"), text)
    text = _ROLE_MENTION.sub(lambda m: "@" + roles.get(int(m[1]), "role"), text)
    text = _SPACES.sub(" ", text)
    return _LEADING_JUNK.sub("", text) if text != content else text


def interaction_event(interaction: discord.Interaction, text: str,
                      free_channels: set[int] | None = None) -> Incoming:
    """The common event for a slash command: addressed to the bot, admin-ness from Discord."""
    perms = interaction.permissions
    is_direct = interaction.guild_id is None
    user = interaction.user
    channel = interaction.channel
    parent = getattr(channel, "parent_id", None) if isinstance(channel, discord.Thread) else None
    return Incoming(
        platform=PLATFORM, channel=str(interaction.channel_id),
        message_id=f"{INTERACTION_PREFIX}{interaction.id}", author_id=str(user.id),
        author_name=user.display_name, text=clean_incoming(text), is_direct=is_direct,
        is_to_me=True, time=interaction.created_at,
        platform_admin=True if is_direct else bool(perms.manage_messages or perms.administrator),
        parent=str(parent) if parent is not None else None,
        free_talk=channel is not None and _is_free(channel, free_channels or set()))


# --- the client -----------------------------------------------------------------------------
class _Hooks:
    """Mixed into discord.Client / AutoShardedClient: hands its events to the adapter."""

    adapter: "DiscordAdapter"

    async def setup_hook(self) -> None:
        await self.adapter._setup()

    async def on_ready(self) -> None:
        self.adapter._ready.set()

    async def on_resumed(self) -> None:
        log.info("discord: gateway session resumed")

    async def on_message(self, message: discord.Message) -> None:
        await self.adapter._on_message(message)


class _Client(_Hooks, discord.Client):
    pass


class _ShardedClient(_Hooks, discord.AutoShardedClient):
    pass


def intents() -> discord.Intents:
    found = discord.Intents.none()
    found.guilds = found.guild_messages = found.dm_messages = found.message_content = True
    return found


@dataclass
class _Pending:
    """A slash command waiting for the core's answer."""

    interaction: discord.Interaction
    created: float = field(default_factory=time.monotonic)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    timer: asyncio.Task | None = None
    deferring: bool = False  # the timer woke up: let its request finish, never cancel it


class DiscordAdapter:
    """`bot.ports.Adapter` for Discord (see the module docstring for what reaches the core).

    `client_options` go to the discord.py client (tests shorten `guild_ready_timeout`).
    """

    name = PLATFORM
    max_message_length = MAX_LENGTH
    rate_limited = True
    outbound_rate: tuple[int, float] | None = (5, 5.0)

    def __init__(self, config: Config, *, ready_timeout: float = 60.0,
                 client_options: dict[str, Any] | None = None):
        if config.discord_token is None:
            raise PlatformError("DIALOGBOT_DISCORD_TOKEN is not set")
        self._token = config.discord_token
        self._free = set(config.discord_channels)
        self._shards = config.discord_shards
        # this instance's subset of the shards (several processes share one bot)
        self._shard_ids = list(config.discord_shard_ids)
        self._shard_count = config.discord_shard_count
        self._ready_timeout = ready_timeout
        self._options = dict(client_options or {})
        self._client: discord.Client | None = None
        self._task: asyncio.Task | None = None
        self._pipeline: Pipeline | None = None
        self._ready = asyncio.Event()
        self.done = asyncio.Event()  # set when the connection has ended for good
        self._closing = False
        self._sending = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._pending: dict[str, _Pending] = {}
        self._members: OrderedDict[tuple[int, int], discord.Member] = OrderedDict()

    @property
    def connected(self) -> bool:
        """For /readyz: logged in, READY and not closed."""
        client = self._client
        return client is not None and client.is_ready() and not client.is_closed()

    @property
    def client(self) -> discord.Client:
        if self._client is None:
            raise PlatformError("the Discord adapter is not started")
        return self._client

    # --- lifecycle --------------------------------------------------------------------------
    def _make_client(self) -> discord.Client:
        options: dict[str, Any] = dict(intents=intents(), allowed_mentions=NO_PINGS,
                                       chunk_guilds_at_startup=False, **self._options)
        if self._shard_ids:
            client: discord.Client = _ShardedClient(
                shard_ids=self._shard_ids, shard_count=self._shard_count, **options)
        elif self._shards is None:
            client = _Client(**options)
        elif self._shards == "auto":
            client = _ShardedClient(**options)
        else:
            client = _ShardedClient(shard_count=int(self._shards), **options)
        client.adapter = self  # type: ignore[attr-defined]
        client.tree = self._make_tree(client)  # type: ignore[attr-defined]
        return client

    async def start(self, pipeline: "Pipeline") -> None:
        """Log in, connect, sync slash commands; return once Discord says READY."""
        if self._task is not None:
            return
        self._pipeline = pipeline
        self._closing = False
        self._ready.clear()
        self.done.clear()
        self._client = self._make_client()
        self._task = asyncio.create_task(
            self._client.start(self._token.get_secret_value()), name="discord-client")
        ready = asyncio.create_task(self._ready.wait())
        done, _ = await asyncio.wait({self._task, ready}, timeout=self._ready_timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        if ready in done:
            self._task.add_done_callback(self._client_ended)
            log.info("discord: connected as %s (id %s), %d server(s)", self.client.user,
                     self.client.user.id if self.client.user else "?", len(self.client.guilds))
            return
        ready.cancel()
        error = (self._task.exception() if self._task.done() and not self._task.cancelled()
                 else None)
        await self.stop()
        raise _start_error(error, self._ready_timeout) from None

    def _client_ended(self, task: asyncio.Task) -> None:
        """The client stopped by itself (e.g. the token was revoked): say so and set `done`,
        which the app watches, so the process exits instead of running deaf."""
        self.done.set()
        if task.cancelled():
            return
        error = task.exception()  # retrieved even when closing, so asyncio never warns
        if self._closing:
            return
        log.error("discord: the connection ended%s", f": {type(error).__name__}: {error}"
                  if error is not None else "")

    async def _setup(self) -> None:
        """Runs in discord.py's setup_hook (after login, before the gateway)."""
        tree: app_commands.CommandTree = self.client.tree  # type: ignore[attr-defined]
        try:
            synced = await tree.sync()
            log.info("discord: synced %d slash commands", len(synced))
        except discord.HTTPException as exc:
            log.warning("discord: could not sync slash commands (%s %s); the text forms "
                        "(@bot reset) still work", exc.status, exc.text[:100])

    async def stop(self) -> None:
        """Stop intake, let sends in flight finish (up to 10 s), close the connection."""
        self._closing = True
        if self._sending:
            try:
                await asyncio.wait_for(self._idle.wait(), 10.0)
            except asyncio.TimeoutError:
                log.warning("discord: closing with %d send(s) unfinished", self._sending)
        for pending in self._pending.values():
            if pending.timer is not None and not pending.deferring:
                pending.timer.cancel()
        self._pending.clear()
        if self._client is not None and not self._client.is_closed():
            await self._client.close()
        if self._task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._task), 10.0)
            except BaseException:  # noqa: BLE001 - its end was already reported or is moot
                pass
        self._task = None
        self.done.set()

    # --- inbound ----------------------------------------------------------------------------
    async def _on_message(self, message: discord.Message) -> None:
        me = self.client.user
        if self._closing or self._pipeline is None or me is None:
            return
        roles = set()
        if message.guild is not None and message.guild.self_role is not None:
            roles.add(message.guild.self_role.id)
        event = to_event(message, me.id, roles, self._free)
        if event is None:
            return
        if event.reply_to and event.quote is None and event.is_to_me:
            event = await self._with_fetched_quote(message, event)
        if isinstance(message.author, discord.Member):
            self._remember(message.author)
        # unaddressed messages too: the core answers them where the channel's talk is "all"
        self._pipeline.submit(event)

    async def _with_fetched_quote(self, message: discord.Message, event: Incoming) -> Incoming:
        """The replied-to message's text when Discord did not include it (a fetch)."""
        try:
            target = await message.channel.fetch_message(int(event.reply_to or 0))
        except (discord.HTTPException, ValueError):
            return event
        me = self.client.user
        text = clean_incoming(target.content) if target.content else ""
        return replace(event, quote=text or None,
                       quote_from_bot=me is not None and target.author.id == me.id)

    def _remember(self, member: discord.Member) -> None:
        key = (member.guild.id, member.id)
        self._members[key] = member
        self._members.move_to_end(key)
        while len(self._members) > 1000:
            self._members.popitem(last=False)

    def _make_tree(self, client: discord.Client) -> app_commands.CommandTree:
        tree = app_commands.CommandTree(client)
        adapter = self

        @tree.command(name="reset", description="Forget this channel's conversation")
        @app_commands.default_permissions(manage_messages=True)
        async def reset(interaction: discord.Interaction) -> None:
            await adapter._on_slash(interaction, "/reset")

        @tree.command(name="forget", description="Delete every message you sent me")
        async def forget(interaction: discord.Interaction) -> None:
            await adapter._on_slash(interaction, "/forget")

        @tree.command(name="help", description="What I do and my commands")
        async def help_(interaction: discord.Interaction) -> None:
            await adapter._on_slash(interaction, "/help")

        @tree.command(name="settings", description="Show or change how I pick words")
        @app_commands.describe(values="e.g. temperature=0.7 top_k=40, or default")
        @app_commands.default_permissions(manage_messages=True)
        async def settings(interaction: discord.Interaction, values: str | None = None) -> None:
            await adapter._on_slash(interaction, f"/settings {values or ''}".strip())

        return tree

    async def _on_slash(self, interaction: discord.Interaction, text: str) -> None:
        if self._closing or self._pipeline is None:
            return
        event = interaction_event(interaction, text, self._free)
        self._prune()
        pending = _Pending(interaction)
        pending.timer = asyncio.create_task(self._defer_later(pending))
        self._pending[event.message_id] = pending
        self._pipeline.submit(event)

    async def _defer_later(self, pending: _Pending) -> None:
        await asyncio.sleep(DEFER_AFTER)
        pending.deferring = True
        async with pending.lock:
            if not pending.interaction.response.is_done():
                try:
                    await pending.interaction.response.defer(ephemeral=True, thinking=True)
                except discord.HTTPException as exc:
                    log.debug("discord: could not defer an interaction: %s", exc.status)

    def _prune(self) -> None:
        old = time.monotonic() - INTERACTION_TTL
        for key in [k for k, p in self._pending.items() if p.created < old]:
            self._pending.pop(key)

    # --- outbound ---------------------------------------------------------------------------
    def split(self, text: str) -> list[str]:
        return split_message(clean_outgoing(text), self.max_message_length)

    async def send_part(self, reply: Reply, index: int, part: str) -> str | None:
        """Deliver one part: to the channel (part 0 as a reply to the trigger), or through the
        slash command's interaction (its response, then follow-ups). Returns the message id."""
        if self._client is None or self._client.is_closed():
            raise PlatformError("the Discord connection is closed")
        to_interaction = bool(reply.reply_to and reply.reply_to.startswith(INTERACTION_PREFIX))
        pending = self._pending.get(reply.reply_to) if to_interaction else None  # type: ignore
        if to_interaction and pending is None and reply.private:
            log.info("discord/%s: slash command expired; private answer dropped", reply.channel)
            return None
        self._sending += 1
        self._idle.clear()
        try:
            if pending is not None:
                sent = await self._answer_interaction(pending, part, reply.private)
                if index == len(self.split(reply.text)) - 1:
                    self._pending.pop(reply.reply_to, None)  # type: ignore[arg-type]
                return sent
            return await self._send_to_channel(reply, index, part)
        except discord.HTTPException as exc:
            error = UndeliverableError if exc.status in (403, 404) else PlatformError
            raise error(f"Discord refused the message ({exc.status}: {exc.text[:100]})") from exc
        finally:
            self._sending -= 1
            if not self._sending:
                self._idle.set()

    async def _send_to_channel(self, reply: Reply, index: int, part: str) -> str:
        channel = self._channel(reply.channel)
        reference = None
        if index == 0 and reply.reply_to and reply.reply_to.isdigit():
            reference = discord.MessageReference(message_id=int(reply.reply_to),
                                                 channel_id=int(reply.channel),
                                                 fail_if_not_exists=False)
        message = await channel.send(part, allowed_mentions=NO_PINGS, mention_author=False,
                                     reference=reference)
        return str(message.id)

    async def _answer_interaction(self, pending: _Pending, part: str,
                                  private: bool) -> str | None:
        if pending.timer is not None and not pending.deferring:
            pending.timer.cancel()
        async with pending.lock:
            interaction = pending.interaction
            if not interaction.response.is_done():
                await interaction.response.send_message(part, ephemeral=private,
                                                        allowed_mentions=NO_PINGS)
                return None
            message = await interaction.followup.send(part, ephemeral=private,
                                                      allowed_mentions=NO_PINGS, wait=True)
            return str(message.id)

    def _channel(self, channel_id: str) -> Any:
        cid = int(channel_id)
        return self.client.get_channel(cid) or self.client.get_partial_messageable(cid)

    async def is_admin(self, event: Incoming) -> bool:
        """DM: the user owns it. Server: Manage Messages or Administrator in that channel."""
        if event.is_direct:
            return True
        if event.platform_admin is not None:
            return event.platform_admin
        try:
            channel = self.client.get_channel(int(event.channel))
            if channel is None:
                channel = await self.client.fetch_channel(int(event.channel))
            guild = getattr(channel, "guild", None)
            if guild is None:
                return False
            uid = int(event.author_id)
            member = (self._members.get((guild.id, uid)) or guild.get_member(uid)
                      or await guild.fetch_member(uid))
            perms = channel.permissions_for(member)
        except (discord.HTTPException, ValueError) as exc:
            log.info("discord/%s: could not check permissions: %s", event.channel, exc)
            return False
        return bool(perms.manage_messages or perms.administrator)

    @asynccontextmanager
    async def typing(self, event: Incoming):
        """Shows "typing..." in the channel until the block exits; never raises for it."""
        context = None
        if not event.message_id.startswith(INTERACTION_PREFIX):
            try:
                context = self._channel(event.channel).typing()
                await context.__aenter__()
            except Exception as exc:  # noqa: BLE001 - typing is cosmetic
                log.debug("discord/%s: typing failed: %s", event.channel, exc)
                context = None
        try:
            yield
        finally:
            if context is not None:
                try:
                    await context.__aexit__(None, None, None)
                except Exception as exc:  # noqa: BLE001
                    log.debug("discord/%s: typing stop failed: %s", event.channel, exc)


def _start_error(error: BaseException | None, timeout: float) -> PlatformError:
    if isinstance(error, discord.PrivilegedIntentsRequired):
        return PlatformError(PRIVILEGED_INTENTS_HELP)
    if isinstance(error, discord.LoginFailure):
        return PlatformError(TOKEN_REJECTED)
    if error is None:
        return PlatformError(f"Discord did not become ready within {timeout:g} s")
    return PlatformError(f"could not connect to Discord: {type(error).__name__}: {error}")


