"""The pipeline end to end on the real SQLite store and the tiny model, with a recording
platform: who gets answered, commands and permissions, limits, errors, bursts."""

from __future__ import annotations

import asyncio

import pytest

from bot.app import build_app, make_generator
from bot.errors import GenerationError
from bot.events import ReplyKind, Role
from bot.pipeline import APOLOGY, BUSY, EMPTY, LIMITED, TEXT_ONLY
from tests.recording import CountingGenerator, RecordingAdapter, message


@pytest.fixture
async def bot(make_config):
    """(app, platform, generator) with defaults overridable through `bot_config` marker."""
    apps = []

    async def make(**overrides):
        config = make_config(**overrides)
        platform = RecordingAdapter()
        generator = CountingGenerator(make_generator(config))
        app = build_app(config, [platform], generator=generator)
        await app.start()
        apps.append(app)
        return app, platform, generator

    yield make
    for app in apps:
        await app.stop()


async def test_direct_message_is_answered_and_both_turns_are_stored(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("hello bot"))
    assert len(platform.sent) == 1 and platform.sent[0].kind is ReplyKind.ANSWER
    assert platform.sent[0].text.strip()
    assert platform.typing_entered == 1
    turns = await app.store.recent("telegram", "100", 10)
    assert [t.role for t in turns] == [Role.USER, Role.BOT]
    assert turns[0].text == "hello bot" and turns[1].text == platform.sent[0].text
    assert turns[1].token_ids  # generated ids kept for the next prompt


async def test_history_accumulates_and_is_sent_to_the_model(bot):
    app, platform, gen = await bot()
    for text in ("one", "two", "three"):
        await app.pipeline.process(message(text))
    last = gen.requests[-1]
    assert [t.text for t in last.turns if t.role is Role.USER] == ["one", "two", "three"]
    assert len(last.turns) == 5


async def test_unaddressed_group_message_is_ignored_and_not_stored(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("just chatting", direct=False, to_me=False))
    assert platform.sent == [] and gen.requests == []
    assert await app.store.count("telegram", "100") == 0


async def test_private_context_never_reaches_a_group(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("my secret plan", channel="7"))  # DM: chat id = user
    await app.pipeline.process(message("hi all", channel="-500", direct=False, to_me=True))
    group_turns = gen.requests[-1].turns
    assert [t.text for t in group_turns] == ["hi all"]


async def test_non_admin_reset_in_group_is_refused_and_changes_nothing(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("hello", channel="-500", direct=False, to_me=True))
    before = await app.store.count("telegram", "-500")
    await app.pipeline.process(message("/reset", channel="-500", direct=False, to_me=True))
    assert platform.sent[-1].kind is ReplyKind.COMMAND and platform.sent[-1].private
    assert "Only admins" in platform.sent[-1].text
    assert await app.store.count("telegram", "-500") == before == 2


async def test_platform_admin_reset_clears_only_that_channel(bot):
    app, platform, gen = await bot()
    platform.admins.add("9")
    await app.pipeline.process(message("hello", channel="-500", direct=False, to_me=True))
    await app.pipeline.process(message("hello", channel="-600", direct=False, to_me=True))
    await app.pipeline.process(message("/reset", channel="-500", author="9", direct=False,
                                       to_me=True))
    assert "forgotten" in platform.sent[-1].text
    assert await app.store.count("telegram", "-500") == 0
    assert await app.store.count("telegram", "-600") == 2


async def test_configured_admin_id_may_reset_without_platform_rights(bot):
    app, platform, gen = await bot(admin_ids="telegram:42,discord:1")
    await app.pipeline.process(message("hello", channel="-500", direct=False, to_me=True))
    await app.pipeline.process(message("/reset@dialogbot", channel="-500", author="42",
                                       direct=False, to_me=True))
    assert await app.store.count("telegram", "-500") == 0
    assert platform.admin_checks == 0


async def test_reset_in_a_direct_chat_is_the_users_own(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("hello"))
    await app.pipeline.process(message("/reset"))
    assert await app.store.count("telegram", "100") == 0


async def test_forget_removes_my_messages_and_replies_everywhere_only_mine(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("mine 1", channel="-1", direct=False, to_me=True))
    await app.pipeline.process(message("theirs", channel="-1", author="8", direct=False,
                                       to_me=True))
    await app.pipeline.process(message("mine 2", channel="7"))
    await app.pipeline.process(message("/forget", channel="7"))
    assert "deleted 2 of your messages" in platform.sent[-1].text
    left = await app.store.recent("telegram", "-1", 10)
    assert [t.text for t in left if t.role is Role.USER] == ["theirs"]
    assert len(left) == 2  # their message and the bot's reply to it
    assert await app.store.count("telegram", "7") == 0


async def test_settings_show_change_and_validate(bot):
    app, platform, gen = await bot()
    platform.admins.add("9")
    group = dict(channel="-5", direct=False, to_me=True)
    await app.pipeline.process(message("/settings", **group))
    assert "temperature = 0.8" in platform.sent[-1].text
    await app.pipeline.process(message("/settings temperature=0.5", **group))
    assert "Only admins" in platform.sent[-1].text
    await app.pipeline.process(message("/settings temperature=0.5 max_new_tokens=5", author="9",
                                       **group))
    assert "temperature = 0.5*" in platform.sent[-1].text
    await app.pipeline.process(message("/settings top_p=3", author="9", **group))
    assert "top_p" in platform.sent[-1].text and platform.sent[-1].private
    await app.pipeline.process(message("/settings colour=red", author="9", **group))
    assert "Can't set" in platform.sent[-1].text
    await app.pipeline.process(message("hello", **group))
    assert gen.requests[-1].settings.temperature == 0.5
    assert gen.requests[-1].settings.max_new_tokens == 5
    assert await app.store.get_settings("telegram", "-5") == {"temperature": 0.5,
                                                              "max_new_tokens": 5}


async def test_help_and_unknown_commands(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("/help"))
    assert "/reset" in platform.sent[-1].text
    await app.pipeline.process(message("/frobnicate now"))
    assert "Unknown command /frobnicate" in platform.sent[-1].text
    assert gen.requests == [] and await app.store.count() == 0


async def test_attachments_only_get_a_notice_in_direct_chats_and_nothing_in_groups(bot):
    app, platform, gen = await bot()
    await app.pipeline.process(message("", attachments=True))
    assert platform.texts() == [TEXT_ONLY]
    await app.pipeline.process(message("", channel="-1", direct=False, to_me=True,
                                       attachments=True))
    assert platform.texts() == [TEXT_ONLY]
    await app.pipeline.process(message("  \x00\u200b ".replace("\u200b", "")))
    assert platform.texts()[-1] == EMPTY
    assert gen.requests == []


async def test_burst_over_the_limit_gets_one_notice_and_no_more_generations(bot):
    app, platform, gen = await bot(user_rate=3, user_period=60)
    for i in range(8):
        await app.pipeline.process(message(f"spam {i}"))
    assert len(gen.requests) == 3
    assert platform.texts().count(LIMITED) == 1
    assert await app.store.count("telegram", "100") == 6  # 3 messages + 3 replies


async def test_channel_limit_applies_across_users(bot):
    app, platform, gen = await bot(channel_rate=2, channel_period=60)
    for author in ("1", "2", "3", "4"):
        await app.pipeline.process(message("hi", channel="-9", author=author, direct=False,
                                           to_me=True))
    assert len(gen.requests) == 2


async def test_generation_error_apologises_and_the_bot_keeps_running(bot):
    app, platform, gen = await bot()
    gen.fail_next.append(GenerationError("boom"))
    await app.pipeline.process(message("first"))
    assert platform.texts() == [APOLOGY]
    await app.pipeline.process(message("second"))
    assert platform.sent[-1].kind is ReplyKind.ANSWER
    turns = await app.store.recent("telegram", "100", 10)
    assert [t.text for t in turns if t.role is Role.USER] == ["first", "second"]


async def test_busy_generator_gets_the_busy_notice(bot):
    app, platform, gen = await bot(queue_size=1)
    gen.gate = asyncio.Event()
    tasks = [app.pipeline.submit(message(f"m{i}", channel=str(i))) for i in range(3)]
    await asyncio.sleep(0.3)
    gen.gate.set()
    await asyncio.gather(*tasks)
    texts = platform.texts()
    assert len(texts) == 3
    assert texts.count(BUSY) >= 1 and len([t for t in texts if t != BUSY]) >= 1


async def test_quick_messages_in_one_channel_are_answered_once(bot):
    app, platform, gen = await bot()
    gen.gate = asyncio.Event()
    first = app.pipeline.submit(message("are you there?"))
    await asyncio.sleep(0.2)  # first generation is pending
    more = [app.pipeline.submit(message(t)) for t in ("hello??", "anyone?")]
    await asyncio.sleep(0.2)
    gen.gate.set()
    await asyncio.gather(first, *more)
    assert len(gen.requests) == 2  # the pending one, then one for the two that came meanwhile
    assert [t.text for t in gen.requests[-1].turns if t.role is Role.USER][-2:] == [
        "hello??", "anyone?"]
    assert len(platform.sent) == 2
    turns = await app.store.recent("telegram", "100", 10)
    assert len([t for t in turns if t.role is Role.USER]) == 3
    assert all(t.state.value == "answered" for t in turns if t.role is Role.USER)


async def test_unanswered_messages_are_answered_after_a_restart_old_ones_skipped(make_config):
    from datetime import timedelta

    from bot.events import Turn, TurnState, utcnow
    from storage.store import SQLAlchemyStore

    config = make_config(recover_window=120)
    store = SQLAlchemyStore(config.database_url)
    await store.start()
    old = await store.append(Turn("telegram", "1", Role.USER, "from yesterday", "5",
                                  state=TurnState.PENDING,
                                  created_at=utcnow() - timedelta(days=1)))
    a = await store.append(Turn("telegram", "2", Role.USER, "are you", "6",
                                message_id="41", state=TurnState.PENDING))
    b = await store.append(Turn("telegram", "2", Role.USER, "there?", "6",
                                message_id="42", state=TurnState.PENDING))
    other = await store.append(Turn("discord", "3", Role.USER, "not attached", "7",
                                    state=TurnState.PENDING))
    await store.stop()

    platform = RecordingAdapter()
    app = build_app(config, [platform])
    await app.start()
    try:
        for _ in range(100):
            if platform.sent:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.1)
        assert len(platform.sent) == 1 and platform.sent[0].reply_to == "42"
        assert platform.sent[0].channel == "2"
        states = {t.id: t.state for t in await app.store.recent("telegram", "2", 10)}
        assert states[a.id] is TurnState.ANSWERED and states[b.id] is TurnState.ANSWERED
        assert [t.id for t in await app.store.pending()] == [other.id]
        old_turn = (await app.store.recent("telegram", "1", 10))[0]
        assert old_turn.id == old.id and old_turn.state is TurnState.SKIPPED
    finally:
        await app.stop()
