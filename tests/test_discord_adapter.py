"""The Discord adapter end to end: a real discord.py client (REST + websocket gateway) against
the loopback fake in tests/fake_discord.py, the real pipeline, SQLite store and tiny model."""

from __future__ import annotations

import asyncio
import time

import pytest

from adapters.discord import DiscordAdapter
from bot.app import build_app
from bot.errors import PlatformError, UndeliverableError
from bot.events import Incoming, Reply
from bot.text import split_message
from tests.recording import send_all
from tests.fake_discord import (EPHEMERAL, MANAGE_MESSAGES, FakeDiscord, Post,
                                point_discord_py_at)

TOKEN = "FAKE.discord.TOKEN-abcdefghijklmnop"
FAST = {"guild_ready_timeout": 0.2}


@pytest.fixture
async def fake(monkeypatch: pytest.MonkeyPatch):
    server = await FakeDiscord(TOKEN).start()
    point_discord_py_at(server, monkeypatch)
    yield server
    await server.stop()


@pytest.fixture
async def bot(fake: FakeDiscord, make_config):
    """bot(**config overrides) -> (app, adapter), started against the fake; stopped after."""
    apps = []

    async def start(**overrides):
        config = make_config(discord_token=TOKEN, discord_channels=[fake.free], **overrides)
        adapter = DiscordAdapter(config, client_options=FAST, ready_timeout=10)
        app = build_app(config, adapters=[adapter])
        await app.start()
        apps.append(app)
        return app, adapter

    yield start
    for app in apps:
        await app.stop()


def assert_inert_reply(post: Post, trigger: dict | None) -> None:
    """Pings nobody (no parse targets, no user/role lists, no replied-user ping) and replies
    to the triggering message."""
    mentions = post.payload["allowed_mentions"]
    assert mentions["parse"] == [], mentions
    assert not mentions.get("users") and not mentions.get("roles")
    assert not mentions.get("replied_user")
    if trigger is not None:
        ref = post.payload["message_reference"]
        assert ref["message_id"] == int(trigger["id"])
        assert ref["fail_if_not_exists"] is False


async def quiet_for(fake: FakeDiscord, seconds: float = 0.5) -> int:
    """Let in-flight work settle; return how many posts exist."""
    await asyncio.sleep(seconds)
    return len(fake.posts)


async def quiet_posts(fake: FakeDiscord, channel: int) -> list[Post]:
    await asyncio.sleep(0.3)
    return [p for p in fake.posts if p.channel_id == channel]


async def stored(app, channel: int) -> int:
    return await app.store.count("discord", str(channel))


# --- start-up -------------------------------------------------------------------------------
async def test_start_syncs_slash_commands_with_permissions(bot, fake):
    await bot()
    by_name = {c["name"]: c for c in fake.commands}
    assert set(by_name) == {"reset", "forget", "help", "settings"}
    for admin_only in ("reset", "settings"):
        assert int(by_name[admin_only]["default_member_permissions"]) == MANAGE_MESSAGES
    for anyone in ("help", "forget"):
        assert by_name[anyone].get("default_member_permissions") is None
    option = by_name["settings"]["options"][0]
    assert option["name"] == "values" and option["required"] is False
    assert fake.identifies[0]["intents"] & (1 << 15)  # message content was asked for


async def test_refused_message_content_intent_fails_start_with_advice(fake, make_config):
    fake.refuse_privileged_intents = True
    adapter = DiscordAdapter(make_config(discord_token=TOKEN), client_options=FAST,
                             ready_timeout=10)
    with pytest.raises(PlatformError) as info:
        await adapter.start(object())
    message = str(info.value)
    assert "Message Content" in message and "developer portal" in message
    assert "\n" not in message and TOKEN not in message
    await adapter.stop()


async def test_rejected_token_fails_start_with_one_line(fake, make_config):
    adapter = DiscordAdapter(make_config(discord_token="WRONG.token-value-xyz"),
                             client_options=FAST, ready_timeout=10)
    with pytest.raises(PlatformError, match="DIALOGBOT_DISCORD_TOKEN was rejected"):
        await adapter.start(object())
    assert fake.identifies == []
    await adapter.stop()
    await adapter.stop()  # idempotent


# --- who gets answered ----------------------------------------------------------------------
async def test_dm_gets_a_reply(bot, fake):
    app, _ = await bot()
    dm = await fake.send_dm(fake.alice, "hello bot")
    [post] = await fake.wait_posts(1, channel_id=fake.dm_channel(fake.alice))
    assert post.content.strip()
    assert_inert_reply(post, dm)
    assert fake.dm_channel(fake.alice) in fake.typing
    assert await stored(app, fake.dm_channel(fake.alice)) == 2


async def test_server_message_without_mention_is_ignored_and_not_stored(bot, fake):
    app, _ = await bot()
    await fake.send_message(fake.alice, fake.general, "just chatting among humans")
    await fake.send_dm(fake.alice, "barrier")  # answered after the first one was handled
    await fake.wait_posts(1, channel_id=fake.dm_channel(fake.alice))
    assert await quiet_for(fake) == 1
    assert await stored(app, fake.general) == 0


@pytest.mark.parametrize("how", ["mention", "role_mention", "reply_to_bot", "free_channel",
                                 "thread_reply_to_bot"])
async def test_addressed_server_messages_are_answered(bot, fake, how):
    app, _ = await bot()
    channel = fake.general
    if how == "mention":
        trigger = await fake.send_message(fake.alice, channel, f"<@{fake.bot.id}> hi there",
                                          mentions=[fake.bot])
    elif how == "role_mention":
        trigger = await fake.send_message(fake.alice, channel, f"<@&{fake.bot_role}> hi",
                                          mention_roles=[fake.bot_role])
    elif how == "free_channel":
        channel = fake.free
        trigger = await fake.send_message(fake.alice, channel, "hi everybody")
    else:
        channel = fake.thread if how.startswith("thread") else fake.general
        earlier = fake.message_payload(fake.bot, channel, "I said this before")
        trigger = await fake.send_message(fake.alice, channel, "why?", reply_to=earlier)
    [post] = await fake.wait_posts(1, channel_id=channel)
    assert_inert_reply(post, trigger)
    turns = await app.store.recent("discord", str(channel), 10)
    assert [t.text for t in turns][0] in ("hi there", "hi", "hi everybody", "why?")
    assert len(turns) == 2
    # the bot's own reply comes back through the gateway (free channel included): no loop
    assert await quiet_for(fake) == 1


async def test_other_bots_are_ignored_even_when_they_mention_the_bot(bot, fake):
    app, _ = await bot()
    await fake.send_message(fake.other_bot, fake.free, f"<@{fake.bot.id}> ping",
                            mentions=[fake.bot])
    await fake.send_message(fake.other_bot, fake.general, f"<@{fake.bot.id}> ping",
                            mentions=[fake.bot])
    await fake.send_dm(fake.alice, "barrier")
    await fake.wait_posts(1)
    assert await quiet_for(fake) == 1
    assert await stored(app, fake.free) == 0 and await stored(app, fake.general) == 0


async def test_everyone_in_user_text_is_answered_without_pinging(bot, fake):
    app, adapter = await bot()
    trigger = await fake.send_message(fake.alice, fake.free, "@everyone @here look at this")
    [post] = await fake.wait_posts(1, channel_id=fake.free)
    assert_inert_reply(post, trigger)
    turns = await app.store.recent("discord", str(fake.free), 10)
    assert turns[0].text == "@everyone @here look at this"
    # even a reply that is nothing but pings goes out inert
    await send_all(adapter, Reply("discord", str(fake.free),
                             f"@everyone @here <@{fake.alice.id}> <@&{fake.admin_role}>",
                             reply_to=trigger["id"]))
    posts = await fake.wait_posts(2, channel_id=fake.free)
    content = posts[1].content
    assert "everyone" in content and "here" in content
    assert "@everyone" not in content and "@here" not in content  # defused by clean_outgoing
    assert_inert_reply(posts[1], trigger)


async def test_long_reply_arrives_in_parts_of_at_most_2000(bot, fake):
    _, adapter = await bot()
    trigger = await fake.send_message(fake.alice, fake.general, "tell me a long story")
    text = " ".join(f"word{i}" for i in range(600))  # 4,689 characters, no line breaks
    await send_all(adapter, Reply("discord", str(fake.general), text, reply_to=trigger["id"]))
    posts = await fake.wait_posts(3, channel_id=fake.general)
    assert len(posts) == 3
    assert all(0 < len(p.content) <= 2000 for p in posts)
    assert " ".join(" ".join(p.content for p in posts).split()) == " ".join(text.split())
    assert_inert_reply(posts[0], trigger)
    for later in posts[1:]:
        assert_inert_reply(later, None)
        assert "message_reference" not in later.payload


async def test_a_retried_send_does_not_repeat_parts_already_delivered(bot, fake):
    app, adapter = await bot()
    app.pipeline.retry_base = 0.01
    trigger = await fake.send_message(fake.alice, fake.general, "long one please")
    reply = Reply("discord", str(fake.general), " ".join(f"w{i}" for i in range(1200)),
                  reply_to=trigger["id"])
    fake.fail_posts(after=1, count=1, status=400)  # the second part fails once
    ids = await app.pipeline.send(reply)  # the pipeline retries that part alone
    expected = split_message(reply.text, 2000)
    assert len(expected) == 4
    posts = await fake.wait_posts(4, channel_id=fake.general)
    assert [p.content for p in await quiet_posts(fake, fake.general)] == expected
    assert [("message_reference" in p.payload) for p in posts] == [True, False, False, False]
    assert ids == [str(p.message_id) for p in posts]  # each part's id as Discord gave it


async def test_a_refused_send_is_undeliverable_and_not_retried(bot, fake):
    app, adapter = await bot()
    app.pipeline.retry_base = 0.01
    trigger = await fake.send_message(fake.alice, fake.general, "hi")
    fake.fail_posts(after=0, count=1, status=403)
    with pytest.raises(UndeliverableError, match="403"):
        await app.pipeline.send(Reply("discord", str(fake.general), "no entry",
                                      reply_to=trigger["id"]))
    assert await quiet_posts(fake, fake.general) == []


# --- commands -------------------------------------------------------------------------------
async def chat_in_general(fake: FakeDiscord, count: int = 1) -> None:
    for n in range(count):
        await fake.send_message(fake.alice, fake.general, f"<@{fake.bot.id}> message {n}",
                                mentions=[fake.bot])
        await fake.wait_posts(n + 1, channel_id=fake.general)


async def test_slash_reset_by_member_is_refused_ephemerally(bot, fake):
    app, _ = await bot()
    await chat_in_general(fake)
    iid = await fake.slash(fake.alice, "reset", fake.general)
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert answer.kind == "callback" and answer.flags & EPHEMERAL
    assert "only admins" in answer.content.lower()
    assert answer.payload["data"]["allowed_mentions"]["parse"] == []
    assert await stored(app, fake.general) == 2


async def test_slash_reset_by_admin_clears_history(bot, fake):
    app, _ = await bot()
    await chat_in_general(fake)
    iid = await fake.slash(fake.admin, "reset", fake.general)
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert answer.kind == "callback" and not answer.flags & EPHEMERAL
    assert answer.content.startswith("Done")
    assert await stored(app, fake.general) == 0


async def test_slash_in_dm_lets_the_user_reset_and_help_is_answered(bot, fake):
    app, _ = await bot()
    await fake.send_dm(fake.alice, "hello")
    await fake.wait_posts(1, channel_id=fake.dm_channel(fake.alice))
    iid = await fake.slash(fake.alice, "reset", dm=True)
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert answer.content.startswith("Done")
    assert await stored(app, fake.dm_channel(fake.alice)) == 0
    iid = await fake.slash(fake.alice, "help", fake.general)
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert "/reset" in answer.content


async def test_slash_settings_by_admin_changes_the_channel(bot, fake):
    app, _ = await bot()
    iid = await fake.slash(fake.alice, "settings", fake.general, {"values": "temperature=0.5"})
    [refused] = await fake.wait_posts(1, interaction_id=iid)
    assert refused.flags & EPHEMERAL
    assert await app.store.get_settings("discord", str(fake.general)) == {}
    iid = await fake.slash(fake.admin, "settings", fake.general, {"values": "temperature=0.5"})
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert answer.content.startswith("Settings updated")
    assert await app.store.get_settings("discord", str(fake.general)) == {"temperature": 0.5}


async def test_answer_to_an_unknown_interaction(bot, fake):
    _, adapter = await bot()
    gone = "interaction:999"
    await send_all(adapter, Reply("discord", str(fake.general), "refused", reply_to=gone,
                             private=True))
    assert await quiet_posts(fake, fake.general) == []  # a private note is not made public
    await send_all(adapter, Reply("discord", str(fake.general), "public answer", reply_to=gone))
    [post] = await fake.wait_posts(1, channel_id=fake.general)
    assert post.content == "public answer" and "message_reference" not in post.payload
    assert_inert_reply(post, None)


async def test_text_reset_by_member_is_refused_and_by_admin_clears(bot, fake):
    app, _ = await bot()
    await chat_in_general(fake)
    trigger = await fake.send_message(fake.alice, fake.general, f"<@{fake.bot.id}> reset",
                                      mentions=[fake.bot])
    posts = await fake.wait_posts(2, channel_id=fake.general)
    assert "only admins" in posts[1].content.lower()
    assert_inert_reply(posts[1], trigger)
    assert await stored(app, fake.general) == 2
    trigger = await fake.send_message(fake.admin, fake.general, f"<@!{fake.bot.id}> reset",
                                      mentions=[fake.bot])
    posts = await fake.wait_posts(3, channel_id=fake.general)
    assert posts[2].content.startswith("Done")
    assert_inert_reply(posts[2], trigger)
    assert await stored(app, fake.general) == 0


async def test_is_admin_fetches_an_uncached_member(bot, fake):
    _, adapter = await bot()

    def event(person) -> Incoming:
        return Incoming("discord", str(fake.general), "1", str(person.id), person.name,
                        "/reset", is_direct=False, is_to_me=True)

    assert await adapter.is_admin(event(fake.admin)) is True
    assert await adapter.is_admin(event(fake.alice)) is False
    assert ("GET", f"/guilds/{fake.guild_id}/members/{fake.admin.id}") in fake.requests


# --- resilience -----------------------------------------------------------------------------
async def test_rate_limited_send_is_waited_out_and_delivered(bot, fake):
    await bot()
    fake.rate_limit_next_posts(1, retry_after=0.6)
    started = time.monotonic()
    dm = await fake.send_dm(fake.alice, "hello despite limits")
    [post] = await fake.wait_posts(1, channel_id=fake.dm_channel(fake.alice))
    assert fake.rate_limited_posts == 1
    assert time.monotonic() - started >= 0.6
    assert_inert_reply(post, dm)


async def test_bot_survives_a_gateway_disconnect(bot, fake):
    await bot()
    await fake.drop_connection()
    trigger = await fake.send_message(fake.alice, fake.general, f"<@{fake.bot.id}> still there?",
                                      mentions=[fake.bot])
    [post] = await fake.wait_posts(1, channel_id=fake.general)
    assert_inert_reply(post, trigger)
    assert len(fake.resumes) == 1 and len(fake.identifies) == 1  # resumed, not re-identified
    await fake.send_dm(fake.alice, "and after?")
    await fake.wait_posts(1, channel_id=fake.dm_channel(fake.alice))


async def test_a_fatal_gateway_close_sets_done_so_the_app_exits(bot, fake, caplog):
    _, adapter = await bot()
    assert not adapter.done.is_set()
    await fake.drop_connection(code=4004)  # "authentication failed": not resumable
    await asyncio.wait_for(adapter.done.wait(), 10)
    assert any("connection ended" in r.getMessage() for r in caplog.records)


async def test_auto_sharding_connects_every_shard(fake, bot):
    fake.recommended_shards = 2
    await bot(discord_shards="auto")
    assert sorted(tuple(i["shard"]) for i in fake.identifies) == [(0, 2), (1, 2)]
    trigger = await fake.send_message(fake.alice, fake.free, "sharded hello")
    [post] = await fake.wait_posts(1, channel_id=fake.free)
    assert_inert_reply(post, trigger)


async def test_slow_slash_answer_is_deferred_then_sent_as_followup(bot, fake, monkeypatch):
    import adapters.discord as module

    monkeypatch.setattr(module, "DEFER_AFTER", 0.0)  # the core is "slower" than the deadline
    app, _ = await bot()
    await chat_in_general(fake)
    iid = await fake.slash(fake.admin, "reset", fake.general)
    [answer] = await fake.wait_posts(1, interaction_id=iid)
    assert fake.deferred == [(iid, EPHEMERAL)]  # "thinking...", only the admin sees it
    assert answer.kind == "followup" and answer.content.startswith("Done")
    assert answer.payload["allowed_mentions"]["parse"] == []
    assert await stored(app, fake.general) == 0


async def test_stop_finishes_a_send_in_flight(bot, fake):
    _, adapter = await bot()
    trigger = await fake.send_message(fake.alice, fake.general, "x")
    fake.rate_limit_next_posts(1, retry_after=0.8)
    sending = asyncio.create_task(send_all(adapter, Reply("discord", str(fake.general), "last words",
                                                     reply_to=trigger["id"])))
    await fake.wait_until(lambda: fake.rate_limited_posts == 1)
    await adapter.stop()
    assert sending.done() and sending.exception() is None
    [post] = [p for p in fake.posts if p.channel_id == fake.general]
    assert post.content == "last words"
    assert adapter.client.is_closed()
    await adapter.stop()  # idempotent


async def test_token_never_reaches_the_logs(bot, fake, caplog):
    caplog.set_level("DEBUG")
    await bot()
    await fake.send_dm(fake.alice, "hello")
    await fake.wait_posts(1)
    assert caplog.records and not any(TOKEN in r.getMessage() for r in caplog.records)
