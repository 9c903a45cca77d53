"""The real PTB Application, the real pipeline and store and a tiny random-weight DialoGPT,
against the fake Bot API server in tests/fake_telegram.py (long polling unless noted)."""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from contextlib import asynccontextmanager

import aiohttp
import pytest

from adapters.telegram import TelegramAdapter
from bot.app import build_app
from bot.events import Reply
from tests import fake_telegram as ft
from tests.fake_telegram import FakeTelegram
from tests.recording import send_all

TOKEN = "123456:TEST-TOKEN-abcdef"
DM = 111  # a private chat is the user's id
GROUP = -100200300
pytestmark = pytest.mark.timeout(60)


@pytest.fixture
async def fake():
    server = await FakeTelegram(TOKEN).start()
    yield server
    await server.stop()


@pytest.fixture
def config(make_config, fake):
    return make_config(telegram_token=TOKEN, telegram_base_url=fake.base_url)


@asynccontextmanager
async def running(config):
    adapter = TelegramAdapter(config)
    app = build_app(config, adapters=[adapter])
    await app.start()
    try:
        yield app, adapter
    finally:
        await app.stop(drain_timeout=10)


def replied_to(message: dict) -> int | None:
    return (message.get("_reply_to") or {}).get("message_id")


async def test_private_chat_reply_and_history_survive_a_restart(config, fake):
    async with running(config) as (app, adapter):
        assert (adapter.username, adapter.bot_id) == (ft.BOT_USERNAME, ft.BOT_ID)
        commands = fake.calls_of("setMyCommands")[0].params["commands"]
        assert [c["command"] for c in commands] == ["start", "help", "reset", "forget",
                                                    "settings"]
        assert fake.calls_of("deleteWebhook")  # polling clears any webhook first
        first = await fake.push(ft.private_update("Hello there, bot!"))
        sent = await fake.wait_sent(DM, 1)
        assert sent[0]["text"].strip()
        assert replied_to(sent[0]) == first["message"]["message_id"]
        assert sent[0]["_params"]["link_preview_options"] == {"is_disabled": True}
        assert "parse_mode" not in sent[0]["_params"]
        assert any(c.params.get("action") == "typing" for c in fake.calls_of("sendChatAction"))
        await fake.push(ft.private_update("How are you today?"))
        await fake.wait_sent(DM, 2)
        assert await app.store.count("telegram", str(DM)) == 4
        await fake.wait_confirmed()

    async with running(config) as (app, adapter):
        await fake.push(ft.private_update("Do you remember me?"))
        await fake.wait_sent(DM, 3)
        turns = await app.store.recent("telegram", str(DM), 50)
        assert [t.text for t in turns if t.role.value == "user"] == [
            "Hello there, bot!", "How are you today?", "Do you remember me?"]
        assert len(turns) == 6
    assert len(fake.sent_to(DM)) == 3  # nothing answered twice after the restart


async def test_group_unaddressed_messages_are_ignored_and_not_stored(config, fake):
    async with running(config) as (app, _):
        await fake.push(ft.group_update("just chatting among ourselves"))
        await fake.push(ft.group_update("/weather Paris"))  # another bot's bare command
        mention = await fake.push(ft.group_update(f"@{ft.BOT_USERNAME} hi bot"))
        sent = await fake.wait_sent(GROUP, 1)
        await asyncio.sleep(0.3)
        assert len(fake.sent_to(GROUP)) == 1
        assert replied_to(sent[0]) == mention["message"]["message_id"]
        turns = await app.store.recent("telegram", str(GROUP), 50)
        assert [t.text for t in turns][0] == "hi bot" and len(turns) == 2


async def test_group_mention_reply_to_bot_and_command_are_answered(config, fake):
    async with running(config):
        mention = await fake.push(ft.group_update(f"hey @{ft.BOT_USERNAME.lower()} hello"))
        first = (await fake.wait_sent(GROUP, 1))[0]
        assert replied_to(first) == mention["message"]["message_id"]

        reply = await fake.push(ft.group_update("and then?", reply_to=first))
        second = (await fake.wait_sent(GROUP, 2))[1]
        assert replied_to(second) == reply["message"]["message_id"]

        command = await fake.push(ft.group_update(f"/help@{ft.BOT_USERNAME}"))
        third = (await fake.wait_sent(GROUP, 3))[2]
        assert replied_to(third) == command["message"]["message_id"]
        assert "/reset" in third["text"] and "mention me" in third["text"]


async def test_reset_in_group_needs_a_chat_admin(config, fake):
    member, admin = 222, 333
    fake.set_member(GROUP, member, "member")
    fake.set_member(GROUP, admin, "administrator")
    async with running(config) as (app, _):
        await fake.push(ft.group_update(f"@{ft.BOT_USERNAME} hello", user_id=member))
        await fake.wait_sent(GROUP, 1)
        assert await app.store.count("telegram", str(GROUP)) == 2

        await fake.push(ft.group_update(f"/reset@{ft.BOT_USERNAME}", user_id=member))
        refused = (await fake.wait_sent(GROUP, 2))[1]
        assert "Only admins" in refused["text"]
        assert await app.store.count("telegram", str(GROUP)) == 2

        await fake.push(ft.group_update(f"/reset@{ft.BOT_USERNAME}", user_id=admin))
        done = (await fake.wait_sent(GROUP, 3))[2]
        assert done["text"].startswith("Done")
        assert await app.store.count("telegram", str(GROUP)) == 0
        asked = {(int(c.params["chat_id"]), int(c.params["user_id"]))
                 for c in fake.calls_of("getChatMember")}
        assert asked == {(GROUP, member), (GROUP, admin)}


async def test_is_admin_is_cached_briefly(config, fake):
    fake.set_member(GROUP, 444, "creator")
    async with running(config) as (_, adapter):
        event = ft_event(GROUP, 444)
        assert await adapter.is_admin(event) and await adapter.is_admin(event)
        assert len(fake.calls_of("getChatMember")) == 1
        assert await adapter.is_admin(ft_event(DM, DM, direct=True))
        assert len(fake.calls_of("getChatMember")) == 1  # a private chat needs no question


async def test_no_log_line_carries_the_token(config, fake, caplog):
    caplog.set_level(logging.DEBUG)
    async with running(config):
        await fake.push(ft.private_update("Hello"))
        await fake.wait_sent(DM, 1)
    assert "getMe" in caplog.text or "Application started" in caplog.text  # logs were on
    assert TOKEN.split(":")[1] not in caplog.text


def ft_event(chat: int, user: int, direct: bool = False):
    from bot.events import Incoming

    return Incoming("telegram", str(chat), "1", str(user), "U", "/reset", direct, True)


async def test_long_reply_arrives_in_parts_within_the_limit(config, fake):
    text = "\n".join(f"line {i}: " + ("lorem ipsum dolor sit amet " * 3).strip()
                     for i in range(115))
    assert len(text) > 10_000
    async with running(config) as (_, adapter):
        await send_all(adapter, Reply("telegram", str(GROUP), text, reply_to="77"))
        sent = fake.sent_to(GROUP)
    assert len(sent) == 3
    assert all(0 < len(m["text"]) <= 4096 for m in sent)
    assert "\n".join(m["text"] for m in sent) == text
    assert replied_to(sent[0]) == 77
    assert sent[0]["_params"]["reply_parameters"]["allow_sending_without_reply"] is True


async def test_429_is_waited_out_and_the_reply_still_arrives(config, fake):
    async with running(config):
        fake.fail_next_sends(1, retry_after=1)
        await fake.push(ft.private_update("Are you there?"))
        sent = await fake.wait_sent(DM, 1)
    assert sent[0]["text"].strip()
    attempts = fake.calls_of("sendMessage")
    assert len(attempts) == 2
    assert attempts[1].at - attempts[0].at >= 1.0


@pytest.mark.parametrize("status", [502, 0], ids=["5xx", "connection-dropped"])
async def test_platform_send_failure_is_retried_and_the_bot_recovers(config, fake, status,
                                                                      caplog):
    async with running(config) as (app, _):
        app.pipeline.retry_base = 0.05
        fake.break_next_sends(2, status)
        await fake.push(ft.private_update("hello through a flaky network"))
        sent = await fake.wait_sent(DM, 1)
        assert sent[0]["text"].strip()
        assert len(fake.calls_of("sendMessage")) >= 3  # two failures, then delivered
        await fake.push(ft.private_update("and again"))
        assert len(await fake.wait_sent(DM, 2)) == 2
    assert any("send failed" in r.getMessage() for r in caplog.records)
    assert all(TOKEN not in r.getMessage() for r in caplog.records)


async def test_sticker_in_private_chat_gets_text_only_notice_and_bot_keeps_going(config, fake):
    async with running(config) as (app, _):
        await fake.push(ft.sticker_update(DM))
        notice = (await fake.wait_sent(DM, 1))[0]
        assert "only read text" in notice["text"]
        await fake.push(ft.private_update("ok, words then"))
        answer = (await fake.wait_sent(DM, 2))[1]
        assert "only read text" not in answer["text"]
        assert await app.store.count("telegram", str(DM)) == 2


async def test_sticker_in_group_is_ignored(config, fake):
    async with running(config):
        await fake.push(ft.sticker_update(GROUP, user_id=222))
        await fake.push(ft.group_update(f"@{ft.BOT_USERNAME} hello"))
        await fake.wait_sent(GROUP, 1)
        await asyncio.sleep(0.3)
        assert len(fake.sent_to(GROUP)) == 1


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_webhook_answers_with_the_right_secret_and_rejects_a_wrong_one(make_config,
                                                                            fake, caplog):
    caplog.set_level(logging.DEBUG)
    port = free_port()
    url = f"http://127.0.0.1:{port}/tg-hook"
    config = make_config(telegram_token=TOKEN, telegram_base_url=fake.base_url,
                         telegram_webhook_url=url, telegram_webhook_listen="127.0.0.1",
                         telegram_webhook_port=port, telegram_webhook_secret="s3cret-Value_1")
    async with running(config), aiohttp.ClientSession() as http:
        assert fake.webhook["url"] == url
        assert fake.webhook["secret_token"] == "s3cret-Value_1"
        assert not fake.calls_of("getUpdates")

        bad = {"update_id": 1, **ft.private_update("let me in")}
        async with http.post(url, json=bad, headers={
                "X-Telegram-Bot-Api-Secret-Token": "wrong"}) as resp:
            assert resp.status == 403
        async with http.post(url, json=bad) as resp:  # no secret at all
            assert resp.status == 403

        good = {"update_id": 2, **ft.private_update("hello via webhook")}
        started = time.monotonic()
        async with http.post(url, json=good, headers={
                "X-Telegram-Bot-Api-Secret-Token": "s3cret-Value_1"}) as resp:
            assert resp.status == 200
        sent = await fake.wait_sent(DM, 1)
        assert time.monotonic() - started < 10
        await asyncio.sleep(0.3)
    assert len(fake.sent_to(DM)) == 1
    assert replied_to(sent[0]) == good["message"]["message_id"]
    assert "setWebhook" in caplog.text and "s3cret-Value_1" not in caplog.text


async def test_stop_is_idempotent_and_send_after_stop_fails_cleanly(config, fake):
    from bot.errors import PlatformError

    async with running(config) as (_, adapter):
        pass
    await adapter.stop()
    with pytest.raises(PlatformError):
        await send_all(adapter, Reply("telegram", str(DM), "late"))


async def test_typing_is_renewed_until_the_block_exits(config, fake, monkeypatch):
    import adapters.telegram as tg

    monkeypatch.setattr(tg, "TYPING_EVERY", 0.05)
    async with running(config) as (_, adapter):
        async with adapter.typing(ft_event(DM, DM, direct=True)):
            await asyncio.sleep(0.4)
        during = len(fake.calls_of("sendChatAction"))
        await asyncio.sleep(0.3)
        after = len(fake.calls_of("sendChatAction"))
    assert during >= 3 and after == during
    assert all(c.params["action"] == "typing" and int(c.params["chat_id"]) == DM
               for c in fake.calls_of("sendChatAction"))


async def test_a_rejected_token_fails_start_with_one_clean_error(make_config, fake, caplog):
    from bot.errors import PlatformError

    config = make_config(telegram_token="999:WRONG-TOKEN-xyz", telegram_base_url=fake.base_url)
    adapter = TelegramAdapter(config)
    app = build_app(config, adapters=[adapter])
    with pytest.raises(PlatformError, match="token was rejected") as info:
        await app.start()
    assert "WRONG-TOKEN" not in str(info.value) and "WRONG-TOKEN" not in caplog.text
    await adapter.stop()  # idempotent after a failed start
