"""The batching generator on the tiny fp32 model: every row equals a solo run, settings stay
per request, requests join and leave mid-batch, the loop keeps ticking, the seam's contract
holds; and the whole pipeline test file runs with it switched on."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.batching import BatchingGenerator
from bot.errors import BusyError, GenerationTimeout
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.generator import QueuedGenerator
from bot.hf import TransformersBackend
from tests import test_pipeline as pipeline_tests

EOS = 50256
GREEDY = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=16)
TEXTS = ["hello there", "what is the meaning of life, the universe and everything? tell me",
         "ok", "I like trains very much, do you like them too or not really at all?",
         "good morning", "the weather is lovely today, shall we go for a walk in the park"]


def request(text: str, settings: DecodingSettings = GREEDY, channel: str = "c") -> GenerationRequest:
    return GenerationRequest(f"console:{channel}", (Turn("console", channel, Role.USER, text),),
                             settings)


@pytest.fixture(scope="module")
def hf(tiny_model_dir):
    return (AutoTokenizer.from_pretrained(tiny_model_dir),
            AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval())


def solo(hf, text: str, settings: DecodingSettings = GREEDY, **extra) -> list[int]:
    """`model.generate` on the prompt alone, end-of-text and what follows removed."""
    tok, model = hf
    prompt = tok.encode(text) + [EOS]
    kwargs = dict(max_new_tokens=settings.max_new_tokens, do_sample=settings.do_sample,
                  pad_token_id=EOS, repetition_penalty=settings.repetition_penalty,
                  no_repeat_ngram_size=settings.no_repeat_ngram_size)
    kwargs.update(extra)
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt),
                             dtype=torch.long), **kwargs)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOS)] if EOS in new else new


@pytest.fixture
async def batcher(tiny_model_dir):
    gens = []

    async def make(**kwargs):
        kwargs.setdefault("max_wait_ms", 50)
        kwargs.setdefault("kv_dtype", "float32")  # token parity with generate is an fp32 property
        gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1), **kwargs)
        await gen.start()
        gens.append(gen)
        return gen

    yield make
    for gen in gens:
        await gen.stop()


async def test_every_batched_greedy_row_equals_its_solo_run(batcher, hf, tiny_model_dir):
    gen = await batcher()
    settings = [DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=n)
                for n in (4, 16, 9, 24, 1, 12)]
    got = await asyncio.gather(*(gen.reply(request(t, s, str(i)))
                                 for i, (t, s) in enumerate(zip(TEXTS, settings))))
    # all prefilled in one packed pass and decoded together, but the max_new_tokens=1 row:
    # it is done after its prefill
    assert gen.worker.stats.max_batch == len(TEXTS) - 1
    assert gen.worker.stats.prefill_passes == 1
    local = QueuedGenerator(TransformersBackend(str(tiny_model_dir), threads=1))
    await local.start()
    try:
        for text, s, g in zip(TEXTS, settings, got):
            expected = solo(hf, text, s)
            assert list(g.token_ids) == expected, text
            assert len(g.token_ids) <= s.max_new_tokens
            alone = await local.reply(request(text, s))
            assert alone.token_ids == g.token_ids and alone.text == g.text
    finally:
        await local.stop()


def _repeats_a_bigram(ids: list[int]) -> bool:
    pairs = list(zip(ids, ids[1:]))
    return len(pairs) != len(set(pairs))


def _favour(a: int, b: int):
    """A forward hook on lm_head that makes the model love tokens a and b (a a little more):
    greedy decoding then says "a a a a ...", repeating the bigram (a, a)."""

    def hook(module, args, output):
        output[..., a] += 50.0
        output[..., b] += 49.0
        return output

    return hook


async def test_each_request_keeps_its_own_decoding_settings(batcher, hf):
    tok, model = hf
    text = TEXTS[3]
    a, b = tok.encode(" yes")[0], tok.encode(" no")[0]
    long = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=12)
    no_repeat = replace(long, no_repeat_ngram_size=2)
    penalty = replace(long, repetition_penalty=1.8)
    top1 = DecodingSettings(do_sample=True, temperature=0.7, top_k=1, top_p=1.0,
                            no_repeat_ngram_size=0, max_new_tokens=12)
    three = replace(long, max_new_tokens=3)
    sampled = DecodingSettings(do_sample=True, temperature=0.9, top_k=40, top_p=0.9,
                               max_new_tokens=20)
    gen = await batcher()
    hooks = [m.lm_head.register_forward_hook(_favour(a, b)) for m in (model, gen.backend.model)]
    try:
        plan = [long, no_repeat, penalty, top1, three, sampled]
        got = await asyncio.gather(*(gen.reply(request(text, s, str(i)))
                                     for i, s in enumerate(plan)))
        assert gen.worker.stats.max_batch == len(plan)
        greedy, nr, pen, t1, short, samp = (list(g.token_ids) for g in got)
        assert greedy == solo(hf, text, long) == [a] * 12  # greedy repeats the bigram (a, a)
        assert nr == solo(hf, text, no_repeat) and nr[:3] == [a, a, b] and nr != greedy
        assert not _repeats_a_bigram(tok.encode(text) + [EOS] + nr)
        assert pen == solo(hf, text, penalty) and pen != greedy
        assert t1 == greedy
        assert short == [a] * 3
        assert 0 < len(samp) <= 20 and samp.count(a) > 1  # its own no_repeat_ngram_size=3:
        full = tok.encode(text) + [EOS] + samp
        trigrams = list(zip(full, full[1:], full[2:]))
        assert len(trigrams) == len(set(trigrams))
    finally:
        for hook in hooks:
            hook.remove()


async def test_a_request_joins_mid_batch_and_a_short_one_leaves_early(batcher, hf):
    gen = await batcher(max_wait_ms=0)
    long = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=120)
    short = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=4)
    done: list[str] = []

    async def ask(name, text, settings):
        result = await gen.reply(request(text, settings, name))
        done.append(name)
        return result

    first = asyncio.create_task(ask("first", TEXTS[1], long))
    while gen.worker.stats.decode_steps < 5:
        await asyncio.sleep(0.001)
    joined = asyncio.create_task(ask("joined", TEXTS[3], long))
    early = asyncio.create_task(ask("early", TEXTS[5], short))
    results = await asyncio.gather(first, joined, early)
    assert gen.worker.stats.max_batch == 3
    assert done.index("early") < done.index("first")  # it left without waiting for the batch
    for (text, settings), got in zip([(TEXTS[1], long), (TEXTS[3], long), (TEXTS[5], short)],
                                     results):
        assert list(got.token_ids) == solo(hf, text, settings)


async def test_a_request_arriving_while_15_decode_starts_before_their_next_step(batcher, hf):
    """Continuous batching: the 16th request's prefill starts right after the decode step in
    progress when it arrived (no decode step starts while it waits), then all 16 decode
    together, and its reply is the one it would get alone."""
    gen = await batcher(max_wait_ms=0)
    long = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=60)
    stats = gen.worker.stats
    texts = [f"{TEXTS[i % len(TEXTS)]} number {i}" for i in range(16)]
    first = [asyncio.create_task(gen.reply(request(texts[i], long, str(i)))) for i in range(15)]
    while sum(rows == 15 for _, rows, _ in stats.steps) < 3:
        await asyncio.sleep(0.001)
    marker = len(stats.admissions)
    last = await gen.reply(request(texts[15], long, "15"))
    await asyncio.gather(*first)
    arrived, admitted = stats.admissions[marker]
    assert admitted >= arrived
    started_while_waiting = [s for s in stats.steps if arrived < s[0] < admitted]
    assert started_while_waiting == []
    assert stats.max_batch == 16 and any(rows == 16 for _, rows, _ in stats.steps)
    assert list(last.token_ids) == solo(hf, texts[15], long)


async def test_event_loop_keeps_ticking_while_a_batch_decodes(batcher):
    gen = await batcher()
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    settings = DecodingSettings(do_sample=False, max_new_tokens=150)
    await asyncio.gather(*(gen.reply(request("tell me a long story " * 30, settings, str(i)))
                           for i in range(4)))
    elapsed = time.perf_counter() - start
    stop.set()
    await tick
    assert elapsed > 0.2, "generation too quick to say anything about the loop"
    assert len(lags) > elapsed / 0.05
    assert max(lags) < min(0.15, elapsed / 3)


async def test_timeout_drops_the_request_from_the_batch_and_others_finish(batcher, hf):
    gen = await batcher(timeout=0.05, max_wait_ms=0)
    endless = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=500)
    with pytest.raises(GenerationTimeout):
        await gen.reply(request("again and again " * 100, endless, "slow"))
    gen.timeout = 30
    steps = gen.worker.stats.decode_steps
    got = await gen.reply(request(TEXTS[0], GREEDY, "next"))
    assert list(got.token_ids) == solo(hf, TEXTS[0], GREEDY)
    assert gen.worker.stats.decode_steps - steps <= GREEDY.max_new_tokens  # not 500 more
    assert not gen.worker._rows


async def test_freed_heap_memory_goes_back_every_32_steps_and_when_the_batch_empties(
        batcher, monkeypatch):
    """glibc keeps the heap the steps' temporaries leave free; the worker returns it to the
    operating system every 32 decode steps of a burst and once when the batch runs empty,
    not at every step."""
    calls: list[int] = []
    gen = await batcher()
    stats = gen.worker.stats
    monkeypatch.setattr("bot.batching.release_freed_memory",
                        lambda: calls.append(stats.decode_steps))
    for new_tokens in (5, 75):
        before, released = stats.decode_steps, len(calls)
        settings = replace(GREEDY, max_new_tokens=new_tokens)
        await gen.reply(request("again and again " * 3, settings))
        steps = stats.decode_steps - before
        for _ in range(200):  # the last one follows the reply, in the worker thread
            if len(calls) > released + steps // 32:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # and nothing more comes
        periodic = [before + 32 * i for i in range(1, steps // 32 + 1)]
        assert calls[released:] == periodic + [before + steps], (new_tokens, steps)
    assert steps >= 64  # the long reply crossed the periodic release twice


async def test_full_queue_raises_busy(batcher):
    gen = await batcher(queue_size=1)
    first = asyncio.create_task(gen.reply(request("hello", GREEDY, "a")))
    await asyncio.sleep(0)
    assert gen.queue_depth == 1
    with pytest.raises(BusyError):
        await gen.reply(request("hi", GREEDY, "b"))
    assert (await first).text
    assert gen.queue_depth == 0


async def test_empty_reply_is_retried_with_sampling_then_the_fallback_line(batcher):
    gen = await batcher(fallback_reply="hmm")
    calls = {"n": 0, "eos_until": 10**9}

    def eos_first(module, args, output):
        calls["n"] += 1
        if calls["n"] <= calls["eos_until"]:
            output[..., EOS] = 1e4  # the model says nothing
        return output

    handle = gen.backend.model.lm_head.register_forward_hook(eos_first)
    try:
        got = await gen.reply(request("hello", GREEDY, "x"))
        assert got.fallback and got.text == "hmm" and got.token_ids == ()
        assert calls["n"] == 2  # one prefill, one retry prefill (no decode step: EOS at once)
        assert gen.worker.stats.reused_tokens > 0  # the retry reused the prompt's cache
        calls.update(n=0, eos_until=1)  # greedy says nothing, the sampled retry speaks
        got = await gen.reply(request("hello", GREEDY, "y"))
        assert not got.fallback and got.text
    finally:
        handle.remove()


# --- the pipeline test file, with the batching generator switched on ---------------------------
@pytest.fixture
def make_config(make_config):
    def make(**overrides):
        overrides.setdefault("batching", True)
        return make_config(**overrides)

    return make


bot = pipeline_tests.bot
for _name in dir(pipeline_tests):
    if _name.startswith("test_"):
        globals()[f"{_name}__batching"] = getattr(pipeline_tests, _name)


async def test_the_pipeline_uses_the_batching_generator_when_on(bot):
    app, platform, gen = await bot()
    assert isinstance(gen.inner, BatchingGenerator)
    from tests.recording import message

    await app.pipeline.process(message("hello"))
    await app.pipeline.process(message("how are you?"))
    assert gen.inner.worker.stats.reused_tokens > 0  # the second turn reused the first's cache
