"""Training speed and memory of `dialogbot train` on the DialoGPT-small shape.

    make bench                                     # runs this after the generator benches
    .venv/bin/python bench/bench_train.py --rounds 3 --steps 3 --json train.json

Model: a random-weight DialoGPT-small-shaped model (12 layers x 768, 1024 positions, vocab
50257, tied embeddings as in the real one: 124M parameters) with the real GPT-2 tokenizer,
built once into the cache directory. Training compute does not depend on the weights' values.

Workload: the command's defaults (batch 4, block 512, AdamW lr 5e-5, fp32 on a CPU, loss on
the response only) through `bot.train.train`, the function behind `dialogbot train`, on
made-up dialogues whose every example is exactly 512 tokens (checked), so each optimizer step
processes 4 x 512 = 2048 tokens.

Measured, each round in its own process (clean peak RSS): the wall time of each optimizer step
after the first (the first pays for allocation and warm-up); training tokens/s = 2048 / the
median step time; peak RSS (VmHWM) of the process over loading, training and saving.
Reported: the median over rounds, and every round's figures (the machine is shared: rounds
vary).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bench import machine, peak_rss_mb  # noqa: E402  (bench/bench.py, this folder)

BATCH, BLOCK = 4, 512
CONTEXT_WORDS, RESPONSE_WORDS = 450, 60  # 450 + eos + 60 + eos = 512 tokens


def model_dir(cache: Path) -> Path:
    """DialoGPT-small's shape with tied embeddings (as released), random weights."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.modelkit import EOS, SHAPES, write_tokenizer

    folder = cache / "dialogpt-small-tied"
    if not (folder / "config.json").exists():
        print(f"building a random-weight DialoGPT-small-shaped model in {folder} ...",
              flush=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        config = GPT2Config(vocab_size=50257, n_positions=1024, bos_token_id=EOS,
                            eos_token_id=EOS, pad_token_id=EOS, tie_word_embeddings=True,
                            **SHAPES["small"])
        GPT2LMHeadModel(config).save_pretrained(tmp)
        write_tokenizer(tmp)
        os.replace(tmp, folder)
    return folder


def write_data(path: Path, dialogues: int) -> None:
    """Two-turn dialogues; "hello" repeated n times is n GPT-2 tokens."""
    lines = []
    for i in range(dialogues):
        context = " ".join(["hello"] * CONTEXT_WORDS)
        response = " ".join(["world"] * RESPONSE_WORDS)
        lines.append(json.dumps({"turns": [context, response], "n": i}))
    path.write_text("\n".join(lines) + "\n")


def measure(model: str, steps: int, work: Path) -> dict:
    """One round, in this process: train `steps` + 1 steps, time each one."""
    from transformers import AutoTokenizer, TrainerCallback

    from bot.train import TrainOptions, train
    from bot.trainingdata import encode_corpus, read_corpus

    data = work / "data.jsonl"
    write_data(data, BATCH * (steps + 1))
    options = TrainOptions(data=data, out=work / "model", base=model, max_steps=steps + 1,
                           batch_size=BATCH, block_size=BLOCK, eval_fraction=0,
                           save_steps=10_000)
    tokenizer = AutoTokenizer.from_pretrained(model)
    encoded, _ = encode_corpus(read_corpus(data), tokenizer.encode, tokenizer.eos_token_id,
                               BLOCK)
    lengths = {len(e.input_ids) for e in encoded}
    if lengths != {BLOCK}:
        raise SystemExit(f"workload: examples of {sorted(lengths)} tokens, not {BLOCK}")

    ends: list[float] = []

    class Clock(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            ends.append(time.perf_counter())

    import torch

    result = train(options, say=lambda _: None, callbacks=[Clock()])
    times = [b - a for a, b in zip(ends, ends[1:])]
    measured = times[1:]
    step = statistics.median(measured)
    return dict(first_step_s=times[0], step_s=step, step_times_s=measured,
                tokens_per_s=BATCH * BLOCK / step, steps=result.steps,
                threads=torch.get_num_threads(), peak_rss_mb=peak_rss_mb())


def round_in_subprocess(args, number: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        out = Path(tmp) / "result.json"
        command = [sys.executable, str(Path(__file__).resolve()), "--worker", "--model-dir",
                   str(args.model_dir), "--steps", str(args.steps), "--out", str(out),
                   "--work", tmp]
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            tail = "\n".join(done.stderr.strip().splitlines()[-8:])
            raise SystemExit(f"round {number + 1} failed (exit {done.returncode}):\n{tail}")
        result = json.loads(out.read_text())
    print(f"  round {number + 1}: {result['tokens_per_s']:.0f} tokens/s, step "
          f"{result['step_s']:.1f} s, peak RSS {result['peak_rss_mb']:.0f} MB "
          f"({time.perf_counter() - started:.0f} s)", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="processes measured (median)")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per round")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "dialogbot-bench")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--work", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        args.out.write_text(json.dumps(measure(args.model_dir, args.steps, args.work)))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    args.model_dir = str(model_dir(args.cache))
    print(f"bench_train: DialoGPT-small shape, batch {BATCH}, block {BLOCK}, "
          f"{args.rounds} rounds x {args.steps} timed steps", flush=True)
    rounds = [round_in_subprocess(args, n) for n in range(args.rounds)]
    report = dict(shape="small", batch=BATCH, block=BLOCK, rounds=rounds, machine=machine(),
                  tokens_per_s=statistics.median(r["tokens_per_s"] for r in rounds),
                  step_s=statistics.median(r["step_s"] for r in rounds),
                  peak_rss_mb=statistics.median(r["peak_rss_mb"] for r in rounds))
    print()
    print("| training (dialogbot train) | tokens/s | s / step | peak RSS MB | rounds |")
    print("|---|---|---|---|---|")
    print(f"| DialoGPT-small shape, fp32 CPU, batch {BATCH} x block {BLOCK} | "
          f"{report['tokens_per_s']:.0f} | {report['step_s']:.1f} | "
          f"{report['peak_rss_mb']:.0f} | "
          + ", ".join(f"{r['tokens_per_s']:.0f}" for r in rounds) + " tokens/s |")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
