"""The pure reply rules: repeat detection and the Unicode-aware word filter."""

from __future__ import annotations

import pytest

from bot.errors import ConfigError
from bot.events import Role, Turn
from bot.quality import Blocklist, earlier_lines, fold, is_repeat, normalise


def test_normalise_ignores_case_spacing_and_punctuation():
    assert normalise("  Hello,   THERE!! ") == "hello there"
    assert normalise("hello\tthere") == normalise("Hello... there?") == "hello there"
    assert normalise("I'm fine") == "i m fine" == normalise("i'm   FINE.")
    assert normalise("hello there") != normalise("hello their")


def test_is_repeat_matches_normalised_equality_only():
    earlier = ["Hello, there.", "What do you mean?"]
    assert is_repeat("hello there", earlier)
    assert is_repeat("WHAT do you mean", earlier)
    assert not is_repeat("hello there friend", earlier)  # containing is not repeating
    assert not is_repeat("...", ["!!!"])  # nothing left to compare: not a repeat
    assert not is_repeat("anything", [])


def _turn(text: str, role: Role) -> Turn:
    return Turn("console", "c", role, text)


def test_earlier_lines_are_recent_bot_replies_and_the_unanswered_user_messages():
    turns = [_turn("u1", Role.USER), _turn("b1", Role.BOT), _turn("u2", Role.USER),
             _turn("b2", Role.BOT), _turn("b3", Role.BOT), _turn("u3", Role.USER),
             _turn("u4", Role.USER)]
    lines = earlier_lines(turns, 2)
    assert sorted(lines) == ["b2", "b3", "u3", "u4"]
    assert sorted(earlier_lines(turns, 10)) == ["b1", "b2", "b3", "u3", "u4"]
    assert earlier_lines(turns, 0) == ()


@pytest.mark.parametrize("text", [
    "that is BAD", "Bad!", "so... bad.", "b\u0430d idea",  # Cyrillic a
    "\u0432\u0430d", "b\u200bad",  # Cyrillic ve; zero-width space
    "b\u00e0d", "\uff42\uff41\uff44",  # accent; fullwidth
    "ba\u0301d", "B\u0391D",  # combining acute; Greek capital alpha
])
def test_listed_word_is_found_in_any_case_and_with_look_alikes(text):
    assert Blocklist(["bad"]).blocks(text), text


@pytest.mark.parametrize("text", ["badge", "abad", "bad_", "a bead", "b a d", ""])
def test_only_whole_words_match(text):
    assert not Blocklist(["bad"]).blocks(text)


def test_phrases_match_across_any_spacing_and_entries_are_folded_too():
    blocklist = Blocklist(["go away", "\u0421\u041e\u0420"])  # "СОР" in Cyrillic
    assert blocklist.blocks("just GO    away now")
    assert blocklist.blocks("go\naway")
    assert not blocklist.blocks("go far away")
    assert blocklist.blocks("call a COP")  # a Cyrillic entry matches Latin text too


def test_fold_maps_look_alikes_and_drops_invisible_characters():
    assert fold("\u0440\u0430\u0443\u0440\u0430\u04cf") == "paypal"
    assert fold("n\u200di\ufeffce") == "nice"
    assert fold("Cr\u00e8me Br\u00fbl\u00e9e") == "creme brulee"
    assert fold("\u2168") == "ix"  # NFKC: Roman numeral nine


def test_empty_list_blocks_nothing_and_file_format(tmp_path):
    assert not Blocklist([]).blocks("anything at all")
    path = tmp_path / "words.txt"
    path.write_text("# a comment\n\nbad\n  rude word  \n", encoding="utf-8")
    blocklist = Blocklist.from_file(path)
    assert len(blocklist) == 2
    assert blocklist.blocks("a RUDE  word") and blocklist.blocks("bad")
    assert not blocklist.blocks("a comment")


def test_unreadable_list_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="DIALOGBOT_BLOCKLIST"):
        Blocklist.from_file(tmp_path / "missing.txt")
