"""One copy of the weights: loading the DialoGPT-small shape with packed fp32 weights or int8
keeps the process's memory at one (converted) model, measured with psutil and the kernel's
peak RSS in a fresh process (each load is its own process, so nothing else counts). The tiny
model is loaded and used the same way first, so imports, kernel code pages and first-use
buffers (which differ by CPU: an earlier form of these tests measured 0.50x the checkpoint
after every token on one host and 0.56x on another) are not counted as weights."""

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
    from bot.hf import TransformersBackend
    from bot.memory import release_freed_memory

    folder, warm_up, quantize, use = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4:]

    def peak():
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def load_and_use(folder):
        backend = TransformersBackend(folder, quantize=quantize, threads=1)
        backend.load()
        with torch.inference_mode():
            backend.model(input_ids=torch.randint(300, 40000, (1, 100)))
            if use == ["every-token"]:  # a long-running bot looks up most of the vocabulary
                vocab = backend.model.config.vocab_size
                for begin in range(0, vocab, 1024):
                    ids = torch.arange(begin, min(begin + 1024, vocab))
                    backend.model.get_input_embeddings()(ids)
        return backend

    # Imports, the kernels' code pages and their first buffers are not the model (they
    # differ by CPU and library build): the tiny model, loaded and used the same way first,
    # brings them in, so what is measured is the weights.
    warm = load_and_use(warm_up)
    del warm
    gc.collect()
    release_freed_memory()
    process = psutil.Process()
    before = process.memory_info().rss
    Path("/proc/self/clear_refs").write_text("5")  # restart the peak (VmHWM) from here
    backend = load_and_use(folder)
    gc.collect()
    release_freed_memory()  # what the model holds, not the allocator's freed arenas
    print(json.dumps(dict(peak=peak() - before, steady=process.memory_info().rss - before)))
""")


@pytest.fixture(scope="module")
def small_model_dir(tmp_path_factory) -> Path:
    return make_model_dir(tmp_path_factory.mktemp("models") / "small", "small")


def load_in_a_fresh_process(folder: Path, warm_up: Path, quantize: str, *extra: str) -> dict:
    done = subprocess.run([sys.executable, "-c", MEASURE, str(folder), str(warm_up), quantize,
                           *extra],
                          capture_output=True, text=True, timeout=300,
                          cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
@pytest.mark.parametrize("quantize, bound", [
    ("none", 1.40),  # packed fp32 replaces the checkpoint's pages (two copies: 2x)
    ("int8", 0.80),  # int8 linear layers (a quarter), fp32 embeddings mapped where read
])
def test_loading_holds_one_copy_of_the_weights(small_model_dir, tiny_model_dir, quantize,
                                               bound):
    checkpoint = (small_model_dir / "model.safetensors").stat().st_size
    got = load_in_a_fresh_process(small_model_dir, tiny_model_dir, quantize)
    assert got["peak"] <= bound * checkpoint, (got, checkpoint)
    assert got["steady"] <= bound * checkpoint, (got, checkpoint)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_an_int8_model_that_has_looked_up_every_token_still_holds_one_copy(small_model_dir,
                                                                          tiny_model_dir):
    """The token embedding is the LM head's fp32 twin: mapped from the checkpoint, each row
    became resident when first looked up, and a bot looks up most of the vocabulary over
    time. Measured on the Zen 5 EPYC: steady 0.32x the checkpoint with int8 rows (0.35x with
    fbgemm's AVX2 kernels), 0.50x with the mapped fp32 embedding (the code before int8 rows);
    the int8 weights alone are 0.25x."""
    checkpoint = (small_model_dir / "model.safetensors").stat().st_size
    got = load_in_a_fresh_process(small_model_dir, tiny_model_dir, "int8", "every-token")
    assert got["steady"] <= 0.42 * checkpoint, (got, checkpoint)
    assert got["peak"] <= 0.70 * checkpoint, (got, checkpoint)
