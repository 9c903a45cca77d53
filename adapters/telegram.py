"""Telegram through python-telegram-bot v22: long polling (default) or a webhook.

Flow: PTB `Update` -> pure `to_event` -> `pipeline.submit(event)`; the pipeline answers through
`send`, which splits to 4096 characters and sends plain text (no parse mode, no link previews)
through PTB's `AIORateLimiter` (30 msg/s overall, 20 msg/min per group; a 429 RetryAfter is
waited out and retried).

Who is addressed in a group (private chats always are):
- a `mention` entity of @botname (case-insensitive), or a text_mention of the bot's user;
- a reply to one of the bot's own messages;
- `/command@botname`; a bare `/command` only when it is one of ours (/start /help /reset
  /forget /settings): Telegram shows bare commands to every bot in the group, and in privacy
  mode only delivers them to the bot that spoke last, so answering our own bare commands is
  what users expect. `/command@otherbot` and other bots' bare commands are dropped (None).

Never logs URLs or the config: PTB puts the token in every request URL.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING
from urllib.parse import urlparse

from telegram import (
    BotCommand,
    LinkPreviewOptions,
    MessageEntity,
    ReplyParameters,
    Update,
)
from telegram.constants import ChatAction, ChatMemberStatus, ChatType
from telegram.error import (BadRequest, ChatMigrated, Forbidden, InvalidToken, NetworkError,
                            TelegramError)
from telegram.ext import AIORateLimiter, Application, ApplicationBuilder, TypeHandler

from bot.commands import COMMAND_NAMES
from bot.config import Config
from bot.errors import ConfigError, PlatformError, UndeliverableError
from bot.events import Incoming, Reply
from bot.logs import RedactingFilter
from bot.text import clean_incoming, clean_outgoing, split_message

if TYPE_CHECKING:
    from bot.pipeline import Pipeline

log = logging.getLogger(__name__)

PLATFORM = "telegram"
MAX_LENGTH = 4096  # per message, in UTF-16 code units
TYPING_EVERY = 4.0  # the typing status lasts ~5 s on clients
ADMIN_TTL = 60.0
MAX_RETRIES = 5  # RetryAfter retries per request before a send fails
COMMANDS = (
    ("start", "Say hello"),
    ("help", "What I can do"),
    ("reset", "Forget this chat's conversation (admins in groups)"),
    ("forget", "Delete every message you sent me"),
    ("settings", "Show or change how I pick words"),
)
_GROUPS = (ChatType.GROUP, ChatType.SUPERGROUP)
# loggers that see request URLs; the bot's is created when the bot is built
_URL_LOGGERS = ("telegram.Bot", "telegram.ext.ExtBot", "httpx", "httpcore")


# --- incoming ------------------------------------------------------------------------------
def to_event(update: Update, bot_username: str, bot_id: int) -> Incoming | None:
    """The common event for a new message, or None when the bot must not see it at all
    (edits, channel posts, service messages, other bots, commands meant for another bot).
    Unaddressed group messages come back with is_to_me=False (the pipeline answers them only
    where the chat's `talk` setting is "all"). A reply carries the replied-to message's text as
    `quote` (context when the bot never stored that message)."""
    message = update.message
    if message is None or update.edited_message is not None:
        return None
    sender = message.from_user
    if sender is None or sender.is_bot:
        return None
    chat = message.chat
    if chat.type != ChatType.PRIVATE and chat.type not in _GROUPS:
        return None
    text = message.text if message.text is not None else message.caption
    attachment = message.effective_attachment is not None
    if text is None and not attachment:
        return None  # service message: member joined, pinned, title changed ...

    entities = (message.parse_entities() if message.text is not None
                else message.parse_caption_entities())
    name = "@" + bot_username.lower()
    cuts: list[tuple[int, int, str]] = []  # UTF-16 spans to replace
    addressed = False
    for entity, value in entities.items():
        span = (entity.offset, entity.offset + entity.length)
        if entity.type == MessageEntity.MENTION and value.lower() == name:
            addressed = True
            cuts.append((*span, ""))
        elif (entity.type == MessageEntity.TEXT_MENTION and entity.user is not None
              and entity.user.id == bot_id):
            addressed = True
            cuts.append((*span, ""))
        elif entity.type == MessageEntity.BOT_COMMAND and entity.offset == 0:
            command, _, target = value.partition("@")
            if target:
                if target.lower() != bot_username.lower():
                    return None  # another bot's command
                addressed = True
                cuts.append((*span, command))
            elif command[1:].lower() in COMMAND_NAMES:
                addressed = True
    reply = message.reply_to_message
    # (in forum topics every message "replies" to the topic's first message: not a reply)
    if reply is not None and reply.forum_topic_created is not None:
        reply = None
    from_bot = reply is not None and reply.from_user is not None and reply.from_user.id == bot_id
    if from_bot:
        addressed = True

    direct = chat.type == ChatType.PRIVATE
    return Incoming(
        platform=PLATFORM, channel=str(chat.id), message_id=str(message.message_id),
        author_id=str(sender.id), author_name=sender.full_name,
        text=clean_incoming(_replace_spans(text or "", cuts)),
        is_direct=direct, is_to_me=direct or addressed,
        reply_to=str(reply.message_id) if reply is not None else None,
        quote=clean_incoming(reply.text or reply.caption) or None if reply is not None else None,
        quote_from_bot=from_bot, time=message.date, has_attachments=attachment)


def _replace_spans(text: str, cuts: list[tuple[int, int, str]]) -> str:
    """Replace UTF-16 spans (Telegram's entity offsets) and tidy the spaces at each cut."""
    if not cuts:
        return text
    data = text.encode("utf-16-le", "surrogatepass")

    def piece(start: int, end: int | None) -> str:
        return data[start * 2: None if end is None else end * 2].decode("utf-16-le",
                                                                        "surrogatepass")

    out, pos = "", 0
    for start, end, new in sorted(cuts):
        out += piece(pos, start)
        if new:
            out += new
        pos = end
    rest = piece(pos, None)
    if out.strip() and rest.strip():
        out = out.rstrip(" ") + " " + rest.lstrip(" ")
    else:
        out = (out + rest).strip()
    starts_with_mention = sorted(cuts)[0][0] == 0 and not sorted(cuts)[0][2]
    return out.lstrip(" ,:;") if starts_with_mention else out


# --- outgoing ------------------------------------------------------------------------------
def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le", "surrogatepass")) // 2


def split_for_telegram(text: str, limit: int = MAX_LENGTH, chars: int | None = None
                       ) -> list[str]:
    """Parts of at most `limit` UTF-16 code units (Telegram counts those; emoji count 2),
    cut at line or word boundaries like `bot.text.split_message`."""
    chars = chars or limit
    parts: list[str] = []
    for part in split_message(text, chars):
        size = utf16_len(part)
        if size <= limit:
            parts.append(part)
        else:  # astral characters: retry this part with a proportionally smaller cut
            smaller = max(1, min(chars - 1, len(part) * limit // size))
            parts.extend(split_for_telegram(part, limit, smaller))
    return parts


class TypingOutsideBudget(AIORateLimiter):
    """PTB's `AIORateLimiter` (30 messages/s overall, 20/min per group, 429s waited out),
    except that chat actions ("typing...") do not count against those budgets: Telegram's
    limits are about messages, and a typing status renewed every few seconds in a busy group
    would otherwise use up the group's 20 per minute and make the replies wait behind it.
    A 429 on a chat action is still waited out and retried."""

    async def process_request(self, callback, args, kwargs, endpoint, data,  # noqa: ANN001
                              rate_limit_args):  # noqa: ANN001
        if endpoint == "sendChatAction":
            data = {k: v for k, v in data.items() if k != "chat_id"}  # no chat: no budget
        return await super().process_request(callback, args, kwargs, endpoint, data,
                                             rate_limit_args)


class TelegramAdapter:
    """The `bot.ports.Adapter` for Telegram (see the module docstring)."""

    name = PLATFORM
    max_message_length = MAX_LENGTH
    rate_limited = True
    # AIORateLimiter paces 30 msg/s overall and 20 msg/min per group and waits out 429s;
    # it has no per-chat pacing, so the core paces replies to 1 per second per chat.
    outbound_rate = (1, 1.0)

    def __init__(self, config: Config):
        self.config = config
        self.username = ""
        self.bot_id = 0
        self._app: Application | None = None
        self._pipeline: Pipeline | None = None
        self._admins: dict[tuple[str, str], tuple[float, bool]] = {}
        self.webhook_secret: str | None = None
        self._redactor: RedactingFilter | None = None
        self._guarded: list[logging.Logger] = []

    # --- lifecycle ---------------------------------------------------------------------------
    def _build(self) -> Application:
        assert self.config.telegram_token is not None
        builder = (ApplicationBuilder()
                   .token(self.config.telegram_token.get_secret_value())
                   .rate_limiter(TypingOutsideBudget(max_retries=MAX_RETRIES))
                   # a spare connection: a long poll torn down mid-flight can leave the
                   # only one checked out ("Pool timeout" on the next getUpdates)
                   .get_updates_connection_pool_size(2))
        if self.config.telegram_base_url:
            builder = builder.base_url(self.config.telegram_base_url)
        if self.config.telegram_base_file_url:
            builder = builder.base_file_url(self.config.telegram_base_file_url)
        app = builder.build()
        app.add_handler(TypeHandler(Update, self._on_update))
        return app

    async def start(self, pipeline: "Pipeline") -> None:
        if self._app is not None:
            return
        cfg = self.config
        if cfg.telegram_token is None:
            raise ConfigError("DIALOGBOT_TELEGRAM_TOKEN is not set")
        if cfg.telegram_webhook_url:
            # Without a configured secret, a random one still makes Telegram prove itself.
            self.webhook_secret = (cfg.telegram_webhook_secret.get_secret_value()
                                   if cfg.telegram_webhook_secret
                                   else secrets.token_urlsafe(32))
        logging.getLogger("httpx").setLevel(logging.WARNING)  # it logs URLs with the token
        self._guard_logs([cfg.telegram_token.get_secret_value(), self.webhook_secret or ""])
        self._pipeline = pipeline
        try:
            app = self._app = self._build()
            await app.initialize()  # getMe
            self.username, self.bot_id = app.bot.username, app.bot.id
            await app.bot.set_my_commands([BotCommand(n, d) for n, d in COMMANDS])
            await app.start()
            assert app.updater is not None
            if cfg.telegram_webhook_url:
                await self._start_webhook(app)
            else:
                await app.updater.start_polling(allowed_updates=[Update.MESSAGE])
        except InvalidToken:
            await self.stop()
            raise PlatformError("telegram: the bot token was rejected") from None
        except TelegramError as exc:
            await self.stop()
            raise PlatformError(f"telegram: could not start: {_describe(exc)}") from None
        except BaseException:
            await self.stop()
            raise
        log.info("telegram: running as @%s (%s)", self.username,
                 "webhook" if cfg.telegram_webhook_url else "long polling")

    async def _start_webhook(self, app: Application) -> None:
        cfg = self.config
        assert app.updater is not None and cfg.telegram_webhook_url
        await app.updater.start_webhook(
            listen=cfg.telegram_webhook_listen, port=cfg.telegram_webhook_port,
            url_path=urlparse(cfg.telegram_webhook_url).path.lstrip("/"),
            webhook_url=cfg.telegram_webhook_url, secret_token=self.webhook_secret,
            allowed_updates=[Update.MESSAGE])

    async def stop(self) -> None:
        """Stop receiving, let PTB finish what it is processing, close the HTTP client."""
        app, self._app = self._app, None
        if app is None:
            self._unguard_logs()
            return
        try:
            if app.updater is not None and app.updater.running:
                await app.updater.stop()
            if app.running:
                await app.stop()
        finally:
            with contextlib.suppress(Exception):
                await app.shutdown()
            self._unguard_logs()

    def _guard_logs(self, secrets_: list[str]) -> None:
        """PTB logs its API URL (with the token) and request parameters (the webhook secret)
        at DEBUG, httpx every request URL at INFO: redact them on those loggers themselves,
        whatever handlers are installed."""
        self._unguard_logs()
        self._redactor = RedactingFilter(secrets_)
        names = [n for n in logging.root.manager.loggerDict
                 if n.split(".")[0] in ("telegram", "httpx", "httpcore")]
        self._guarded = [logging.getLogger(n) for n in {*names, *_URL_LOGGERS}]
        for logger in self._guarded:
            logger.addFilter(self._redactor)

    def _unguard_logs(self) -> None:
        for logger in self._guarded:
            if self._redactor is not None:
                logger.removeFilter(self._redactor)
        self._guarded = []

    async def _on_update(self, update: object, context: object) -> None:
        if not isinstance(update, Update) or self._pipeline is None:
            return
        try:
            event = to_event(update, self.username, self.bot_id)
        except Exception:  # noqa: BLE001 - one odd update must not stop the bot
            log.exception("telegram: could not read update %s", update.update_id)
            return
        if event is not None:
            self._pipeline.submit(event)

    # --- the port ----------------------------------------------------------------------------
    def _bot(self):  # noqa: ANN202 - telegram.ext.ExtBot
        if self._app is None:
            raise PlatformError("telegram: adapter is not running")
        return self._app.bot

    def split(self, text: str) -> list[str]:
        return split_for_telegram(clean_outgoing(text), self.max_message_length)

    async def send_part(self, reply: Reply, index: int, part: str) -> str | None:
        """One plain-text message (part 0 replies to the trigger); returns its message id."""
        bot = self._bot()
        target = None
        if index == 0 and reply.reply_to and reply.reply_to.isdigit():
            target = ReplyParameters(int(reply.reply_to), allow_sending_without_reply=True)
        try:
            message = await bot.send_message(
                chat_id=int(reply.channel), text=part, parse_mode=None, reply_parameters=target,
                link_preview_options=LinkPreviewOptions(is_disabled=True))
        except (Forbidden, ChatMigrated) as exc:
            raise UndeliverableError(f"telegram: {_describe(exc)}") from None
        except BadRequest as exc:
            if "chat not found" in exc.message.lower():
                raise UndeliverableError(f"telegram: {_describe(exc)}") from None
            raise PlatformError(f"telegram: send failed: {_describe(exc)}") from None
        except TelegramError as exc:
            raise PlatformError(f"telegram: send failed: {_describe(exc)}") from None
        return str(message.message_id)

    async def is_admin(self, event: Incoming) -> bool:
        if event.is_direct:
            return True  # the user owns their private chat
        key = (event.channel, event.author_id)
        now = time.monotonic()
        cached = self._admins.get(key)
        if cached is not None and cached[0] > now:
            return cached[1]
        try:
            member = await self._bot().get_chat_member(int(event.channel), int(event.author_id))
        except TelegramError as exc:
            log.warning("telegram/%s: getChatMember failed: %s", event.channel, _describe(exc))
            return False
        answer = member.status in (ChatMemberStatus.ADMINISTRATOR, ChatMemberStatus.OWNER)
        if len(self._admins) > 4096:
            self._admins = {k: v for k, v in self._admins.items() if v[0] > now}
        self._admins[key] = (now + ADMIN_TTL, answer)
        return answer

    @contextlib.asynccontextmanager
    async def typing(self, event: Incoming) -> AsyncIterator[None]:
        task = asyncio.create_task(self._keep_typing(int(event.channel)),
                                   name=f"typing-{event.channel}")
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _keep_typing(self, chat_id: int) -> None:
        while True:
            try:
                await self._bot().send_chat_action(chat_id, ChatAction.TYPING)
            except Exception as exc:  # noqa: BLE001 - typing is decoration, never an error
                log.debug("telegram/%s: typing failed: %s", chat_id, type(exc).__name__)
            await asyncio.sleep(TYPING_EVERY)


def _describe(exc: TelegramError) -> str:
    """A log-safe description: network errors may quote the request URL (and the token)."""
    if isinstance(exc, NetworkError) and type(exc).__name__ in ("NetworkError", "TimedOut"):
        return type(exc).__name__
    return f"{type(exc).__name__}: {exc.message}"
