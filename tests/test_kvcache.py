"""Per-channel KV cache reuse between turns (tiny fp32 model), its byte bound, forgetting, and
the stepped prompt window that keeps a channel's prefix stable."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.batching import BatchingGenerator
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.hf import TransformersBackend
from bot.prompt import build_prompt, build_window

EOS = 50256
GREEDY = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, max_new_tokens=10)


def user(text: str, channel: str = "c") -> Turn:
    return Turn("console", channel, Role.USER, text)


@pytest.fixture
async def batcher(tiny_model_dir):
    gens = []

    async def make(**kwargs):
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
    gen = await batcher(kv_cache_mb=0.04)  # ~3 short conversations (tiny model, float16)
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
