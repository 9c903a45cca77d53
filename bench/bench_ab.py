"""A/B measurements of two memory/speed details of the batching generator, each side by side
in one sitting (this host's speed drifts between runs):

- `heap`: the cold workload of `bench.py` (1, 4 and 16 channels, a 16th joining 15) in its own
  process, with the worker returning freed heap memory to the OS (every 32 decode steps and
  when the batch empties: `bot.batching.RELEASE_EVERY`) and without: RSS at the end, peak RSS,
  16-channel tokens/s.
- `gelu`: 16 cold prompts (60-200 tokens) prefilled in packed forwards of <= 512 tokens with
  GPT-2's activation as transformers writes it, in place (`bot.quant.gelu_in_place`,
  bit-identical) and fused into the MLP's packed linear layer (`bot.quant.fuse_gelu`, fp32
  with packed weights), alternating, in one process: ms per prompt token.
- `attention`: 16-row decode steps over 150, 400 and 800 tokens of history per row with
  float16 keys/values attended as stored and widened to fp32 row by row first (what
  `bot.kvcache.attends_as_stored` chooses between at load), float32 keys/values (twice
  the memory) for reference, and float16 in the decode kernel (`bot.decode_kernel`, where it
  builds), interleaved step by step in one process: median ms a step.

    .venv/bin/python bench/bench_ab.py [heap] [gelu] [attention] [--size medium] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import runpy
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]


def heap(args) -> None:
    from bench import model_dir

    folder = model_dir(args.size, args.cache)
    print("| option | returns freed memory | RSS at the end MB | peak RSS MB | KV cache MB | "
          "16 channels tokens/s |\n|---|---|---|---|---|---|")
    for option in ("torch-fp32-batching", "torch-int8-batching"):
        for release in ("no", "yes"):
            out = Path(tempfile.mkstemp(suffix=".json")[1])
            subprocess.run([sys.executable, __file__, "--wrap", release, "--worker", option,
                            "--mode", "throughput", "--model-dir", str(folder), "--runs", "1",
                            "--out", str(out), "--no-warm"], check=True, capture_output=True)
            r = json.loads(out.read_text())
            out.unlink()
            print(f"| {option} | {release} | {r['end_rss_mb']:.0f} | {r['peak_rss_mb']:.0f} | "
                  f"{r['kv_cache_mb']:.0f} | {r['c16']['tokens_per_s']:.1f} |", flush=True)


def gelu(args) -> None:
    import torch
    from transformers.activations import NewGELUActivation

    from bench import model_dir
    from bot.batching import BatchWorker
    from bot.hf import TransformersBackend
    from bot.quant import _gelu_class

    backend = TransformersBackend(str(model_dir(args.size, args.cache)))
    worker = BatchWorker(backend, "-", cache_bytes=2**30)
    worker.load()
    rng = random.Random(0)
    prompts = [[rng.randrange(300, 40000) for _ in range(rng.randint(60, 200))]
               for _ in range(16)]
    packs, pack = [], []
    for prompt in prompts:
        if pack and sum(map(len, pack)) + len(prompt) > 512:
            packs.append(pack)
            pack = []
        pack.append(prompt)
    packs.append(pack)
    total = sum(map(len, prompts))
    class TanhGELU(torch.nn.Module):
        def forward(self, x):
            return torch.nn.functional.gelu(x, approximate="tanh")

    kinds = {"as written": NewGELUActivation, "in place": _gelu_class(),
             "torch's gelu(tanh)": TanhGELU}
    fused = all(getattr(b.mlp.c_fc, "gelu", False) for b in backend.model.transformer.h)
    if fused:  # the served model runs it in the linear layer (fp32, packed weights)
        kinds["fused into the linear"] = torch.nn.Identity
    times: dict[str, list[float]] = {k: [] for k in kinds}
    with torch.inference_mode():
        for _ in range(args.rounds + 1):  # the first round warms up
            for kind, cls in kinds.items():
                for block in backend.model.transformer.h:
                    block.mlp.act = cls()
                    if fused:
                        block.mlp.c_fc.gelu = cls is torch.nn.Identity
                started = time.perf_counter()
                for pack in packs:
                    worker._forward([worker.layout.new_row() for _ in pack], [0] * len(pack),
                                    pack, packed=True)
                times[kind].append(1000 * (time.perf_counter() - started) / total)
    print(f"\n16 cold prompts, {total} tokens, {len(packs)} packed forwards; ms a prompt token, "
          f"median of {args.rounds} alternating rounds\n\n| activation | ms/token | rounds |\n"
          "|---|---|---|")
    for kind, values in times.items():
        values = sorted(values[1:])
        print(f"| {kind} | {values[len(values) // 2]:.2f} | "
              f"{', '.join(f'{v:.2f}' for v in values)} |")


def attention(args) -> None:
    import statistics
    from dataclasses import replace

    import torch

    from bench import model_dir
    from bot import decode_kernel
    from bot.batching import BatchWorker
    from bot.hf import TransformersBackend

    backend = TransformersBackend(str(model_dir(args.size, args.cache)))
    worker = BatchWorker(backend, "-", cache_bytes=2**30, kv_dtype="float16")
    worker.load()
    half, wide = worker.layout, replace(worker.layout, dtype=torch.float32)
    scratch = torch.empty((2, half.heads, half.capacity, half.head_dim))
    kinds = {"float16 as stored": (half, None, None),
             "float16 widened to fp32": (half, scratch, None),
             "float32 stored": (wide, None, None)}
    kernel = decode_kernel.load()
    if kernel is not None:
        kinds["float16, decode kernel"] = (half, None, kernel)
    steps = 4 * args.rounds
    print(f"\n16-row decode steps, ms a step (median of {steps}, the kinds interleaved);"
          f" the last column: the median ratio of paired steps\n\n| history tokens | "
          + " | ".join(kinds) + " | as stored / widened |\n|---|" + "---|" * len(kinds)
          + "---|")
    with torch.inference_mode():
        for history in (150, 400, 800):
            rows = {}
            for kind, (layout, _, _) in kinds.items():
                rows[kind] = [layout.new_row() for _ in range(16)]
                for row in rows[kind]:
                    row.buf[:, :, :, :history].normal_()
            times: dict[str, list[float]] = {k: [] for k in kinds}
            for step in range(steps + 1):  # the first steps warm up
                for kind, (_, scratch_or_none, kernel_or_none) in kinds.items():
                    worker._scratch, worker._kernel = scratch_or_none, kernel_or_none
                    started = time.perf_counter()
                    worker._forward(rows[kind], [history] * 16, [[1000]] * 16, packed=False)
                    if step:
                        times[kind].append(1000 * (time.perf_counter() - started))
            ms = {k: statistics.median(v) for k, v in times.items()}
            ratios = [a / b for a, b in zip(times["float16 as stored"],
                                            times["float16 widened to fp32"])]
            print(f"| {history} | " + " | ".join(f"{v:.0f}" for v in ms.values())
                  + f" | {statistics.median(ratios):.2f} |", flush=True)


def main() -> int:
    if len(sys.argv) > 2 and sys.argv[1] == "--wrap":  # a bench.py worker, release on/off
        release = sys.argv[2] == "yes"
        sys.argv = [str(HERE / "bench.py"), *sys.argv[3:]]
        if not release:
            import bot.batching

            bot.batching.release_freed_memory = lambda: None
        runpy.run_path(str(HERE / "bench.py"), run_name="__main__")
        return 0
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("what", nargs="*", help="heap, gelu, attention (default: all)")
    parser.add_argument("--size", default="medium", choices=("small", "medium", "tiny"))
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "dialogbot-bench")
    args = parser.parse_args()
    known = {"heap": heap, "gelu": gelu, "attention": attention}
    if set(args.what) - set(known):
        parser.error(f"unknown A/B: {', '.join(sorted(set(args.what) - set(known)))}")
    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    for what in args.what or list(known):
        known[what](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
