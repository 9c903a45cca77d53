"""Choosing the next token for many rows at once, as `generate` would for each row alone.

The batching worker decodes up to 16 rows per step; applying transformers' logits processors
row by row cost a third of a step (16 top-p sorts, 16 n-gram scans of the whole prompt), so
rows that share `DecodingSettings` are processed together:

- repetition penalty: transformers' `RepetitionPenaltyLogitsProcessor` on the rows' ids,
  each row padded with its own first token (a token already penalised once is penalised
  once: gather/scatter of a repeated id writes the same value), so the result is per row;
- no-repeat n-grams: `NGramBans` keeps each row's (n-1)-gram -> next tokens map and updates
  it with each new token, instead of rescanning prompt + reply every step; it bans exactly
  what transformers' `NoRepeatNGramLogitsProcessor` bans (tested against it);
- temperature, top-k, top-p: transformers' warpers, which treat every row on its own;
  with top-k on, the warpers run on each row's k best scores only (`torch.topk`), not on the
  whole vocabulary: top-k keeps nothing else, temperature keeps the order, so the
  distribution is the same (tested) for a fraction of the work (a full-vocabulary top-p sort
  and a 50,257-way draw per row were a fifth of a 16-row step);
- the token: one `argmax` or one `multinomial` for the group.

Processors run in `generate`'s order: repetition penalty, n-grams, temperature, top-k, top-p.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)

from bot.events import DecodingSettings


class NGramBans:
    """The tokens that would complete an n-gram already in `tokens` (no_repeat_ngram_size).

    `banned()` equals transformers' `NoRepeatNGramLogitsProcessor` for these tokens; `add`
    appends a token in O(n)."""

    __slots__ = ("n", "tokens", "seen")

    def __init__(self, n: int, tokens: Sequence[int]):
        self.n = n
        self.tokens: list[int] = []
        self.seen: dict[tuple[int, ...], set[int]] = {}
        for token in tokens:
            self.add(token)

    def add(self, token: int) -> None:
        self.tokens.append(token)
        if len(self.tokens) >= self.n:
            prefix = tuple(self.tokens[len(self.tokens) - self.n:-1])
            self.seen.setdefault(prefix, set()).add(token)

    def banned(self) -> list[int]:
        if len(self.tokens) < self.n:
            return []
        prefix = tuple(self.tokens[len(self.tokens) - self.n + 1:])
        return sorted(self.seen.get(prefix, ()))

    def copy(self) -> "NGramBans":
        other = NGramBans.__new__(NGramBans)
        other.n, other.tokens = self.n, list(self.tokens)
        other.seen = {key: set(value) for key, value in self.seen.items()}
        return other


def warpers_for(settings: DecodingSettings) -> LogitsProcessorList:
    """The sampling warpers `generate` would add for these settings, in its order."""
    out = LogitsProcessorList()
    if settings.do_sample:
        if settings.temperature != 1.0:
            out.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_k != 0:
            out.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
        if settings.top_p < 1.0:
            out.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
    return out


def choice_key(settings: DecodingSettings) -> tuple:
    """The settings that decide a token (rows with equal keys are processed together)."""
    return (settings.do_sample, settings.temperature, settings.top_k, settings.top_p,
            settings.repetition_penalty, settings.no_repeat_ngram_size)


def is_plain_greedy(settings: DecodingSettings) -> bool:
    """True when the next token is just the argmax of the logits."""
    return (not settings.do_sample and settings.repetition_penalty == 1.0
            and settings.no_repeat_ngram_size <= 0)


def choose(scores: torch.Tensor, settings: DecodingSettings, tokens: Sequence[list[int]],
           bans: Sequence[NGramBans | None]) -> list[int]:
    """The next token of each row. `scores` [rows, vocab] (float, modified freely), `tokens`
    each row's prompt + reply so far, `bans` each row's `NGramBans` (when the settings ask
    for no-repeat n-grams)."""
    if is_plain_greedy(settings):
        return scores.argmax(-1).tolist()
    if settings.repetition_penalty != 1.0:
        width = max(len(row) for row in tokens)
        ids = torch.tensor([row + [row[0]] * (width - len(row)) for row in tokens],
                           dtype=torch.long, device=scores.device)
        scores = RepetitionPenaltyLogitsProcessor(settings.repetition_penalty)(ids, scores)
    if settings.no_repeat_ngram_size > 0:
        for index, row_bans in enumerate(bans):
            banned = row_bans.banned() if row_bans is not None else []
            if banned:
                scores[index, banned] = -float("inf")
    if not settings.do_sample:
        return scores.argmax(-1).tolist()
    probs, index = distribution(scores, settings)
    drawn = torch.multinomial(probs, 1)
    return (drawn if index is None else index.gather(1, drawn))[:, 0].tolist()


def distribution(scores: torch.Tensor, settings: DecodingSettings,
                 ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Sampling probabilities after temperature, top-k and top-p: `(probs, None)` over the
    vocabulary, or, with top-k on, `(probs, index)` over each row's k best tokens (`index`
    holds their ids)."""
    warpers = warpers_for(settings)
    if 0 < settings.top_k < scores.shape[-1]:
        scores, index = scores.topk(settings.top_k, dim=-1)
        warpers = LogitsProcessorList(w for w in warpers if not isinstance(w, TopKLogitsWarper))
    else:
        index = None
    if warpers:
        scores = warpers(None, scores)
    return torch.softmax(scores, dim=-1), index
