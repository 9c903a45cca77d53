"""Next-token choice for a group of rows (bot.sampling) equals transformers' processors applied
to each row alone; the oneDNN-packed fp32 model (bot.quant) computes what the plain one does."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import (AutoModelForCausalLM, LogitsProcessorList,
                          NoRepeatNGramLogitsProcessor, RepetitionPenaltyLogitsProcessor,
                          TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper)
from transformers.pytorch_utils import Conv1D

from bot.events import DecodingSettings
from bot.hf import TransformersBackend
from bot.quant import can_pack
from bot.sampling import NGramBans, choose, distribution, warpers_for

VOCAB = 64


def banned_by_transformers(n: int, tokens: list[int]) -> list[int]:
    scores = torch.zeros((1, VOCAB))
    out = NoRepeatNGramLogitsProcessor(n)(torch.tensor([tokens]), scores)
    return torch.nonzero(torch.isinf(out[0])).flatten().tolist()


@pytest.mark.parametrize("n", [1, 2, 3, 4])
def test_ngram_bans_equal_transformers_after_every_token(n):
    rng = random.Random(n)
    for _ in range(20):
        prompt = [rng.randrange(6) for _ in range(rng.randrange(1, 12))]  # few ids: repeats
        bans = NGramBans(n, prompt)
        tokens = list(prompt)
        for _ in range(15):
            assert bans.banned() == banned_by_transformers(n, tokens), (n, tokens)
            token = rng.randrange(6)
            bans.add(token)
            tokens.append(token)


def test_ngram_bans_copies_are_independent():
    bans = NGramBans(2, [1, 2])
    other = bans.copy()
    other.add(1)
    assert other.banned() == [2] and bans.banned() == []
    bans.add(3)
    assert other.banned() == [2] and bans.tokens == [1, 2, 3]


def per_row(scores: torch.Tensor, settings: DecodingSettings, tokens: list[int]) -> torch.Tensor:
    """What `generate` does to one row's scores (greedy settings: no warpers)."""
    processors = LogitsProcessorList()
    if settings.repetition_penalty != 1.0:
        processors.append(RepetitionPenaltyLogitsProcessor(settings.repetition_penalty))
    if settings.no_repeat_ngram_size:
        processors.append(NoRepeatNGramLogitsProcessor(settings.no_repeat_ngram_size))
    if settings.do_sample:
        processors += [TemperatureLogitsWarper(settings.temperature),
                       TopKLogitsWarper(settings.top_k), TopPLogitsWarper(settings.top_p)]
    return processors(torch.tensor([tokens]), scores.clone())


def rows_and_scores(seed: int, count: int = 8):
    """Rows of different lengths over a small vocabulary, and scores that favour tokens the
    rows already hold (so the penalty and the n-gram bans change the answer)."""
    rng = random.Random(seed)
    tokens = [[rng.randrange(VOCAB) for _ in range(rng.randrange(3, 40))] for _ in range(count)]
    scores = torch.randn((count, VOCAB), generator=torch.Generator().manual_seed(seed))
    for i, row in enumerate(tokens):
        scores[i, row[-3:]] += 3.0  # the last tokens look likely again
        scores[i, row[0]] -= 5.0  # and one is negative: the penalty multiplies those
    return tokens, scores


@pytest.mark.parametrize("settings", [
    DecodingSettings(do_sample=False, no_repeat_ngram_size=0),
    DecodingSettings(do_sample=False, no_repeat_ngram_size=0, repetition_penalty=1.8),
    DecodingSettings(do_sample=False, no_repeat_ngram_size=2),
    DecodingSettings(do_sample=False, no_repeat_ngram_size=3, repetition_penalty=1.3),
], ids=["greedy", "penalty", "no-repeat-2", "both"])
def test_greedy_group_equals_each_row_alone(settings):
    for seed in range(10):
        tokens, scores = rows_and_scores(seed)
        n = settings.no_repeat_ngram_size
        bans = [NGramBans(n, row) if n else None for row in tokens]
        got = choose(scores.clone(), settings, tokens, bans)
        expected = [int(per_row(scores[i:i + 1], settings, row).argmax())
                    for i, row in enumerate(tokens)]
        assert got == expected


def test_sampling_group_draws_only_what_each_row_alone_allows():
    """top-k 3 after the bans: every draw is one of the row's own three best allowed tokens,
    and over many draws each row uses more than one of them (it samples)."""
    settings = DecodingSettings(do_sample=True, temperature=0.7, top_k=3, top_p=1.0,
                                no_repeat_ngram_size=2, repetition_penalty=1.2)
    tokens, scores = rows_and_scores(7)
    bans = [NGramBans(2, row) for row in tokens]
    allowed = [set(torch.nonzero(~torch.isinf(per_row(scores[i:i + 1], settings, row)[0]))
                   .flatten().tolist()) for i, row in enumerate(tokens)]
    assert all(len(a) == 3 for a in allowed)
    torch.manual_seed(0)
    drawn = [set() for _ in tokens]
    for _ in range(200):
        for i, token in enumerate(choose(scores.clone(), settings, tokens, bans)):
            assert token in allowed[i]
            drawn[i].add(token)
    assert all(len(d) > 1 for d in drawn)


@pytest.mark.parametrize("temperature,top_k,top_p", [
    (0.8, 50, 0.9), (1.0, 5, 0.5), (1.3, 200, 1.0), (0.7, 0, 0.9), (0.5, 1, 0.9)])
def test_sampling_distribution_equals_transformers_warpers_over_the_vocabulary(
        temperature, top_k, top_p):
    """The top-k shortcut gives every token the probability transformers' warpers give it
    over the full vocabulary (GPT-2's 50,257 tokens, 16 rows of made-up logits)."""
    settings = DecodingSettings(do_sample=True, temperature=temperature, top_k=top_k,
                                top_p=top_p)
    scores = 3 * torch.randn((16, 50257), generator=torch.Generator().manual_seed(top_k))
    expected = torch.softmax(warpers_for(settings)(None, scores.clone()), dim=-1)
    probs, index = distribution(scores.clone(), settings)
    if index is not None:
        assert index.shape == (16, top_k)
        probs = torch.zeros_like(scores).scatter(1, index, probs)
    assert torch.allclose(probs, expected, atol=1e-6)
    assert torch.equal(probs > 0, expected > 0)


def test_top_p_keeps_each_rows_own_nucleus():
    settings = DecodingSettings(do_sample=True, temperature=1.0, top_k=0, top_p=0.5,
                                no_repeat_ngram_size=0)
    scores = torch.full((2, VOCAB), -10.0)
    scores[0, 5] = 10.0  # row 0: one token holds all the mass
    scores[1, [7, 8, 9]] = 10.0  # row 1: three equal tokens; the nucleus keeps two of them
    torch.manual_seed(0)
    seen = [set(), set()]
    for _ in range(100):
        a, b = choose(scores.clone(), settings, [[1], [1, 2]], [None, None])
        seen[0].add(a)
        seen[1].add(b)
    assert seen[0] == {5}
    assert seen[1] < {7, 8, 9} and len(seen[1]) == 2


needs_onednn = pytest.mark.skipif(not can_pack(), reason="this torch has no oneDNN linear ops")


@needs_onednn
def test_packed_fp32_model_computes_what_the_plain_model_does(tiny_model_dir):
    backend = TransformersBackend(str(tiny_model_dir), threads=1)
    backend.load()
    plain = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    kinds = [type(m).__name__ for m in backend.model.modules()]
    assert kinds.count("PackedLinear") == 4 * 2 + 1  # 4 per layer and the LM head
    assert not any(isinstance(m, Conv1D) for m in backend.model.modules())
    for block in backend.model.transformer.h:  # GPT-2's activation runs inside c_fc
        assert block.mlp.c_fc.gelu and isinstance(block.mlp.act, torch.nn.Identity)
    ids = torch.randint(300, 40000, (3, 50), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        got, want = backend.model(ids).logits, plain(ids).logits
        assert (got - want).abs().max() < 1e-4
        mask = torch.ones_like(ids)
        out = backend.model.generate(ids, attention_mask=mask, max_new_tokens=12,
                                     do_sample=False, pad_token_id=50256)
        assert out.tolist() == plain.generate(ids, attention_mask=mask, max_new_tokens=12,
                                              do_sample=False, pad_token_id=50256).tolist()


@needs_onednn
def test_the_activation_is_fused_only_where_onednn_computes_gelu_new(tiny_model_dir,
                                                                     monkeypatch):
    """The fused activation equals transformers' gelu_new within 1e-5 on one layer's real
    output; where the check fails (a oneDNN computing it differently) the MLPs keep the
    in-place activation and the linear layer computes no activation."""
    from transformers.activations import NewGELUActivation

    from bot import quant

    backend = TransformersBackend(str(tiny_model_dir), threads=1)
    backend.load()
    mlp = backend.model.transformer.h[0].mlp
    x = torch.randn(40, mlp.c_fc.in_features, generator=torch.Generator().manual_seed(2)) * 3
    with torch.inference_mode():
        fused = mlp.c_fc(x)
        mlp.c_fc.gelu = False
        plain = mlp.c_fc(x)
    assert not torch.equal(fused, plain)
    assert (fused - NewGELUActivation()(plain)).abs().max() < 1e-5

    monkeypatch.setattr(quant, "_fused_gelu_agrees", lambda linear: False)
    backend = TransformersBackend(str(tiny_model_dir), threads=1)
    backend.load()
    for block in backend.model.transformer.h:
        assert not block.mlp.c_fc.gelu and type(block.mlp.act).__name__ == "InPlaceGELU"


def test_packing_can_be_switched_off(tiny_model_dir):
    backend = TransformersBackend(str(tiny_model_dir), threads=1, pack_weights=False)
    backend.load()
    assert sum(isinstance(m, Conv1D) for m in backend.model.modules()) == 4 * 2
    assert type(backend.model.lm_head).__name__ == "Linear"
