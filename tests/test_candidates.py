"""Candidates end to end: one batched generate call, DialogRPT picks, repeats and listed words
dropped, fallbacks, /settings. Real tiny models where the model matters, a scripted backend
where the exact candidate texts matter."""

from __future__ import annotations

import asyncio
import itertools
import threading
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from bot.app import build_app, reply_rules
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.generator import QueuedGenerator
from bot.hf import TransformersBackend
from bot.quality import ReplyRules
from bot.rankers import FEEDBACK, HUMAN_LIKE, Ensemble, RankerSpec
from tests.recording import CountingGenerator, RecordingAdapter, message
from tests.test_rankers import expected_final, make_ranker_dirs

SAMPLE = DecodingSettings(do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                          no_repeat_ngram_size=0, max_new_tokens=10, candidates=6)
GREEDY = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=16)


def turn(text: str, role: Role = Role.USER) -> Turn:
    return Turn("console", "c", role, text)


@pytest.fixture(scope="module")
def ranker_dirs(tmp_path_factory) -> list[Path]:
    return make_ranker_dirs(tmp_path_factory.mktemp("rankers"))


class RecordingBackend(TransformersBackend):
    """The real backend, keeping every `model.generate` call and every candidate batch."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.model_calls: list[dict] = []
        self.batches: list[list[list[int]]] = []

    def load(self):
        super().load()
        real = self.model.generate

        def counted(*args, **kwargs):
            self.model_calls.append(kwargs)
            return real(*args, **kwargs)

        self.model.generate = counted

    def generate_candidates(self, prompt, settings, cancel, n):
        batch = super().generate_candidates(prompt, settings, cancel, n)
        self.batches.append(batch)
        return batch


class Scripted:
    """A backend answering from scripted candidate batches (character ids), counting calls."""

    eos_token_id = 50256
    n_positions = 1024

    def __init__(self, batches):
        self.batches = [list(b) for b in batches]
        self.calls: list[tuple[DecodingSettings, int]] = []

    def load(self):
        pass

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def generate(self, prompt, settings, cancel):
        return self.generate_candidates(prompt, settings, cancel, 1)[0]

    def generate_candidates(self, prompt, settings, cancel, n):
        self.calls.append((settings, n))
        batch = self.batches.pop(0)
        assert len(batch) == n, "the worker asked for a different number of candidates"
        return [self.encode(t) for t in batch]


async def run(backend, request, **kwargs):
    gen = QueuedGenerator(backend, **kwargs)
    await gen.start()
    try:
        return await gen.reply(request)
    finally:
        await gen.stop()


class ScriptedRows:
    """The batching generator (the default) on the tiny model, with each request's candidate
    rows decoding scripted texts instead of the model's choice: the worker's real batch,
    groups, judgement, retry and rankers see exactly these candidates. `calls` holds
    (settings, rows) per attempt, like `Scripted.calls`."""

    eos_token_id = 50256

    def __init__(self, tok, batches):
        self.tok = tok
        self.batches = [list(b) for b in batches]
        self.calls: list[tuple[DecodingSettings, int]] = []
        self._scripts: dict[int, list[int]] = {}

    def install(self, worker) -> None:
        def choose(rows, scores):
            for row in rows:
                if id(row) not in self._scripts:
                    group = [r for r in rows if r.group is row.group]
                    self.calls.append((row.group.settings, len(group)))
                    batch = self.batches.pop(0)
                    assert len(batch) == len(group), "a different number of candidates"
                    for member, text in zip(group, batch):
                        self._scripts[id(member)] = self.tok.encode(text)
            return [(self._scripts[id(r)] + [self.eos_token_id])[len(r.generated)]
                    for r in rows]

        worker._choose = choose


async def run_batching(tiny_model_dir, batches, request, *, tok=None, **kwargs):
    """`run` through the batching generator with scripted candidates; returns
    (reply, ScriptedRows)."""
    from bot.batching import BatchingGenerator

    tok = tok or AutoTokenizer.from_pretrained(tiny_model_dir)
    script = ScriptedRows(tok, batches)
    gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1), **kwargs)
    await gen.start()
    script.install(gen.worker)
    try:
        return await gen.reply(request), script
    finally:
        await gen.stop()


@pytest.fixture(params=["one-by-one", "batching"])
def scripted(request, tiny_model_dir):
    """scripted(batches, request, **kwargs) -> (reply, calls) through either generator."""
    async def go(batches, generation_request, **kwargs):
        if request.param == "one-by-one":
            backend = Scripted(batches)
            return await run(backend, generation_request, **kwargs), backend.calls
        got, script = await run_batching(tiny_model_dir, batches, generation_request, **kwargs)
        return got, script.calls

    return go


# --- one batched call -----------------------------------------------------------------------
async def test_n_candidates_come_from_one_generate_call(tiny_model_dir):
    backend = RecordingBackend(str(tiny_model_dir), threads=1)
    got = await run(backend, GenerationRequest("c", (turn("tell me something"),), SAMPLE))
    assert len(backend.model_calls) == 1
    assert backend.model_calls[0]["generation_config"].num_return_sequences == 6
    assert len(backend.batches) == 1 and len(backend.batches[0]) == 6
    assert got.text in {backend.decode(ids).strip() for ids in backend.batches[0]}


async def test_candidates_are_bounded_and_greedy_asks_for_one(tiny_model_dir):
    backend = Scripted([["a", "b", "c"], ["only"]])
    gen = QueuedGenerator(backend, rules=ReplyRules(max_candidates=3))
    await gen.start()
    try:
        await gen.reply(GenerationRequest("c", (turn("x"),), replace(SAMPLE, candidates=50)))
        await gen.reply(GenerationRequest("c", (turn("x"),), replace(GREEDY, candidates=5)))
    finally:
        await gen.stop()
    assert [n for _, n in backend.calls] == [3, 1]


# --- rankers pick the argmax --------------------------------------------------------------
def independent_scores(folders, prompt, candidates) -> dict[str, list[float]]:
    """Each ranker's sigmoid(logit) computed one row at a time with transformers' own pooling."""
    out = {}
    for name, folder in folders.items():
        model = AutoModelForSequenceClassification.from_pretrained(folder).eval()
        with torch.no_grad():
            out[name] = [torch.sigmoid(model(torch.tensor([prompt + c])).logits).item()
                         for c in candidates]
    return out


WEIGHTS = [
    {"r0": (FEEDBACK, 1.0)},  # one ranker only
    {"r1": (HUMAN_LIKE, 0.5)},
    {"r0": (HUMAN_LIKE, 0.5), "r1": (HUMAN_LIKE, 0.5), "r2": (FEEDBACK, 1.0)},  # both groups
    {"r1": (HUMAN_LIKE, 1.0), "r0": (FEEDBACK, 1.0), "r2": (FEEDBACK, -0.5)},  # negative
]


@pytest.mark.parametrize("kind", ["one-by-one", "batching"])
@pytest.mark.parametrize("weights", WEIGHTS)
async def test_chosen_reply_is_the_argmax_of_the_combined_score(tiny_model_dir, ranker_dirs,
                                                              weights, kind):
    from bot.batching import BatchingGenerator

    folders = {f"r{i}": str(d) for i, d in enumerate(ranker_dirs)}
    specs = [RankerSpec(name, folders[name], g, w) for name, (g, w) in weights.items()]
    history = (turn("Do you like pizza?"), turn("Yes, a lot.", Role.BOT), turn("Why?"))
    if kind == "one-by-one":
        backend = RecordingBackend(str(tiny_model_dir), threads=1)
        torch.manual_seed(1)
        got = await run(backend, GenerationRequest("c", history, SAMPLE),
                        rankers=Ensemble(specs))
        batches = backend.batches
    else:  # the candidates are rows of the batch; the worker's rules see the same batch
        gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1),
                                rankers=Ensemble(specs))
        await gen.start()
        batches = capture_candidates(gen.worker)
        try:
            torch.manual_seed(1)
            got = await gen.reply(GenerationRequest("c:1", history, SAMPLE))
        finally:
            await gen.stop()

    (batch,) = batches
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    prompt = []
    for t in history:
        prompt += tok.encode(t.text) + [tok.eos_token_id]
    kept, seen = [], set()
    for ids in batch:
        text = tok.decode(ids, skip_special_tokens=True).strip()
        if text and text not in seen:
            seen.add(text)
            kept.append((ids, text))
    assert len(kept) >= 3, "sampling should give several different candidates"
    raw = independent_scores({n: folders[n] for n in weights}, prompt, [i for i, _ in kept])
    final = [expected_final(raw, weights, i) for i in range(len(kept))]
    best = max(range(len(kept)), key=final.__getitem__)
    assert got.text == kept[best][1]
    assert list(got.token_ids) == kept[best][0]


@pytest.mark.parametrize("kind", ["one-by-one", "batching"])
async def test_weights_change_the_choice(ranker_dirs, tiny_model_dir, kind):
    """Same candidates, different weights: the winner follows the combined score."""
    texts = ["yes", "No, I hate it.", "I love pizza so much!", "What is pizza?", "maybe later"]
    tok = AutoTokenizer.from_pretrained(ranker_dirs[0])
    folders = {f"r{i}": str(d) for i, d in enumerate(ranker_dirs)}
    prompt = tok.encode("Do you like pizza?") + [tok.eos_token_id]
    raw = independent_scores(folders, prompt, [tok.encode(t) for t in texts])
    winners = set()
    for weights in WEIGHTS + [{"r2": (FEEDBACK, 1.0)}, {"r0": (HUMAN_LIKE, 1.0)}]:
        specs = [RankerSpec(name, folders[name], g, w) for name, (g, w) in weights.items()]
        request = GenerationRequest("c:1", (turn("Do you like pizza?"),),
                                    replace(SAMPLE, candidates=len(texts)))
        if kind == "one-by-one":
            got = await run(TokenScripted(tok, [texts]), request, rankers=Ensemble(specs))
        else:
            got, _ = await run_batching(tiny_model_dir, [texts], request, tok=tok,
                                        rankers=Ensemble(specs))
        final = [expected_final(raw, weights, i) for i in range(len(texts))]
        assert got.text == texts[max(range(len(texts)), key=final.__getitem__)]
        winners.add(got.text)
    assert len(winners) > 1  # the weights really decide


class TokenScripted(Scripted):
    """Scripted candidates in real GPT-2 token ids (rankers read them)."""

    def __init__(self, tok, batches):
        super().__init__(batches)
        self.tok = tok

    def encode(self, text):
        return self.tok.encode(text)

    def decode(self, ids):
        return self.tok.decode(ids)


async def test_one_candidate_never_runs_the_rankers(tiny_model_dir, ranker_dirs):
    """candidates=1 (or greedy) with rankers configured: the reply is the plain greedy one."""
    history = (turn("Hello there, how are you doing today?"),)
    plain = await run(TransformersBackend(str(tiny_model_dir), threads=1),
                      GenerationRequest("c", history, GREEDY))
    ensemble = Ensemble([RankerSpec("r0", str(ranker_dirs[0]), FEEDBACK, 1.0)])
    calls = []
    ensemble.best = lambda *a: calls.append(a) or 0  # noqa: E731
    ranked = await run(TransformersBackend(str(tiny_model_dir), threads=1),
                       GenerationRequest("c", history, replace(GREEDY, candidates=4)),
                       rankers=ensemble)
    assert ranked == plain and calls == []


# --- the same through the batching generator (the default) -------------------------------
def capture_candidates(worker) -> list[list[list[int]]]:
    """Every candidate batch the worker's reply rules see."""
    batches: list[list[list[int]]] = []
    real = worker.screen

    def screen(batch, earlier):
        batches.append([list(ids) for ids in batch])
        return real(batch, earlier)

    worker.screen = screen
    return batches


async def test_batching_candidates_are_rows_of_one_batch_after_one_prefill(tiny_model_dir):
    from bot.batching import BatchingGenerator

    gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1))
    await gen.start()
    batches = capture_candidates(gen.worker)
    history = (turn("tell me something"),)
    try:
        got = await gen.reply(GenerationRequest("c:1", history, SAMPLE))
    finally:
        await gen.stop()
    stats = gen.worker.stats
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    assert stats.prefill_tokens == len(tok.encode("tell me something")) + 1  # one prefill
    assert stats.max_batch == 6 and len(batches) == 1 and len(batches[0]) == 6
    assert got.text in {tok.decode(ids).strip() for ids in batches[0]}


# --- no repeats ---------------------------------------------------------------------------
HISTORY = (turn("hi"), turn("Hello there!", Role.BOT), turn("You said HI?"))


@pytest.mark.parametrize("order", list(itertools.permutations(
    ["hello, there", "you said hi", "something new"])))
async def test_repeats_and_parrots_are_never_sent_while_another_candidate_exists(order,
                                                                                scripted):
    got, calls = await scripted([list(order)], GenerationRequest(
        "c:1", HISTORY, replace(SAMPLE, candidates=3)))
    assert got.text == "something new" and not got.fallback
    assert len(calls) == 1


async def test_all_repeats_regenerate_once_with_sampling_then_fall_back(scripted):
    got, calls = await scripted([["HELLO THERE"], ["you said hi.", "Fresh words"]],
                                GenerationRequest("c:1", HISTORY,
                                                  replace(GREEDY, candidates=2)),
                                fallback_reply="hmm")
    assert got.text == "Fresh words"
    assert [(s.do_sample, n) for s, n in calls] == [(False, 1), (True, 2)]

    got, calls = await scripted([["hello there", "you said hi"],
                                 ["Hello there", "hello there!!"]],
                                GenerationRequest("c:1", HISTORY,
                                                  replace(SAMPLE, candidates=2)),
                                fallback_reply="hmm")
    assert got.text == "hmm" and got.fallback and got.token_ids == ()
    assert len(calls) == 2


async def test_repeat_window_zero_turns_the_rule_off(scripted):
    got, _ = await scripted([["hello there", "something new"]], GenerationRequest(
        "c:1", HISTORY, replace(SAMPLE, candidates=2)), rules=ReplyRules(repeat_window=0))
    assert got.text == "hello there"


# --- word filter --------------------------------------------------------------------------
@pytest.fixture
def blocklist(tmp_path) -> Path:
    path = tmp_path / "blocked.txt"
    path.write_text("bad\nshut up\n", encoding="utf-8")
    return path


async def test_listed_words_in_any_disguise_are_never_sent(blocklist):
    disguised = ["that is B\u0430D", "sh\u200but   UP now", "b\u00e1d", "\uff42\uff41\uff44!"]
    for order in itertools.permutations(disguised + ["a fine reply"]):
        backend = Scripted([list(order)])
        got = await run(backend, GenerationRequest("c", (turn("x"),),
                                                   replace(SAMPLE, candidates=5)),
                        rules=ReplyRules(blocklist=blocklist))
        assert got.text == "a fine reply"


async def test_listed_words_are_never_sent_by_the_batching_generator(blocklist, tiny_model_dir):
    """Eight requests at once (their candidates decode in shared batches), each with the
    listed words in disguise among five candidates: each gets the one clean candidate."""
    from bot.batching import BatchingGenerator

    disguised = ["that is B\u0430D", "sh\u200but   UP now", "b\u00e1d", "\uff42\uff41\uff44!"]
    orders = list(itertools.permutations(disguised + ["a fine reply"]))[::15]
    script = ScriptedRows(AutoTokenizer.from_pretrained(tiny_model_dir),
                          [list(order) for order in orders])
    gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1),
                            rules=ReplyRules(blocklist=blocklist), max_wait_ms=100)
    await gen.start()
    script.install(gen.worker)
    try:
        got = await asyncio.gather(*(gen.reply(GenerationRequest(
            f"c:{i}", (turn("x"),), replace(SAMPLE, candidates=5))) for i in range(len(orders))))
    finally:
        await gen.stop()
    assert [g.text for g in got] == ["a fine reply"] * len(orders)
    assert len(script.calls) == len(orders) and gen.worker.stats.max_batch >= 10


async def test_filter_off_drops_nothing(scripted):
    got, _ = await scripted([["that is bad", "a fine reply"]], GenerationRequest(
        "c:1", (turn("x"),), replace(SAMPLE, candidates=2)))
    assert got.text == "that is bad"


async def test_all_blocked_gives_the_neutral_line(blocklist, scripted):
    got, calls = await scripted([["bad", "BAD!"], ["so bad", "shut up"]], GenerationRequest(
        "c:1", (turn("x"),), replace(SAMPLE, candidates=2)),
        rules=ReplyRules(blocklist=blocklist, neutral_reply="Let's move on."))
    assert got.text == "Let's move on." and got.fallback
    assert len(calls) == 2


# --- through the pipeline -----------------------------------------------------------------
@pytest.fixture
async def scripted_bot(make_config):
    apps = []

    async def make(batches, **overrides):
        config = make_config(**overrides)
        backend = Scripted(batches)
        generator = CountingGenerator(QueuedGenerator(
            backend, fallback_reply=config.fallback_reply, rules=reply_rules(config)))
        platform = RecordingAdapter()
        app = build_app(config, [platform], generator=generator)
        await app.start()
        apps.append(app)
        return app, platform, generator, backend

    yield make
    for app in apps:
        await app.stop()


async def test_the_bots_stored_replies_are_not_repeated(scripted_bot):
    app, platform, gen, backend = await scripted_bot(
        [["I like trains", "I like trains"], ["i like TRAINS!", "Me too"],
         ["Me too.", "hm, trains"]], do_sample=True, candidates=2)
    await app.pipeline.process(message("hello"))
    await app.pipeline.process(message("what do you like?"))
    await app.pipeline.process(message("cool"))
    assert platform.texts() == ["I like trains", "Me too", "hm, trains"]


async def test_user_text_with_a_listed_word_is_stored_and_seen_as_is(scripted_bot, blocklist):
    app, platform, gen, backend = await scripted_bot(
        [["you are bad", "fair enough"]], do_sample=True, candidates=2,
        blocklist=str(blocklist))
    await app.pipeline.process(message("This is B\u0430D, shut up"))
    assert platform.texts() == ["fair enough"]
    turns = await app.store.recent("telegram", "100", 10)
    assert turns[0].role is Role.USER and turns[0].text == "This is B\u0430D, shut up"
    assert gen.requests[0].turns[0].text == "This is B\u0430D, shut up"


async def test_settings_show_and_change_candidates_within_the_maximum(scripted_bot, ranker_dirs,
                                                                      blocklist):
    app, platform, gen, backend = await scripted_bot(
        [["one", "two", "three", "four"]], do_sample=True, max_candidates=4,
        rankers=f"{ranker_dirs[0]}:0.7", blocklist=str(blocklist))
    await app.pipeline.process(message("/settings"))
    shown = platform.texts()[-1]
    assert "candidates = 1 (at most 4" in shown
    assert f"rankers = {ranker_dirs[0].name}:0.7" in shown and "word filter = on" in shown
    await app.pipeline.process(message("/settings candidates=5"))
    assert "at most 4" in platform.texts()[-1] and platform.sent[-1].private
    await app.pipeline.process(message("/settings candidates=4"))
    assert "candidates = 4*" in platform.texts()[-1]
    await app.pipeline.process(message("hi"))
    assert gen.requests[-1].settings.candidates == 4
    assert backend.calls[-1][1] == 4


def test_generation_happens_in_the_worker_thread_only(tiny_model_dir, ranker_dirs):
    """Rankers load and score in the generator's thread (never the caller's)."""
    seen: list[str] = []
    ensemble = Ensemble([RankerSpec("r0", str(ranker_dirs[0]), FEEDBACK, 1.0)])
    load, best = ensemble.load, ensemble.best
    ensemble.load = lambda *a: seen.append(threading.current_thread().name) or load(*a)
    ensemble.best = lambda *a: seen.append(threading.current_thread().name) or best(*a)
    asyncio.run(run(Scripted([["a", "b"]]), GenerationRequest(
        "c", (turn("x"),), replace(SAMPLE, candidates=2)), rankers=ensemble))
    assert seen == ["dialogbot-generator", "dialogbot-generator"]
