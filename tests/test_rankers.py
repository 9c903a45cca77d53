"""DialogRPT rankers on tiny random-weight DialogRPT-shaped models (GPT2ForSequenceClassification,
one label, pad = end-of-text) saved with save_pretrained and loaded with from_pretrained."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bot.config import load_config
from bot.errors import ConfigError
from bot.rankers import (FEEDBACK, HUMAN_LIKE, DialogRPTRanker, Ensemble, RankerSpec, combine,
                         parse_rankers)
from tests.modelkit import EOS, make_model_dir
from tests.test_generator import no_hub  # noqa: F401 - a fixture

PAIRS = [
    ("I love NLP!", "Here's a free textbook (URL) in case anyone needs it."),
    ("I love NLP!", "Me too!"),
    ("Hello, how are you?<|endoftext|>Fine, and you?", "Not bad at all, thanks for asking"),
    ("what's up", "nothing"),
]


def make_ranker_dirs(root: Path, count: int = 3) -> list[Path]:
    """Tiny DialogRPT-shaped rankers with their score head scaled up, so random models give
    scores spread over (0, 1) instead of all close to 0.5."""
    dirs = []
    for seed in range(count):
        folder = root / f"ranker-{seed}"
        make_model_dir(folder, "tiny", seed=100 + seed, kind="ranker")
        model = AutoModelForSequenceClassification.from_pretrained(folder)
        with torch.no_grad():
            model.score.weight.mul_(40)
        model.save_pretrained(folder)
        dirs.append(folder)
    return dirs


@pytest.fixture(scope="module")
def ranker_dirs(tmp_path_factory) -> list[Path]:
    return make_ranker_dirs(tmp_path_factory.mktemp("rankers"))


@pytest.fixture(scope="module")
def tok(ranker_dirs):
    return AutoTokenizer.from_pretrained(ranker_dirs[0])


@functools.cache
def card_model(folder: Path):
    return (AutoTokenizer.from_pretrained(folder),
            AutoModelForSequenceClassification.from_pretrained(folder).eval())


def card_score(folder: Path, context: str, response: str) -> float:
    """The DialogRPT model card, verbatim in substance."""
    tokenizer, model = card_model(Path(folder))
    model_input = tokenizer.encode(context + "<|endoftext|>" + response, return_tensors="pt")
    with torch.no_grad():
        result = model(model_input, return_dict=True)
    return torch.sigmoid(result.logits).item()


def loaded(folder: Path, group: str = FEEDBACK, weight: float = 1.0) -> DialogRPTRanker:
    ranker = DialogRPTRanker(RankerSpec(folder.name, str(folder), group, weight))
    ranker.load()
    return ranker


def context_ids(tok, context: str) -> list[int]:
    """The generator's prompt form: each turn's ids followed by end-of-text."""
    ids: list[int] = []
    for part in context.split("<|endoftext|>"):
        ids += tok.encode(part) + [EOS]
    return ids


def test_score_equals_the_model_card_way(ranker_dirs, tok):
    ranker = loaded(ranker_dirs[0])
    for context, response in PAIRS:
        expected = card_score(ranker_dirs[0], context, response)
        got = ranker.score(context_ids(tok, context), [tok.encode(response)])
        assert got == pytest.approx([expected], abs=1e-6), (context, response)
    spread = [card_score(ranker_dirs[0], c, r) for c, r in PAIRS]
    assert max(spread) - min(spread) > 0.05  # the check above compares different numbers


def test_batched_scores_equal_one_by_one(ranker_dirs, tok):
    context = context_ids(tok, "Hi there<|endoftext|>hello!<|endoftext|>What are you doing?")
    candidates = [tok.encode(t) for t in (
        "ok", "Just reading a very long book about the history of the world, you?",
        "Nothing much.", "lol", "I am cooking dinner for my family tonight")]
    for folder in ranker_dirs[:2]:
        ranker = loaded(folder)
        batched = ranker.score(context, candidates)
        alone = [ranker.score(context, [c])[0] for c in candidates]
        assert batched == pytest.approx(alone, abs=1e-5)
        assert len(set(round(s, 4) for s in batched)) == len(candidates)


def test_a_context_over_the_window_keeps_its_end(ranker_dirs, tok):
    ranker = loaded(ranker_dirs[0])
    long_context = context_ids(tok, "the quick brown fox jumps over the lazy dog " * 250)
    assert len(long_context) > 2000
    candidate = tok.encode("That is a lot of foxes.")
    got = ranker.score(long_context, [candidate])[0]
    tail = long_context[-(1024 - len(candidate)):]
    _, model = card_model(ranker_dirs[0])
    with torch.no_grad():
        logit = model(torch.tensor([tail + candidate])).logits
    assert got == pytest.approx(torch.sigmoid(logit).item(), abs=1e-6)


def expected_final(scores: dict[str, list[float]], weights: dict[str, tuple[str, float]],
                   i: int) -> float:
    """DialogRPT JointScorer.core, written out: weighted averages divided by the sum of the
    weights, prior x cond, a group without rankers = 1."""
    prior = [(w, scores[k][i]) for k, (g, w) in weights.items() if g == HUMAN_LIKE]
    cond = [(w, scores[k][i]) for k, (g, w) in weights.items() if g == FEEDBACK]
    p = sum(w * s for w, s in prior) / sum(w for w, _ in prior) if prior else 1
    c = sum(w * s for w, s in cond) / sum(w for w, _ in cond) if cond else 1
    return p * c


@pytest.mark.parametrize("weights", [
    {"updown": (FEEDBACK, 1.0)},
    {"human-vs-rand": (HUMAN_LIKE, 0.5)},
    {"human-vs-rand": (HUMAN_LIKE, 0.5), "human-vs-machine": (HUMAN_LIKE, 0.5),
     "updown": (FEEDBACK, 1.0), "depth": (FEEDBACK, 0.48), "width": (FEEDBACK, -0.5)},
    {"human-vs-rand": (HUMAN_LIKE, 2.0), "updown": (FEEDBACK, 1.0), "width": (FEEDBACK, -0.5)},
])
def test_combine_is_dialogrpts_ensemble(weights):
    scores = {"human-vs-rand": [0.9, 0.2, 0.5], "human-vs-machine": [0.1, 0.8, 0.5],
              "updown": [0.3, 0.6, 0.7], "depth": [0.5, 0.1, 0.9], "width": [0.9, 0.4, 0.2]}
    specs = [RankerSpec(k, k, g, w) for k, (g, w) in weights.items()]
    got = combine({k: scores[k] for k in weights}, specs)
    assert got == pytest.approx([expected_final(scores, weights, i) for i in range(3)])


def test_negative_weight_divides_by_the_plain_sum_of_weights():
    specs = [RankerSpec("updown", "u", FEEDBACK, 1.0), RankerSpec("width", "w", FEEDBACK, -0.5)]
    # (1*0.8 - 0.5*0.4) / (1 - 0.5) = 1.2, not / 1.5
    assert combine({"updown": [0.8], "width": [0.4]}, specs) == pytest.approx([1.2])


def test_parse_rankers_names_weights_and_sources(tmp_path):
    specs = parse_rankers("human-vs-rand:0.5, updown , width:-0.25")
    assert [(s.name, s.source, s.group, s.weight) for s in specs] == [
        ("human-vs-rand", "microsoft/DialogRPT-human-vs-rand", HUMAN_LIKE, 0.5),
        ("updown", "microsoft/DialogRPT-updown", FEEDBACK, 1.0),
        ("width", "microsoft/DialogRPT-width", FEEDBACK, -0.25)]
    (spec,) = parse_rankers("depth")
    assert spec.weight == 0.48 and spec.group == FEEDBACK
    (spec,) = parse_rankers("human-vs-machine")
    assert spec.weight == 0.5 and spec.group == HUMAN_LIKE
    local = tmp_path / "DialogRPT-human-vs-machine"
    (spec,) = parse_rankers(f"{local}:0.7")
    assert (spec.source, spec.group, spec.weight) == (str(local), HUMAN_LIKE, 0.7)
    (spec,) = parse_rankers(str(tmp_path / "my-ranker"))
    assert (spec.name, spec.group, spec.weight) == ("my-ranker", FEEDBACK, 1.0)
    (spec,) = parse_rankers("microsoft/DialogRPT-updown:2")
    assert (spec.source, spec.weight) == ("microsoft/DialogRPT-updown", 2.0)
    assert parse_rankers("") == () and parse_rankers(" , ") == ()


@pytest.mark.parametrize("value", ["updown,updown:2", "updown:1,width:-1", "updown:nan"])
def test_bad_ranker_lists_are_refused_with_one_line(value):
    with pytest.raises(ConfigError) as err:
        load_config(rankers=value)
    assert "DIALOGBOT_RANKERS" in str(err.value) and "\n" not in str(err.value)


def test_a_missing_or_wrong_model_is_a_config_error(tmp_path, tiny_model_dir):
    with pytest.raises(ConfigError, match="DIALOGBOT_RANKERS"):
        Ensemble(parse_rankers(str(tmp_path / "nowhere"))).load()
    with pytest.raises(ConfigError, match="not a DialogRPT ranker"):
        Ensemble(parse_rankers(str(tiny_model_dir))).load()  # a DialoGPT language model


def test_ensemble_best_is_the_argmax_of_the_combined_score(ranker_dirs, tok):
    context = context_ids(tok, "Do you like pizza?")
    candidates = [tok.encode(t) for t in ("yes", "No, I hate it.", "I love pizza so much!",
                                          "What is pizza?")]
    specs = [RankerSpec("a", str(ranker_dirs[0]), HUMAN_LIKE, 0.5),
             RankerSpec("b", str(ranker_dirs[1]), FEEDBACK, 1.0),
             RankerSpec("c", str(ranker_dirs[2]), FEEDBACK, -0.5)]
    ensemble = Ensemble(specs)
    ensemble.load()
    texts = ["yes", "No, I hate it.", "I love pizza so much!", "What is pizza?"]
    raw = {s.name: [card_score(Path(s.source), "Do you like pizza?", t) for t in texts]
           for s in specs}
    weights = {s.name: (s.group, s.weight) for s in specs}
    final = [expected_final(raw, weights, i) for i in range(len(texts))]
    assert ensemble.scores(context, candidates) == pytest.approx(final, abs=1e-5)
    assert ensemble.best(context, candidates) == max(range(len(final)), key=final.__getitem__)


@pytest.mark.parametrize("entry, why", [
    ("{tmp}/nowhere", "no such local directory"),
    ("{tmp}/empty", "the directory has no config.json"),
    ("some-org/no-such-ranker", "cannot be downloaded"),
])
async def test_a_bad_ranker_entry_stops_start_up_with_one_short_line(entry, why, tmp_path,
                                                                     tiny_model_dir, no_hub):
    import time

    from bot.generator import QueuedGenerator
    from bot.hf import TransformersBackend

    (tmp_path / "empty").mkdir()
    gen = QueuedGenerator(TransformersBackend(str(tiny_model_dir), threads=1),
                          rankers=Ensemble(parse_rankers(entry.format(tmp=tmp_path))))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        await gen.start()
    message = str(err.value)
    assert time.perf_counter() - started < 10
    assert message.startswith("DIALOGBOT_RANKERS") and why in message
    assert "\n" not in message and len(message) < 200, message
