"""Per-channel KV cache reuse between turns (tiny fp32 model), its byte bound, forgetting, and
the stepped prompt window that keeps a channel's prefix stable."""

from __future__ import annotations

import asyncio
import mmap
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.batching import BatchingGenerator
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.hf import TransformersBackend
from bot.prompt import build_prompt, build_window
from bot.quality import ReplyRules

EOS = 50256
GREEDY = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=10)


def user(text: str, channel: str = "c") -> Turn:
    return Turn("console", channel, Role.USER, text)


@pytest.fixture
async def batcher(tiny_model_dir):
    gens = []

    async def make(**kwargs):
        kwargs.setdefault("kv_dtype", "float32")  # token parity with generate is an fp32 property
        gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1), **kwargs)
        await gen.start()
        gens.append(gen)
        return gen

    yield make
    for gen in gens:
        await gen.stop()


class FedTokens:
    """Counts what the model is fed: one entry per forward call, its number of tokens."""

    def __init__(self, model):
        self.calls: list[int] = []
        self.handle = model.transformer.wte.register_forward_hook(
            lambda module, args, out: self.calls.append(args[0].shape[-1]))

    def take(self) -> list[int]:
        calls, self.calls = self.calls, []
        return calls


async def test_second_turn_prefills_only_its_new_tokens_and_replies_as_a_cold_run(
        batcher, tiny_model_dir):
    gen = await batcher()
    fed = FedTokens(gen.backend.model)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = [user("hello there, how are you doing?")]
    first = await gen.reply(GenerationRequest("console:c", tuple(history), GREEDY))
    prompt1 = tok.encode(history[0].text) + [EOS]
    assert fed.take()[0] == len(prompt1)  # cold: the whole prompt
    history += [Turn("console", "c", Role.BOT, first.text, token_ids=first.token_ids),
                user("what are you doing this weekend?")]
    second = await gen.reply(GenerationRequest("console:c", tuple(history), GREEDY))
    prompt2 = prompt1 + list(first.token_ids) + [EOS] + tok.encode(history[2].text) + [EOS]
    # the model saw the reply's tokens except the last one when it stopped at max_new_tokens
    seen = len(prompt1) + len(first.token_ids) - (len(first.token_ids) == GREEDY.max_new_tokens)
    prefill = fed.take()[0]
    assert prefill == len(prompt2) - seen < len(prompt2) // 2
    assert gen.worker.stats.reused_tokens == seen

    # the same turn on a cold cache: everything prefilled, the same reply
    gen.forget_channel("console:c")
    assert "console:c" not in gen.worker.prefix and gen.worker.prefix.bytes_used == 0
    cold = await gen.reply(GenerationRequest("console:c", tuple(history), GREEDY))
    assert fed.take()[0] == len(prompt2)
    assert cold.token_ids == second.token_ids and cold.text == second.text

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt2]), max_new_tokens=GREEDY.max_new_tokens,
                             do_sample=False, pad_token_id=EOS)
    new = out[0, len(prompt2):].tolist()
    assert list(second.token_ids) == (new[:new.index(EOS)] if EOS in new else new)


async def test_reset_forget_and_settings_changes_drop_the_cache_through_the_pipeline(
        make_config):
    from bot.app import build_app
    from tests.recording import RecordingAdapter, message

    platform = RecordingAdapter()
    app = build_app(make_config(batching=True), [platform])
    await app.start()
    try:
        prefix = app.generator.worker.prefix
        for command in ("/reset", "/forget", "/settings max_new_tokens=5"):
            await app.pipeline.process(message("hello"))
            assert "telegram:100" in prefix
            await app.pipeline.process(message(command))
            assert "telegram:100" not in prefix, command
            assert prefix.anchor("telegram:100") == ()
    finally:
        await app.stop()


async def test_cache_stays_within_its_byte_bound_least_recently_used_evicted(batcher):
    gen = await batcher(kv_cache_mb=0.08)  # ~3 short conversations of the tiny model
    prefix = gen.worker.prefix
    for i in range(12):
        await gen.reply(GenerationRequest(f"console:{i}", (user(f"message number {i}, hi", str(i)),),
                                          GREEDY))
        assert 0 < prefix.bytes_used <= prefix.max_bytes
    assert 1 < len(prefix) < 12
    assert "console:11" in prefix and "console:0" not in prefix
    # touching an old entry protects it from the next eviction
    kept = [k for k in (f"console:{i}" for i in range(12)) if k in prefix]
    oldest = kept[0]
    i = oldest.split(":")[1]
    hits = prefix.hits
    await gen.reply(GenerationRequest(oldest, (user(f"message number {i}, hi", i),
                                               user("and again", i)), GREEDY))
    assert prefix.hits == hits + 1 and list(prefix._entries)[-1] == oldest
    await gen.reply(GenerationRequest("console:new", (user("another one " * 15, "new"),), GREEDY))
    assert oldest in prefix and kept[1] not in prefix
    assert prefix.bytes_used <= prefix.max_bytes


async def test_cache_off_stores_nothing(batcher):
    gen = await batcher(kv_cache_mb=0)
    await gen.reply(GenerationRequest("console:a", (user("hello"),), GREEDY))
    assert len(gen.worker.prefix) == 0 and gen.worker.prefix.bytes_used == 0


async def test_a_long_conversation_keeps_reusing_its_prefix_as_the_window_slides(batcher):
    """30 turns of ~40 tokens through a 400-token budget (n_positions is 1024, 624 new tokens
    asked would not fit a real reply, so the budget is set by max_new_tokens)."""
    settings = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=624)
    gen = await batcher(window_step=128)
    worker = gen.worker
    history: list[Turn] = []
    starts = []
    for i in range(30):
        history.append(user(f"turn {i}: " + "tell me about trains and boats " * 5))
        # the bot's reply, as stored: fixed ids so the test does not wait for 624 tokens
        history.append(Turn("console", "c", Role.BOT, "ok", token_ids=(482, 11, 612) * 3))
        request = GenerationRequest("console:c", tuple(history), settings)
        prompt = worker.prompt_for(request, worker.prefix.ticket())
        assert len(prompt) <= 1024 - 624
        starts.append(tuple(prompt[:8]))
    slides = sum(1 for a, b in zip(starts, starts[1:]) if a != b)
    assert 0 < slides <= 30 * 50 // 128 + 1  # the window moves in steps, not every turn


def test_window_without_step_is_build_prompt():
    turns = [[i] * 10 for i in range(1, 8)]
    assert build_window(turns, 35, EOS, 0) == build_prompt(turns, 35, EOS)


def test_window_slides_in_steps_and_holds_its_start():
    turns = [[i] * 9 for i in range(1, 8)]  # 7 turns of 10 tokens with their eos
    first = build_window(turns, 50, EOS, 20)
    assert len(first) == 30 and first[0] == 5  # over budget: slide to 50 - 20 = 30 tokens
    more = turns + [[8] * 9]
    held = build_window(more, 50, EOS, 20, anchor=first[:4])
    assert held[0] == 5 and len(held) == 40  # the same start while it fits
    even_more = more + [[9] * 9, [10] * 9]
    slid = build_window(even_more, 50, EOS, 20, anchor=first[:4])
    assert slid[0] == 8 and len(slid) == 30  # 60 > 50: slide again by a step
    assert build_window(turns[:3], 50, EOS, 20) == build_prompt(turns[:3], 50, EOS)


def test_window_keeps_the_end_of_a_single_huge_message():
    turns = [[1, 2], list(range(5000))]
    assert build_window(turns, 960, EOS, 256) == build_prompt(turns, 960, EOS)


def test_a_miss_that_shares_no_token_frees_the_stale_prefix_at_once():
    """After a window slide the cached prefix shares nothing with the prompt and never will:
    it is dropped when the miss is taken (its buffer freed before the new prompt's is
    filled), not held beside the new row until `put` replaces it. A prompt that shares
    tokens but is too short to reuse any (one token) keeps the entry."""
    import weakref

    from bot.kvcache import PrefixCache, RowKV

    prefix = PrefixCache(10**6)
    row = RowKV(torch.empty(1))
    alive = weakref.ref(row.buf)
    assert prefix.put("telegram:1", [5, 6, 7], row, prefix.ticket())
    del row
    assert prefix.take("telegram:1", [5]) == (0, None)  # shares a token: kept
    assert "telegram:1" in prefix and prefix.bytes_used == 3
    assert prefix.take("telegram:1", [8, 9, 10]) == (0, None)  # the window slid
    assert "telegram:1" not in prefix and prefix.bytes_used == 0
    assert alive() is None  # the buffer is gone, not waiting for the next put
    assert prefix.stats().misses == 2


# --- forgetting a channel's conversations --------------------------------------------------
def test_forgetting_a_channel_drops_every_conversation_inside_it():
    from bot.kvcache import PrefixCache, RowKV

    prefix = PrefixCache(10**6)
    keys = ["telegram:1", "telegram:1#u7", "telegram:1#reply-3", "telegram:10",
            "telegram:10#u7", "discord:1"]
    for key in keys:
        ticket = prefix.ticket()
        assert prefix.put(key, [1, 2, 3], RowKV(torch.empty(1)), ticket)
        prefix.set_anchor(key, [1, 2, 3], ticket)
    prefix.forget("telegram:1")
    left = ["telegram:10", "telegram:10#u7", "discord:1"]
    assert [k for k in keys if k in prefix] == left
    assert [k for k in keys if prefix.anchor(k)] == left
    prefix.forget("telegram:10#u7")  # one conversation: the channel's own key stays
    assert [k for k in keys if k in prefix] == ["telegram:10", "discord:1"]


def test_a_request_that_started_before_the_forget_stores_nothing_for_it():
    from bot.kvcache import PrefixCache, RowKV

    prefix = PrefixCache(10**6)
    before = {key: prefix.ticket() for key in ("telegram:1#u7", "telegram:1", "telegram:2")}
    prefix.forget("telegram:1")
    after = prefix.ticket()
    for key, ticket in before.items():
        prefix.put(key, [1, 2], RowKV(torch.empty(1)), ticket)
        prefix.set_anchor(key, [1, 2], ticket)
    assert "telegram:1#u7" not in prefix and "telegram:1" not in prefix
    assert prefix.anchor("telegram:1#u7") == () and prefix.anchor("telegram:1") == ()
    assert "telegram:2" in prefix  # another channel is not affected
    assert prefix.put("telegram:1#u7", [1, 2], RowKV(torch.empty(1)), after)  # started after


async def test_forget_during_a_generation_keeps_its_cache_out_and_its_ticket_is_pruned(batcher):
    gen = await batcher(max_wait_ms=0)
    prefix = gen.worker.prefix
    long = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=300)
    key = "telegram:1#u7"
    task = asyncio.create_task(gen.reply(GenerationRequest(key, (user("tell me a story"),),
                                                           long)))
    while gen.worker.stats.decode_steps < 3:
        await asyncio.sleep(0.001)
    gen.forget_channel("telegram:1")  # the channel: every conversation in it
    await task
    assert key not in prefix and prefix.anchor(key) == ()
    await gen.reply(GenerationRequest(key, (user("tell me a story"),), GREEDY))
    assert key in prefix and prefix.anchor(key) != ()  # requests after the forget store
    assert prefix._forgotten == {}  # no request in flight is older: the forget time is gone


# --- the cache layout: joins and leaves copy nothing of the other rows ------------------------
def moved_bytes(fn) -> tuple[int, int]:
    """(bytes allocated, bytes written by copying ops) while `fn` runs, from torch's profiler."""
    from torch.profiler import ProfilerActivity, profile

    copying = {"aten::copy_", "aten::clone", "aten::cat", "aten::index_put_", "aten::stack",
               "aten::index_select", "aten::slice_scatter", "aten::contiguous", "aten::to"}
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                 record_shapes=True) as prof:
        fn()
    allocated = written = 0
    for event in prof.events():
        allocated += max(0, event.self_cpu_memory_usage)
        if event.name in copying and event.input_shapes and event.input_shapes[0]:
            written += 4 * int(torch.tensor(event.input_shapes[0]).prod())
    return allocated, written


async def test_a_join_or_a_leave_does_not_copy_the_other_rows(tiny_model_dir):
    """15 rows decode with 100, then 800 tokens of history each; a 16th request joins (its
    prefill and the regroup) and a row leaves: what is allocated or copied does not grow with
    the other rows' history."""
    from bot.batching import BatchWorker
    from bot.generator import _Job

    loop = asyncio.get_running_loop()
    worker = BatchWorker(TransformersBackend(str(tiny_model_dir), threads=1), "fallback",
                         max_batch_size=16, kv_dtype="float32")
    worker.load()
    long = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=100)
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)

    def job(key: str, history: int, settings=long) -> _Job:
        ids = tuple(tok.encode(" word" * history)[:history])
        turns = (Turn("console", key, Role.BOT, "x", token_ids=ids), user("a question"))
        return _Job(GenerationRequest(f"console:{key}", turns, settings), loop.create_future(),
                    loop)

    figures = {}
    with torch.inference_mode():
        for history in (100, 800):
            worker._admit([job(f"{history}-{i}", history) for i in range(15)])
            worker._regroup()
            worker._step()
            assert len(worker._rows) == 15 and min(r.kv_len for r in worker._rows) > history
            joiner = job(f"{history}-join", 20)
            join = moved_bytes(lambda: (worker._admit([joiner]), worker._regroup()))
            assert len(worker._rows) == 16
            worker._rows[3].job.cancel.set()  # a row leaves at the next regroup
            leave = moved_bytes(worker._regroup)
            assert len(worker._rows) == 15
            figures[history] = join, leave
            for row in worker._rows:
                row.job.cancel.set()
            worker._regroup()
    (join100, leave100), (join800, leave800) = figures[100], figures[800]
    assert join800 == join100, figures  # the joining row's own prefill only
    assert leave100 == leave800 == (0, 0), figures


# --- parity across window slides and evictions; half precision --------------------------------
@pytest.fixture(scope="module")
def short_window_dir(tmp_path_factory):
    """The tiny model with 128 positions: a conversation slides its window every few turns."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.modelkit import write_tokenizer

    torch.manual_seed(3)
    config = GPT2Config(vocab_size=50257, n_positions=128, n_layer=2, n_embd=64, n_head=2,
                        bos_token_id=EOS, eos_token_id=EOS, pad_token_id=EOS,
                        tie_word_embeddings=False)
    folder = tmp_path_factory.mktemp("models") / "tiny-128"
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    write_tokenizer(folder)
    return folder


def generate_ids(model, prompt: list[int], max_new_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(
            1, len(prompt), dtype=torch.long), max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=EOS)
    new = out[0, len(prompt):].tolist()
    return new[:new.index(EOS)] if EOS in new else new


async def test_every_turn_equals_generate_across_window_slides_and_evictions(
        short_window_dir):
    """Two conversations take turns through a cache that holds one of them (each turn evicts
    the other's cache) and a 128-position model whose window slides every few turns; every
    reply equals `generate` on the prompt the worker built, cache hit or not."""
    settings = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=8)
    model = AutoModelForCausalLM.from_pretrained(short_window_dir).eval()
    tok = AutoTokenizer.from_pretrained(short_window_dir)
    gen = BatchingGenerator(TransformersBackend(str(short_window_dir), threads=1),
                            window_step=32, kv_dtype="float32", kv_cache_mb=0.15,
                            rules=ReplyRules(repeat_window=0))  # each reply is the greedy one
    await gen.start()
    worker, prompts = gen.worker, []
    real = worker.prompt_for
    worker.prompt_for = lambda request, ticket=0: prompts.append(real(request, ticket)) \
        or prompts[-1]
    try:
        histories = {"a": [], "b": []}
        starts = {"a": [], "b": []}
        for turn in range(14):
            for name, history in histories.items():
                history.append(user(f"{name} says {turn}: do you like trains?", name))
                got = await gen.reply(GenerationRequest(f"console:{name}", tuple(history),
                                                        settings))
                prompt = prompts[-1]
                assert list(got.token_ids) == generate_ids(model, prompt, 8), (name, turn)
                starts[name].append(tuple(prompt[:6]))
                history.append(Turn("console", name, Role.BOT, got.text,
                                    token_ids=got.token_ids))
        stats = gen.cache_stats()
    finally:
        await gen.stop()
    slides = sum(a != b for s in starts.values() for a, b in zip(s, s[1:]))
    assert slides >= 4  # the windows moved
    assert stats.hits >= 4 and stats.misses >= 14  # reused, and evicted (or slid) often
    assert len(tok.encode("a says 1: do you like trains?")) > 8


def needs_kernel(path: str) -> None:
    from bot import decode_kernel

    if path == "kernel" and not decode_kernel.cpu_supported():
        pytest.skip("the decode kernel needs AVX2")


@pytest.mark.parametrize("half, bound, path", [
    ("float16", 2e-3, "widened"),  # 11 significant bits, widened to fp32 for attention
    ("float16", 2e-3, "as stored"),  # attended in float16 (where that measures faster)
    ("float16", 2e-3, "kernel"),  # decode steps in bot/csrc/decode_attention.cpp
    ("bfloat16", 2e-2, "widened"),  # 8 significant bits, widened
    ("bfloat16", 2e-2, "as stored"),  # attended in bf16 (where that measures faster)
])
async def test_half_precision_keys_and_values_give_the_fp32_replies_over_30_turns(
        tiny_model_dir, measured_attention, half, bound, path):
    """The same 30-turn conversation (the fp32 replies fed back to both) through half and
    float32 storage: the greedy replies are the same; the first-token logits stay within
    `bound` of each other."""
    needs_kernel(path)
    as_stored = path == "as stored"
    measured_attention(True, FAST if as_stored else SLOW, FAST if as_stored else SLOW,
                       kernel=1e-5 if path == "kernel" else float("inf"))
    gens = {}
    for dtype in ("float32", half):
        gens[dtype] = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1),
                                        kv_dtype=dtype)
        await gens[dtype].start()
    assert (gens[half].worker._scratch is None) == as_stored  # the path under test
    assert (gens[half].worker._kernel is not None) == (path == "kernel")
    logits: dict[str, list[torch.Tensor]] = {"float32": [], half: []}
    for dtype, gen in gens.items():
        real = gen.worker._choose
        gen.worker._choose = lambda rows, scores, real=real, seen=logits[dtype]: (
            seen.append(scores[0].clone()) if not rows[0].generated else None) or real(rows,
                                                                                      scores)
    settings = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=12)
    history: list[Turn] = []
    differ = []
    try:
        for turn in range(30):
            history.append(user(f"turn {turn}: what do you think about {turn * 7} trains?"))
            full = await gens["float32"].reply(GenerationRequest("c:1", tuple(history),
                                                                 settings))
            other = await gens[half].reply(GenerationRequest("c:1", tuple(history),
                                                             settings))
            if other.token_ids != full.token_ids:
                differ.append(turn)
            history.append(Turn("console", "c", Role.BOT, full.text, token_ids=full.token_ids))
        assert gens[half].cache_stats().hits >= 25  # the half cache was reused
    finally:
        for gen in gens.values():
            await gen.stop()
    assert differ == []
    worst = max(float((a - b).abs().max()) for a, b in zip(logits["float32"], logits[half]))
    assert 0 < worst < bound, worst


async def test_the_cache_hit_rate_is_exported_to_prometheus(make_config):
    from prometheus_client.parser import text_string_to_metric_families

    from bot.app import build_app
    from tests.recording import RecordingAdapter, message
    from tests.test_metrics import get

    app = build_app(make_config(batching=True, metrics_port=0, metrics_host="127.0.0.1"),
                    [RecordingAdapter()])
    await app.start()
    try:
        for text in ("hello", "how are you?", "and now?"):
            await app.pipeline.process(message(text))
        status, body = await get(f"http://127.0.0.1:{app.ops.port}/metrics")
    finally:
        await app.stop()
    samples = {(s.name, s.labels.get("result")): s.value
               for family in text_string_to_metric_families(body) for s in family.samples}
    assert samples[("dialogbot_kv_cache_lookups_total", "miss")] == 1
    assert samples[("dialogbot_kv_cache_lookups_total", "hit")] == 2
    assert samples[("dialogbot_kv_cache_bytes", None)] > 0


def attention_dtypes(monkeypatch) -> list[tuple[torch.dtype, torch.dtype]]:
    """Record (query dtype, keys dtype) of every attention call from now on."""
    seen = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(query, key, value, **kwargs):
        seen.append((query.dtype, key.dtype))
        return real(query, key, value, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    return seen


@pytest.fixture
def measured_attention(monkeypatch):
    """Make this CPU look like one with (or without) native bf16 whose attention on stored
    bfloat16 / float16 keys/values measures (as stored, widened) seconds, and the decode
    kernel `kernel` seconds (never faster by default); the per-process measurements are taken
    again."""
    import bot.quant
    from bot import kvcache

    def pretend(native: bool, bf16: tuple[float, float] = (1.0, 1.0),
                fp16: tuple[float, float] = (1.0, 1.0), kernel: float = float("inf")):
        timings = {torch.bfloat16: bf16, torch.float16: fp16}
        monkeypatch.setattr(bot.quant, "cpu_supports_bf16", lambda: native)
        monkeypatch.setattr(kvcache, "time_attention",
                            lambda heads, head_dim, dtype: timings[dtype])
        monkeypatch.setattr(kvcache, "time_decode_kernel",
                            lambda module, heads, head_dim: (kernel, min(fp16)))
        kvcache.attention_times.cache_clear()
        kvcache.decode_kernel_times.cache_clear()

    yield pretend
    kvcache.attention_times.cache_clear()
    kvcache.decode_kernel_times.cache_clear()


FAST, SLOW = (1e-4, 2e-4), (3e-4, 2e-4)  # (as stored, widened) seconds


@pytest.mark.parametrize("kv_dtype, native, bf16, fp16, stored, attends", [
    # AVX512-BF16 + AMX: bf16 attention measured faster -> stored bf16, attended in bf16
    ("auto", True, FAST, SLOW, torch.bfloat16, torch.bfloat16),
    # AVX512-BF16 without AMX (AMD EPYC here: 449 vs 111 us) -> float16 widened to fp32
    ("auto", True, (4.5e-4, 1.1e-4), SLOW, torch.float16, torch.float32),
    ("auto", True, (1.0e-4, 1.05e-4), SLOW, torch.float16, torch.float32),  # not 10% faster
    ("auto", False, FAST, SLOW, torch.float16, torch.float32),  # no native bf16: no timing
    # no bf16 (Intel Ice Lake here: 259 vs 399 us over 800 tokens): float16 as stored
    ("auto", False, SLOW, (2.6e-4, 4e-4), torch.float16, torch.float16),
    # bf16 as stored pays, but not 10% over float16 as stored: the more precise float16
    ("auto", True, FAST, (1.05e-4, 2e-4), torch.float16, torch.float16),
    # asked for bfloat16 / float16: stored as asked, attended the faster way
    ("bfloat16", True, (4.5e-4, 1.1e-4), FAST, torch.bfloat16, torch.float32),
    ("bfloat16", True, FAST, SLOW, torch.bfloat16, torch.bfloat16),
    ("float16", True, FAST, SLOW, torch.float16, torch.float32),
    ("float16", False, SLOW, FAST, torch.float16, torch.float16),
])
async def test_keys_and_values_are_attended_as_stored_only_where_that_measures_faster(
        batcher, monkeypatch, measured_attention, kv_dtype, native, bf16, fp16, stored,
        attends):
    """`auto` stores bfloat16 only where the CPU has native bf16 AND attending on bf16
    directly measures at least 10% faster than the faster float16 path; float16 elsewhere.
    Half-precision keys/values are attended as stored (no widening scratch) where that
    measures at least 10% faster than widening to fp32. Either way the greedy reply equals
    the fp32 cache's and the kept buffer has the stored dtype."""
    measured_attention(native, bf16, fp16)
    full = await batcher(kv_dtype="float32")
    gen = await batcher(kv_dtype=kv_dtype)
    seen = attention_dtypes(monkeypatch)
    request = GenerationRequest("c:1", (user("do you like trains?"),), GREEDY)
    expected = await full.reply(request)
    seen.clear()
    got = await gen.reply(request)
    assert got.token_ids == expected.token_ids
    worker = gen.worker
    assert worker.kv_dtype == stored
    assert (worker._scratch is None) == (attends == stored)
    assert set(seen) == {(attends, attends)}
    assert worker.prefix.stats().entries == 1
    assert next(iter(worker.prefix._entries.values())).row.buf.dtype == stored


@pytest.mark.parametrize("bf16, fp16, stored, attends", [
    (FAST, SLOW, torch.bfloat16, torch.bfloat16),
    (SLOW, SLOW, torch.float16, torch.float32),  # e.g. AMD EPYC: widened to fp32, not to bf16
    (SLOW, FAST, torch.float16, torch.float16),  # float16 attended as stored
])
async def test_a_bf16_model_attends_in_fp32_where_bf16_attention_is_slow(
        tiny_model_dir, monkeypatch, measured_attention, bf16, fp16, stored, attends):
    """DIALOGBOT_QUANTIZE=bf16 computes the layers in bf16; its attention runs in bf16 only
    where that measures faster, otherwise in float16 on the stored keys/values where that
    does, or on keys/values and a query widened to fp32; the result goes back to bf16. The
    reply is whole either way."""
    measured_attention(True, bf16, fp16)
    gen = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1,
                                                quantize="bf16"))
    await gen.start()
    seen = attention_dtypes(monkeypatch)
    try:
        settings = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=6)
        got = await gen.reply(GenerationRequest("c:1", (user("do you like trains?"),),
                                                settings))
    finally:
        await gen.stop()
    assert got.token_ids and got.text.strip()
    assert gen.worker.kv_dtype == stored
    assert next(gen.backend.model.parameters()).dtype == torch.bfloat16
    assert set(seen) == {(attends, attends)}


class CountingKernel:
    """The decode kernel, counting its calls."""

    def __init__(self, module):
        self.module, self.calls = module, 0

    def decode_attention(self, *args):
        self.calls += 1
        return self.module.decode_attention(*args)


@pytest.mark.parametrize("quantize", ["none", "int8"])
@pytest.mark.parametrize("kernel, used", [(1e-5, True), (0.95e-4, False)])
async def test_decode_steps_attend_in_the_kernel_only_where_it_measures_faster(
        tiny_model_dir, monkeypatch, measured_attention, kernel, used, quantize):
    """Float16 keys/values on a CPU: where the decode kernel measures at least 10% faster
    than torch's faster way, every decode step's attention runs in it (one call per layer
    for all rows, none through torch's attention; prefills stay with torch), and the
    replies of 3 channels decoded together equal the fp32 cache's, token for token (int8:
    whole replies). Not 10% faster: torch attends."""
    needs_kernel("kernel")
    measured_attention(False, SLOW, (3e-4, 1e-4), kernel=kernel)  # widened: 1e-4
    gens = {}
    for dtype in ("float32", "float16"):
        gens[dtype] = BatchingGenerator(TransformersBackend(str(tiny_model_dir), threads=1,
                                                            quantize=quantize),
                                        kv_dtype=dtype)
        await gens[dtype].start()
    worker = gens["float16"].worker
    assert (worker._kernel is not None) == used
    if used:
        worker._kernel = CountingKernel(worker._kernel)
    settings = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=8)
    requests = [GenerationRequest(f"c:{i}", (user(f"channel {i}: do you like {i * 3} trains?"),
                                             user("tell me more", f"c{i}")), settings)
                for i in range(3)]
    try:
        expected = [await gens["float32"].reply(r) for r in requests]
        seen = attention_dtypes(monkeypatch)
        got = await asyncio.gather(*(gens["float16"].reply(r) for r in requests))
    finally:
        for gen in gens.values():
            await gen.stop()
    steps = max(len(r.token_ids) for r in got) - 1  # the first token comes from the prefill
    layers = gens["float16"].backend.model.config.n_layer
    if used:
        assert worker._kernel.calls >= layers * steps > 0
        assert len(seen) <= layers * len(requests)  # torch: the prefills only
    else:
        assert len(seen) >= layers * (len(requests) + steps)
    assert all(r.token_ids and r.text.strip() for r in got)
    if quantize == "none":
        assert [r.token_ids for r in got] == [r.token_ids for r in expected]


def test_half_precision_attention_is_timed_on_the_models_shape_against_widening():
    """The measurement behind the choice runs both paths for real on this CPU: two positive
    durations per half dtype, and deciding twice for one shape measures once (bfloat16 only
    on a CPU with native bf16)."""
    from bot import kvcache

    for dtype in (torch.float16, torch.bfloat16):
        as_stored, widened = kvcache.time_attention(4, 16, dtype, lengths=(32, 64), reps=3)
        assert as_stored > 0 and widened > 0
    kvcache.attention_times.cache_clear()
    calls = []
    real = kvcache.time_attention
    try:
        kvcache.time_attention = lambda *a: calls.append(a) or real(*a, lengths=(32, 64),
                                                                    reps=3)
        cpu = torch.device("cpu")
        for dtype in (torch.float16, torch.bfloat16):
            first = kvcache.attends_as_stored(cpu, dtype, 4, 16)
            assert kvcache.attends_as_stored(cpu, dtype, 4, 16) == first
        assert not kvcache.attends_as_stored(cpu, torch.float32, 4, 16)
        assert calls == [(4, 16, torch.float16)] + (
            [(4, 16, torch.bfloat16)] if kvcache.native_bf16(cpu) else [])
    finally:
        kvcache.time_attention = real
        kvcache.attention_times.cache_clear()


def _vma_of(address: int) -> dict[str, str]:
    """The /proc/self/smaps entry of the mapping that holds `address` (with its range)."""
    entry: dict[str, str] | None = None
    for line in Path("/proc/self/smaps").read_text().splitlines():
        first = line.split()[0] if line.split() else ""
        if "-" in first and ":" not in first:
            start, end = (int(x, 16) for x in first.split("-"))
            entry = {"start": str(start), "end": str(end)} if start <= address < end else None
        elif entry is not None and ":" in line:
            name, _, value = line.partition(":")
            entry[name] = value.strip()
            if name == "VmFlags":
                return entry
    raise AssertionError(f"no mapping holds {address:#x}")


@pytest.mark.skipif(not Path("/proc/self/smaps").exists(), reason="needs Linux")
def test_a_row_buffer_stays_at_small_pages_and_holds_only_its_written_tokens():
    """A DialoGPT-medium row buffer (the whole window, ~100 MB) is advised against huge pages
    (where THP is "always", one touched byte would make 2 MiB resident), and writing 150
    tokens makes about 150 tokens' worth resident."""
    from bot.kvcache import KVLayout

    page = mmap.PAGESIZE
    layout = KVLayout(layers=24, heads=16, head_dim=64, capacity=1024, dtype=torch.bfloat16,
                      device=torch.device("cpu"))
    rows = [layout.new_row()]
    rows.append(rows[0].copy(0))  # a candidate's copy is advised too
    mappings = []
    for row in rows:
        start = row.buf.data_ptr()
        end = start + row.buf.numel() * row.buf.element_size()
        inside = -(-start // page) * page  # the buffer's first whole page
        vma = _vma_of(inside)
        assert "nh" in vma["VmFlags"].split()  # MADV_NOHUGEPAGE
        assert int(vma["start"]) == inside
        assert int(vma["end"]) >= end // page * page
        mappings.append(inside)
    rows[0].buf[:, :, :, :150] = 1
    vma = _vma_of(mappings[0])
    resident = int(vma["Rss"].split()[0]) * 1024
    assert resident <= layout.resident_bytes(150) * 1.3, (resident, layout.resident_bytes(150))
