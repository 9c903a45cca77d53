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


def build_window(turns: Sequence[Sequence[int]], budget: int, eos: int, step: int,
                 anchor: Sequence[int] = ()) -> list[int]:
    """`build_prompt` with a window that moves in steps, so a channel's prompt keeps the same
    beginning from one turn to the next (and a KV cache of that beginning stays valid).

    anchor: the first tokens of the channel's previous prompt (empty = none).
    - When a suffix of `turns` begins with `anchor` and fits `budget`, that suffix is the prompt
      (the window does not move, even if older turns would fit).
    - Without an anchor, all turns when they fit.
    - Otherwise the window slides: the newest turns that fit in `min(total, budget) - step`,
      so the next turns fit without sliding again until about `step` more tokens arrived.
    - A newest turn too long for that is handled as `build_prompt` does (its end is kept).
    `step <= 0` is exactly `build_prompt`.
    """
    if step <= 0:
        return build_prompt(turns, budget, eos)
    turns = [ids for ids in turns if ids]
    sizes = [len(ids) + 1 for ids in turns]
    total = sum(sizes)
    if anchor:
        start = _anchored_start(turns, eos, anchor)
        if start is not None and sum(sizes[start:]) <= budget:
            return _join(turns[start:], eos)
        limit = min(total, budget) - step
    elif total <= budget:
        return _join(turns, eos)
    else:
        limit = budget - step
    kept = used = 0
    for size in reversed(sizes):
        if used + size > limit:
            break
        used += size
        kept += 1
    if kept == 0:
        return build_prompt(turns, budget, eos)
    return _join(turns[len(turns) - kept:], eos)


def _join(turns: Sequence[Sequence[int]], eos: int) -> list[int]:
    prompt: list[int] = []
    for ids in turns:
        prompt.extend(ids)
        prompt.append(eos)
    return prompt


def _anchored_start(turns: Sequence[Sequence[int]], eos: int,
                    anchor: Sequence[int]) -> int | None:
    """The oldest turn index whose suffix prompt begins with `anchor`, or None."""
    want = list(anchor)
    for start in range(len(turns)):
        head: list[int] = []
        for ids in turns[start:]:
            head.extend(ids)
            head.append(eos)
            if len(head) >= len(want):
                break
        if head[:len(want)] == want:
            return start
    return None
