"""What a second character costs: 16 channels split over two characters against 16 channels on
one (aggregate tokens/s, reply latency, peak RSS).

    make bench                                   # runs this after bench.py
    .venv/bin/python bench/bench_characters.py --size small --runs 3 [--threads 1]

Models: two DialoGPT-shaped random-weight models with different seeds (`tests.modelkit`, end of
text pushed down so every reply runs to exactly 40 new tokens, checked), the real tokenizer.
Workload: bench.py's (prompts of 60-200 tokens, the bot's default sampling settings, 40 new
tokens); 16 channels each send one request at once, through `bot.app.make_generator` with
DIALOGBOT_CHARACTERS set (the `CharacterRouter` over one batching generator per character).

Modes, each measured in its own subprocess (clean peak RSS), in rounds:
- one:  all 16 channels on character a (one model loaded: today's bot);
- two:  8 channels on a and 8 on b, both loaded (DIALOGBOT_MAX_MODELS=2): two batches of 8
        decode side by side, each in its own worker thread;
- swap: the same 8 + 8 with DIALOGBOT_MAX_MODELS=1: b's requests wait until a's batch is
        done, then a is unloaded and b loaded (one unload and one load per burst).
Each round also reports `two`'s and `swap`'s tokens/s over `one`'s in the same round; the
median of those ratios is printed (the machine's speed drifts on shared hosts).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("dialogbot_bench", HERE / "bench.py")
base = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(base)  # bench.py's workload, checks and helpers (adds the repo path)

CHANNELS = 16
MODES = {  # name -> (every other channel on b, DIALOGBOT_MAX_MODELS)
    "one": (False, 2),
    "two": (True, 2),
    "swap": (True, 1),
}


def model_dirs(size: str, cache: Path) -> tuple[Path, Path]:
    """bench.py's model (seed 0, the same cache folder) and a sibling with seed 1."""
    from tests.modelkit import cached_model_dir

    return tuple(cached_model_dir(cache / f"dialogpt-{size}-never-eos{suffix}", size,
                                  seed=seed, never_eos=True)
                 for seed, suffix in ((0, ""), (1, "-seed1")))


async def measure(args) -> dict:
    """One burst of 16 requests in this process (the subprocess side)."""
    from transformers import AutoTokenizer

    from bot.app import make_generator

    split, max_models = MODES[args.worker]
    config = base.make_config(args, characters=f"a={args.model_dir},b={args.second_dir}",
                              max_models=max_models)
    router = make_generator(config)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    checker = base.Checker()
    settings = base.decoding()
    t0 = time.perf_counter()
    await router.start()
    result: dict = dict(load_s=time.perf_counter() - t0)
    try:
        warm = ["b", "a"] if split else ["a"]
        for index, (name, turns) in enumerate(zip(warm, base.make_prompts(tokenizer, 2, -1))):
            await router.reply(replace(base.request_for(f"warm-up-{index}", turns, settings),
                                       character=name))  # unmeasured; a is loaded last
        histories = base.make_prompts(tokenizer, CHANNELS, 1000 * CHANNELS + args.first_run)

        async def one(index: int, turns) -> float:
            character = "b" if split and index % 2 else "a"
            request = base.request_for(f"{args.worker}-{args.first_run}-{index}", turns,
                                       settings)
            started = time.perf_counter()
            checker.check(await router.reply(replace(request, character=character)))
            return time.perf_counter() - started

        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(i, h) for i, h in enumerate(histories)))
        wall = time.perf_counter() - start
        result.update(tokens_per_s=CHANNELS * base.NEW_TOKENS / wall, wall_s=wall,
                      p50_s=base.pct(latencies, 50), p95_s=base.pct(latencies, 95),
                      loaded=len(router.loaded))
    finally:
        await router.stop()
    result.update(replies_checked=checker.replies, bad_replies=checker.bad,
                  peak_rss_mb=base.peak_rss_mb())
    return result


def subprocess_run(args, mode: str, run: int) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode,
               "--model-dir", str(args.model_dir), "--second-dir", str(args.second_dir),
               "--first-run", str(run), "--out", str(out)]
    command += ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        print(f"  {mode}: FAILED (exit {done.returncode})\n{tail}", flush=True)
        return dict(error=tail)
    result = json.loads(out.read_text())
    out.unlink()
    print(f"  run {run + 1}: {mode}: {result['tokens_per_s']:.1f} tokens/s "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    return result


def summary(rounds: list[dict]) -> dict:
    out = {}
    for mode in MODES:
        ok = [r[mode] for r in rounds if "error" not in r[mode]]
        if not ok:
            out[mode] = dict(error=rounds[0][mode].get("error", "failed"))
            continue
        out[mode] = base.median_of(ok)
        out[mode]["bad_replies"] = sum(r["bad_replies"] for r in ok)
        out[mode]["replies_checked"] = sum(r["replies_checked"] for r in ok)
        ratios = [r[mode]["tokens_per_s"] / r["one"]["tokens_per_s"] for r in rounds
                  if "error" not in r[mode] and "error" not in r["one"]]
        if ratios:
            out[mode]["x_one"] = statistics.median(ratios)
    return out


def table(report: dict) -> str:
    m = report["machine"]
    lines = [f"DialoGPT-{report['size']} shape, {CHANNELS} channels at once, "
             f"{base.NEW_TOKENS} new tokens, torch threads "
             f"{report['threads'] or m['torch_threads']}, {m['cores']} cores ({m['cpu']}), "
             f"median of {report['runs']} round(s)", "",
             "| characters | channels | models loaded | tokens/s | x one character | p50 s "
             "| p95 s | peak RSS MB |", "|" + "---|" * 8]
    labels = {"one": ("one", "16"), "two": ("two", "8 + 8"),
              "swap": ("two, DIALOGBOT_MAX_MODELS=1", "8 + 8")}
    for mode, row in report["modes"].items():
        label, channels = labels[mode]
        if "error" in row:
            lines.append(f"| {label} | {channels} | failed | | | | | |")
            continue
        lines.append(f"| {label} | {channels} | {row['loaded']:.0f} | "
                     f"{row['tokens_per_s']:.1f} | {row.get('x_one', 1.0):.2f} | "
                     f"{row['p50_s']:.2f} | {row['p95_s']:.2f} | {row['peak_rss_mb']:.0f} |")
    bad = sum(r.get("bad_replies", 0) for r in report["modes"].values())
    checked = sum(r.get("replies_checked", 0) for r in report["modes"].values())
    lines += ["", f"replies checked: {checked}, not exactly {base.NEW_TOKENS} tokens: {bad}"]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "medium", "tiny"), default="small")
    parser.add_argument("--runs", type=int, default=3, help="rounds (medians are reported)")
    parser.add_argument("--threads", type=int, help="torch intra-op threads")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "dialogbot-bench")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--second-dir", help=argparse.SUPPRESS)
    parser.add_argument("--first-run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.worker:  # inside a subprocess
        args.out.write_text(json.dumps(asyncio.run(measure(args))))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    args.model_dir, args.second_dir = map(str, model_dirs(args.size, args.cache))
    started = time.perf_counter()
    print(f"bench_characters: DialoGPT-{args.size} shape, runs={args.runs}", flush=True)
    rounds = [{mode: subprocess_run(args, mode, run) for mode in MODES}
              for run in range(args.runs)]
    report = dict(size=args.size, runs=args.runs, threads=args.threads,
                  machine=base.machine(), modes=summary(rounds), rounds=rounds,
                  seconds=time.perf_counter() - started)
    print()
    print(table(report))
    print(f"\nbench_characters took {report['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
