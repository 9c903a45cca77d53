"""A loopback fake of the Discord API for driving a real discord.py client in tests.

REST under `{url}/api/v10` (what discord.py asks for at start-up and when it sends) and a
websocket gateway at `ws_url` (HELLO, IDENTIFY -> READY + GUILD_CREATE, heartbeats, RESUME ->
replay + RESUMED, dispatches with increasing sequence numbers). Every request is recorded so
tests assert on what the bot really sent.

Point discord.py at it (tests only): `discord.http.Route.BASE = fake.api_base` and
`discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(fake.ws_url)`.

Notes on discord.py 2.7: it parses JSON only when Content-Type is exactly `application/json`
(aiohttp's json_response adds a charset, so `_json` builds the response by hand); it treats a
429 without a `Via` header as a Cloudflare ban, so rate-limit answers carry one; it asks for
zlib-stream compression but accepts plain text frames, which is what this fake sends.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import secrets
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from aiohttp import WSMsgType, web

DISCORD_EPOCH_MS = 1420070400000
MANAGE_MESSAGES = 1 << 13
ADMINISTRATOR = 1 << 3
# view channel, send messages, read history, embed links, attach files, add reactions,
# use application commands
MEMBER_PERMS = (1 << 10) | (1 << 11) | (1 << 16) | (1 << 14) | (1 << 15) | (1 << 6) | (1 << 31)
MESSAGE_CONTENT_INTENT = 1 << 15
EPHEMERAL = 1 << 6


def iso_now() -> str:
    return datetime.now(timezone.utc).isoformat()


_counter = itertools.count(1)


def snowflake() -> int:
    """A fresh, increasing Discord-style id (its timestamp part is now)."""
    return ((int(time.time() * 1000) - DISCORD_EPOCH_MS) << 22) | (next(_counter) & 0x3FFFFF)


def user_payload(uid: int, name: str, bot: bool = False) -> dict[str, Any]:
    return {"id": str(uid), "username": name, "discriminator": "0", "global_name": name,
            "avatar": None, "bot": bot, "public_flags": 0}


def role_payload(rid: int, name: str, permissions: int, position: int,
                 managed: bool = False, tags: dict[str, Any] | None = None) -> dict[str, Any]:
    data = {"id": str(rid), "name": name, "color": 0, "hoist": False, "position": position,
            "permissions": str(permissions), "managed": managed, "mentionable": False,
            "flags": 0, "icon": None, "unicode_emoji": None}
    if tags is not None:
        data["tags"] = tags
    return data


@dataclass
class Person:
    id: int
    name: str
    bot: bool = False
    roles: list[int] = field(default_factory=list)

    @property
    def user(self) -> dict[str, Any]:
        return user_payload(self.id, self.name, self.bot)

    def member(self, with_user: bool = True) -> dict[str, Any]:
        data = {"roles": [str(r) for r in self.roles], "joined_at": iso_now(), "deaf": False,
                "mute": False, "flags": 0, "nick": None, "avatar": None, "pending": False}
        if with_user:
            data["user"] = self.user
        return data


@dataclass
class Post:
    """One message the bot created (channel message or interaction answer)."""

    kind: str  # "message", "callback", "followup"
    channel_id: int | None
    payload: dict[str, Any]
    message_id: int
    interaction_id: int | None = None
    message: dict[str, Any] | None = None  # the Message object (to reply to it)

    @property
    def content(self) -> str:
        if self.kind == "callback":
            return (self.payload.get("data") or {}).get("content") or ""
        return self.payload.get("content") or ""

    @property
    def flags(self) -> int:
        data = self.payload.get("data") if self.kind == "callback" else self.payload
        return int((data or {}).get("flags") or 0)


class _Shard:
    """One gateway session: its socket, sequence number and the events sent on it."""

    def __init__(self, shard: list[int] | None):
        self.shard = shard
        self.session_id = secrets.token_hex(16)
        self.seq = 0
        self.sent: list[dict[str, Any]] = []  # dispatches, for RESUME replay
        self.ws: web.WebSocketResponse | None = None


class FakeDiscord:
    """The fake server plus a small world: one guild with a plain channel, a free-talk
    channel, a thread, the bot's managed role, an admin role; users alice (no permissions),
    admin (Manage Messages) and another bot."""

    def __init__(self, token: str, *, shards: int = 1, heartbeat_ms: int = 45000):
        self.token = token
        self.recommended_shards = shards
        self.heartbeat_ms = heartbeat_ms
        self.bot = Person(snowflake(), "dialogbot", bot=True)
        self.app_id = self.bot.id
        self.guild_id = snowflake()
        self.bot_role = snowflake()
        self.admin_role = snowflake()
        self.general = snowflake()
        self.free = snowflake()
        self.thread = snowflake()
        self.bot.roles = [self.bot_role]
        self.alice = Person(snowflake(), "alice")
        self.admin = Person(snowflake(), "admin", roles=[self.admin_role])
        self.other_bot = Person(snowflake(), "otherbot", bot=True)
        self.dm_channels: dict[int, int] = {}  # user id -> DM channel id
        self.messages: dict[int, dict[str, Any]] = {}  # id -> payload (GET .../messages/id)

        # what the bot did
        self.posts: list[Post] = []
        self.typing: list[int] = []
        self.fetched: list[int] = []  # message ids the bot fetched
        self.commands: list[dict[str, Any]] = []
        self.requests: list[tuple[str, str]] = []
        self.identifies: list[dict[str, Any]] = []
        self.resumes: list[dict[str, Any]] = []
        self.heartbeats = 0
        self.rate_limited_posts = 0
        self.deferred: list[tuple[int, int]] = []  # (interaction id, flags)

        # knobs
        self.refuse_privileged_intents = False
        self._rate_limit_left = 0
        self._retry_after = 0.0
        self._fail_plan: list[int] = [0, 0, 0]  # successes to let through, failures, status

        self._shards: dict[int, _Shard] = {}
        self._sessions: dict[str, _Shard] = {}
        self._changed = asyncio.Condition()
        self._runner: web.AppRunner | None = None
        self.url = ""

    # --- lifecycle --------------------------------------------------------------------------
    async def start(self) -> "FakeDiscord":
        app = web.Application()
        app.router.add_get("/gateway-ws", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        return self

    async def stop(self) -> None:
        for shard in self._shards.values():
            if shard.ws is not None and not shard.ws.closed:
                await shard.ws.close(code=1001)
        if self._runner is not None:
            await self._runner.cleanup()

    @property
    def api_base(self) -> str:
        return f"{self.url}/api/v10"

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/gateway-ws"

    # --- knobs ------------------------------------------------------------------------------
    def rate_limit_next_posts(self, count: int, retry_after: float) -> None:
        """Answer the next `count` message posts with 429 and this retry_after."""
        self._rate_limit_left, self._retry_after = count, retry_after

    def fail_posts(self, after: int, count: int = 1, status: int = 403) -> None:
        """Let `after` message posts succeed, then refuse `count` with `status`
        (403 = Missing Permissions, which discord.py does not retry)."""
        self._fail_plan = [after, count, status]

    async def drop_connection(self, code: int = 4000) -> None:
        """Close every gateway socket (as Discord does now and then); sessions stay resumable."""
        for shard in self._shards.values():
            if shard.ws is not None and not shard.ws.closed:
                await shard.ws.close(code=code, message=b"fake disconnect")

    # --- waiting ----------------------------------------------------------------------------
    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait_until(self, predicate, timeout: float = 10.0) -> None:
        async def wait() -> None:
            async with self._changed:
                await self._changed.wait_for(predicate)

        await asyncio.wait_for(wait(), timeout)

    async def wait_posts(self, count: int, timeout: float = 10.0, **match: Any) -> list[Post]:
        """Wait until at least `count` posts match (kind=, channel_id=, interaction_id=)."""

        def found() -> list[Post]:
            return [p for p in self.posts
                    if all(getattr(p, k) == v for k, v in match.items())]

        await self.wait_until(lambda: len(found()) >= count, timeout)
        return found()

    # --- world payloads ---------------------------------------------------------------------
    def text_channel(self, cid: int, name: str) -> dict[str, Any]:
        return {"id": str(cid), "type": 0, "guild_id": str(self.guild_id), "name": name,
                "position": 0, "permission_overwrites": [], "nsfw": False, "parent_id": None,
                "topic": None, "last_message_id": None, "rate_limit_per_user": 0, "flags": 0}

    def thread_channel(self) -> dict[str, Any]:
        return {"id": str(self.thread), "type": 11, "guild_id": str(self.guild_id),
                "parent_id": str(self.general), "owner_id": str(self.alice.id),
                "name": "a thread", "last_message_id": None, "rate_limit_per_user": 0,
                "message_count": 0, "member_count": 2, "flags": 0,
                "thread_metadata": {"archived": False, "auto_archive_duration": 1440,
                                    "archive_timestamp": iso_now(), "locked": False}}

    def guild_payload(self) -> dict[str, Any]:
        roles = [
            role_payload(self.guild_id, "@everyone", MEMBER_PERMS, 0),
            role_payload(self.bot_role, "dialogbot", MEMBER_PERMS, 1, managed=True,
                         tags={"bot_id": str(self.bot.id)}),
            role_payload(self.admin_role, "mods", MEMBER_PERMS | MANAGE_MESSAGES, 2),
        ]
        return {
            "id": str(self.guild_id), "name": "Fake Guild", "icon": None, "owner_id": "1",
            "unavailable": False, "member_count": 4, "large": False, "features": [],
            "roles": roles, "emojis": [], "stickers": [], "verification_level": 0,
            "default_message_notifications": 0, "explicit_content_filter": 0, "mfa_level": 0,
            "afk_timeout": 300, "system_channel_flags": 0, "premium_tier": 0,
            "preferred_locale": "en-US", "nsfw_level": 0, "joined_at": iso_now(),
            "channels": [self.text_channel(self.general, "general"),
                         self.text_channel(self.free, "chat-with-bot")],
            "threads": [self.thread_channel()],
            "members": [p.member() for p in (self.bot, self.alice, self.admin, self.other_bot)],
            "voice_states": [], "presences": [], "stage_instances": [],
            "guild_scheduled_events": [], "soundboard_sounds": [],
        }

    def permissions_of(self, person: Person) -> int:
        perms = MEMBER_PERMS
        if self.admin_role in person.roles:
            perms |= MANAGE_MESSAGES
        return perms

    def person(self, uid: int) -> Person | None:
        for p in (self.bot, self.alice, self.admin, self.other_bot):
            if p.id == uid:
                return p
        return None

    def dm_channel(self, person: Person) -> int:
        return self.dm_channels.setdefault(person.id, snowflake())

    def message_payload(self, author: Person, channel_id: int, content: str, *,
                        guild: bool = True, mentions: list[Person] = (),
                        mention_roles: list[int] = (), reply_to: dict[str, Any] | None = None,
                        attachments: int = 0, webhook: bool = False,
                        type_: int | None = None, reference_only: bool = False
                        ) -> dict[str, Any]:
        data: dict[str, Any] = {
            "id": str(snowflake()), "channel_id": str(channel_id), "author": author.user,
            "content": content, "timestamp": iso_now(), "edited_timestamp": None,
            "tts": False, "mention_everyone": False, "pinned": False, "flags": 0,
            "mentions": [dict(p.user, member=p.member(with_user=False)) if guild else p.user
                         for p in mentions],
            "mention_roles": [str(r) for r in mention_roles], "embeds": [],
            "attachments": [{"id": str(snowflake()), "filename": f"f{i}.png", "size": 10,
                             "url": "https://cdn.invalid/f.png",
                             "proxy_url": "https://cdn.invalid/f.png"}
                            for i in range(attachments)],
            "type": 0 if type_ is None else type_,
        }
        if guild:
            data["guild_id"] = str(self.guild_id)
            data["member"] = author.member(with_user=False)
        if webhook:
            data["webhook_id"] = str(snowflake())
        if reply_to is not None:
            data["type"] = 19 if type_ is None else type_
            data["message_reference"] = {"message_id": reply_to["id"],
                                         "channel_id": reply_to["channel_id"],
                                         "guild_id": reply_to.get("guild_id"), "type": 0}
            if not reference_only:  # Discord leaves it out when it could not load it
                data["referenced_message"] = reply_to
        self.messages[int(data["id"])] = data
        return data

    def posted_while_offline(self, author: Person, channel_id: int, content: str
                             ) -> dict[str, Any]:
        """A message the bot never received (no MESSAGE_CREATE): only a fetch finds it."""
        return self.message_payload(author, channel_id, content)

    # --- pushing events ---------------------------------------------------------------------
    def _shard_for(self, guild_id: int | None) -> _Shard:
        count = max(len(self._shards), 1)
        sid = 0 if guild_id is None else (guild_id >> 22) % count
        return self._shards[sid]

    async def dispatch(self, event: str, data: dict[str, Any],
                       guild_id: int | None = None) -> None:
        """Send one dispatch (op 0) on the shard that owns the guild (DMs: shard 0); kept for
        replay if the socket is down."""
        await self.wait_until(lambda: 0 in self._shards)
        shard = self._shard_for(guild_id)
        shard.seq += 1
        frame = {"op": 0, "t": event, "s": shard.seq, "d": data}
        shard.sent.append(frame)
        if shard.ws is not None and not shard.ws.closed:
            try:
                await shard.ws.send_str(json.dumps(frame))
            except ConnectionError:
                pass

    async def send_message(self, author: Person, channel_id: int, content: str,
                           **kw: Any) -> dict[str, Any]:
        """A user posts a message: MESSAGE_CREATE. Returns the payload (for reply_to=)."""
        data = self.message_payload(author, channel_id, content, **kw)
        await self.dispatch("MESSAGE_CREATE", data,
                            self.guild_id if kw.get("guild", True) else None)
        return data

    async def send_dm(self, author: Person, content: str, **kw: Any) -> dict[str, Any]:
        return await self.send_message(author, self.dm_channel(author), content,
                                       guild=False, **kw)

    async def slash(self, person: Person, name: str, channel_id: int | None = None,
                    options: dict[str, str] | None = None, dm: bool = False) -> int:
        """A user runs a slash command: INTERACTION_CREATE. Returns the interaction id."""
        iid = snowflake()
        cmd = next((c for c in self.commands if c["name"] == name), None)
        data: dict[str, Any] = {
            "id": str(iid), "application_id": str(self.app_id), "type": 2,
            "token": f"itoken-{iid}", "version": 1, "locale": "en-US",
            "attachment_size_limit": 8 * 1024 * 1024, "entitlements": [],
            "app_permissions": str(MEMBER_PERMS),
            "data": {"id": cmd["id"] if cmd else str(snowflake()), "name": name, "type": 1,
                     "options": [{"name": k, "type": 3, "value": v}
                                 for k, v in (options or {}).items()]},
        }
        if dm:
            cid = self.dm_channel(person)
            data.update(user=person.user, context=1, channel_id=str(cid),
                        channel={"id": str(cid), "type": 1, "recipients": [person.user],
                                 "last_message_id": None, "flags": 0})
        else:
            cid = channel_id or self.general
            member = person.member()
            member["permissions"] = str(self.permissions_of(person))
            chan = (self.thread_channel() if cid == self.thread
                    else self.text_channel(cid, "general"))
            data.update(guild_id=str(self.guild_id), member=member, context=0,
                        channel_id=str(cid), channel=chan, guild_locale="en-US",
                        guild={"id": str(self.guild_id), "locale": "en-US", "features": []})
        await self.dispatch("INTERACTION_CREATE", data, None if dm else self.guild_id)
        return iid

    # --- gateway ----------------------------------------------------------------------------
    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": self.heartbeat_ms},
                                      "s": None, "t": None}))
        shard: _Shard | None = None
        async for msg in ws:
            if msg.type is not WSMsgType.TEXT:
                continue
            frame = json.loads(msg.data)
            op, d = frame.get("op"), frame.get("d")
            if op == 1:
                self.heartbeats += 1
                await ws.send_str(json.dumps({"op": 11, "d": None, "s": None, "t": None}))
            elif op == 2:
                shard = await self._identify(ws, d)
                if shard is None:
                    break
            elif op == 6:
                shard = await self._resume(ws, d)
            await self._notify()
        if shard is not None and shard.ws is ws:
            shard.ws = None
        await self._notify()
        return ws

    async def _identify(self, ws: web.WebSocketResponse, d: dict[str, Any]) -> _Shard | None:
        self.identifies.append(d)
        if d.get("token") != self.token:
            await ws.close(code=4004, message=b"Authentication failed.")
            return None
        if self.refuse_privileged_intents and int(d.get("intents", 0)) & MESSAGE_CONTENT_INTENT:
            await ws.close(code=4014, message=b"Disallowed intent(s).")
            return None
        shard = _Shard(d.get("shard"))
        sid = shard.shard[0] if shard.shard else 0
        self._shards[sid] = shard
        self._sessions[shard.session_id] = shard
        shard.ws = ws
        ready = {"v": 10, "user": self.bot.user, "session_id": shard.session_id,
                 "resume_gateway_url": self.ws_url, "session_type": "normal",
                 "application": {"id": str(self.app_id), "flags": 0},
                 "guilds": [], "private_channels": [], "relationships": [],
                 "user_settings": {}, "presences": [], "geo_ordered_rtc_regions": []}
        count = shard.shard[1] if shard.shard else 1
        owns_guild = (self.guild_id >> 22) % count == sid
        if owns_guild:
            ready["guilds"] = [{"id": str(self.guild_id), "unavailable": True}]
        if shard.shard:
            ready["shard"] = shard.shard
        await self.dispatch_on(shard, "READY", ready)
        if owns_guild:
            await self.dispatch_on(shard, "GUILD_CREATE", self.guild_payload())
        return shard

    async def _resume(self, ws: web.WebSocketResponse, d: dict[str, Any]) -> _Shard | None:
        self.resumes.append(d)
        shard = self._sessions.get(d.get("session_id", ""))
        if shard is None or d.get("token") != self.token:
            await ws.send_str(json.dumps({"op": 9, "d": False, "s": None, "t": None}))
            return None
        shard.ws = ws
        seq = d.get("seq") or 0
        for frame in shard.sent:
            if frame["s"] > seq:
                await ws.send_str(json.dumps(frame))
        await self.dispatch_on(shard, "RESUMED", {})
        return shard

    async def dispatch_on(self, shard: _Shard, event: str, data: dict[str, Any]) -> None:
        shard.seq += 1
        frame = {"op": 0, "t": event, "s": shard.seq, "d": data}
        shard.sent.append(frame)
        assert shard.ws is not None
        await shard.ws.send_str(json.dumps(frame))

    # --- REST -------------------------------------------------------------------------------
    @staticmethod
    def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None
              ) -> web.Response:
        h = {"Content-Type": "application/json"}
        h.update(headers or {})
        return web.Response(body=json.dumps(data).encode(), status=status, headers=h)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        path = "/" + request.match_info["tail"]
        self.requests.append((request.method, path))
        try:
            return await self._route(request, request.method, path.strip("/").split("/"))
        finally:
            await self._notify()

    async def _route(self, request: web.Request, method: str, parts: list[str]
                     ) -> web.StreamResponse:
        interaction_call = parts[0] == "interactions" or (parts[0] == "webhooks")
        if not interaction_call and request.headers.get("Authorization") != f"Bot {self.token}":
            return self._json({"message": "401: Unauthorized", "code": 0}, 401)
        body = await request.json() if request.can_read_body else None
        match method, parts:
            case "GET", ["users", "@me"]:
                return self._json(self.bot.user)
            case "GET", ["oauth2", "applications", "@me"]:
                return self._json({
                    "id": str(self.app_id), "name": "dialogbot", "description": "",
                    "icon": None, "bot_public": True, "bot_require_code_grant": False,
                    "owner": user_payload(snowflake(), "owner"), "verify_key": "00",
                    "flags": 0, "team": None})
            case "GET", ["gateway"]:
                return self._json({"url": self.ws_url})
            case "GET", ["gateway", "bot"]:
                return self._json({"url": self.ws_url, "shards": self.recommended_shards,
                                   "session_start_limit": {"total": 1000, "remaining": 999,
                                                           "reset_after": 0,
                                                           "max_concurrency": 1}})
            case "PUT", ["applications", _, "commands"]:
                self.commands = [dict(c, id=str(snowflake()), application_id=str(self.app_id),
                                      version=str(snowflake()), type=c.get("type", 1))
                                 for c in body]
                return self._json(self.commands)
            case "POST", ["channels", cid, "typing"]:
                self.typing.append(int(cid))
                return web.Response(status=204)
            case "POST", ["channels", cid, "messages"]:
                return await self._create_message(int(cid), body)
            case "GET", ["channels", cid, "messages", mid]:
                found = self.messages.get(int(mid))
                if found is None or found["channel_id"] != cid:
                    return self._json({"message": "Unknown Message", "code": 10008}, 404)
                self.fetched.append(int(mid))
                return self._json(found)
            case "GET", ["channels", cid]:
                cid = int(cid)
                if cid in (self.general, self.free):
                    return self._json(self.text_channel(cid, "general"))
                if cid == self.thread:
                    return self._json(self.thread_channel())
                return self._json({"message": "Unknown Channel", "code": 10003}, 404)
            case "GET", ["guilds", _, "members", uid]:
                person = self.person(int(uid))
                if person is None:
                    return self._json({"message": "Unknown Member", "code": 10007}, 404)
                return self._json(person.member())
            case "POST", ["interactions", iid, _token, "callback"]:
                return self._interaction_callback(int(iid), body)
            case "POST", ["webhooks", _app, token]:
                iid = int(token.removeprefix("itoken-"))
                msg = self._bot_message(None, body.get("content") or "")
                self.posts.append(Post("followup", None, body, int(msg["id"]), iid))
                return self._json(msg)
            case "PATCH", ["webhooks", _app, token, "messages", "@original"]:
                iid = int(token.removeprefix("itoken-"))
                msg = self._bot_message(None, body.get("content") or "")
                self.posts.append(Post("followup", None, body, int(msg["id"]), iid))
                return self._json(msg)
        return self._json({"message": f"fake: no route {method} {'/'.join(parts)}",
                           "code": 0}, 404)

    def _bot_message(self, channel_id: int | None, content: str) -> dict[str, Any]:
        data = self.message_payload(self.bot, channel_id or 0, content,
                                    guild=channel_id in (self.general, self.free, self.thread))
        return data

    async def _create_message(self, cid: int, body: dict[str, Any]) -> web.Response:
        if self._rate_limit_left > 0:
            self._rate_limit_left -= 1
            self.rate_limited_posts += 1
            retry = self._retry_after
            return self._json(
                {"message": "You are being rate limited.", "retry_after": retry,
                 "global": False},
                429, {"Retry-After": str(max(1, round(retry))), "Via": "1.1 google",
                      "X-RateLimit-Limit": "5", "X-RateLimit-Remaining": "0",
                      "X-RateLimit-Reset-After": f"{retry:.3f}",
                      "X-RateLimit-Reset": f"{time.time() + retry:.3f}",
                      "X-RateLimit-Bucket": "fake-messages", "X-RateLimit-Scope": "user"})
        after, failures, status = self._fail_plan
        if failures and not after:
            self._fail_plan[1] -= 1
            return self._json({"message": "Missing Permissions", "code": 50013}, status)
        if failures:
            self._fail_plan[0] -= 1
        msg = self._bot_message(cid, body.get("content") or "")
        self.posts.append(Post("message", cid, body, int(msg["id"]), message=msg))
        # Discord echoes the bot's own message through the gateway
        guild = cid in (self.general, self.free, self.thread)
        await self.dispatch("MESSAGE_CREATE", msg, self.guild_id if guild else None)
        return self._json(msg, headers={"X-RateLimit-Limit": "5",
                                        "X-RateLimit-Remaining": "4",
                                        "X-RateLimit-Reset-After": "5.000",
                                        "X-RateLimit-Bucket": "fake-messages"})

    def _interaction_callback(self, iid: int, body: dict[str, Any]) -> web.Response:
        data = body.get("data") or {}
        flags = int(data.get("flags") or 0)
        mid = snowflake()
        if body.get("type") == 4:  # CHANNEL_MESSAGE_WITH_SOURCE
            self.posts.append(Post("callback", None, body, mid, iid))
        elif body.get("type") == 5:  # DEFERRED_CHANNEL_MESSAGE_WITH_SOURCE ("thinking")
            self.deferred.append((iid, flags))
        return self._json({
            "interaction": {"id": str(iid), "type": 2, "response_message_id": str(mid),
                            "response_message_loading": body.get("type") == 5,
                            "response_message_ephemeral": bool(flags & EPHEMERAL)},
        })


def point_discord_py_at(fake: FakeDiscord, monkeypatch: Any) -> None:
    """Make the real discord.py client talk to `fake`: its REST base URL and its gateway."""
    import discord
    import yarl

    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(discord.gateway.DiscordWebSocket, "DEFAULT_GATEWAY",
                        yarl.URL(fake.ws_url))
