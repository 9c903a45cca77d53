"""Pure tests of adapters.telegram.to_event on update payloads shaped like Telegram's own."""

from __future__ import annotations

from datetime import timezone

import pytest
from telegram import Update

from adapters.telegram import split_for_telegram, to_event, utf16_len
from tests import fake_telegram as ft

BOT = ft.BOT_USERNAME
BOT_ID = ft.BOT_ID
GROUP = -1001234567890

# Recorded from the Bot API (ids and names changed).
PRIVATE_TEXT = {
    "update_id": 810422001,
    "message": {
        "message_id": 57, "date": 1717000000,
        "from": {"id": 5123456789, "is_bot": False, "first_name": "Ada", "last_name": "L",
                 "username": "ada", "language_code": "en"},
        "chat": {"id": 5123456789, "first_name": "Ada", "last_name": "L", "username": "ada",
                 "type": "private"},
        "text": "Hi there, how are you?",
    },
}
GROUP_MENTION_EMOJI = {
    "update_id": 810422002,
    "message": {
        "message_id": 301, "date": 1717000100,
        "from": {"id": 42, "is_bot": False, "first_name": "Bob"},
        "chat": {"id": GROUP, "title": "Friends", "type": "supergroup"},
        "text": f"\N{GRINNING FACE} hey @{BOT.lower()} what's up?",
        "entities": [{"type": "mention", "offset": 7, "length": len(BOT) + 1}],
    },
}
EDITED = {
    "update_id": 810422003,
    "edited_message": {
        "message_id": 57, "date": 1717000000, "edit_date": 1717000200,
        "from": {"id": 5123456789, "is_bot": False, "first_name": "Ada"},
        "chat": {"id": 5123456789, "first_name": "Ada", "type": "private"},
        "text": "Hi there (edited)",
    },
}
CHANNEL_POST = {
    "update_id": 810422004,
    "channel_post": {
        "message_id": 9, "date": 1717000000, "chat": {"id": -1009999, "title": "News",
                                                       "type": "channel"},
        "sender_chat": {"id": -1009999, "title": "News", "type": "channel"},
        "text": f"@{BOT} hello",
        "entities": [{"type": "mention", "offset": 0, "length": len(BOT) + 1}],
    },
}
NEW_MEMBER = {
    "update_id": 810422005,
    "message": {
        "message_id": 302, "date": 1717000000,
        "from": {"id": 42, "is_bot": False, "first_name": "Bob"},
        "chat": {"id": GROUP, "title": "Friends", "type": "supergroup"},
        "new_chat_members": [{"id": 43, "is_bot": False, "first_name": "Carol"}],
        "new_chat_member": {"id": 43, "is_bot": False, "first_name": "Carol"},
        "new_chat_participant": {"id": 43, "is_bot": False, "first_name": "Carol"},
    },
}
PHOTO_WITH_CAPTION = {
    "update_id": 810422006,
    "message": {
        "message_id": 303, "date": 1717000000,
        "from": {"id": 42, "is_bot": False, "first_name": "Bob"},
        "chat": {"id": GROUP, "title": "Friends", "type": "supergroup"},
        "photo": [{"file_id": "AgACAgQAAx0", "file_unique_id": "AQADq", "file_size": 1234,
                   "width": 90, "height": 90}],
        "caption": f"@{BOT} look at this",
        "caption_entities": [{"type": "mention", "offset": 0, "length": len(BOT) + 1}],
    },
}


def event(payload: dict):
    return to_event(Update.de_json(payload, None), BOT, BOT_ID)


def test_private_text_is_direct_and_keeps_everything():
    e = event(PRIVATE_TEXT)
    assert e is not None
    assert (e.platform, e.channel, e.message_id) == ("telegram", "5123456789", "57")
    assert (e.author_id, e.author_name) == ("5123456789", "Ada L")
    assert e.is_direct and e.is_to_me and not e.has_attachments
    assert e.text == "Hi there, how are you?"
    assert e.reply_to is None
    assert e.time.tzinfo is not None and e.time.astimezone(timezone.utc).timestamp() == 1717000000


def test_group_mention_is_addressed_and_stripped_with_utf16_offsets():
    e = event(GROUP_MENTION_EMOJI)
    assert e is not None and e.is_to_me and not e.is_direct
    assert e.channel == str(GROUP)
    assert e.text == "\N{GRINNING FACE} hey what's up?"


def test_unaddressed_group_message_is_not_to_me():
    e = event({"update_id": 1, **ft.group_update("just chatting with friends")})
    assert e is not None and not e.is_to_me and not e.is_direct


def test_mention_of_someone_else_does_not_address_the_bot():
    text = "@SomeOtherBot hello"
    update = ft.group_update(text)
    update["message"]["entities"] = ft.mention_entities(text, "SomeOtherBot")
    e = event({"update_id": 1, **update})
    assert e is not None and not e.is_to_me and e.text == text


def test_leading_mention_and_punctuation_are_stripped():
    e = event({"update_id": 1, **ft.group_update(f"@{BOT}, tell me a joke")})
    assert e is not None and e.is_to_me and e.text == "tell me a joke"


def test_mention_in_the_middle_leaves_one_space():
    e = event({"update_id": 1, **ft.group_update(f"so @{BOT} what now")})
    assert e is not None and e.text == "so what now"


def test_reply_to_bot_message_is_addressed():
    bot_msg = ft.message("I am a bot", -100200300, ft.BOT_USER)
    e = event({"update_id": 1, **ft.group_update("really?", reply_to=bot_msg)})
    assert e is not None and e.is_to_me and e.reply_to == str(bot_msg["message_id"])
    assert e.text == "really?"
    assert e.quote == "I am a bot" and e.quote_from_bot


def test_reply_to_a_human_is_not_addressed():
    other = ft.message("hello", -100200300, ft.user(333, "Carol"))
    e = event({"update_id": 1, **ft.group_update("hi Carol", reply_to=other)})
    assert e is not None and not e.is_to_me
    assert e.quote == "hello" and not e.quote_from_bot  # context if the bot is addressed


def test_a_forum_topic_start_is_not_a_reply():
    topic = ft.message(None, -100200300, ft.user(333, "Carol"),
                       forum_topic_created={"name": "t", "icon_color": 1})
    e = event({"update_id": 1, **ft.group_update(f"@{BOT} hi", reply_to=topic)})
    assert e is not None and e.reply_to is None and e.quote is None


def test_command_for_this_bot_is_normalised():
    e = event({"update_id": 1, **ft.group_update(f"/reset@{BOT.upper()} now please")})
    assert e is not None and e.is_to_me and e.text == "/reset now please"


def test_command_for_another_bot_is_dropped():
    assert event({"update_id": 1, **ft.group_update("/reset@OtherBot")}) is None


def test_bare_command_in_group_only_when_it_is_ours():
    ours = event({"update_id": 1, **ft.group_update("/help")})
    assert ours is not None and ours.is_to_me and ours.text == "/help"
    theirs = event({"update_id": 2, **ft.group_update("/weather Paris")})
    assert theirs is not None and not theirs.is_to_me


def test_private_command_with_botname():
    e = event({"update_id": 1, **ft.private_update(f"/settings@{BOT} temperature=0.5")})
    assert e is not None and e.is_direct and e.text == "/settings temperature=0.5"


def test_sticker_has_attachments_and_no_text():
    e = event({"update_id": 1, **ft.sticker_update(111)})
    assert e is not None and e.has_attachments and e.text == "" and e.is_direct


def test_caption_is_the_text_for_media():
    e = event(PHOTO_WITH_CAPTION)
    assert e is not None and e.has_attachments and e.is_to_me and e.text == "look at this"


@pytest.mark.parametrize("payload", [EDITED, CHANNEL_POST, NEW_MEMBER],
                         ids=["edited", "channel_post", "service"])
def test_ignored_updates(payload):
    assert event(payload) is None


def test_messages_from_bots_are_ignored():
    update = ft.group_update(f"@{BOT} hi")
    update["message"]["from"] = ft.user(999, "Spam", is_bot=True)
    assert event({"update_id": 1, **update}) is None


def test_control_characters_are_cleaned():
    e = event({"update_id": 1, **ft.private_update("hel\x00lo\x07 \r\nthere  ")})
    assert e is not None and e.text == "hello \nthere"


def test_split_counts_utf16_units():
    emoji = "\N{GRINNING FACE}"
    text = (emoji * 100 + " ") * 30  # 3030 characters, 6030 UTF-16 units
    parts = split_for_telegram(text)
    assert len(parts) >= 2
    assert all(0 < utf16_len(p) <= 4096 for p in parts)
    assert "".join(parts).replace(" ", "") == text.replace(" ", "")


def test_split_plain_text_at_4096():
    text = "word " * 2000
    parts = split_for_telegram(text.strip())
    assert len(parts) == 3 and all(len(p) <= 4096 for p in parts)
