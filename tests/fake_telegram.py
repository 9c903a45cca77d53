"""A fake Telegram Bot API server for adapter tests: aiohttp on 127.0.0.1, port 0.

Serves `/bot{token}/{method}` the way api.telegram.org does (JSON or form bodies; answers
`{"ok": true, "result": ...}`). Tests push updates (`push`), read what the bot sent
(`sent`, `wait_sent`), set chat member statuses (`set_member`) and make the next N sendMessage
calls fail with 429 (`fail_next_sends`). Builders make realistic update dicts.

Semantics kept from the real server: getUpdates returns updates with id >= offset and forgets
the ones below it (an update is gone only once confirmed by a later offset), long-polls up to
`timeout` seconds, and a client that hangs up stops its poll (so a stopped bot never swallows
an update meant for the next one).
"""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

BOT_ID = 7_000_000_001
BOT_USERNAME = "DialoTestBot"
BOT_USER = {"id": BOT_ID, "is_bot": True, "first_name": "Dialo", "username": BOT_USERNAME}
# fields that arrive JSON-encoded inside form bodies
_JSON_FIELDS = {"reply_parameters", "link_preview_options", "commands", "allowed_updates",
                "entities", "reply_markup", "scope"}
_ADMIN_RIGHTS = dict(can_be_edited=False, is_anonymous=False, can_manage_chat=True,
                     can_delete_messages=True, can_manage_video_chats=True,
                     can_restrict_members=True, can_promote_members=False,
                     can_change_info=True, can_invite_users=True, can_post_stories=False,
                     can_edit_stories=False, can_delete_stories=False)


@dataclass
class Call:
    method: str
    params: dict[str, Any]
    at: float = field(default_factory=time.monotonic)


class FakeTelegram:
    def __init__(self, token: str):
        self.token = token
        self.calls: list[Call] = []
        self.sent: list[dict[str, Any]] = []  # the Message objects sendMessage returned
        self.webhook: dict[str, Any] = {}
        self.members: dict[tuple[int, int], str] = {}  # (chat, user) -> status
        self._updates: list[dict[str, Any]] = []
        self._next_update_id = 1
        self._next_message_id = 1000
        self._fail_sends = 0
        self._broken_sends = 0
        self._broken_status = 502
        self._break_after = 0
        self._release = asyncio.Event()
        self._release.set()
        self.holding = 0  # sendMessage calls waiting on `hold_sends`
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> "FakeTelegram":
        app = web.Application()
        app.router.add_route("*", "/bot{token}/{method}", self._handle)
        # cancel a long poll when its client disconnects, as the real server does
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1,
                                     access_log=None)  # its lines hold the token
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def base_url(self) -> str:
        """What DIALOGBOT_TELEGRAM_BASE_URL is set to (PTB appends the token)."""
        return f"{self.url}/bot"

    # --- test controls -----------------------------------------------------------------------
    async def push(self, update: dict[str, Any]) -> dict[str, Any]:
        """Queue an update for getUpdates; gives it the next update_id."""
        update = {"update_id": self._next_update_id, **update}
        self._next_update_id += 1
        self._updates.append(update)
        await self._notify()
        return update

    def set_member(self, chat_id: int, user_id: int, status: str) -> None:
        """status: creator, administrator, member, left, kicked."""
        self.members[(chat_id, user_id)] = status

    def fail_next_sends(self, count: int, retry_after: int = 1) -> None:
        self._fail_sends = count
        self._retry_after = retry_after

    def break_next_sends(self, count: int, status: int = 502) -> None:
        """The next `count` sendMessage calls answer a server error (5xx), or, with
        status=0, drop the connection without answering (a network failure)."""
        self._broken_sends = count
        self._broken_status = status

    def break_sends_after(self, after: int, count: int = 1, status: int = 502) -> None:
        """Let `after` sendMessage calls through, then break the next `count` like
        `break_next_sends`."""
        self._break_after = after
        self.break_next_sends(count, status)

    def hold_sends(self) -> None:
        """From now on sendMessage calls wait (unanswered, nothing delivered) until
        `release_sends`; a client that hangs up meanwhile delivered nothing."""
        self._release.clear()

    def release_sends(self) -> None:
        self._release.set()

    def calls_of(self, method: str) -> list[Call]:
        return [c for c in self.calls if c.method.lower() == method.lower()]

    def sent_to(self, chat_id: int) -> list[dict[str, Any]]:
        return [m for m in self.sent if m["chat"]["id"] == chat_id]

    async def wait_sent(self, chat_id: int, count: int, timeout: float = 10.0
                        ) -> list[dict[str, Any]]:
        """Wait until at least `count` messages went to `chat_id`; returns them all."""
        async def enough() -> list[dict[str, Any]]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.sent_to(chat_id)) >= count)
            return self.sent_to(chat_id)

        try:
            return await asyncio.wait_for(enough(), timeout)
        except TimeoutError:
            raise AssertionError(f"expected {count} messages to chat {chat_id}, got "
                                 f"{[m['text'] for m in self.sent_to(chat_id)]}") from None

    async def wait_call(self, method: str, count: int = 1, timeout: float = 10.0) -> list[Call]:
        async def enough() -> list[Call]:
            async with self._changed:
                await self._changed.wait_for(lambda: len(self.calls_of(method)) >= count)
            return self.calls_of(method)

        return await asyncio.wait_for(enough(), timeout)

    async def wait_confirmed(self, timeout: float = 10.0) -> None:
        """Wait until the bot has fetched and confirmed every pushed update."""
        async def empty() -> None:
            async with self._changed:
                await self._changed.wait_for(lambda: not self._updates)

        await asyncio.wait_for(empty(), timeout)

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    # --- the API -----------------------------------------------------------------------------
    async def _handle(self, request: web.Request) -> web.Response:
        if request.match_info["token"] != self.token:
            return _error(401, "Unauthorized")
        method = request.match_info["method"]
        params = await _params(request)
        self.calls.append(Call(method, params))
        await self._notify()
        handler = getattr(self, f"_api_{method.lower()}", None)
        if handler is None:
            return _error(404, "Not Found: method not found")
        return await handler(params)

    async def _api_getme(self, params: dict[str, Any]) -> web.Response:
        return _ok({**BOT_USER, "can_join_groups": True, "can_read_all_group_messages": False,
                    "supports_inline_queries": False})

    async def _api_getupdates(self, params: dict[str, Any]) -> web.Response:
        offset = int(params.get("offset") or 0)
        timeout = float(params.get("timeout") or 0)
        limit = int(params.get("limit") or 100)
        if offset:
            self._updates = [u for u in self._updates if u["update_id"] >= offset]
            await self._notify()
        if not self._updates and timeout > 0:
            async with self._changed:
                try:
                    await asyncio.wait_for(self._changed.wait_for(lambda: bool(self._updates)),
                                           timeout)
                except TimeoutError:
                    pass
        return _ok(self._updates[:limit])

    async def _api_sendmessage(self, params: dict[str, Any]) -> web.Response:
        if not self._release.is_set():
            self.holding += 1
            await self._notify()
            try:
                await self._release.wait()
            finally:
                self.holding -= 1
        if self._broken_sends > 0 and self._break_after > 0:
            self._break_after -= 1
        elif self._broken_sends > 0:
            self._broken_sends -= 1
            if self._broken_status == 0:
                raise ConnectionResetError("fake: connection dropped")
            return web.json_response({"ok": False, "error_code": self._broken_status,
                                      "description": "Bad Gateway"},
                                     status=self._broken_status)
        if self._fail_sends > 0:
            self._fail_sends -= 1
            return web.json_response(
                {"ok": False, "error_code": 429,
                 "description": f"Too Many Requests: retry after {self._retry_after}",
                 "parameters": {"retry_after": self._retry_after}}, status=429)
        text = str(params.get("text", ""))
        if not text.strip():
            return _error(400, "Bad Request: message text is empty")
        if len(text) > 4096:
            return _error(400, "Bad Request: message is too long")
        chat_id = int(params["chat_id"])
        self._next_message_id += 1
        message = {"message_id": self._next_message_id, "date": int(time.time()),
                   "chat": _chat(chat_id), "from": BOT_USER, "text": text}
        reply = params.get("reply_parameters") or {}
        if params.get("reply_to_message_id"):
            reply = {"message_id": int(params["reply_to_message_id"])}
        if reply:
            message["_reply_to"] = reply  # recorded for tests; PTB ignores unknown keys
        message["_params"] = params
        self.sent.append(message)
        await self._notify()
        return _ok({k: v for k, v in message.items() if not k.startswith("_")})

    async def _api_sendchataction(self, params: dict[str, Any]) -> web.Response:
        return _ok(True)

    async def _api_getchatmember(self, params: dict[str, Any]) -> web.Response:
        chat_id, user_id = int(params["chat_id"]), int(params["user_id"])
        status = self.members.get((chat_id, user_id), "member")
        user = {"id": user_id, "is_bot": False, "first_name": f"User{user_id}"}
        member: dict[str, Any] = {"status": status, "user": user}
        if status == "administrator":
            member.update(_ADMIN_RIGHTS)
        elif status == "creator":
            member["is_anonymous"] = False
        elif status == "kicked":
            member["until_date"] = 0
        return _ok(member)

    async def _api_setmycommands(self, params: dict[str, Any]) -> web.Response:
        return _ok(True)

    async def _api_deletewebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook = {}
        return _ok(True)

    async def _api_setwebhook(self, params: dict[str, Any]) -> web.Response:
        self.webhook = dict(params)
        return _ok(True)

    async def _api_getwebhookinfo(self, params: dict[str, Any]) -> web.Response:
        return _ok({"url": self.webhook.get("url", ""), "has_custom_certificate": False,
                    "pending_update_count": len(self._updates)})

    async def _api_close(self, params: dict[str, Any]) -> web.Response:
        return _ok(True)

    async def _api_logout(self, params: dict[str, Any]) -> web.Response:
        return _ok(True)


# --- update builders ---------------------------------------------------------------------------
_message_ids = iter(range(1, 10**9))


def user(user_id: int = 111, first_name: str = "Ada", last_name: str | None = "Lovelace",
         is_bot: bool = False) -> dict[str, Any]:
    out: dict[str, Any] = {"id": user_id, "is_bot": is_bot, "first_name": first_name}
    if last_name:
        out["last_name"] = last_name
    return out


def _chat(chat_id: int) -> dict[str, Any]:
    if chat_id > 0:
        return {"id": chat_id, "type": "private", "first_name": "Ada"}
    if chat_id < -1_000_000_000_000:
        return {"id": chat_id, "type": "supergroup", "title": "Test supergroup"}
    return {"id": chat_id, "type": "group", "title": "Test group"}


def message(text: str | None, chat_id: int, sender: dict[str, Any] | None = None,
            entities: list[dict[str, Any]] | None = None, reply_to: dict[str, Any] | None = None,
            message_id: int | None = None, **extra: Any) -> dict[str, Any]:
    """A Message dict as Telegram sends it (private chat when chat_id > 0, group below 0)."""
    sender = sender or user(chat_id if chat_id > 0 else 111)
    msg: dict[str, Any] = {"message_id": message_id or next(_message_ids),
                           "date": int(time.time()), "chat": _chat(chat_id), "from": sender}
    if text is not None:
        msg["text"] = text
    if entities:
        msg["entities"] = entities
    if reply_to is not None:
        msg["reply_to_message"] = {k: v for k, v in reply_to.items() if not k.startswith("_")}
    msg.update(extra)
    return msg


def utf16_len(text: str) -> int:
    return len(text.encode("utf-16-le")) // 2


def mention_entities(text: str, username: str = BOT_USERNAME) -> list[dict[str, Any]]:
    """`mention` entities for every @username in text, any case (offsets in UTF-16 units)."""
    out = []
    needle = "@" + username.lower()
    start = text.lower().find(needle)
    while start >= 0:
        out.append({"type": "mention", "offset": utf16_len(text[:start]),
                    "length": utf16_len(needle)})
        start = text.lower().find(needle, start + 1)
    return out


def private_update(text: str, user_id: int = 111, **kw: Any) -> dict[str, Any]:
    entities = command_entities(text)
    return {"message": message(text, user_id, user(user_id), entities=entities, **kw)}


def command_entities(text: str) -> list[dict[str, Any]]:
    if not text.startswith("/"):
        return []
    head = text.split(" ", 1)[0]
    return [{"type": "bot_command", "offset": 0, "length": utf16_len(head)}]


def group_update(text: str, chat_id: int = -100200300, user_id: int = 222,
                 reply_to: dict[str, Any] | None = None, **kw: Any) -> dict[str, Any]:
    """A group message; entities for /commands and @mentions are computed from the text."""
    entities = command_entities(text) + mention_entities(text)
    return {"message": message(text, chat_id, user(user_id, "Bob", "Builder"),
                               entities=entities or None, reply_to=reply_to, **kw)}


def sticker_update(chat_id: int = 111, user_id: int | None = None) -> dict[str, Any]:
    sticker = {"file_id": "CAACAgIAAxkBAAEB", "file_unique_id": "AgADxx", "type": "regular",
               "width": 512, "height": 512, "is_animated": False, "is_video": False,
               "emoji": "\N{SMILING FACE WITH SUNGLASSES}"}
    sender = user(user_id or (chat_id if chat_id > 0 else 111))
    return {"message": message(None, chat_id, sender, sticker=sticker)}


# --- helpers ---------------------------------------------------------------------------------
def _ok(result: Any) -> web.Response:
    return web.json_response({"ok": True, "result": result})


def _error(code: int, description: str) -> web.Response:
    return web.json_response({"ok": False, "error_code": code, "description": description},
                             status=code)


async def _params(request: web.Request) -> dict[str, Any]:
    params: dict[str, Any] = dict(request.query)
    if request.can_read_body:
        if request.content_type == "application/json":
            body = await request.json()
            params.update(body if isinstance(body, dict) else {})
        else:
            form = await request.post()
            for key, value in form.items():
                if isinstance(value, str) and key in _JSON_FIELDS:
                    try:
                        params[key] = json.loads(value)
                        continue
                    except ValueError:
                        pass
                params[key] = value if isinstance(value, str) else "<file>"
    return params
