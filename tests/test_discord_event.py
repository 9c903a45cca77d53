"""`adapters.discord.to_event` / `interaction_event`: real discord.py objects built from
gateway payloads (the fake server's world), no network."""

from __future__ import annotations

import discord
import pytest
from discord.user import ClientUser

from adapters.discord import interaction_event, intents, to_event
from tests.fake_discord import FakeDiscord


class World:
    def __init__(self) -> None:
        self.fake = FakeDiscord("TOKEN")
        self.client = discord.Client(intents=intents())
        self.state = self.client._connection
        self.state.user = ClientUser(state=self.state, data=self.fake.bot.user)
        self.guild = self.state._add_guild_from_data(self.fake.guild_payload())
        self.bot_roles = {self.guild.self_role.id}

    def message(self, author, channel_id, content, **kw) -> discord.Message:
        guild = kw.get("guild", True)
        payload = self.fake.message_payload(author, channel_id, content, **kw)
        if guild:
            channel = self.guild.get_channel_or_thread(channel_id)
        else:
            channel = discord.DMChannel._from_message(self.state, channel_id)
        return discord.Message(state=self.state, channel=channel, data=payload)

    def event(self, message: discord.Message, free: set[int] = frozenset()):
        return to_event(message, self.fake.bot.id, self.bot_roles, set(free))


@pytest.fixture
def world() -> World:
    return World()


def test_dm_is_direct_and_addressed(world: World) -> None:
    f = world.fake
    event = world.event(world.message(f.alice, f.dm_channel(f.alice), "hello there",
                                      guild=False))
    assert event is not None
    assert (event.is_direct, event.is_to_me, event.text) == (True, True, "hello there")
    assert event.platform == "discord" and event.channel == str(f.dm_channel(f.alice))
    assert event.author_id == str(f.alice.id) and event.author_name == "alice"


def test_server_message_without_mention_is_not_addressed(world: World) -> None:
    f = world.fake
    event = world.event(world.message(f.alice, f.general, "just chatting"))
    assert event is not None and not event.is_direct and not event.is_to_me


@pytest.mark.parametrize("form", ["<@{id}>", "<@!{id}>"])
def test_user_mention_addresses_the_bot_and_is_stripped(world: World, form: str) -> None:
    f = world.fake
    mention = form.format(id=f.bot.id)
    event = world.event(world.message(f.alice, f.general, f"{mention}, how are you?",
                                      mentions=[f.bot]))
    assert event.is_to_me and event.text == "how are you?"
    event = world.event(world.message(f.alice, f.general, f"so {mention} what now"))
    assert event.is_to_me and event.text == "so what now"


def test_managed_role_mention_addresses_the_bot(world: World) -> None:
    f = world.fake
    event = world.event(world.message(f.alice, f.general, f"<@&{f.bot_role}> hi",
                                      mention_roles=[f.bot_role]))
    assert event.is_to_me and event.text == "hi"
    other = world.event(world.message(f.alice, f.general, f"<@&{f.admin_role}> hi",
                                      mention_roles=[f.admin_role]))
    assert not other.is_to_me and other.text == "@mods hi"


def test_other_users_mentions_become_names(world: World) -> None:
    f = world.fake
    text = f"<@{f.bot.id}> say hi to <@{f.admin.id}>"
    event = world.event(world.message(f.alice, f.general, text, mentions=[f.bot, f.admin]))
    assert event.text == "say hi to @admin"


def test_reply_to_a_bot_message_is_addressed(world: World) -> None:
    f = world.fake
    bot_msg = f.message_payload(f.bot, f.general, "I am a bot")
    event = world.event(world.message(f.alice, f.general, "are you?", reply_to=bot_msg))
    assert event.is_to_me and event.reply_to == bot_msg["id"] and event.text == "are you?"
    human = f.message_payload(f.admin, f.general, "I am human")
    event = world.event(world.message(f.alice, f.general, "are you?", reply_to=human))
    assert not event.is_to_me and event.reply_to == human["id"]


def test_free_talk_channels_and_their_threads_are_marked_and_threads_name_their_parent(
        world: World) -> None:
    f = world.fake
    free = world.event(world.message(f.alice, f.free, "anyone?"), {f.free})
    assert free.free_talk and not free.is_to_me  # answered by talk=all, not as addressed
    assert not world.event(world.message(f.alice, f.free, "anyone?"), set()).free_talk
    # the thread lives under #general: free only when its parent is
    in_thread = world.message(f.alice, f.thread, "in a thread")
    event = world.event(in_thread, {f.general})
    assert event.free_talk and event.channel == str(f.thread) and event.parent == str(f.general)
    assert not world.event(in_thread, {f.free}).free_talk
    assert world.event(world.message(f.alice, f.general, "x"), set()).parent is None


@pytest.mark.parametrize("who", ["bot", "other_bot"])
def test_bot_messages_are_ignored(world: World, who: str) -> None:
    f = world.fake
    author = getattr(f, who)
    msg = world.message(author, f.free, f"<@{f.bot.id}> hi", mentions=[f.bot])
    assert world.event(msg, {f.free}) is None


def test_webhook_and_system_messages_are_ignored(world: World) -> None:
    f = world.fake
    assert world.event(world.message(f.alice, f.free, "hook", webhook=True), {f.free}) is None
    join = world.message(f.alice, f.free, "", type_=7)  # member join
    assert world.event(join, {f.free}) is None


@pytest.mark.parametrize("text,expected", [
    ("reset", "/reset"), ("Reset!", "/reset"),
    ("settings temperature=0.7", "/settings temperature=0.7"),
    ("help", "/help"), ("forget", "/forget"), ("start", "/start"),
    ("/reset", "/reset"), ("resetting is fun", "resetting is fun"),
    ("settings\ntop_k=40", "/settings top_k=40"),
])
def test_mention_plus_command_word_becomes_a_command(world: World, text: str,
                                                     expected: str) -> None:
    f = world.fake
    msg = world.message(f.alice, f.general, f"<@{f.bot.id}> {text}", mentions=[f.bot])
    assert world.event(msg).text == expected


def test_command_word_without_a_mention_stays_text(world: World) -> None:
    f = world.fake
    assert world.event(world.message(f.alice, f.free, "help me"), {f.free}).text == "help me"


def test_attachment_only_message(world: World) -> None:
    f = world.fake
    event = world.event(world.message(f.alice, f.dm_channel(f.alice), "", guild=False,
                                      attachments=1))
    assert event.text == "" and event.has_attachments


def test_text_is_cleaned(world: World) -> None:
    f = world.fake
    event = world.event(world.message(f.alice, f.dm_channel(f.alice), "  hi\x00 \r\nthere ",
                                      guild=False))
    assert event.text == "hi \nthere"


def test_interaction_event_permissions(world: World) -> None:
    f = world.fake

    def interaction(person, dm=False) -> discord.Interaction:
        payload = {
            "id": "123456789012345678", "application_id": str(f.app_id), "type": 2,
            "token": "t", "version": 1, "attachment_size_limit": 1, "locale": "en-US",
            "data": {"id": "1", "name": "reset", "type": 1},
        }
        if dm:
            payload.update(user=person.user, channel_id="42",
                           channel={"id": "42", "type": 1, "recipients": [person.user]})
        else:
            member = person.member()
            member["permissions"] = str(f.permissions_of(person))
            payload.update(guild_id=str(f.guild_id), member=member,
                           channel_id=str(f.general),
                           channel=f.text_channel(f.general, "general"))
        return discord.Interaction(data=payload, state=world.state)

    member = interaction_event(interaction(f.alice), "/reset")
    assert member.platform_admin is False and member.is_to_me and not member.is_direct
    assert member.message_id == "interaction:123456789012345678"
    assert member.channel == str(f.general) and member.text == "/reset"
    assert interaction_event(interaction(f.admin), "/reset").platform_admin is True
    dm = interaction_event(interaction(f.alice, dm=True), "/reset")
    assert dm.is_direct and dm.platform_admin is True and dm.channel == "42"
