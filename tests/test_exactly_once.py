"""Issue 13: order, exactly once, at least once, commands in order, outbound pacing.

Every test runs the real store (SQLite here; PostgreSQL where TEST_DATABASE_URL is set) and the
batching generator on the tiny random-weight model, slowed down by a controllable delay on the
model's forward pass, and asserts on what the model actually received (its forward inputs).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import timedelta

import pytest

from bot.app import build_app, make_generator
from bot.events import Incoming, ReplyKind, Role, Turn, TurnState, utcnow
from bot.quality import earlier_lines
from storage.store import SQLAlchemyStore
from tests.recording import CountingGenerator, RecordingAdapter, message
from tests.test_store import PG_URL, empty_postgres

pytestmark = pytest.mark.timeout(120)
EOS = 50256


@dataclass
class ModelTap:
    """A forward pre-hook on the loaded model: records every call's input ids and sleeps
    `delay` seconds first (so generations overlap what the test does meanwhile)."""

    delay: float = 0.0
    calls: list[list[int]] = field(default_factory=list)  # the first row's input ids per call

    def attach(self, model) -> None:  # noqa: ANN001
        def hook(module, args, kwargs):  # noqa: ANN001, ARG001
            ids = kwargs.get("input_ids")
            if ids is None and args:
                ids = args[0]
            if ids is not None:
                self.calls.append(ids[0].tolist())
            if self.delay:
                time.sleep(self.delay)

        model.register_forward_pre_hook(hook, with_kwargs=True)

    @property
    def prefills(self) -> list[list[int]]:
        """Inputs of the calls that ran more than one token (prompts, not decode steps)."""
        return [c for c in self.calls if len(c) > 1]

    async def wait(self, count: int, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while len(self.calls) < count:
            assert time.monotonic() < deadline, f"model called {len(self.calls)} times"
            await asyncio.sleep(0.005)


def split_at_eos(ids: list[int]) -> list[list[int]]:
    """The turns in one model input: segments ending with end-of-text (the token dropped)."""
    segments, current = [], []
    for token in ids:
        if token == EOS:
            segments.append(current)
            current = []
        else:
            current.append(token)
    return segments


@pytest.fixture(params=["sqlite", "postgresql"])
def database(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite+aiosqlite:///{tmp_path / 'data' / 'bot.db'}"
    if not PG_URL:
        pytest.skip("PostgreSQL variant: set TEST_DATABASE_URL to run it")
    return PG_URL


@pytest.fixture
async def slow_bot(make_config, database):
    """slow_bot(**settings) -> (app, platform, counting generator, tap); the same database
    for every app of the test (a restart is a new app on it)."""
    if database == PG_URL:
        await empty_postgres(PG_URL)
    apps = []

    async def make(platform: RecordingAdapter | None = None, owner: str | None = None,
                   delay: float = 0.0, **overrides):
        values = dict(database_url=database, batching=True, max_new_tokens=8,
                      user_rate=10**6, channel_rate=10**6, claim_lease=5)
        values.update(overrides)
        config = make_config(**values)
        platform = platform or RecordingAdapter()
        generator = CountingGenerator(make_generator(config))
        tap = ModelTap(delay)
        backend = generator.inner.backend
        load = backend.load

        def load_and_tap() -> None:  # in the worker, before anything is generated
            load()
            tap.attach(backend.model)

        backend.load = load_and_tap
        app = build_app(config, [platform], generator=generator)
        if owner is not None:  # several "instances" in one process: one host each
            app.pipeline.owner = owner
        await app.start()
        apps.append(app)
        return app, platform, generator, tap

    yield make
    for app in apps:
        await app.stop(drain_timeout=5)


def encode(generator, text: str) -> list[int]:
    return generator.inner.backend.encode(text)


def answers(platform: RecordingAdapter) -> list:
    return [r for r in platform.sent if r.kind is ReplyKind.ANSWER]


async def settle(app, timeout: float = 30.0) -> None:
    """Wait until no task of the pipeline runs."""
    deadline = time.monotonic() + timeout
    while app.pipeline.in_flight:
        assert time.monotonic() < deadline, "pipeline still busy"
        await asyncio.sleep(0.01)


# --- order ------------------------------------------------------------------------------------
@pytest.mark.parametrize("candidates", [1, 3])
async def test_a_message_sent_while_a_reply_generates_comes_after_that_reply(slow_bot,
                                                                             candidates):
    quality = dict(do_sample=True, candidates=candidates, repeat_window=4) if candidates > 1 \
        else {}
    app, platform, gen, tap = await slow_bot(kv_cache_mb=0, **quality)
    tap.delay = 0.05
    first = app.pipeline.submit(message("What is your name?"))
    await tap.wait(1)  # A's prompt is in the model: its reply is being generated
    second = app.pipeline.submit(message("Where do you live?"))
    await asyncio.gather(first, second)

    turns = await app.store.recent("telegram", "100", 10)
    assert [(t.role, t.text) for t in turns][:3] == [
        (Role.USER, "What is your name?"), (Role.BOT, turns[1].text),
        (Role.USER, "Where do you live?")]
    assert turns[3].role is Role.BOT and len(turns) == 4
    reply_a = turns[1]
    # what the model received for B: [A, reply to A, B], each followed by end-of-text
    expected = (encode(gen, "What is your name?") + [EOS] + list(reply_a.token_ids) + [EOS]
                + encode(gen, "Where do you live?") + [EOS])
    assert tap.prefills[-1] == expected
    # the repeat filter sees B's own text and the bot's reply (it stops at the last bot turn)
    assert [t.text for t in gen.requests[-1].turns] == [t.text for t in turns[:3]]
    assert earlier_lines(gen.requests[-1].turns, 4) == ("Where do you live?", reply_a.text)
    assert [r.reply_to for r in answers(platform)] == [
        turns[0].message_id, turns[2].message_id]


# --- exactly once -----------------------------------------------------------------------------
async def test_a_backlog_after_a_restart_is_answered_once_even_when_redelivered(
        slow_bot, database):
    store = SQLAlchemyStore(database)
    await store.start()
    backlog = []
    for chat in ("1", "2", "3"):  # written while the bot was down
        backlog.append(await store.append(Turn(
            "telegram", chat, Role.USER, f"anyone there? ({chat})", "7", "user7",
            message_id=f"m{chat}", state=TurnState.PENDING,
            created_at=utcnow() - timedelta(seconds=20), conversation="u:7")))
    await store.stop()

    app, platform, gen, tap = await slow_bot(delay=0.03)  # recovery is generating ...
    # ... while the platform delivers the same messages again (Telegram does after a crash)
    again = [app.pipeline.submit(Incoming("telegram", t.channel, t.message_id, "7", "user7",
                                          t.text, is_direct=True, is_to_me=True))
             for t in backlog]
    await asyncio.gather(*again)
    await settle(app)
    replies = answers(platform)
    assert sorted(r.channel for r in replies) == ["1", "2", "3"]
    assert sorted(r.reply_to for r in replies) == ["m1", "m2", "m3"]
    # three generations, no more: each prompt reached the model once (prompts admitted together
    # are prefilled in one packed call, so count the prompts, not the calls)
    assert len(gen.requests) == 3
    prompts = [segment for call in tap.prefills for segment in split_at_eos(call)]
    assert sorted(prompts) == sorted(encode(gen, t.text) for t in backlog)
    for chat in ("1", "2", "3"):
        turns = await app.store.recent("telegram", chat, 10)
        assert [(t.role, t.state) for t in turns] == [(Role.USER, TurnState.ANSWERED),
                                                      (Role.BOT, TurnState.DONE)]


async def test_a_second_instance_never_answers_what_the_first_has_claimed(slow_bot, database):
    """Two processes' worth of pipelines on one database: while A generates, B starts (its
    recovery runs) and receives the same message again; only A answers."""
    app_a, platform_a, gen_a, tap_a = await slow_bot(owner="host-a:100:aaaa")
    tap_a.delay = 0.1
    task = app_a.pipeline.submit(message("hello from the chat", channel="55"))
    await tap_a.wait(1)
    app_b, platform_b, gen_b, tap_b = await slow_bot(RecordingAdapter(),
                                                     owner="host-b:100:bbbb")
    [turn] = await app_b.store.recent("telegram", "55", 5)
    await app_b.pipeline.process(Incoming("telegram", "55", turn.message_id, turn.author_id,
                                          turn.author_name, turn.text, True, True))
    await task
    assert len(answers(platform_a)) == 1 and answers(platform_b) == []
    assert tap_b.calls == []
    assert app_a.pipeline.owner != app_b.pipeline.owner


# --- at least once: shutdown -------------------------------------------------------------------
async def test_messages_arriving_during_the_drain_are_answered_then_or_at_the_next_start(
        slow_bot):
    app, platform, gen, tap = await slow_bot(max_new_tokens=10)
    tap.delay = 0.08  # one reply ~ 1 s
    first = app.pipeline.submit(message("first", channel="1"))
    await tap.wait(1)
    stopping = asyncio.create_task(app.stop(drain_timeout=1.5))
    await asyncio.sleep(0.05)
    late = [app.pipeline.submit(message(f"late {i}", channel=str(2 + i % 2))) for i in range(4)]
    await stopping
    await asyncio.gather(first, *late, return_exceptions=True)
    answered_now = {r.reply_to for r in answers(platform)}

    restarted = RecordingAdapter()
    app2, _, _, _ = await slow_bot(restarted)
    await settle(app2)
    deadline = time.monotonic() + 20
    while (await app2.store.pending()) and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert await app2.store.pending() == []
    answered_later = {r.reply_to for r in answers(restarted)}
    assert not answered_now & answered_later  # nothing answered twice
    for chat in ("1", "2", "3"):
        turns = await app2.store.recent("telegram", chat, 20)
        users = [t for t in turns if t.role is Role.USER]
        assert users and all(t.state is TurnState.ANSWERED for t in users)
        bots = [t for t in turns if t.role is Role.BOT]
        assert all(t.state is TurnState.DONE for t in bots)
        # one reply per batch of messages it answers, each sent once
        assert len({t.in_reply_to for t in bots}) == len(bots)
    sent_texts = [r.text for r in answers(platform) + answers(restarted)]
    stored = [t.text for chat in ("1", "2", "3")
              for t in await app2.store.recent("telegram", chat, 20) if t.role is Role.BOT]
    assert sorted(sent_texts) == sorted(stored)


# --- commands in order -------------------------------------------------------------------------
def cached_prefixes(gen) -> list[tuple[str, tuple[int, ...]]]:
    """(conversation key, token ids) of every KV cache entry the batching generator holds."""
    prefix = gen.inner.worker.prefix
    with prefix._lock:
        return [(key, tuple(entry.ids)) for key, entry in prefix._entries.items()]


def contains(haystack, needle) -> bool:
    n = len(needle)
    return any(list(haystack[i:i + n]) == list(needle) for i in range(len(haystack) - n + 1))


async def test_reset_during_a_slow_generation_drops_the_old_reply(slow_bot):
    app, platform, gen, tap = await slow_bot()
    await app.pipeline.process(message("hello there"))  # cached and answered
    tap.delay = 0.1
    secret = "my secret plan alpha"
    task = app.pipeline.submit(message(secret))
    calls = len(tap.calls)
    await tap.wait(calls + 1)
    await app.pipeline.process(message("/reset"))
    await task
    kinds = [r.kind for r in platform.sent]
    assert kinds == [ReplyKind.ANSWER, ReplyKind.COMMAND]  # no old reply, before or after
    assert "forgotten" in platform.sent[-1].text
    assert await app.store.count("telegram", "100") == 0
    secret_ids = encode(gen, secret)
    assert not any(contains(ids, secret_ids) for _, ids in cached_prefixes(gen))
    tap.delay = 0
    await app.pipeline.process(message("and now?"))
    assert [t.text for t in gen.requests[-1].turns] == ["and now?"]
    assert not contains(tap.prefills[-1], secret_ids)


async def test_forget_during_a_slow_generation_regenerates_without_the_forgotten_text(slow_bot):
    app, platform, gen, tap = await slow_bot(context="channel")  # Bob's prompt has Alice's
    group = dict(channel="-9", direct=False, to_me=True)
    alice_secret = "alice private words"
    await app.pipeline.process(message(alice_secret, author="1", **group))
    await app.pipeline.process(message("alice says hello too", author="1", channel="5"))
    tap.delay = 0.1
    bob = app.pipeline.submit(message("bob asks something", author="2", **group))
    calls = len(tap.calls)
    await tap.wait(calls + 1)  # Bob's prompt (with Alice's words) is in the model
    await app.pipeline.process(message("/forget", author="1", **group))
    await bob
    forgot = [r for r in platform.sent if r.kind is ReplyKind.COMMAND]
    assert "deleted 2 of your messages" in forgot[0].text
    # Bob is answered once, after the command, from a prompt without Alice's words
    after = platform.sent[platform.sent.index(forgot[0]) + 1:]
    assert [r.kind for r in after] == [ReplyKind.ANSWER]
    bob_replies = [r for r in answers(platform) if r.channel == "-9"]
    assert len(bob_replies) == 2  # Alice's earlier answer (sent before) and Bob's one
    turns = await app.store.recent("telegram", "-9", 10)
    assert [t.text for t in turns if t.role is Role.USER] == ["bob asks something"]
    assert [t.text for t in gen.requests[-1].turns] == ["bob asks something"]
    secret_ids = encode(gen, alice_secret)
    assert not contains(tap.prefills[-1], secret_ids)
    assert not any(contains(ids, secret_ids) for _, ids in cached_prefixes(gen))
    assert await app.store.count("telegram", "5") == 0  # her DM went too


async def test_two_admins_changing_settings_at_once_both_keep_their_change(slow_bot):
    app, platform, gen, tap = await slow_bot(admin_ids="telegram:1,telegram:2")
    group = dict(channel="-3", direct=False, to_me=True)
    await asyncio.gather(
        app.pipeline.process(message("/settings temperature=0.5", author="1", **group)),
        app.pipeline.process(message("/settings top_k=7", author="2", **group)))
    assert await app.store.get_settings("telegram", "-3") == {"temperature": 0.5, "top_k": 7}


# --- outbound pacing ---------------------------------------------------------------------------
async def test_parts_are_paced_to_the_platform_rate(slow_bot):
    platform = RecordingAdapter(outbound_rate=(2, 0.4), max_message_length=40)
    app, platform, gen, tap = await slow_bot(platform)
    await app.pipeline.process(message("/help"))  # a long command answer: several parts
    assert len(platform.sent) >= 6
    # a bucket of 2 that drains 2 per 0.4 s: after the first two, one part every 0.2 s
    took = platform.sent_at[-1] - platform.sent_at[0]
    assert took >= (len(platform.sent) - 2) * 0.2 * 0.9
    assert " ".join(r.text for r in platform.sent).startswith("I'm a DialoGPT chat bot")
