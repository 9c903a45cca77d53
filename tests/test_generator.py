"""The generator on a real (tiny, random-weight) DialoGPT-shaped model and the real tokenizer."""

from __future__ import annotations

import asyncio
import statistics
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from bot.errors import BusyError, ConfigError, GenerationTimeout
from bot.events import DecodingSettings, GenerationRequest, Role, Turn
from bot.generator import QueuedGenerator
from bot.hf import TransformersBackend

GREEDY = DecodingSettings(do_sample=False, no_repeat_ngram_size=0, repetition_penalty=1.0,
                          max_new_tokens=16)


def turn(text: str, role: Role = Role.USER, ids=None) -> Turn:
    return Turn("console", "c", role, text, token_ids=ids)


@pytest.fixture
async def generator(tiny_model_dir):
    gen = QueuedGenerator(TransformersBackend(str(tiny_model_dir), threads=1), timeout=60)
    await gen.start()
    yield gen
    await gen.stop()


@pytest.fixture(scope="module")
def model_card(tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    return tok, model


def card_reply(tok, model, ids: torch.Tensor, max_new_tokens: int) -> tuple[str, list[int]]:
    """The DialoGPT model card's loop: generate after the prompt, decode only the new tokens."""
    with torch.inference_mode():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False,
                             pad_token_id=tok.eos_token_id)
    new = out[0, ids.shape[-1]:].tolist()
    return tok.decode(new, skip_special_tokens=True), new


async def test_greedy_reply_to_three_turns_equals_the_model_card_loop(generator, model_card):
    tok, model = model_card
    texts = ["Hello there, how are you doing today?", "I'm fine, thanks. And you?",
             "Pretty good. What are you up to this weekend?"]
    ids = torch.cat([tok.encode(t + tok.eos_token, return_tensors="pt") for t in texts], -1)
    expected, new = card_reply(tok, model, ids, GREEDY.max_new_tokens)
    assert expected.strip(), "the tiny model should say something under greedy decoding"

    roles = [Role.USER, Role.BOT, Role.USER]
    got = await generator.reply(GenerationRequest(
        "console:c", tuple(turn(t, r) for t, r in zip(texts, roles)), GREEDY))
    assert got.text == expected.strip()
    assert list(got.token_ids) == [i for i in new if i != tok.eos_token_id][:len(got.token_ids)]
    assert got.prompt_tokens == ids.shape[-1]


async def test_conversation_keeps_the_generated_ids_of_bot_turns(generator, model_card):
    """Turn after turn, the prompt holds exactly the ids the model produced (not re-encoded)."""
    tok, model = model_card
    history: list[Turn] = []
    card_ids = torch.empty((1, 0), dtype=torch.long)
    for text in ["hi!", "what's your favourite food?", "why is that?"]:
        history.append(turn(text))
        card_ids = torch.cat([card_ids, tok.encode(text + tok.eos_token, return_tensors="pt")], -1)
        expected, new = card_reply(tok, model, card_ids, GREEDY.max_new_tokens)
        got = await generator.reply(GenerationRequest("console:c", tuple(history), GREEDY))
        assert got.text == expected.strip()
        kept = [i for i in new if i != tok.eos_token_id]
        card_ids = torch.cat([card_ids, torch.tensor([kept + [tok.eos_token_id]])], -1)
        history.append(turn(got.text, Role.BOT, got.token_ids))


async def test_history_far_over_the_window_keeps_the_newest_turns(generator, tiny_model_dir):
    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    history = tuple(turn(f"message number {i} " + "word " * 30) for i in range(200))
    settings = DecodingSettings(do_sample=False, max_new_tokens=40)
    got = await generator.reply(GenerationRequest("console:c", history, settings))
    assert got.prompt_tokens <= 1024 - 40
    # the newest turn is in; the oldest cannot be
    encoded = generator.worker.encode_turns(GenerationRequest("console:c", history, settings))
    assert sum(len(t) + 1 for t in encoded) > 4000
    assert got.prompt_tokens > 1024 - 40 - len(encoded[-1]) - 1
    assert got.text


async def test_a_20000_character_message_is_answered(generator):
    huge = ("The quick brown fox jumps over the lazy dog. " * 500)[:20_000]
    settings = DecodingSettings(do_sample=False, max_new_tokens=8)
    got = await generator.reply(GenerationRequest("console:c", (turn(huge),), settings))
    assert got.text and got.prompt_tokens == 1024 - 8


async def test_event_loop_keeps_ticking_while_generating(generator):
    lags: list[float] = []
    stop = asyncio.Event()

    async def ticker() -> None:
        while not stop.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lags.append(time.perf_counter() - before - 0.01)

    tick = asyncio.create_task(ticker())
    history = tuple(turn("tell me a long story " * 40) for _ in range(3))
    start = time.perf_counter()
    await generator.reply(GenerationRequest(
        "console:c", history, DecodingSettings(do_sample=False, max_new_tokens=200)))
    elapsed = time.perf_counter() - start
    stop.set()
    await tick
    assert elapsed > 0.2, "generation too quick to say anything about the loop"
    assert len(lags) > elapsed / 0.05  # it ticked all along
    assert max(lags) < min(0.15, elapsed / 3), (max(lags), statistics.median(lags))


async def test_timeout_abandons_generation_and_the_worker_recovers(tiny_model_dir):
    gen = QueuedGenerator(TransformersBackend(str(tiny_model_dir), threads=1), timeout=0.05)
    await gen.start()
    try:
        long = tuple(turn("again and again " * 200) for _ in range(2))
        with pytest.raises(GenerationTimeout):
            await gen.reply(GenerationRequest(
                "console:c", long, DecodingSettings(do_sample=False, max_new_tokens=500)))
        gen.timeout = 30
        start = time.perf_counter()
        got = await gen.reply(GenerationRequest("console:c", (turn("hi"),), GREEDY))
        assert got.text
        assert time.perf_counter() - start < 5  # the abandoned job was cancelled, not finished
    finally:
        await gen.stop()


class ScriptedBackend:
    """A backend double that answers from a script, to test the worker's empty-reply rule."""

    eos_token_id = 50256
    n_positions = 1024

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls: list[DecodingSettings] = []
        self.gate = threading.Event()
        self.gate.set()

    def load(self):
        pass

    def encode(self, text):
        return [ord(c) for c in text]

    def decode(self, ids):
        return "".join(chr(i) for i in ids)

    def generate(self, prompt, settings, cancel):
        self.gate.wait()
        self.calls.append(settings)
        return [ord(c) for c in self.replies.pop(0)]


async def test_empty_reply_is_retried_with_sampling_then_falls_back():
    backend = ScriptedBackend(["   ", "ok then"])
    gen = QueuedGenerator(backend, fallback_reply="hmm")
    await gen.start()
    got = await gen.reply(GenerationRequest("k", (turn("x"),), GREEDY))
    assert got.text == "ok then" and not got.fallback
    assert [c.do_sample for c in backend.calls] == [False, True]

    backend.replies = ["", " \n "]
    got = await gen.reply(GenerationRequest("k", (turn("x"),), GREEDY))
    assert got.text == "hmm" and got.fallback and got.token_ids == ()
    await gen.stop()


async def test_full_queue_raises_busy():
    backend = ScriptedBackend(["a"] * 10)
    backend.gate.clear()  # hold the worker
    gen = QueuedGenerator(backend, queue_size=2)
    await gen.start()
    first = asyncio.create_task(gen.reply(GenerationRequest("k", (turn("x"),), GREEDY)))
    second = asyncio.create_task(gen.reply(GenerationRequest("k", (turn("y"),), GREEDY)))
    await asyncio.sleep(0.05)
    assert gen.queue_depth == 2
    with pytest.raises(BusyError):
        await gen.reply(GenerationRequest("k", (turn("z"),), GREEDY))
    backend.gate.set()
    assert (await first).text == "a" and (await second).text == "a"
    assert gen.queue_depth == 0
    await gen.stop()


async def test_a_directory_without_weights_stops_with_one_clear_line(tmp_path):
    gen = QueuedGenerator(TransformersBackend(str(tmp_path / "nothing-here")))
    with pytest.raises(ConfigError) as err:
        await gen.start()
    message = str(err.value)
    assert "DIALOGBOT_MODEL" in message and "local directory" in message
    assert "\n" not in message


async def test_hub_id_offline_stops_with_one_clear_line(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    gen = QueuedGenerator(TransformersBackend("microsoft/DialoGPT-medium"))
    with pytest.raises(ConfigError) as err:
        await gen.start()
    assert "DIALOGBOT_MODEL='microsoft/DialoGPT-medium'" in str(err.value)
    assert "HF_HUB_OFFLINE=1" in str(err.value)


# --- start-up without the hub --------------------------------------------------------------
@pytest.fixture
async def no_hub(monkeypatch, tmp_path):
    """The Hugging Face hub at an address that accepts connections and never answers (a
    firewalled or dead network), an empty cache, offline mode unset: what a bot without
    network sees, whether or not this machine has one."""
    import huggingface_hub.constants as hub

    from bot import hf

    held: list[asyncio.StreamWriter] = []

    async def hold(reader, writer):
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(hub, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "ENDPOINT", f"http://127.0.0.1:{port}")
    monkeypatch.setattr(hub, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(hf, "_probes", {})
    yield tmp_path / "hub-cache"
    for writer in held:
        writer.close()
    server.close()


async def test_a_hub_id_without_network_stops_in_seconds_with_one_line(no_hub, caplog):
    gen = QueuedGenerator(TransformersBackend("microsoft/DialoGPT-medium"))
    started = time.perf_counter()
    with pytest.raises(ConfigError) as err:
        await gen.start()
    assert time.perf_counter() - started < 10  # huggingface_hub alone retries for ~50 s
    message = str(err.value)
    assert message.startswith("DIALOGBOT_MODEL='microsoft/DialoGPT-medium'")
    assert "cannot be downloaded" in message and "\n" not in message and len(message) < 300
    assert not [r for r in caplog.records if "Retrying" in r.getMessage()]


async def test_a_cached_hub_model_loads_when_the_hub_cannot_be_reached(no_hub, tiny_model_dir):
    """The hub is down but the model was downloaded before: it loads from the cache at once."""
    import shutil

    snapshot = no_hub / "models--microsoft--DialoGPT-medium" / "snapshots" / "0123abcd"
    shutil.copytree(tiny_model_dir, snapshot)
    (snapshot.parent.parent / "refs").mkdir()
    (snapshot.parent.parent / "refs" / "main").write_text("0123abcd")
    gen = QueuedGenerator(TransformersBackend("microsoft/DialoGPT-medium", threads=1))
    started = time.perf_counter()
    await gen.start()
    try:
        assert time.perf_counter() - started < 15
        got = await gen.reply(GenerationRequest("console:c", (turn("hi"),), GREEDY))
        assert got.text
    finally:
        await gen.stop()
