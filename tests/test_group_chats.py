"""Issue 14: group conversations. Context scopes (chain, user, channel), reply chains, quotes,
talk=all, thread inheritance and /reset per scope, through the real adapters against the fake
Telegram and Discord servers and the console, with a recording generator (the real batching
generator on the tiny model behind it) that keeps each prompt's turns."""

from __future__ import annotations

import asyncio
import io
import time
from contextlib import asynccontextmanager
from dataclasses import replace

import pytest

from adapters.console import ConsoleAdapter
from adapters.discord import DiscordAdapter
from adapters.telegram import TelegramAdapter
from bot.app import build_app, make_generator
from bot.events import ReplyKind, Role, TurnState
from tests import fake_telegram as ft
from tests.fake_discord import FakeDiscord, point_discord_py_at
from tests.fake_telegram import FakeTelegram
from tests.recording import CountingGenerator, RecordingAdapter, message
from tests.test_exactly_once import ModelTap

pytestmark = pytest.mark.timeout(120)
TG_TOKEN = "555000:GROUP-CHATS-TOKEN-abcdef"
DC_TOKEN = "FAKE.discord.GROUPS-abcdefghijklmnop"
GROUP = -100200300
ALICE, BOB, ADMIN = 501, 502, 503
MENTION = f"@{ft.BOT_USERNAME}"


def user_texts(turns) -> list[str]:
    return [t.text for t in turns if t.role is Role.USER]


def prompts_of(gen: CountingGenerator, author: str) -> list[list[str]]:
    """The turn texts of every prompt whose newest turn is `author`'s."""
    return [[t.text for t in r.turns] for r in gen.requests if r.turns[-1].author_id == author]


# --- Telegram -------------------------------------------------------------------------------
@pytest.fixture
async def tg_fake():
    server = await FakeTelegram(TG_TOKEN).start()
    yield server
    await server.stop()


@pytest.fixture
def tg(make_config, tg_fake):
    """tg(**settings) -> async context (app, adapter, recording generator)."""

    @asynccontextmanager
    async def running(**overrides):
        values = dict(telegram_token=TG_TOKEN, telegram_base_url=tg_fake.base_url,
                      user_rate=10**6, channel_rate=10**6)
        values.update(overrides)
        config = make_config(**values)
        adapter = TelegramAdapter(config)
        gen = CountingGenerator(make_generator(config))
        app = build_app(config, adapters=[adapter], generator=gen)
        await app.start()
        try:
            yield app, adapter, gen
        finally:
            await app.stop(drain_timeout=10)

    return running


async def say(fake: FakeTelegram, text: str, user: int, *, reply_to: dict | None = None,
              expect_reply: bool = True) -> dict:
    """A group message from `user`; waits for the bot's reply (returned) unless told not to."""
    before = len(fake.sent_to(GROUP))
    update = await fake.push(ft.group_update(text, GROUP, user, reply_to=reply_to))
    if not expect_reply:
        await fake.wait_confirmed()
        await asyncio.sleep(0.3)
        return update["message"]
    sent = await fake.wait_sent(GROUP, before + 1, timeout=30)
    return sent[-1]


@pytest.mark.parametrize("scope", ["chain", "user", "channel"])
async def test_telegram_two_users_interleaving_keep_their_contexts_apart(tg, tg_fake, scope):
    async with tg(context=scope) as (app, adapter, gen):
        for i in range(2):
            await say(tg_fake, f"{MENTION} alice talks {i}", ALICE)
            await say(tg_fake, f"{MENTION} bob talks {i}", BOB)
    alice, bob = prompts_of(gen, str(ALICE)), prompts_of(gen, str(BOB))
    assert len(alice) == len(bob) == 2
    assert alice[1][-1] == "alice talks 1" and bob[1][-1] == "bob talks 1"
    if scope == "channel":  # everyone shares one history: both users in the last prompt
        assert "alice talks 1" in bob[1] and "bob talks 0" in alice[1]
    else:
        assert not any("bob" in t for p in alice for t in p)
        assert not any("alice" in t for p in bob for t in p)
        assert user_texts(gen.requests[-1].turns) == ["bob talks 0", "bob talks 1"]


async def test_telegram_a_reply_to_an_old_bot_message_continues_that_branch(tg, tg_fake):
    async with tg() as (app, adapter, gen):  # chain is the default
        first = await say(tg_fake, f"{MENTION} where shall we start", ALICE)
        await say(tg_fake, "and then?", ALICE, reply_to=await_last(tg_fake))
        await say(tg_fake, "and after that?", ALICE, reply_to=await_last(tg_fake))
        assert user_texts(gen.requests[-1].turns) == [
            "where shall we start", "and then?", "and after that?"]
        await say(tg_fake, "back to your first answer", ALICE, reply_to=first)
        branch = gen.requests[-1].turns
        assert [t.text for t in branch][0] == "where shall we start"
        assert user_texts(branch) == ["where shall we start", "back to your first answer"]
        assert [t.role for t in branch] == [Role.USER, Role.BOT, Role.USER]
        # a message replying to nothing goes on with her latest exchange: the new branch
        await say(tg_fake, f"{MENTION} go on", ALICE)
        assert user_texts(gen.requests[-1].turns) == [
            "where shall we start", "back to your first answer", "go on"]


def await_last(fake: FakeTelegram) -> dict:
    return fake.sent_to(GROUP)[-1]


async def test_telegram_a_quoted_message_is_context_and_not_stored_as_theirs(tg, tg_fake):
    async with tg() as (app, adapter, gen):
        bobs = await say(tg_fake, "pineapple belongs on pizza", BOB, expect_reply=False)
        await say(tg_fake, f"{MENTION} what do you think of this?", ALICE, reply_to=bobs)
        turns = gen.requests[-1].turns
        assert [t.text for t in turns] == ["pineapple belongs on pizza",
                                           "what do you think of this?"]
        stored = await app.store.recent("telegram", str(GROUP), 10)
        assert user_texts(stored) == ["what do you think of this?"]
        assert not [t for t in stored if t.author_id == str(BOB)]


async def test_telegram_chains_survive_a_restart(tg, tg_fake):
    async with tg() as (app, adapter, gen):
        answer = await say(tg_fake, f"{MENTION} remember the blue door", ALICE)
        await say(tg_fake, f"{MENTION} something else entirely", ALICE)
        await tg_fake.wait_confirmed()
    async with tg() as (app, adapter, gen):
        await say(tg_fake, "which door was it?", ALICE, reply_to=answer)
        turns = gen.requests[-1].turns
        assert [t.text for t in turns][0] == "remember the blue door"
        assert user_texts(turns) == ["remember the blue door", "which door was it?"]


async def test_telegram_a_reply_to_the_second_part_of_a_split_reply_continues_it(tg, tg_fake):
    long = dict(do_sample=True, temperature=5.0, top_k=0, top_p=1.0, max_new_tokens=24)
    async with tg(**long) as (app, adapter, gen):
        adapter.max_message_length = 40  # the reply goes out in several parts
        await say(tg_fake, f"{MENTION} tell me a long story", ALICE)
        deadline = time.monotonic() + 30  # parts go out at one a second in a chat
        while (stored := await app.store.recent("telegram", str(GROUP), 10))[1].state \
                is not TurnState.DONE:
            assert time.monotonic() < deadline
            await asyncio.sleep(0.1)
        parts = tg_fake.sent_to(GROUP)
        assert len(parts) >= 3
        assert await app.store.sent_ids(stored[1].id) == [str(m["message_id"]) for m in parts]
        await say(tg_fake, "what happened next?", ALICE, reply_to=parts[1])
        turns = gen.requests[-1].turns
        assert [t.id for t in turns[:2]] == [stored[0].id, stored[1].id]
        assert user_texts(turns) == ["tell me a long story", "what happened next?"]


async def test_telegram_talk_all_is_an_admin_setting_that_survives_a_restart(tg, tg_fake):
    tg_fake.set_member(GROUP, ADMIN, "administrator")
    async with tg() as (app, adapter, gen):
        await say(tg_fake, "just chatting among ourselves", ALICE, expect_reply=False)
        assert gen.requests == [] and await app.store.count("telegram", str(GROUP)) == 0
        refused = await say(tg_fake, "/settings talk=all", ALICE)
        assert "Only admins" in refused["text"]
        done = await say(tg_fake, "/settings talk=all", ADMIN)
        assert "Settings updated" in done["text"] and "talk = all*" in done["text"]
        await say(tg_fake, "does anyone know the time", ALICE)
        assert gen.requests[-1].turns[-1].text == "does anyone know the time"
    async with tg() as (app, adapter, gen):
        await say(tg_fake, "still there after the restart", BOB)
        assert gen.requests[-1].turns[-1].text == "still there after the restart"
        shown = await say(tg_fake, "/settings", BOB)
        assert "talk = all*" in shown["text"] and "context = chain" in shown["text"]


async def test_telegram_help_says_how_to_let_the_bot_see_every_message(tg, tg_fake):
    async with tg() as (app, adapter, gen):
        text = (await say(tg_fake, "/help", ALICE))["text"]
    assert "privacy mode" in text and "reply chains" in text


# --- Discord --------------------------------------------------------------------------------
@pytest.fixture
async def dc_fake(monkeypatch: pytest.MonkeyPatch):
    server = await FakeDiscord(DC_TOKEN).start()
    point_discord_py_at(server, monkeypatch)
    yield server
    await server.stop()


@pytest.fixture
def dc(make_config, dc_fake):
    @asynccontextmanager
    async def running(**overrides):
        values = dict(discord_token=DC_TOKEN, discord_channels=[dc_fake.free],
                      user_rate=10**6, channel_rate=10**6)
        values.update(overrides)
        config = make_config(**values)
        adapter = DiscordAdapter(config, client_options={"guild_ready_timeout": 0.2},
                                 ready_timeout=10)
        gen = CountingGenerator(make_generator(config))
        app = build_app(config, adapters=[adapter], generator=gen)
        await app.start()
        try:
            yield app, adapter, gen
        finally:
            await app.stop(drain_timeout=10)

    return running


async def post(fake: FakeDiscord, person, text: str, channel: int | None = None, *,
               mention: bool = True, reply_to: dict | None = None, expect_reply: bool = True):
    """`person` writes in a channel (general by default); returns the bot's answer Post."""
    channel = channel or fake.general
    before = len([p for p in fake.posts if p.channel_id == channel])
    content = f"<@{fake.bot.id}> {text}" if mention else text
    sent = await fake.send_message(person, channel, content,
                                   mentions=[fake.bot] if mention else [], reply_to=reply_to)
    if not expect_reply:
        await asyncio.sleep(0.6)
        return sent
    posts = await fake.wait_posts(before + 1, channel_id=channel, timeout=30)
    return posts[-1]


@pytest.mark.parametrize("scope", ["chain", "user", "channel"])
async def test_discord_two_users_interleaving_keep_their_contexts_apart(dc, dc_fake, scope):
    async with dc(context=scope) as (app, adapter, gen):
        for i in range(2):
            await post(dc_fake, dc_fake.alice, f"alice talks {i}")
            await post(dc_fake, dc_fake.admin, f"admin talks {i}")
    alice, other = prompts_of(gen, str(dc_fake.alice.id)), prompts_of(gen, str(dc_fake.admin.id))
    assert len(alice) == len(other) == 2
    if scope == "channel":
        assert "alice talks 1" in other[1] and "admin talks 0" in alice[1]
    else:
        assert not any("admin" in t for p in alice for t in p)
        assert not any("alice" in t for p in other for t in p)


async def test_discord_reply_to_an_old_bot_message_and_a_quote(dc, dc_fake):
    async with dc() as (app, adapter, gen):
        first = await post(dc_fake, dc_fake.alice, "where shall we start")
        await post(dc_fake, dc_fake.alice, "and then?")
        await post(dc_fake, dc_fake.alice, "back to the start", mention=False,
                   reply_to=first.message)
        assert user_texts(gen.requests[-1].turns) == ["where shall we start",
                                                      "back to the start"]
        # the admin's unaddressed line in general is not stored; replying to it quotes it
        theirs = await post(dc_fake, dc_fake.admin, "tabs are better than spaces",
                            mention=False, expect_reply=False)
        await post(dc_fake, dc_fake.alice, "is that right?", reply_to=theirs)
        assert [t.text for t in gen.requests[-1].turns] == ["tabs are better than spaces",
                                                            "is that right?"]
        stored = await app.store.recent("discord", str(dc_fake.general), 20)
        assert not [t for t in stored if t.author_id == str(dc_fake.admin.id)]


async def test_discord_a_reply_whose_payload_lacks_the_quoted_message_fetches_it(dc, dc_fake):
    async with dc() as (app, adapter, gen):
        unseen = dc_fake.posted_while_offline(dc_fake.admin, dc_fake.general,
                                              "the meeting moved to friday")
        before = len(dc_fake.posts)
        await dc_fake.send_message(dc_fake.alice, dc_fake.general,
                                   f"<@{dc_fake.bot.id}> is that true?", mentions=[dc_fake.bot],
                                   reply_to=unseen, reference_only=True)
        await dc_fake.wait_posts(before + 1, channel_id=dc_fake.general, timeout=30)
        assert dc_fake.fetched == [int(unseen["id"])]
        assert [t.text for t in gen.requests[-1].turns] == ["the meeting moved to friday",
                                                            "is that true?"]
        stored = await app.store.recent("discord", str(dc_fake.general), 20)
        assert not [t for t in stored if t.author_id == str(dc_fake.admin.id)]


async def test_discord_talk_all_and_a_thread_inheriting_it(dc, dc_fake):
    async with dc() as (app, adapter, gen):
        await post(dc_fake, dc_fake.alice, "nobody asked you", mention=False,
                   channel=dc_fake.thread, expect_reply=False)
        assert gen.requests == []
        refused = await post(dc_fake, dc_fake.alice, "settings talk=all")
        assert "Only admins" in refused.content
        done = await post(dc_fake, dc_fake.admin, "settings talk=all")
        assert "talk = all*" in done.content
        # the thread (in general) inherits it
        await post(dc_fake, dc_fake.alice, "now you answer here", mention=False,
                   channel=dc_fake.thread)
        assert gen.requests[-1].turns[-1].text == "now you answer here"
        shown = await post(dc_fake, dc_fake.alice, "settings", channel=dc_fake.thread)
        assert "talk = all^" in shown.content
        # until the thread says otherwise
        await post(dc_fake, dc_fake.admin, "settings talk=mentions", channel=dc_fake.thread)
        count = len(gen.requests)
        await post(dc_fake, dc_fake.alice, "quiet in the thread", mention=False,
                   channel=dc_fake.thread, expect_reply=False)
        assert len(gen.requests) == count
        # the free-talk channel of DIALOGBOT_DISCORD_CHANNELS answers everything from the start
        await post(dc_fake, dc_fake.alice, "free talk here", mention=False,
                   channel=dc_fake.free)
        assert gen.requests[-1].turns[-1].text == "free talk here"


# --- the console -------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["user", "channel"])
async def test_console_group_keeps_users_apart_in_user_scope(make_config, scope):
    config = make_config(context=scope)
    lines = "alice: hello from alice\nbob: hello from bob\nalice: alice again\nbob: bob again\n"
    out = io.StringIO()
    console = ConsoleAdapter(config, stdin=io.StringIO(lines), stdout=out, interactive=False,
                             channel="room", group=True)
    gen = CountingGenerator(make_generator(config))
    app = build_app(config, [console], generator=gen)
    await app.start()
    try:
        await asyncio.wait_for(console.done.wait(), 60)
    finally:
        await app.stop()
    assert len(out.getvalue().splitlines()) == 4  # one line out per line in
    alice, bob = prompts_of(gen, "alice"), prompts_of(gen, "bob")
    if scope == "user":
        assert user_texts(gen.requests[2].turns) == ["hello from alice", "alice again"]
        assert not any("bob" in t for p in alice for t in p)
        assert not any("alice" in t for p in bob for t in p)
    else:
        assert user_texts(gen.requests[3].turns) == ["hello from alice", "hello from bob",
                                                     "alice again", "bob again"]


# --- batching and caches per conversation --------------------------------------------------------
def split_into_suffixes(call: list[int], prompts: list[list[int]],
                        taken: tuple[int, ...] = ()) -> list[tuple[int, int]]:
    """How one prefill's tokens divide into the ends of `prompts` (each at most once), as
    (prompt index, tokens) in order; [] when they do not."""
    for index, prompt in enumerate(prompts):
        if index in taken:
            continue
        for k in range(len(call), 0, -1):
            if prompt[-k:] == call[:k]:
                rest = call[k:]
                more = split_into_suffixes(rest, prompts, (*taken, index)) if rest else []
                if not rest or more:
                    return [(index, k), *more]
    return []


async def test_two_conversations_in_one_channel_share_a_batch_and_keep_their_own_cache(
        make_config):
    config = make_config(user_rate=10**6, channel_rate=10**6, max_new_tokens=8)
    platform = RecordingAdapter()
    gen = CountingGenerator(make_generator(config))
    tap = ModelTap(0.03)
    backend = gen.inner.backend
    load = backend.load
    backend.load = lambda: (load(), tap.attach(backend.model))
    app = build_app(config, [platform], generator=gen)
    await app.start()
    try:
        group = dict(channel="-7", direct=False, to_me=True)
        for rnd in range(2):
            started = len(tap.calls)
            await asyncio.gather(
                app.pipeline.process(message(f"alice round {rnd}", author="1", **group)),
                app.pipeline.process(message(f"bob round {rnd}", author="2", **group)))
            (a0, a1), (b0, b1) = gen.spans[-2:]
            assert a0 < b1 and b0 < a1  # generated at the same time ...
            assert gen.inner.worker.stats.max_batch >= 2  # ... in one batch
        # each second turn ran only its new tokens: its prefix came from its own cache
        keys = {r.channel_key for r in gen.requests}
        assert keys == {"telegram:-7#u:1", "telegram:-7#u:2"}
        # run one by one or packed into one forward (when both arrived within the batch wait)
        prefills = [c for c in tap.calls[started:] if len(c) > 1]
        prompts = [[i for t in request.turns for i in
                    ((list(t.token_ids) if t.role is Role.BOT else backend.encode(t.text))
                     + [50256])] for request in gen.requests[-2:]]
        parts = [part for call in prefills for part in split_into_suffixes(call, prompts)]
        assert sorted(index for index, _ in parts) == [0, 1], (prefills, prompts)
        for index, length in parts:
            assert length < len(prompts[index]) // 2
        assert gen.inner.worker.stats.reused_tokens > 0
    finally:
        await app.stop()


# --- /reset per scope ------------------------------------------------------------------------------
@pytest.fixture
async def recorded(make_config):
    apps = []

    async def make(**overrides):
        config = make_config(user_rate=10**6, channel_rate=10**6, **overrides)
        platform = RecordingAdapter()
        platform.admins.add("9")
        gen = CountingGenerator(make_generator(config))
        app = build_app(config, [platform], generator=gen)
        await app.start()
        apps.append(app)
        return app, platform, gen

    yield make
    for app in apps:
        await app.stop()


GROUP_MSG = dict(channel="-5", direct=False, to_me=True)


async def test_reset_in_user_scope_is_each_users_own_and_all_needs_an_admin(recorded):
    app, platform, gen = await recorded(context="user")
    await app.pipeline.process(message("alice one", author="1", **GROUP_MSG))
    await app.pipeline.process(message("bob one", author="2", **GROUP_MSG))
    await app.pipeline.process(message("/reset", author="1", **GROUP_MSG))
    assert "our conversation here (2 messages)" in platform.sent[-1].text
    left = await app.store.recent("telegram", "-5", 10)
    assert user_texts(left) == ["bob one"] and len(left) == 2
    await app.pipeline.process(message("/reset all", author="2", **GROUP_MSG))
    assert "Only admins" in platform.sent[-1].text and platform.sent[-1].private
    assert await app.store.count("telegram", "-5") == 2
    await app.pipeline.process(message("/reset all", author="9", **GROUP_MSG))
    assert await app.store.count("telegram", "-5") == 0


async def test_reset_in_chain_scope_clears_a_branch_by_reply_or_the_chat_for_admins(recorded):
    app, platform, gen = await recorded(context="chain")
    await app.pipeline.process(message("alice starts", author="1", **GROUP_MSG))
    alice_answer = platform.sent[-1]
    ids = await app.store.sent_ids((await app.store.recent("telegram", "-5", 5))[1].id)
    await app.pipeline.process(message("alice goes on", author="1", **GROUP_MSG))
    await app.pipeline.process(message("bob starts", author="2", **GROUP_MSG))
    # bob may not clear alice's branch; a plain /reset is the whole chat: admins only
    await app.pipeline.process(replace(message("/reset", author="2", **GROUP_MSG),
                                       reply_to=ids[0]))
    assert "Only the person" in platform.sent[-1].text
    await app.pipeline.process(message("/reset", author="2", **GROUP_MSG))
    assert "Only admins" in platform.sent[-1].text and "Reply /reset" in platform.sent[-1].text
    # alice clears her branch by replying /reset to the bot's answer in it
    await app.pipeline.process(replace(message("/reset", author="1", **GROUP_MSG),
                                       reply_to=ids[0]))
    assert "forgotten that conversation (2 messages)" in platform.sent[-1].text
    left = user_texts(await app.store.recent("telegram", "-5", 10))
    assert left == ["alice goes on", "bob starts"]
    await app.pipeline.process(message("what now?", author="1", **GROUP_MSG))
    assert user_texts(gen.requests[-1].turns) == ["alice goes on", "what now?"]
    await app.pipeline.process(message("/reset", author="9", **GROUP_MSG))
    assert await app.store.count("telegram", "-5") == 0
    assert alice_answer.kind is ReplyKind.ANSWER
