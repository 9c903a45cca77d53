"""Scale-out end to end: `dialogbot run` processes sharing the machine's real PostgreSQL (a
database created for the test) and Redis (a key prefix of the test's own), fed through their
Telegram webhooks, answering through the fake Bot API, generating through a completions
server (tests/fake_openai.py, greedy, 0.3 s a reply so generations would overlap without the
lock). Also: instances migrating an empty database at once, Discord shard subsets."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio

from bot.pipeline import LIMITED
from tests import fake_telegram as ft
from tests.fake_openai import FakeOpenAI
from tests.fake_telegram import FakeTelegram
from tests.test_metrics import PG_URL, fresh_database
from tests.test_migrations import HEAD

REDIS_URL = os.environ.get("TEST_REDIS_URL", "")
BIN = Path(sys.executable).parent / "dialogbot"
TOKEN = "7000000001:AAFakeTokenForScaleTests_abcdefghijk"
SECRET = "scale-webhook-secret-1"
LEASE = 3.0


def _needs_services() -> None:
    if not PG_URL:
        pytest.skip("needs PostgreSQL: set TEST_DATABASE_URL "
                    "(e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test)")
    if not REDIS_URL:
        pytest.skip("needs Redis: set TEST_REDIS_URL (e.g. redis://127.0.0.1:6379/15)")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Instance:
    name: str
    process: subprocess.Popen
    hook: str
    ready: str
    log: Path

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait(10)


class Cluster:
    """Two bot processes behind webhooks, plus the fakes and the database they share."""

    def __init__(self, tmp_path: Path, db_url: str, model_dir: Path):
        self.tmp_path = tmp_path
        self.db_url = db_url
        self.model_dir = model_dir
        self.prefix = f"dialogbot-scale-{uuid.uuid4().hex[:10]}"
        self.telegram = FakeTelegram(TOKEN)
        self.openai = FakeOpenAI(model_dir)
        self.instances: list[Instance] = []
        self._ids = iter(range(10_000, 10**9))

    async def start(self, count: int = 2, **settings: str) -> None:
        await self.telegram.start()
        await self.openai.start()
        self.openai.delay = 0.3
        self.settings = settings
        for number in range(count):
            self.instances.append(self._spawn(f"bot{number}", settings))
        await asyncio.gather(*(self._wait_ready(i) for i in self.instances))

    async def restart(self, index: int) -> Instance:
        """SIGTERM one instance, wait for its exit, start it again and wait until ready."""
        old = self.instances[index]
        old.process.send_signal(signal.SIGTERM)
        await asyncio.to_thread(old.process.wait, 30)
        new = self._spawn(f"{old.name}-again", self.settings)
        self.instances[index] = new
        await self._wait_ready(new)
        return new

    def _spawn(self, name: str, settings: dict[str, str]) -> Instance:
        hook_port, metrics_port = free_port(), free_port()
        hook = f"http://127.0.0.1:{hook_port}/hook"
        env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
        env.update(
            HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false",
            DIALOGBOT_MODEL=str(self.model_dir), DIALOGBOT_GENERATOR_BACKEND="openai",
            DIALOGBOT_GENERATOR_URL=self.openai.url, DIALOGBOT_GENERATOR_MODEL=self.openai.name,
            DIALOGBOT_DO_SAMPLE="false", DIALOGBOT_NO_REPEAT_NGRAM_SIZE="0",
            DIALOGBOT_MAX_NEW_TOKENS="8", DIALOGBOT_DATABASE_URL=self.db_url,
            DIALOGBOT_REDIS_URL=REDIS_URL, DIALOGBOT_REDIS_PREFIX=self.prefix,
            DIALOGBOT_LOCK_LEASE=str(LEASE), DIALOGBOT_CLAIM_LEASE=str(LEASE),
            DIALOGBOT_TELEGRAM_TOKEN=TOKEN,
            DIALOGBOT_TELEGRAM_BASE_URL=self.telegram.base_url,
            DIALOGBOT_TELEGRAM_WEBHOOK_URL=hook, DIALOGBOT_TELEGRAM_WEBHOOK_LISTEN="127.0.0.1",
            DIALOGBOT_TELEGRAM_WEBHOOK_PORT=str(hook_port),
            DIALOGBOT_TELEGRAM_WEBHOOK_SECRET=SECRET, DIALOGBOT_METRICS_PORT=str(metrics_port),
            DIALOGBOT_METRICS_HOST="127.0.0.1", DIALOGBOT_LOG_FORMAT="json",
            DIALOGBOT_SHUTDOWN_TIMEOUT="5")
        env.update({f"DIALOGBOT_{k.upper()}": v for k, v in settings.items()})
        log = self.tmp_path / f"{name}.log"
        with log.open("w") as out:
            process = subprocess.Popen([str(BIN), "run"], stdout=out, stderr=subprocess.STDOUT,
                                       env=env, cwd=self.tmp_path)
        return Instance(name, process, hook, f"http://127.0.0.1:{metrics_port}/readyz", log)

    async def _wait_ready(self, instance: Instance, timeout: float = 90.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as http:
            while time.monotonic() < deadline:
                if instance.process.poll() is not None:
                    raise AssertionError(f"{instance.name} exited: {instance.log.read_text()}")
                try:
                    async with http.get(instance.ready) as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.2)
        raise AssertionError(f"{instance.name} not ready: {instance.log.read_text()[-3000:]}")

    async def post(self, instance: Instance, chat_id: int, text: str) -> int:
        """A private-chat message from user `chat_id` to the instance's webhook."""
        update = {"update_id": next(self._ids), **ft.private_update(text, user_id=chat_id)}
        async with aiohttp.ClientSession() as http, http.post(
                instance.hook, json=update,
                headers={"X-Telegram-Bot-Api-Secret-Token": SECRET}) as response:
            assert response.status == 200, await response.text()
        return update["message"]["message_id"]

    async def turns(self, chat_id: int) -> list[tuple]:
        import asyncpg
        from sqlalchemy.engine import make_url

        dsn = make_url(self.db_url).set(drivername="postgresql").render_as_string(
            hide_password=False)
        conn = await asyncpg.connect(dsn)
        try:
            return [tuple(r) for r in await conn.fetch(
                "SELECT id, role, state, message_id, text, in_reply_to FROM turns WHERE platform = "
                "'telegram' AND channel = $1 ORDER BY id", str(chat_id))]
        finally:
            await conn.close()

    async def settled(self, chat_id: int, users: int, timeout: float = 60.0) -> list[tuple]:
        """Wait until `users` user turns are stored and none is pending; returns the turns."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = await self.turns(chat_id)
            mine = [r for r in rows if r[1] == "user"]
            if len(mine) >= users and all(r[2] != "pending" for r in mine):
                return rows
            await asyncio.sleep(0.2)
        raise AssertionError(f"chat {chat_id} never settled: {await self.turns(chat_id)}; "
                             f"redis: {await self.redis_keys()}")

    async def redis_keys(self) -> dict[str, int]:
        """This test's Redis keys and their remaining lifetimes (ms), for failure messages."""
        from redis import asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        try:
            return {k.decode(): await client.pttl(k)
                    async for k in client.scan_iter(match=f"{self.prefix}*")}
        finally:
            await client.aclose()

    async def stop(self) -> None:
        for instance in self.instances:
            if instance.process.poll() is None:
                instance.process.send_signal(signal.SIGTERM)
        for instance in self.instances:
            try:
                await asyncio.to_thread(instance.process.wait, 20)
            except subprocess.TimeoutExpired:
                instance.kill()
        self.openai.gate = None
        await self.openai.stop()
        await self.telegram.stop()
        from redis import asyncio as aioredis

        client = aioredis.Redis.from_url(REDIS_URL)
        keys = [k async for k in client.scan_iter(match=f"{self.prefix}*")]
        if keys:
            await client.delete(*keys)
        await client.aclose()


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def cluster(tmp_path_factory, tiny_model_dir):
    """One pair of instances for this module's tests (starting them is the slow part); the
    kill test runs last."""
    _needs_services()
    async with fresh_database() as db_url:
        made = Cluster(tmp_path_factory.mktemp("cluster"), db_url, tiny_model_dir)
        try:
            await made.start(user_rate="6", user_period="60")
            yield made
        finally:
            await made.stop()


def timeline(fake: FakeTelegram, chat_id: int) -> list[tuple[float, str]]:
    calls = [(c.at, c.method.lower()) for c in fake.calls
             if c.method.lower() in ("sendchataction", "sendmessage")
             and int(c.params.get("chat_id", 0)) == chat_id]
    return sorted(calls)


@pytest.mark.asyncio(loop_scope="module")
async def test_two_instances_share_one_chat_without_overlap_or_duplicates(cluster):
    one, two = cluster.instances
    tg, gen = cluster.telegram, cluster.openai

    # one chat, messages POSTed alternately to both instances
    chat = 601
    sent = []
    for i in range(6):
        sent.append(await cluster.post((one, two)[i % 2], chat, f"message number {i}"))
        await asyncio.sleep(0.15)
    rows = await cluster.settled(chat, users=6)
    users = [r for r in rows if r[1] == "user"]
    assert sorted(int(r[3]) for r in users) == sorted(sent)  # every message stored once
    replies = [r for r in rows if r[1] == "bot"]
    await tg.wait_sent(chat, len(replies))
    await asyncio.sleep(0.5)
    assert len(tg.sent_to(chat)) == len(replies) >= 2
    assert {m["text"] for m in tg.sent_to(chat)} <= {r[4] for r in replies}

    # never two replies in the chat at once: typing, send, typing, send ...
    kinds = [kind for _, kind in timeline(tg, chat)]
    collapsed = [k for i, k in enumerate(kinds) if i == 0 or k != kinds[i - 1]]
    assert collapsed == ["sendchataction", "sendmessage"] * len(replies), kinds
    # and no generation started before the previous reply was sent
    events = sorted([(r.start, "generate") for r in gen.requests]
                    + [(at, "send") for at, kind in timeline(tg, chat) if kind == "sendmessage"])
    assert [k for _, k in events] == ["generate", "send"] * len(replies), events

    # a burst over the user limit, alternately to both: limited once across both instances
    burst = 602
    for i in range(10):
        await cluster.post((one, two)[i % 2], burst, f"burst {i}")
    rows = await cluster.settled(burst, users=6)
    await asyncio.sleep(1.0)
    assert len([r for r in await cluster.turns(burst) if r[1] == "user"]) == 6
    texts = [m["text"] for m in tg.sent_to(burst)]
    assert texts.count(LIMITED) == 1, texts


@pytest.mark.asyncio(loop_scope="module")
async def test_an_instance_restarting_while_the_other_generates_answers_nothing_twice(cluster):
    """`one` is generating a reply when `two` restarts: `two`'s recovery finds the message
    claimed by a live instance and leaves it; the chat gets exactly one reply."""
    one, _ = cluster.instances
    tg, gen = cluster.telegram, cluster.openai
    before = len(gen.requests)
    gen.gate = asyncio.Event()
    chat = 801
    await cluster.post(one, chat, "a slow question")
    for _ in range(300):
        if len(gen.requests) > before:
            break
        await asyncio.sleep(0.05)
    assert len(gen.requests) == before + 1
    await cluster.restart(1)  # its recovery runs while `one` still generates
    await asyncio.sleep(LEASE + 0.5)  # past a lock lease: the claim is renewed, not taken
    gen.gate.set()
    gen.gate = None
    rows = await cluster.settled(chat, users=1)
    await tg.wait_sent(chat, 1)
    await asyncio.sleep(1.0)
    assert len(tg.sent_to(chat)) == 1
    assert [r[1:3] for r in rows] == [("user", "answered"), ("bot", "done")]
    assert len(gen.requests) == before + 1  # generated once


@pytest.mark.asyncio(loop_scope="module")
async def test_killed_instance_lease_expires_and_the_other_serves_the_chat(cluster):
    one, two = cluster.instances
    tg, gen = cluster.telegram, cluster.openai
    before = len(gen.requests)
    gen.gate = asyncio.Event()  # generations hold until released

    chat = 701
    posted = time.monotonic()
    await cluster.post(one, chat, "you will be cut off")
    for _ in range(300):  # until `one` holds the chat's lock and is generating
        if len(gen.requests) > before:
            break
        await asyncio.sleep(0.05)
    assert len(gen.requests) == before + 1
    one.kill()
    gen.gate.set()

    await cluster.post(two, 702, "another chat is not blocked")
    await tg.wait_sent(702, 1, timeout=20)
    await cluster.post(two, chat, "anyone there?")
    [answer] = await tg.wait_sent(chat, 1, timeout=30)
    assert answer["_reply_to"]["message_id"] != 0
    second = [r for r in gen.requests[before + 1:] if r.end is not None and r.status == 200]
    started = [r.start for r in second]
    assert max(started) >= posted + LEASE  # waited for the dead instance's lease
    rows = await cluster.turns(chat)
    assert [r[4] for r in rows if r[1] == "user"] == ["you will be cut off", "anyone there?"]
    assert [r[4] for r in rows if r[1] == "bot"] == [answer["text"]]


def test_instances_migrating_an_empty_database_at_once_all_start(tmp_path):
    _needs_services()

    async def go() -> None:
        async with fresh_database() as db_url:
            env = {k: v for k, v in os.environ.items() if not k.startswith("DIALOGBOT_")}
            env["DIALOGBOT_DATABASE_URL"] = db_url
            runs = [subprocess.Popen([str(BIN), "reset", "--platform", "telegram", "--channel",
                                      "1"], env=env, cwd=tmp_path, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for _ in range(3)]
            results = [await asyncio.to_thread(p.communicate, timeout=120) for p in runs]
            for process, (out, err) in zip(runs, results):
                assert process.returncode == 0, err
                assert "removed 0 messages" in out
            import asyncpg
            from sqlalchemy.engine import make_url

            conn = await asyncpg.connect(make_url(db_url).set(drivername="postgresql")
                                         .render_as_string(hide_password=False))
            try:
                versions = [r[0] for r in await conn.fetch(
                    "SELECT version_num FROM alembic_version")]
                tables = {r[0] for r in await conn.fetch(
                    "SELECT tablename FROM pg_tables WHERE schemaname = 'public'")}
            finally:
                await conn.close()
            assert versions == [HEAD]
            assert {"turns", "channel_settings", "alembic_version"} <= tables

    asyncio.run(go())


async def test_discord_instances_each_run_their_subset_of_shards(make_config, monkeypatch):
    """Two instances, shard ids 0 and 1 of 2: each identifies only its own shard, and a
    message in the free-talk channel is answered once, by the instance owning its guild."""
    from adapters.discord import DiscordAdapter
    from bot.app import build_app
    from tests.fake_discord import FakeDiscord, point_discord_py_at
    from tests.test_discord_adapter import FAST, TOKEN as DISCORD_TOKEN

    fake = await FakeDiscord(DISCORD_TOKEN).start()
    point_discord_py_at(fake, monkeypatch)
    apps = []
    try:
        for shard in (0, 1):
            config = make_config(discord_token=DISCORD_TOKEN, discord_channels=[fake.free],
                                 discord_shard_ids=str(shard), discord_shard_count=2)
            adapter = DiscordAdapter(config, client_options=FAST, ready_timeout=10)
            app = build_app(config, adapters=[adapter])
            await app.start()
            apps.append(app)
            assert [tuple(i["shard"]) for i in fake.identifies][-1] == (shard, 2)
            assert adapter.connected
        assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)]
        await fake.send_message(fake.alice, fake.free, "hello shards")
        await fake.wait_posts(1, channel_id=fake.free)
        await asyncio.sleep(0.5)
        assert len([p for p in fake.posts if p.channel_id == fake.free]) == 1
    finally:
        for app in apps:
            await app.stop()
        await fake.stop()
    assert not any(app.adapters[0].connected for app in apps)


def test_scale_settings_are_checked_with_one_line_each(make_config):
    from bot.config import load_config
    from bot.errors import ConfigError

    with pytest.raises(ConfigError, match="DIALOGBOT_GENERATOR_URL: required"):
        load_config(generator_backend="openai")
    with pytest.raises(ConfigError, match="DIALOGBOT_DISCORD_SHARD_COUNT"):
        load_config(discord_shard_ids="0,1")
    with pytest.raises(ConfigError, match="below it"):
        load_config(discord_shard_ids="0,4", discord_shard_count=4)
    config = make_config(redis_url="redis://:redis-pass-123@cache:6379/0",
                         generator_backend="openai", generator_url="http://u:gen-pass-456@vllm/v1",
                         generator_api_key="sk-key-7890123", discord_shard_ids="2,3",
                         discord_shard_count=4, log_format="JSON")
    assert config.discord_shard_ids == [2, 3] and config.log_format == "json"
    assert {"redis-pass-123", "gen-pass-456", "sk-key-7890123"} <= set(config.secrets())
