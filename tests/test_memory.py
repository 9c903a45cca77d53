"""One copy of the weights: loading the DialoGPT-small shape with packed fp32 weights or int8
keeps the process's memory at one (converted) model, measured with psutil and the kernel's
peak RSS in a fresh process (each load is its own process, so nothing else counts)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.modelkit import make_model_dir

MEASURE = textwrap.dedent("""
    import gc, json, sys
    from pathlib import Path
    import psutil, torch
    from bot.hf import TransformersBackend, load_tokenizer

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    load_tokenizer(sys.argv[1])  # imports and the tokenizer are not the model
    gc.collect()
    process = psutil.Process()
    before = process.memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    backend = TransformersBackend(sys.argv[1], quantize=sys.argv[2], threads=1)
    backend.load()
    with torch.inference_mode():
        backend.model(input_ids=torch.randint(300, 40000, (1, 100)))
        if sys.argv[3:] == ["every-token"]:  # a long-running bot looks up most of the vocab
            vocab = backend.model.config.vocab_size
            for begin in range(0, vocab, 1024):
                ids = torch.arange(begin, min(begin + 1024, vocab))
                backend.model.get_input_embeddings()(ids)
    print(json.dumps(dict(peak=peak() - before, steady=process.memory_info().rss - before)))
""")


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "small", "small")


def load_in_a_fresh_process(folder: Path, quantize: str, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), quantize, *extra],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("quantize, bound", [
    ("none", 1.40),  # packed fp32 replaces the checkpoint's pages (two copies: 2x)
    ("int8", 0.80),  # int8 linear layers (a quarter), fp32 embeddings mapped where read
])
def test_loading_holds_one_copy_of_the_weights(small_model_dir, quantize, bound):
    checkpoint = (small_model_dir / "model.safetensors").stat().st_size
    got = load_in_a_fresh_process(small_model_dir, quantize)
    assert got["peak"] <= bound * checkpoint, (got, checkpoint)
    assert got["steady"] <= bound * checkpoint, (got, checkpoint)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_an_int8_model_that_has_looked_up_every_token_still_holds_one_copy(small_model_dir):
    """The token embedding is the LM head's fp32 twin: mapped from the checkpoint, each row
    became resident when first looked up, and a bot looks up most of the vocabulary over
    time (before int8 rows: 0.65x the checkpoint after every token, 0.57x after 100)."""
    checkpoint = (small_model_dir / "model.safetensors").stat().st_size
    got = load_in_a_fresh_process(small_model_dir, "int8", "every-token")
    assert got["steady"] <= 0.55 * checkpoint, (got, checkpoint)
    assert got["peak"] <= 0.70 * checkpoint, (got, checkpoint)
