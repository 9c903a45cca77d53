"""The prompt builder: DialoGPT's training format and the token budget."""

import pytest

from bot.prompt import build_prompt, prompt_budget, text_tail

EOS = 50256


def test_turns_are_joined_by_end_of_text_oldest_first():
    assert build_prompt([[1, 2], [3], [4, 5, 6]], 100, EOS) == [1, 2, EOS, 3, EOS, 4, 5, 6, EOS]


def test_oldest_turns_are_dropped_to_fit_the_budget():
    turns = [[i] * 10 for i in range(1, 8)]  # 7 turns of 10 tokens = 11 each with eos
    prompt = build_prompt(turns, 35, EOS)
    assert len(prompt) == 33
    assert prompt == [5] * 10 + [EOS] + [6] * 10 + [EOS] + [7] * 10 + [EOS]


def test_a_single_over_long_message_keeps_its_end():
    prompt = build_prompt([[1, 2], list(range(5000))], 960, EOS)
    assert len(prompt) == 960
    assert prompt[:-1] == list(range(5000 - 959, 5000)) and prompt[-1] == EOS


def test_empty_turns_are_skipped_and_budget_is_exact():
    assert build_prompt([[], [1], []], 2, EOS) == [1, EOS]
    assert build_prompt([[1, 2, 3], [4]], 4, EOS) == [4, EOS]  # 4 + 2 > 4: older turn dropped


def test_budget_too_small_is_an_error():
    with pytest.raises(ValueError):
        build_prompt([[1]], 1, EOS)


def test_budget_leaves_room_for_the_reply():
    assert prompt_budget(1024, 64) == 960


def test_text_tail_keeps_the_end_of_huge_text():
    text = "a" * 100 + "b" * 20_000
    tail = text_tail(text, 960)
    assert text.endswith(tail) and len(tail) == 16 * 960
    assert text_tail("short", 960) == "short"
