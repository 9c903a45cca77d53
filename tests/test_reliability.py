"""Reliability and abuse (issue 7): hostile text, floods, faults. The pipeline runs on the real
SQLite store; the generator is a fast double where the model is beside the point."""

from __future__ import annotations

import asyncio
import gc
import re
import sqlite3
import threading
import time

import psutil
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from adapters.discord import MAX_LENGTH as DISCORD_MAX
from adapters.telegram import split_for_telegram, utf16_len
from bot.app import build_app
from bot.events import Generated, Role, TurnState
from bot.generator import QueuedGenerator
from bot.pipeline import APOLOGY, BUSY, SLOW
from bot.text import clean_outgoing, split_message
from storage.store import SQLAlchemyStore
from tests.recording import RecordingAdapter, message

LIVE_MENTION = re.compile(r"@(?=\w)")
CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


class EchoGenerator:
    """Worst case for output safety: parrots the user's last message back."""

    def __init__(self):
        self.calls = 0

    async def start(self):
        pass

    async def stop(self):
        pass

    def forget_channel(self, key):
        pass

    queue_depth = 0

    async def reply(self, request):
        self.calls += 1
        text = [t.text for t in request.turns if t.role is Role.USER][-1]
        return Generated(text, (), 0)


class SlowBackend:
    """A backend double that takes `delay` seconds per reply (or hangs once until cancelled)."""

    eos_token_id = 50256
    n_positions = 1024

    def __init__(self, delay=0.002):
        self.delay = delay
        self.hang_next = False
        self.count = 0  # every reply differs, so the no-repeat rule never drops one

    def load(self):
        pass

    def encode(self, text):
        return [1] * min(len(text), 50)

    def decode(self, ids):
        return "ok " + " ".join(map(str, ids))

    def generate(self, prompt, settings, cancel):
        if self.hang_next:
            self.hang_next = False
            while not cancel.wait(0.01):
                pass
            return []
        time.sleep(self.delay)
        self.count += 1
        return [self.count, 2]


def platform_parts(platform: str, text: str) -> list[str]:
    """What the real adapters put on the wire for a reply's text."""
    if platform == "discord":
        return split_message(clean_outgoing(text), DISCORD_MAX)
    return split_for_telegram(clean_outgoing(text))


HOSTILE = st.one_of(
    st.text(st.characters(exclude_categories=()), max_size=300),  # incl. lone surrogates
    st.sampled_from(["@everyone", "@here hi", "<@&123456> <@!42> <#7>", "**bold** __u__ `x`",
                     "<b>html</b><script>alert(1)</script>", "\u202eevil\u202c", "a\u200bb\u200d",
                     "😀" * 700, "\x00\x07\x1b[31m red", "[link](http://x)", "/reset@other",
                     "/", "@" * 5000, " ".join(f"<@{i}>" for i in range(300)),
                     "\ud800\udc00\udfff", "ｆｕｌｌ", "x" * 5000 + "\n" * 50]),
    st.lists(st.sampled_from(["@everyone", "hi", "\n", "😀", "<@1>", "ä", "\u0301"]),
             max_size=60).map("".join),
)


@pytest.fixture
async def echo_bot(make_config):
    config = make_config(user_rate=10**6, channel_rate=10**6, send_retries=0)
    platforms = [RecordingAdapter(name="telegram",
                                  splitter=lambda t: platform_parts("telegram", t)),
                 RecordingAdapter(name="discord", max_message_length=2000,
                                  splitter=lambda t: platform_parts("discord", t))]
    generator = EchoGenerator()
    app = build_app(config, platforms, generator=generator)
    await app.start()
    yield app, platforms, generator
    await app.stop()


async def test_hostile_texts_never_crash_and_go_out_inert(echo_bot):
    app, platforms, generator = echo_bot
    loop = asyncio.get_running_loop()
    count = 0

    @settings(max_examples=800, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(text=HOSTILE, direct=st.booleans(), which=st.sampled_from([0, 1]))
    def feed(text, direct, which):
        nonlocal count
        count += 1
        platform = platforms[which].name
        event = message(text, platform=platform, channel=f"c{which}{direct}", direct=direct,
                        to_me=True)
        asyncio.run_coroutine_threadsafe(app.pipeline.process(event), loop).result(30)

    await asyncio.to_thread(feed)
    assert count >= 600
    sent = platforms[0].sent + platforms[1].sent
    assert sent and APOLOGY not in [r.text for r in sent]
    for reply in sent:  # every part as it went out
        for part in [reply.text]:
            assert part.strip()
            part.encode("utf-8")  # valid Unicode: no lone surrogates
            assert not CONTROL.search(part)
            assert not LIVE_MENTION.search(part)
            if reply.platform == "telegram":
                assert utf16_len(part) <= 4096
            else:
                assert len(part) <= 2000


async def test_a_100_kb_message_is_stored_whole_and_answered(echo_bot):
    app, platforms, _ = echo_bot
    text = ("Lorem ipsum dolor sit amet. " * 4000)[:100_000]
    await app.pipeline.process(message(text))
    turns = await app.store.recent("telegram", "100", 5)
    assert turns[0].text == text.strip() and turns[1].role is Role.BOT
    parts = [r.text for r in platforms[0].sent]
    assert len(parts) > 20 and all(utf16_len(p) <= 4096 for p in parts)
    assert parts == platform_parts("telegram", turns[1].text)  # each part once, in order


async def test_flood_keeps_the_queue_bounded_and_answers_or_refuses_every_message(make_config):
    config = make_config(user_rate=10**6, channel_rate=10**6, queue_size=16)
    platform = RecordingAdapter()
    backend = SlowBackend(delay=0.002)
    generator = QueuedGenerator(backend, queue_size=config.queue_size)
    app = build_app(config, [platform], generator=generator)
    await app.start()
    process = psutil.Process()
    gc.collect()
    rss_before = process.memory_info().rss
    depth, stop = [0], asyncio.Event()

    async def watch():
        while not stop.is_set():
            depth[0] = max(depth[0], generator.queue_depth)
            await asyncio.sleep(0.001)

    watcher = asyncio.create_task(watch())
    try:
        tasks = [app.pipeline.submit(message(f"flood {i}", channel=f"ch{c}", author=f"u{c}"))
                 for i in range(5) for c in range(200)]
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
    finally:
        stop.set()
        await watcher
    rss_growth = process.memory_info().rss - rss_before
    try:
        assert depth[0] <= 16
        users = [t for c in range(200) for t in await app.store.recent("telegram", f"ch{c}", 50)
                 if t.role is Role.USER]
        assert len(users) == 1000
        assert all(t.state in (TurnState.ANSWERED, TurnState.SKIPPED) for t in users)
        by_channel = {}
        for reply in platform.sent:
            by_channel.setdefault(reply.channel, []).append(reply.text)
        for c in range(200):
            texts = by_channel.get(f"ch{c}", [])
            skipped = [t for t in users if t.channel == f"ch{c}" and t.state is TurnState.SKIPPED]
            assert texts, f"ch{c} got nothing"
            if skipped:
                assert BUSY in texts
        assert rss_growth < 200 * 2**20, f"RSS grew {rss_growth / 2**20:.0f} MiB"
    finally:
        await app.stop()


async def test_hanging_generation_times_out_and_the_bot_recovers(make_config):
    config = make_config(generation_timeout=0.3)
    platform = RecordingAdapter()
    backend = SlowBackend()
    backend.hang_next = True
    app = build_app(config, [platform], generator=QueuedGenerator(backend, timeout=0.3))
    await app.start()
    try:
        await app.pipeline.process(message("hello?"))
        assert platform.texts() == [SLOW]
        await app.pipeline.process(message("hello again"))
        assert platform.texts()[-1].startswith("ok")
        states = [t.state for t in await app.store.recent("telegram", "100", 5)
                  if t.role is Role.USER]
        assert states == [TurnState.SKIPPED, TurnState.ANSWERED]
    finally:
        await app.stop()


def hold_write_lock(path, seconds, ready: threading.Event):
    db = sqlite3.connect(path, timeout=5)
    db.execute("BEGIN EXCLUSIVE")
    ready.set()
    time.sleep(seconds)
    db.rollback()
    db.close()


async def test_locked_database_is_waited_out_then_apologised_for_then_recovers(make_config,
                                                                               tmp_path):
    config = make_config()
    path = tmp_path / "data" / "bot.db"
    platform = RecordingAdapter()
    store = SQLAlchemyStore(config.database_url, retries=2, backoff=0.05, busy_timeout_ms=100)
    app = build_app(config, [platform], store=store, generator=QueuedGenerator(SlowBackend()))
    await app.start()
    try:
        # locked briefly: the store's retries ride it out and the user is answered
        ready = threading.Event()
        holder = threading.Thread(target=hold_write_lock, args=(path, 0.3, ready))
        holder.start()
        ready.wait()
        await app.pipeline.process(message("during a short lock"))
        holder.join()
        assert platform.texts()[-1].startswith("ok")

        # locked for longer than the retries: one apology, nothing crashes
        ready = threading.Event()
        holder = threading.Thread(target=hold_write_lock, args=(path, 2.0, ready))
        holder.start()
        ready.wait()
        await app.pipeline.process(message("during a long lock"))
        assert platform.texts()[-1] == APOLOGY
        holder.join()

        # fault cleared: answered again, and everything that was stored is there
        await app.pipeline.process(message("after the lock"))
        assert platform.texts()[-1].startswith("ok")
        users = [t.text for t in await app.store.recent("telegram", "100", 10)
                 if t.role is Role.USER]
        assert users[0] == "during a short lock" and users[-1] == "after the lock"
    finally:
        await app.stop()


class FlakyAdapter(RecordingAdapter):
    def __init__(self, failures: int, **kwargs):
        super().__init__(**kwargs)
        self.failures = failures
        self.attempts = 0

    async def send_part(self, reply, index, part):
        self.attempts += 1
        if self.failures:
            self.failures -= 1
            raise ConnectionResetError("network dropped")
        return await super().send_part(reply, index, part)


async def test_failed_sends_are_retried_and_delivered(make_config):
    config = make_config(send_retries=3)
    platform = FlakyAdapter(failures=2)
    app = build_app(config, [platform], generator=QueuedGenerator(SlowBackend()))
    app.pipeline.retry_base = 0.01
    await app.start()
    try:
        await app.pipeline.process(message("hi"))
        assert platform.attempts == 3 and len(platform.sent) == 1
    finally:
        await app.stop()


async def test_a_platform_that_keeps_failing_does_not_stop_other_channels(make_config):
    """A reply whose delivery fails after every retry is not lost: it stays in the outbox
    (state sending, never counted as delivered) and the next start delivers it once."""
    config = make_config(send_retries=1)
    broken = FlakyAdapter(failures=10**6, name="discord")
    working = RecordingAdapter(name="telegram")
    app = build_app(config, [broken, working], generator=QueuedGenerator(SlowBackend()))
    app.pipeline.retry_base = 0.01
    await app.start()
    try:
        await asyncio.gather(
            app.pipeline.process(message("to discord", platform="discord")),
            app.pipeline.process(message("to telegram", platform="telegram")))
        assert len(working.sent) == 1 and broken.sent == []
        turns = await app.store.recent("discord", "100", 10)
        assert [(t.role, t.state) for t in turns] == [(Role.USER, TurnState.ANSWERED),
                                                      (Role.BOT, TurnState.SENDING)]
    finally:
        await app.stop()

    healed = RecordingAdapter(name="discord")
    again = build_app(config, [healed, RecordingAdapter(name="telegram")],
                      generator=QueuedGenerator(SlowBackend()))
    await again.start()
    try:
        for _ in range(100):
            if healed.sent:
                break
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.1)
        assert [r.text for r in healed.sent] == [turns[1].text]
        assert healed.sent[0].reply_to == turns[0].message_id
        states = [t.state for t in await again.store.recent("discord", "100", 10)]
        assert states == [TurnState.ANSWERED, TurnState.DONE]
    finally:
        await again.stop()
