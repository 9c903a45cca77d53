"""DialoGPT's prompt, as it was trained: each turn's tokens followed by end-of-text, oldest
first, keeping the newest turns that fit the budget. Pure functions over token ids."""

from __future__ import annotations

from collections.abc import Sequence


def build_prompt(turns: Sequence[Sequence[int]], budget: int, eos: int) -> list[int]:
    """Concatenate `turn + [eos]` for the newest turns whose total fits in `budget` tokens.

    Turns are oldest first; empty turns are skipped. When even the newest turn alone is over
    budget, its end is kept (the last `budget - 1` tokens and the end-of-text token), since
    that is what the reply answers.
    """
    if budget < 2:
        raise ValueError(f"prompt budget {budget} leaves no room for a turn")
    kept: list[Sequence[int]] = []
    used = 0
    for ids in reversed(turns):
        if not ids:
            continue
        cost = len(ids) + 1
        if used + cost > budget:
            if not kept:  # a single over-long message keeps its end
                kept.append(ids[len(ids) - (budget - 1):])
            break
        kept.append(ids)
        used += cost
    prompt: list[int] = []
    for ids in reversed(kept):
        prompt.extend(ids)
        prompt.append(eos)
    return prompt


def prompt_budget(n_positions: int, max_new_tokens: int) -> int:
    """Tokens the prompt may use so prompt + reply stays inside the position embeddings."""
    return n_positions - max_new_tokens


def text_tail(text: str, budget: int) -> str:
    """The end of a huge message, long enough to hold `budget` tokens of ordinary text.

    Tokenising 100 kB only to keep its last 1,000 tokens is wasted work; GPT-2 tokens average
    about four characters, so 16 characters per token leaves a wide margin.
    """
    limit = 16 * budget
    return text if len(text) <= limit else text[-limit:]
