"""The outbox (issue 13): a reply counts as delivered only when the platform confirmed it.

- `dialogbot run` (a real process, Telegram long polling against the fake Bot API, the tiny
  model) is killed with SIGKILL while the platform has not confirmed its reply; after a restart
  the reply is delivered exactly once.
- A multi-part reply whose second part fails is retried from that part (the first part is
  never sent twice), in process and across a restart.
- The typing status never uses the group's message budget.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from adapters.telegram import TelegramAdapter
from bot.app import build_app
from bot.events import Reply, Role, TurnState
from tests import fake_telegram as ft
from tests.fake_telegram import FakeTelegram

BIN = Path(sys.executable).parent / "dialogbot"
TOKEN = "424242:OUTBOX-TEST-TOKEN-abcdef"
DM = 111
GROUP = -100200300
pytestmark = pytest.mark.timeout(180)


@pytest.fixture
async def fake():
    server = await FakeTelegram(TOKEN).start()
    yield server
    server.release_sends()
    await server.stop()


def bot_env(tmp_path: Path, model_dir: Path, fake: FakeTelegram) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
    env.update(HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
               DIALOGBOT_MODEL=str(model_dir), DIALOGBOT_DO_SAMPLE="false",
               DIALOGBOT_NO_REPEAT_NGRAM_SIZE="0", DIALOGBOT_MAX_NEW_TOKENS="8",
               DIALOGBOT_TORCH_THREADS="1", DIALOGBOT_TELEGRAM_TOKEN=TOKEN,
               DIALOGBOT_TELEGRAM_BASE_URL=fake.base_url, DIALOGBOT_SHUTDOWN_TIMEOUT="5",
               DIALOGBOT_DATABASE_URL=f"sqlite+aiosqlite:///{tmp_path}/bot.db")
    return env


def rows(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "bot.db") as db:
        return db.execute("SELECT id, role, state, text FROM turns ORDER BY seq, id").fetchall()


def parts(tmp_path: Path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "bot.db") as db:
        return db.execute("SELECT turn_id, part, message_id FROM sent_parts").fetchall()


async def wait_for(check, timeout: float = 60.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            found = check()
        except sqlite3.OperationalError:
            found = None
        if found:
            return found
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


async def test_killed_before_the_platform_confirmed_then_delivered_once_after_restart(
        fake, tmp_path, tiny_model_dir):
    env = bot_env(tmp_path, tiny_model_dir, fake)
    log = (tmp_path / "first.log").open("w")
    first = subprocess.Popen([str(BIN), "run"], env=env, cwd=tmp_path, stdout=log,
                             stderr=subprocess.STDOUT)
    try:
        await fake.wait_call("getUpdates", timeout=60)
        fake.hold_sends()  # the platform takes the reply but never answers
        update = await fake.push(ft.private_update("please answer me once"))
        await wait_for(lambda: fake.holding == 1, what="the held send")
        stored = rows(tmp_path)
        assert [r[1:3] for r in stored] == [("user", "answered"), ("bot", "sending")]
        first.send_signal(signal.SIGKILL)
        first.wait(10)
    finally:
        if first.poll() is None:
            first.kill()
    await wait_for(lambda: fake.holding == 0, what="the dropped request")
    assert fake.sent_to(DM) == []  # nothing was delivered
    fake.release_sends()

    second = subprocess.Popen([str(BIN), "run"], env=env, cwd=tmp_path,
                              stdout=(tmp_path / "second.log").open("w"),
                              stderr=subprocess.STDOUT)
    try:
        [message] = await fake.wait_sent(DM, 1, timeout=60)
        await wait_for(lambda: [r for r in rows(tmp_path) if r[2] == "done"], what="done")
        await asyncio.sleep(1.0)  # nothing more arrives
        assert len(fake.sent_to(DM)) == 1
        assert message["text"] == stored[1][3].strip()
        assert message["_reply_to"]["message_id"] == update["message"]["message_id"]
        assert [r[1:3] for r in rows(tmp_path)] == [("user", "answered"), ("bot", "done")]
        assert parts(tmp_path) == [(stored[1][0], 0, str(message["message_id"]))]
    finally:
        second.send_signal(signal.SIGTERM)
        await asyncio.to_thread(second.wait, 30)
    assert second.returncode == 0, (tmp_path / "second.log").read_text()[-2000:]


@pytest.fixture
def config(make_config, fake):
    return make_config(telegram_token=TOKEN, telegram_base_url=fake.base_url, send_retries=1,
                       do_sample=True, temperature=5.0, top_k=0, top_p=1.0,
                       max_new_tokens=64)


async def long_reply_app(config, length: int = 60):
    adapter = TelegramAdapter(config)
    adapter.max_message_length = length  # a few dozen characters a part: several parts
    app = build_app(config, adapters=[adapter])
    app.pipeline.retry_base = 0.01
    await app.start()
    return app, adapter


async def test_a_failed_part_is_retried_alone_never_the_parts_before_it(config, fake):
    app, adapter = await long_reply_app(config)
    try:
        fake.break_sends_after(1, count=1, status=502)  # the second part fails once
        await fake.push(ft.private_update("tell me everything"))
        turns = await wait_for_settled(app)
        expected = adapter.split(turns[1].text)
        assert len(expected) >= 3
        sent = await fake.wait_sent(DM, len(expected))
        await asyncio.sleep(0.3)
        assert [m["text"] for m in fake.sent_to(DM)] == expected  # each part once, in order
        assert len(fake.calls_of("sendMessage")) == len(expected) + 1  # one retry
        assert await app.store.sent_ids(turns[1].id) == [str(m["message_id"]) for m in sent]
    finally:
        await app.stop()


async def wait_for_settled(app, chat: int = DM, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        turns = await app.store.recent("telegram", str(chat), 10)
        if len(turns) == 2 and turns[1].state in (TurnState.DONE, TurnState.SENDING) \
                and not app.pipeline.in_flight:
            return turns
        await asyncio.sleep(0.05)
    raise AssertionError("the reply never settled")


async def test_a_reply_cut_off_mid_parts_resumes_after_a_restart(config, fake):
    app, adapter = await long_reply_app(config)
    try:
        fake.break_sends_after(1, count=10, status=502)  # part 2 fails through every retry
        await fake.push(ft.private_update("tell me a long story"))
        turns = await wait_for_settled(app)
        assert turns[1].state is TurnState.SENDING  # kept in the outbox, not "delivered"
        assert len(fake.sent_to(DM)) == 1
        await fake.wait_confirmed()
    finally:
        await app.stop()
    fake.break_next_sends(0)
    expected = adapter.split(turns[1].text)
    app, adapter = await long_reply_app(config)
    try:
        await fake.wait_sent(DM, len(expected))
        await asyncio.sleep(0.5)
        assert [m["text"] for m in fake.sent_to(DM)] == expected  # part 1 not repeated
        [_, reply] = await app.store.recent("telegram", str(DM), 10)
        assert reply.role is Role.BOT and reply.state is TurnState.DONE
    finally:
        await app.stop()


async def test_typing_never_uses_the_groups_message_budget(config, fake):
    """AIORateLimiter allows 20 messages a minute per group. 40 typing actions first (ten
    minutes of one reply's typing status), then a message: it goes out at once."""
    app, adapter = await long_reply_app(config, length=4096)
    try:
        bot = adapter._bot()
        started = time.monotonic()
        for _ in range(40):
            await bot.send_chat_action(GROUP, "typing")
        await app.pipeline.send(Reply("telegram", str(GROUP), "not delayed"))
        assert time.monotonic() - started < 5
        assert [m["text"] for m in fake.sent_to(GROUP)] == ["not delayed"]
        assert len(fake.calls_of("sendChatAction")) == 40
    finally:
        await app.stop()


async def test_typing_is_sent_every_few_seconds_while_a_reply_generates(config, fake,
                                                                       monkeypatch):
    import adapters.telegram as tg

    monkeypatch.setattr(tg, "TYPING_EVERY", 0.2)
    app, adapter = await long_reply_app(config, length=4096)
    try:
        original = app.generator.reply

        async def reply(request):  # noqa: ANN001 - a generation that takes about 1 s
            await asyncio.sleep(1.0)
            return await original(request)

        app.generator.reply = reply
        await fake.push(ft.group_update(f"@{ft.BOT_USERNAME} are you typing?"))
        await fake.wait_sent(-100200300, 1, timeout=20)
        actions = [c.at for c in fake.calls_of("sendChatAction")]
        sent_at = fake.calls_of("sendMessage")[-1].at
        # one action every 0.2 s from the start of the generation (>= 1 s) to the reply,
        # none after it
        assert sent_at - actions[0] >= 0.9
        expected = (sent_at - actions[0]) / 0.2 + 1
        assert expected - 2 <= len(actions) <= expected + 1
        assert all(at <= sent_at for at in actions)
    finally:
        await app.stop()
