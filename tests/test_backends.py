"""Each backend/precision option (DIALOGBOT_GENERATOR_BACKEND, DIALOGBOT_QUANTIZE) loads and
answers through the same pipeline, honours the decoding settings, and refuses combinations
that cannot run with one clear line. CTranslate2 tests skip when the ct2 extra is missing."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from bot.app import build_app, make_generator
from bot.ct2 import ct2_available
from bot.errors import ConfigError
from bot.events import DecodingSettings, Role
from bot.quant import cpu_supports_bf16
from tests.modelkit import EOS, make_model_dir
from tests.recording import RecordingAdapter, message

needs_ct2 = pytest.mark.skipif(
    not ct2_available(), reason="ctranslate2 not installed (pip install '.[ct2]'; make test does)")
no_bf16 = pytest.mark.skipif(not cpu_supports_bf16(), reason="this CPU has no native bf16")
BACKENDS = [  # the model backends, one request at a time (QueuedGenerator)
    pytest.param(dict(quantize="none", batching=False), id="torch-fp32"),
    pytest.param(dict(quantize="int8", batching=False), id="torch-int8"),
    pytest.param(dict(quantize="bf16", batching=False), id="torch-bf16", marks=no_bf16),
    pytest.param(dict(generator_backend="ct2"), id="ct2-int8", marks=needs_ct2),
]
GENERATORS = BACKENDS + [  # and the torch precisions under the batching generator
    pytest.param(dict(quantize="none", batching=True), id="torch-fp32-batching"),
    pytest.param(dict(quantize="int8", batching=True), id="torch-int8-batching"),
    pytest.param(dict(quantize="bf16", batching=True), id="torch-bf16-batching", marks=no_bf16),
]


@pytest.fixture(scope="session")
def never_eos_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model, but end-of-text never wins: every reply runs to max_new_tokens."""
    return make_model_dir(tmp_path_factory.mktemp("models") / "tiny-never-eos", "tiny",
                          never_eos=True)


@pytest.fixture
def backend_config(make_config, never_eos_dir, tmp_path, monkeypatch):
    """make_config on the never-EOS model with the CTranslate2 cache in this test's HF_HOME."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))

    def make(**overrides):
        return make_config(**{"model": str(never_eos_dir), **overrides})

    return make


async def run_bot(config, texts_by_channel):
    """Send each (channel, text) through the pipeline; return (platform, stored turns)."""
    platform = RecordingAdapter()
    app = build_app(config, [platform])
    await app.start()
    try:
        for channel, text in texts_by_channel:
            await app.pipeline.process(message(text, channel=channel))
        turns = {channel: await app.store.recent("telegram", channel, 50)
                 for channel, _ in texts_by_channel}
    finally:
        await app.stop()
    return platform, turns, app.generator


@pytest.mark.parametrize("options", GENERATORS)
async def test_backend_answers_through_the_pipeline_with_settings_honoured(
        backend_config, options):
    config = backend_config(max_new_tokens=9, **options)
    platform, turns, generator = await run_bot(
        config, [("1", "hello there"), ("2", "hello there"), ("1", "how are you?")])
    batched = options.get("batching", True) and options.get("generator_backend") != "ct2"
    assert type(generator).__name__ == ("BatchingGenerator" if batched else "QueuedGenerator")
    assert len(platform.sent) == 3
    assert all(r.text.strip() and r.text == r.text.strip() for r in platform.sent)
    bots = [t for t in turns["1"] + turns["2"] if t.role is Role.BOT]
    assert len(bots) == 3
    for turn in bots:  # max_new_tokens: exactly 9 generated ids, no end-of-text among them
        assert len(turn.token_ids) == 9 and EOS not in turn.token_ids
        assert generator.backend.decode(list(turn.token_ids)).strip() == turn.text
    # greedy is deterministic: the same history in two channels gives the same reply
    assert turns["1"][1].text == turns["2"][1].text
    assert turns["1"][3].token_ids != turns["1"][1].token_ids  # the context did change


def greedy(**kw) -> DecodingSettings:
    return DecodingSettings(**{"do_sample": False, "no_repeat_ngram_size": 0, **kw})


@pytest.mark.parametrize("options", BACKENDS)
async def test_backend_honours_sampling_and_repetition_settings(backend_config, options):
    backend = make_generator(backend_config(**options)).backend
    backend.load()
    prompt = backend.encode("Hello, how are you today?") + [EOS]
    never = threading.Event()
    plain = backend.generate(prompt, greedy(max_new_tokens=120), never)
    assert len(plain) == 120 and backend.generate(prompt, greedy(max_new_tokens=120),
                                                  never) == plain
    # top_k=1 sampling is greedy whatever the temperature: top_k reaches the model (not in
    # bf16, whose 8-bit mantissa makes exact ties among the tiny model's logits: top-k keeps
    # every tied token and sampling picks one, where greedy takes the first)
    top1 = DecodingSettings(do_sample=True, top_k=1, temperature=1.5, no_repeat_ngram_size=0,
                            max_new_tokens=120)
    if options.get("quantize") != "bf16":
        assert backend.generate(prompt, top1, never) == plain
    # sampling is on: several candidates from one call are not all the same
    sampled = backend.generate_candidates(prompt, DecodingSettings(max_new_tokens=20), never, 4)
    assert len(sampled) == 4 and all(len(ids) == 20 for ids in sampled)
    assert len({tuple(ids) for ids in sampled}) > 1
    # the random model repeats itself in 120 greedy tokens; a repetition penalty reduces it
    penalised = backend.generate(prompt, greedy(max_new_tokens=120, repetition_penalty=3.0),
                                 never)
    repeats = len(plain) - len(set(plain))
    assert repeats > 0 and len(penalised) - len(set(penalised)) < repeats
    # a cancelled generation stops early
    cancelled = threading.Event()
    cancelled.set()
    assert len(backend.generate(prompt, greedy(max_new_tokens=120), cancelled)) < 120


def test_conv1d_to_linear_keeps_the_model_exact(never_eos_dir):
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D

    from bot.quant import conv1d_to_linear

    model = AutoModelForCausalLM.from_pretrained(never_eos_dir).eval()
    ids = torch.tensor([[15496, 995, EOS, 40, 716]])
    with torch.inference_mode():
        before = model(ids).logits
        assert conv1d_to_linear(model) == 4 * model.config.n_layer
        after = model(ids).logits
    assert not any(isinstance(m, Conv1D) for m in model.modules())
    assert torch.allclose(before, after, atol=1e-5)


def test_gelu_in_place_is_bit_identical_and_leaves_training_to_autograd(never_eos_dir):
    """The served model's activation runs in place: the logits are bit-identical to the
    model as transformers builds it; with autograd recording (training) it computes as
    written, so gradients are the same too."""
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.activations import NewGELUActivation

    from bot.quant import gelu_in_place

    ids = torch.tensor([[15496, 995, EOS, 40, 716, 257, 3797, 13] * 8])
    plain = AutoModelForCausalLM.from_pretrained(never_eos_dir).eval()
    served = AutoModelForCausalLM.from_pretrained(never_eos_dir).eval()
    assert gelu_in_place(served) == served.config.n_layer
    assert not any(isinstance(m, NewGELUActivation) for m in served.modules())
    with torch.inference_mode():
        assert torch.equal(plain(ids).logits, served(ids).logits)
        x = torch.randn(64, 4096) * 4
        assert torch.equal(NewGELUActivation()(x), served.transformer.h[0].mlp.act(x))
    grads = []
    for model in (plain, served):
        model.zero_grad()
        model(ids, labels=ids).loss.backward()
        grads.append(model.transformer.h[0].mlp.c_fc.weight.grad)
    assert torch.equal(*grads)


def test_int8_model_is_quantized(never_eos_dir):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from bot.hf import TransformersBackend

    backend = TransformersBackend(str(never_eos_dir), threads=1, quantize="int8")
    backend.load()
    quantized = [m for m in backend.model.modules() if isinstance(m, DynamicLinear)]
    assert len(quantized) == 4 * 2 + 1  # 4 per layer and the LM head


def test_int8_token_embedding_is_the_fp32_one_rounded_per_row(never_eos_dir):
    """The int8 model's token embedding: every row within half a step (its own scale) of
    the fp32 row, the model's other parts unchanged, and replies still come."""
    import torch
    from transformers import AutoModelForCausalLM

    from bot.hf import TransformersBackend

    plain = AutoModelForCausalLM.from_pretrained(never_eos_dir).eval()
    backend = TransformersBackend(str(never_eos_dir), threads=1, quantize="int8")
    backend.load()
    wte = backend.model.transformer.wte
    assert type(wte).__name__ == "Int8Embedding" and wte.rows.dtype == torch.int8
    ids = torch.arange(plain.config.vocab_size)
    with torch.inference_mode():
        want = plain.transformer.wte(ids)
        got = wte(ids)
    step = want.abs().amax(dim=1, keepdim=True) / 127
    assert ((got - want).abs() <= step / 2 + 1e-7).all()
    assert not torch.equal(got, want)  # rounded, really
    assert torch.equal(backend.model.transformer.wpe.weight, plain.transformer.wpe.weight)
    out = backend.model.generate(torch.tensor([[15496, 995, EOS]]), max_new_tokens=5,
                                 do_sample=False, pad_token_id=EOS)
    assert out.shape == (1, 8)


@pytest.mark.parametrize("overrides, words", [
    (dict(quantize="fp16"), "DIALOGBOT_QUANTIZE=fp16 needs a CUDA device"),
    (dict(quantize="int8", device="cuda"), "CPU only"),
    (dict(generator_backend="ct2", quantize="bf16"), "always runs int8"),
])
def test_impossible_combinations_are_config_errors(make_config, overrides, words):
    if overrides.get("generator_backend") == "ct2" and not ct2_available():
        pytest.skip("ctranslate2 not installed")
    with pytest.raises(ConfigError, match=words):
        make_generator(make_config(**overrides))


def test_unknown_backend_or_precision_is_rejected(make_config):
    with pytest.raises(ConfigError, match="DIALOGBOT_QUANTIZE"):
        make_config(quantize="int4")
    with pytest.raises(ConfigError, match="DIALOGBOT_GENERATOR_BACKEND"):
        make_config(generator_backend="onnx")
    assert make_config(quantize="INT8", generator_backend="CT2").quantize == "int8"


def test_bf16_on_a_cpu_without_it_is_a_config_error(make_config, monkeypatch):
    import bot.quant

    monkeypatch.setattr(bot.quant, "cpu_supports_bf16", lambda: False)
    with pytest.raises(ConfigError, match="DIALOGBOT_QUANTIZE=bf16"):
        make_generator(make_config(quantize="bf16"))


def test_ct2_missing_names_the_extra(make_config, monkeypatch):
    import bot.ct2

    monkeypatch.setattr(bot.ct2, "ct2_available", lambda: False)
    with pytest.raises(ConfigError, match=r"GENERATOR_BACKEND=ct2 .*ct2\]"):
        make_generator(make_config(generator_backend="ct2"))


@needs_ct2
def test_ct2_conversion_is_cached_next_to_the_hf_cache(backend_config, tmp_path, monkeypatch):
    import ctranslate2

    from bot.ct2 import converted_dir

    config = backend_config(generator_backend="ct2")
    first = make_generator(config).backend
    first.load()
    assert first.converted and first.path == converted_dir(config.model)
    assert first.path.parent == tmp_path / "hf" / "dialogbot-ct2"
    assert first.path.name.endswith("-int8") and (first.path / "model.bin").is_file()
    stamp = (first.path / "model.bin").stat().st_mtime_ns

    def refuse(*args, **kwargs):
        raise AssertionError("converted again")

    monkeypatch.setattr(ctranslate2.converters, "TransformersConverter", refuse)
    second = make_generator(config).backend
    second.load()
    assert not second.converted and second.path == first.path
    assert (second.path / "model.bin").stat().st_mtime_ns == stamp
    prompt = second.encode("hi") + [EOS]
    assert first.generate(prompt, greedy(max_new_tokens=5), threading.Event()) == \
        second.generate(prompt, greedy(max_new_tokens=5), threading.Event())


@needs_ct2
def test_ct2_bad_model_is_a_config_error(make_config, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    (tmp_path / "empty").mkdir()
    backend = make_generator(make_config(generator_backend="ct2",
                                         model=str(tmp_path / "empty"))).backend
    with pytest.raises(ConfigError, match="DIALOGBOT_MODEL"):
        backend.load()
    assert not list((tmp_path / "hf").glob("dialogbot-ct2/*"))  # nothing half-written left
