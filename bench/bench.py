"""Throughput, latency and memory of the bot's generators against the model card's loop.

    make bench                                   # medium, then small, then bench_quality
    .venv/bin/python bench/bench.py --size medium --runs 3 --json bench/results/medium.json
    .venv/bin/python bench/bench.py --size medium --runs 1 --only torch-fp32-batching

Model: a DialoGPT-shaped random-weight model (`tests.modelkit`, medium by default — the bot's
default model — or small: the same compute as the real one) with the real GPT-2 tokenizer,
built once into the cache directory. Its end-of-text logit is pushed down (`never_eos=True`,
no change in compute), so EVERY reply runs to exactly 40 new tokens on every path; each
measured reply is checked (40 token ids, no fallback) and the count of bad replies is printed.

Cold workload: requests whose prompts hold 60-200 tokens (1-3 turns of made-up text), the
bot's default decoding settings (sampling, top-k 50, top-p 0.9, temperature 0.8, no-repeat
3-grams), 40 new tokens. Every generator is built by `bot.app.make_generator` from a `Config`
and driven through its async `reply()` with `GenerationRequest`s of `Turn`s, as the pipeline
does.

Measured, each option in its own subprocess (clean peak RSS), in rounds (`--runs`; each
option's ratio is taken against its own round's baseline, then the median over rounds):
- baseline: the model card's loop, `model.generate` on one request after another (cold
  prompts, and the warm workload's first turns);
- per generator option (torch fp32 one-by-one, batching with and without the oneDNN-packed
  weights, batching with float16 keys/values (the default, auto, stores bfloat16 where bf16
  attention measures faster, and attends as stored or widened to fp32, whichever measures
  faster: `bot.kvcache.kv_dtype_for`, `attends_as_stored`), torch int8, bf16 when the CPU
  has it, CTranslate2 int8 when installed): 1, 4 and 16 channels each sending one request
  at once: aggregate new tokens/s, p50/p95 latency, ratio to the baseline's tokens/s;
  event-loop lag (a 10 ms ticker) during the largest run;
- batching generators: a 16th request arriving while 15 channels decode (time until its
  prefill starts against one 15-row decode step), and the ceiling: their 16-row decode steps
  against the bare batched forward of the model alone on the same cache lengths
  (`bench/workloads.py`);
- warm workload (`bench/workloads.py`; skip with --no-warm): 16 and 64 channels each in the
  middle of a conversation (400-900 tokens of history), several turns each, with the default
  (auto) KV budget and 512 MiB: tokens/s, p50/p95, cache hit rate, against the model card's
  loop on the same turns;
- one conversation of ~20-token user turns (the window slides every few turns): turn 1 and
  the median over turns 26-35 (26-30 with --quick), with and without KV cache reuse, and
  where a turn's time goes (prefill tokens and seconds, decode step time);
- memory: RSS after loading, peak during loading, peak over the whole run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

NEW_TOKENS = 40
CONCURRENCY = (1, 4, 16)
EOS = 50256


# --- the workload ---------------------------------------------------------------------------
def make_prompts(tokenizer, count: int, seed: int) -> list[list[tuple[str, list[int] | None]]]:
    """`count` histories of 1-3 turns totalling 60-200 tokens: (text, ids) pairs; user turns
    carry text only (ids None), bot turns their token ids as the store keeps them."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        total = rng.randint(60, 200)
        parts = rng.randint(1, 3)
        sizes = [total // parts] * parts
        turns = []
        for index, size in enumerate(sizes):
            ids = [rng.randrange(300, 40000) for _ in range(max(1, size - 1))]
            bot = (parts - index) % 2 == 0  # the last turn is the user's
            text = tokenizer.decode(ids)
            turns.append((text, ids if bot else None))
        out.append(turns)
    return out


def user_text(tokenizer, rng: random.Random, tokens: int = 20) -> str:
    return tokenizer.decode([rng.randrange(300, 40000) for _ in range(tokens)])


def model_card_ids(tokenizer, turns) -> list[int]:
    """The model card's prompt: each turn's ids followed by end-of-text."""
    out: list[int] = []
    for text, ids in turns:
        out += (list(ids) if ids is not None else tokenizer.encode(text)) + [EOS]
    return out


def decoding():
    from bot.events import DecodingSettings

    return DecodingSettings(max_new_tokens=NEW_TOKENS)  # the bot's defaults otherwise


def peak_rss_mb() -> float:
    """This process's peak resident memory. VmHWM belongs to the process's own memory map;
    `ru_maxrss` does not do: Linux carries the parent's peak over fork and exec, so every
    measured process would report at least the orchestrator's size."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))]


def median_of(runs: list[dict]) -> dict:
    """Field-wise median of a list of flat dicts of numbers (other values from the first)."""
    out = dict(runs[0])
    for key, value in runs[0].items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            out[key] = statistics.median(run[key] for run in runs)
    return out


# --- subprocess: the model card's loop ------------------------------------------------------
def run_baseline(args) -> dict:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from bot.hf import TransformersBackend

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    kwargs = TransformersBackend(args.model_dir).generation_kwargs(decoding())
    config = GenerationConfig(**kwargs)
    count = 3 if args.quick else 8
    runs, bad = [], 0
    for run in range(args.first_run, args.first_run + args.runs):
        prompts = [model_card_ids(tokenizer, t) for t in make_prompts(tokenizer, count, run)]
        latencies = []
        with torch.inference_mode():
            for ids in [model_card_ids(tokenizer, t) for t in make_prompts(tokenizer, 2, -1)]:
                model.generate(torch.tensor([ids]), generation_config=config,  # warm-up
                               attention_mask=torch.ones(1, len(ids), dtype=torch.long))
            start = time.perf_counter()
            for ids in prompts:
                t0 = time.perf_counter()
                inputs = torch.tensor([ids])
                out = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                     generation_config=config)
                latencies.append(time.perf_counter() - t0)
                bad += out.shape[1] - len(ids) != NEW_TOKENS
            wall = time.perf_counter() - start
        runs.append(dict(replies=count, tokens_per_s=count * NEW_TOKENS / wall,
                         p50_s=pct(latencies, 50), p95_s=pct(latencies, 95),
                         prompt_min=min(map(len, prompts)), prompt_max=max(map(len, prompts))))
        if args.warm:  # the warm workload's first turns, as the model card's loop runs them
            from workloads import model_card_sample

            sample = model_card_sample(tokenizer, 9000 + run, 2 if args.quick else 4)
            start = time.perf_counter()
            with torch.inference_mode():
                for ids in sample:
                    inputs = torch.tensor([ids])
                    out = model.generate(inputs, attention_mask=torch.ones_like(inputs),
                                         generation_config=config)
                    bad += out.shape[1] - len(ids) != NEW_TOKENS
            runs[-1].update(warm_tokens_per_s=len(sample) * NEW_TOKENS /
                            (time.perf_counter() - start),
                            warm_prompt_min=min(map(len, sample)),
                            warm_prompt_max=max(map(len, sample)))
    return dict(median_of(runs), bad_replies=bad)


# --- subprocess: one generator option -------------------------------------------------------
OPTIONS = {  # name -> Config overrides
    "torch-fp32": dict(generator_backend="torch", quantize="none", batching=False),
    "torch-fp32-batching": dict(generator_backend="torch", quantize="none", batching=True),
    "torch-fp32-batching-unpacked": dict(generator_backend="torch", quantize="none",
                                         batching=True, pack_weights=False),
    "torch-fp32-batching-fp16kv": dict(generator_backend="torch", quantize="none",
                                       batching=True, kv_dtype="float16"),
    "torch-int8": dict(generator_backend="torch", quantize="int8", batching=False),
    "torch-int8-batching": dict(generator_backend="torch", quantize="int8", batching=True),
    "torch-bf16": dict(generator_backend="torch", quantize="bf16", batching=False),
    "torch-bf16-batching": dict(generator_backend="torch", quantize="bf16", batching=True),
    "ct2-int8": dict(generator_backend="ct2", quantize="int8", batching=False),
}


def available_options() -> tuple[list[str], dict[str, str]]:
    """(options to run, skipped option -> reason)."""
    import importlib.util

    from bot.config import Config
    from bot.quant import cpu_supports_bf16

    skipped = {}
    batching = "batching" in Config.model_fields and \
        importlib.util.find_spec("bot.batching") is not None
    if not batching:
        for name in ("torch-fp32-batching", "torch-fp32-batching-unpacked",
                     "torch-fp32-batching-fp16kv", "torch-int8-batching", "torch-bf16-batching"):
            skipped[name] = "no bot.batching"
    if not cpu_supports_bf16():
        skipped["torch-bf16"] = "CPU has no native bf16"
        skipped["torch-bf16-batching"] = "CPU has no native bf16"
    if importlib.util.find_spec("ctranslate2") is None:
        skipped["ct2-int8"] = "ctranslate2 not installed (pip install '.[ct2]')"
    return [name for name in OPTIONS if name not in skipped], skipped


def make_config(args, **overrides):
    from bot.config import load_config

    for key in [k for k in os.environ if k.startswith("DIALOGBOT_")]:
        del os.environ[key]
    values = dict(model=args.model_dir, torch_threads=args.threads, queue_size=1000,
                  generation_timeout=3600, max_new_tokens=NEW_TOKENS, _env_file=None)
    values.update(overrides)
    return load_config(**values)


class LagProbe:
    """A 10 ms ticker on the event loop; records how late each tick wakes up."""

    def __init__(self, period: float = 0.010):
        self.period = period
        self.lags: list[float] = []
        self._task: asyncio.Task | None = None

    async def _tick(self) -> None:
        while True:
            t0 = time.perf_counter()
            await asyncio.sleep(self.period)
            self.lags.append(max(0.0, time.perf_counter() - t0 - self.period))

    def __enter__(self) -> "LagProbe":
        self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    def __exit__(self, *exc) -> None:
        self._task.cancel()

    def summary(self) -> dict:
        ms = [lag * 1000 for lag in self.lags]
        return dict(lag_p50_ms=pct(ms, 50), lag_p99_ms=pct(ms, 99),
                    lag_max_ms=max(ms, default=float("nan")), lag_ticks=len(ms))


def request_for(channel: str, turns, settings):
    from bot.events import GenerationRequest, Role, Turn

    out = []
    for text, ids in turns:
        role = Role.BOT if ids is not None else Role.USER
        out.append(Turn("bench", channel, role, text,
                        token_ids=tuple(ids) if ids is not None else None))
    return GenerationRequest(f"bench:{channel}", tuple(out), settings)


class Checker:
    def __init__(self):
        self.bad = 0
        self.replies = 0

    def check(self, generated) -> None:
        self.replies += 1
        if generated.fallback or len(generated.token_ids) != NEW_TOKENS:
            self.bad += 1


async def concurrency_run(generator, tokenizer, level: int, seed: int, checker: Checker,
                          tag: str) -> dict:
    settings = decoding()
    histories = make_prompts(tokenizer, level, 1000 * level + seed)

    async def one(index: int, turns) -> float:
        t0 = time.perf_counter()
        generated = await generator.reply(request_for(f"{tag}-{level}-{seed}-{index}", turns,
                                                      settings))
        checker.check(generated)
        return time.perf_counter() - t0

    with LagProbe() as probe:
        start = time.perf_counter()
        latencies = await asyncio.gather(*(one(i, h) for i, h in enumerate(histories)))
        wall = time.perf_counter() - start
    return dict(replies=level, tokens_per_s=level * NEW_TOKENS / wall,
                p50_s=pct(latencies, 50), p95_s=pct(latencies, 95), **probe.summary())


async def join_run(generator, tokenizer, seed: int, checker: Checker) -> dict:
    """Continuous batching: 15 channels decode; a 16th request arrives mid-reply. How long
    from its arrival until its prefill starts, against the time of one 15-row decode step
    (the worker's own clock: `BatchStats.admissions` and `.steps`)."""
    stats = generator.worker.stats
    settings = decoding()
    histories = make_prompts(tokenizer, 16, 7000 + seed)

    async def one(index: int) -> None:
        checker.check(await generator.reply(request_for(f"join-{seed}-{index}",
                                                        histories[index], settings)))

    first_step = len(stats.steps)
    tasks = [asyncio.create_task(one(i)) for i in range(15)]
    while sum(rows == 15 for _, rows, _ in list(stats.steps)[first_step:]) < 5:
        await asyncio.sleep(0.005)  # all 15 decode together, a few steps in
    mark_admissions, mark_steps = len(stats.admissions), len(stats.steps)
    tasks.append(asyncio.create_task(one(15)))
    await asyncio.gather(*tasks)
    arrived, admitted = list(stats.admissions)[mark_admissions]
    wait = admitted - arrived
    steps = list(stats.steps)[first_step:]
    step = statistics.median(s for _, rows, s in steps[:mark_steps - first_step] if rows == 15)
    # the step that was running when it arrived (the last one started before), and the
    # time from that step's end to the request's prefill
    start, _, seconds = max((s for s in steps if s[0] <= arrived), key=lambda s: s[0])
    return dict(join_wait_ms=wait * 1000, step15_ms=step * 1000, join_over_step=wait / step,
                inflight_step_ms=seconds * 1000, after_step_ms=(admitted - start - seconds) * 1000)


async def conversation(generator, tokenizer, args, seed: int, checker: Checker) -> dict:
    """Turn 1's latency and the median over turns 26-35 (26-30 with --quick, where turns
    1-24 hold made-up replies of 40 tokens instead of generated ones; turn 25 is generated
    unmeasured, so turn 26 finds what a long conversation leaves behind), with where each
    turn's time went (batching generators: prefill tokens and seconds, decode seconds)."""
    from bot.events import GenerationRequest, Role, Turn
    from workloads import TurnProfile

    settings, rng = decoding(), random.Random(seed)
    key = f"bench:conv-{seed}"
    last = 30 if args.quick else 35

    def user() -> Turn:
        return Turn("bench", key, Role.USER, user_text(tokenizer, rng))

    async def timed(channel_key: str, turns: list[Turn]):
        t0 = time.perf_counter()
        with TurnProfile(generator) as profile:
            generated = await generator.reply(GenerationRequest(channel_key, tuple(turns),
                                                                settings))
        checker.check(generated)
        return (time.perf_counter() - t0, profile.figures), generated

    history: list[Turn] = []
    turns: dict[int, tuple[float, dict]] = {}
    first = 1
    if args.quick:
        turns[1], _ = await timed(key + "-first", [user()])
        for _ in range(24):
            ids = tuple(rng.randrange(300, 40000) for _ in range(NEW_TOKENS))
            history += [user(), Turn("bench", key, Role.BOT, tokenizer.decode(ids),
                                     token_ids=ids)]
        first = 25
    for number in range(first, last + 1):
        history.append(user())
        turns[number], generated = await timed(key, history[-64:])  # history_turns
        history.append(Turn("bench", key, Role.BOT, generated.text,
                            token_ids=generated.token_ids))
    late_numbers = range(26, last + 1)
    late = statistics.median(turns[n][0] for n in late_numbers)
    out = dict(turn1_s=turns[1][0], late_median_s=late, late_over_turn1=late / turns[1][0],
               late_turns=f"26-{last}", last_prompt_tokens=generated.prompt_tokens)
    if turns[1][1]:
        for name in ("prefill_tokens", "prefill_s", "decode_s"):
            out[f"turn1_{name}"] = turns[1][1][name]
            out[f"late_{name}"] = statistics.median(turns[n][1][name] for n in late_numbers)
        out["turn1_step_ms"] = 1000 * turns[1][1]["decode_s"] / max(1, turns[1][1]["decode_steps"])
        out["late_step_ms"] = 1000 * statistics.median(
            turns[n][1]["decode_s"] / max(1, turns[n][1]["decode_steps"]) for n in late_numbers)
        out["late_misses"] = sum(1 for n in late_numbers if not turns[n][1]["hit"])
    return out


def run_ids(args) -> range:
    return range(args.first_run, args.first_run + args.runs)


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def run_option(args) -> dict:
    from bot.app import make_generator

    overrides = dict(OPTIONS.get(args.worker.removesuffix("-nocache"), {}))
    if args.worker.endswith("-nocache"):
        overrides["kv_cache_mb"] = 0
    if args.mode == "warm" and args.warm_budget != "auto":
        overrides["kv_cache_mb"] = float(args.warm_budget)
    config = make_config(args, **overrides)
    generator = make_generator(config)
    t0 = time.perf_counter()
    await generator.start()
    load_s = time.perf_counter() - t0
    tokenizer = generator.backend.tokenizer
    checker = Checker()
    result: dict = dict(generator=type(generator).__name__, load_s=load_s,
                        load_rss_mb=rss_mb(), load_peak_rss_mb=peak_rss_mb())
    worker = getattr(generator, "worker", None)
    if getattr(worker, "layout", None) is not None:  # the batching generator's choice
        result["kv"] = str(worker.kv_dtype).removeprefix("torch.") + (
            ", attended as stored" if worker._scratch is None else
            f", widened to {str(worker._scratch.dtype).removeprefix('torch.')} to attend") + (
            "; decode steps attend in the decode kernel" if worker._kernel is not None else "")
    try:
        for index, turns in enumerate(make_prompts(tokenizer, 2, -1)):  # warm-up, unmeasured
            await generator.reply(request_for(f"warm-up-{index}", turns, decoding()))
        if args.mode == "warm":
            from workloads import bare_ceiling, warm_run

            runs = [await warm_run(generator, tokenizer, decoding(), checker,
                                   channels=args.warm_channels, rounds=args.warm_rounds,
                                   seed=9000 + run) for run in run_ids(args)]
            result["warm"] = median_of(runs)
            result["peak_rss_mb"] = peak_rss_mb()  # before the ceiling's own padded cache
            if args.warm_channels >= 16:
                lengths = [n + NEW_TOKENS // 2 for n in runs[-1]["last_prompts"]]
                result["warm"]["bare"] = bare_ceiling(generator.backend.model, lengths)
        if args.mode in ("all", "throughput"):
            levels = CONCURRENCY
            if args.quick and type(generator).__name__ != "BatchingGenerator":
                levels = (1, 4)  # one by one: 16 channels only queue 4x longer
            for level in levels:
                runs = [await concurrency_run(generator, tokenizer, level, run, checker,
                                              args.worker) for run in run_ids(args)]
                result[f"c{level}"] = median_of(runs)
            stats = getattr(getattr(generator, "worker", None), "stats", None)
            if stats is not None:  # batching: its 16-row steps, for the ceiling (run last)
                steps = [s for _, rows, s in list(stats.steps) if rows == 16][-39:]
                result["ceiling"] = dict(
                    bot_step_ms=1000 * statistics.median(steps) if steps else None,
                    bot_tokens_per_s=16 / statistics.median(steps) if steps else None)
            if hasattr(getattr(generator, "worker", None), "stats"):  # batching
                runs = [await join_run(generator, tokenizer, run, checker)
                        for run in run_ids(args)]
                result["join"] = dict(median_of(runs),
                                      join_wait_max_ms=max(r["join_wait_ms"] for r in runs))
        if args.mode in ("all", "conversation"):
            runs = [await conversation(generator, tokenizer, args, run, checker)
                    for run in run_ids(args)]
            result["conversation"] = median_of(runs)
        stats = getattr(getattr(generator, "worker", None), "stats", None)
        if stats is not None and hasattr(stats, "reused_tokens"):
            result["reused_tokens"] = stats.reused_tokens
            result["prefill_tokens"] = stats.prefill_tokens
        if hasattr(generator, "cache_stats"):  # keys/values the prefix cache holds now
            result["kv_cache_mb"] = generator.cache_stats().bytes_used / 2**20
            result["end_rss_mb"] = rss_mb()
        if result.get("ceiling", {}).get("bot_step_ms"):
            from workloads import bare_ceiling

            result["peak_rss_mb"] = peak_rss_mb()  # before the ceiling's own padded cache
            lengths = [len(model_card_ids(tokenizer, turns)) + NEW_TOKENS // 2
                       for turns in make_prompts(tokenizer, 16, 16000 + args.first_run)]
            result["ceiling"].update(bare_ceiling(generator.backend.model, lengths))
    finally:
        await generator.stop()
    result.update(replies_checked=checker.replies, bad_replies=checker.bad)
    return result


# --- the orchestrator -----------------------------------------------------------------------
SUMMED = ("bad_replies", "replies_checked")


def merge_runs(runs: list[dict], baselines: list[dict] | None = None) -> dict:
    """One option's results over rounds: medians (sums of the reply checks, the worst join
    wait), each level's tokens/s ratio to its own round's baseline (median over rounds)."""
    ok = [r for r in runs if "error" not in r]
    if not ok:
        return runs[0]
    out = median_of(ok)
    for key in SUMMED:
        if key in out:
            out[key] = sum(r.get(key, 0) for r in ok)
    for key, pick in (("prompt_min", min), ("prompt_max", max)):
        if key in out:
            out[key] = pick(r[key] for r in ok)
    for key, value in ok[0].items():
        if isinstance(value, dict):
            out[key] = median_of([r[key] for r in ok])
    if "join" in out:
        out["join"]["join_wait_max_ms"] = max(r["join"]["join_wait_max_ms"] for r in ok)
    if baselines:
        for level in CONCURRENCY:
            ratios = [r[f"c{level}"]["tokens_per_s"] / b["tokens_per_s"]
                      for r, b in zip(runs, baselines)
                      if "error" not in r and f"c{level}" in r and b.get("tokens_per_s")]
            if ratios:
                out[f"c{level}"]["x_baseline"] = statistics.median(ratios)
    out["runs_failed"] = len(runs) - len(ok)
    return out


def model_dir(size: str, cache: Path) -> Path:
    from tests.modelkit import make_model_dir

    folder = cache / f"dialogpt-{size}-never-eos"
    if not (folder / "config.json").exists():
        print(f"building a random-weight DialoGPT-{size}-shaped model in {folder} ...",
              flush=True)
        tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
        make_model_dir(tmp, size, never_eos=True)
        os.replace(tmp, folder)
    return folder


def subprocess_run(args, worker: str, mode: str = "all", run: int = 0,
                   warm: tuple[int, str] | None = None) -> dict:
    """Run `run` (its prompts are seeded by its number) of one option in a fresh process;
    `warm` = (channels, budget) for the warm workload."""
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as handle:
        out = Path(handle.name)
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", worker,
               "--mode", mode, "--model-dir", str(args.model_dir), "--runs", "1",
               "--first-run", str(run), "--out", str(out)]
    command += ["--quick"] if args.quick else []
    command += ["--no-warm"] if not args.warm else []
    if warm is not None:
        rounds = 2 if args.quick or warm[0] > 16 or warm[1] != "auto" else 3
        command += ["--warm-channels", str(warm[0]), "--warm-budget", warm[1],
                    "--warm-rounds", str(rounds)]
    command += ["--threads", str(args.threads)] if args.threads else []
    t0 = time.perf_counter()
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode != 0:
        tail = "\n".join(done.stderr.strip().splitlines()[-6:])
        print(f"  {worker}: FAILED (exit {done.returncode})\n{tail}", flush=True)
        return dict(error=tail)
    result = json.loads(out.read_text())
    out.unlink()
    what = mode if warm is None else f"{warm[0]} channels, budget {warm[1]}"
    print(f"  run {run + 1}: {worker} ({what}): {time.perf_counter() - t0:.0f} s", flush=True)
    return result


def warm_label(name: str, warm: tuple[int, str]) -> str:
    budget = "auto" if warm[1] == "auto" else f"{warm[1]} MiB"
    return f"{name} | {warm[0]} | {budget}"


def machine() -> dict:
    import torch

    cpu = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    info = dict(cpu=cpu, cores=os.cpu_count(), python=platform.python_version(),
                torch=torch.__version__, torch_threads=torch.get_num_threads())
    try:
        import ctranslate2

        info["ctranslate2"] = ctranslate2.__version__
    except ImportError:
        pass
    return info


def fmt(value, spec: str = ".2f") -> str:
    return "-" if value is None else format(value, spec)


def table(report: dict) -> str:
    base = report["baseline"].get("tokens_per_s")
    lines = [f"DialoGPT-{report['size']} shape, {NEW_TOKENS} new tokens, prompts "
             f"{report['baseline'].get('prompt_min')}-{report['baseline'].get('prompt_max')} "
             f"tokens, {report['machine']['cores']} cores ({report['machine']['cpu']}), "
             f"median of {report['runs']} run(s){', --quick' if report['quick'] else ''}", ""]
    head = ("| option | channels | tokens/s | x baseline | p50 s | p95 s | loop lag p50/p99/max"
            " ms | peak RSS MB |")
    lines += [head, "|" + "---|" * 8]
    lines.append(f"| model-card loop (sequential generate) | 1 | {fmt(base, '.1f')} | 1.00 | "
                 f"{fmt(report['baseline'].get('p50_s'))} | "
                 f"{fmt(report['baseline'].get('p95_s'))} | - | "
                 f"{fmt(report['baseline'].get('peak_rss_mb'), '.0f')} |")
    for name, result in report["options"].items():
        if "error" in result:
            lines.append(f"| {name} | failed | | | | | | |")
            continue
        for level in CONCURRENCY:
            row = result.get(f"c{level}")
            if row is None:
                continue
            lag = (f"{row['lag_p50_ms']:.1f}/{row['lag_p99_ms']:.1f}/{row['lag_max_ms']:.1f}"
                   if level == max(c for c in CONCURRENCY if f"c{c}" in result) else "")
            ratio = row.get("x_baseline")
            lines.append(f"| {name} | {level} | {row['tokens_per_s']:.1f} | {fmt(ratio)} | "
                         f"{row['p50_s']:.2f} | {row['p95_s']:.2f} | {lag} | "
                         f"{fmt(result.get('peak_rss_mb'), '.0f') if level == 1 else ''} |")
    for name, why in report["skipped"].items():
        lines.append(f"| {name} | skipped: {why} | | | | | | |")
    kv = [f"{name}: {r['kv']}" for name, r in report["options"].items() if "kv" in r]
    if kv:
        lines += ["", "Keys/values (DIALOGBOT_KV_DTYPE as each option sets it, `auto` "
                  "otherwise): " + "; ".join(kv)]
    joins = [(name, r["join"]) for name, r in report["options"].items() if "join" in r]
    if joins:
        lines += ["", "| a 16th request joins 15 decoding | waited until its prefill, ms |"
                  " the step running when it arrived, ms | from that step's end to its prefill,"
                  " ms | median 15-row step, ms |", "|---|---|---|---|---|"]
        for name, join in joins:
            lines.append(f"| {name} | {join['join_wait_ms']:.0f} (max "
                         f"{join['join_wait_max_ms']:.0f}) | {join['inflight_step_ms']:.0f} | "
                         f"{join['after_step_ms']:.1f} | {join['step15_ms']:.0f} |")
    lines += ["", "| conversation | turn 1 s | median turns " + "26-30" * report["quick"] +
              "26-35" * (not report["quick"]) + " s | ratio | prompt tokens at the end |",
              "|---|---|---|---|---|"]
    for name, result in report["conversations"].items():
        conv = result.get("conversation")
        if conv:
            lines.append(f"| {name} | {conv['turn1_s']:.2f} | {conv['late_median_s']:.2f} | "
                         f"{conv['late_over_turn1']:.2f} | {conv['last_prompt_tokens']:.0f} |")
        else:
            lines.append(f"| {name} | failed | | | |")
    lines += warm_table(report) + ceiling_table(report) + memory_table(report)
    lines += turn_table(report)
    results = {id(r): r for r in [*report["options"].values(),
                                  *report["conversations"].values(),
                                  *report.get("warm", {}).values()]}.values()
    bad = report["baseline"].get("bad_replies", 0) + sum(r.get("bad_replies", 0)
                                                         for r in results)
    checked = sum(r.get("replies_checked", 0) for r in results)
    lines += ["", f"replies checked: {checked}, not exactly {NEW_TOKENS} tokens: {bad}"]
    return "\n".join(lines)


def warm_table(report: dict) -> list[str]:
    warm = report.get("warm") or {}
    if not warm:
        return []
    base = report["baseline"]
    lines = ["", "Warm: channels in the middle of a conversation (400-900 tokens of history, "
             "a ~20-token message, 40 new tokens), every channel sending at once each round; "
             f"model-card loop on the same turns: {fmt(base.get('warm_tokens_per_s'), '.1f')} "
             f"tokens/s (prompts {base.get('warm_prompt_min')}-{base.get('warm_prompt_max')})",
             "", "| option | channels | KV budget | tokens/s | x model-card loop | p50 s | p95 s "
             "| cache hit rate | 16-row step ms | a round: prefill tokens, s + decode s | peak RSS "
             "MB |", "|" + "---|" * 11]
    for label, result in warm.items():
        row = result.get("warm")
        if not row:
            lines.append(f"| {label} | failed | | | | | | |")
            continue
        ratio = statistics.median(result["ratios"]) if result.get("ratios") else None
        budget = label.rsplit("| ", 1)[1]
        if budget == "auto":
            budget = f"auto ({row['cache_mb']:.0f} MiB)"
        name, channels = label.split(" | ")[:2]
        lines.append(f"| {name} | {channels} | {budget} | {row['tokens_per_s']:.1f} | "
                     f"{fmt(ratio)} | {row['p50_s']:.2f} | {row['p95_s']:.2f} | "
                     f"{row['hit_rate']:.2f} | {fmt(row.get('step16_ms'), '.0f')} | "
                     f"{fmt(row.get('prefill_tokens'), '.0f')}, {fmt(row.get('prefill_s'))} + "
                     f"{fmt(row.get('decode_s'))} | {fmt(result.get('peak_rss_mb'), '.0f')} |")
    return lines


def ceiling_table(report: dict) -> list[str]:
    rows = []
    for name, result in report["options"].items():
        ceiling = result.get("ceiling")
        if ceiling and ceiling.get("bot_tokens_per_s"):
            rows.append((name, "cold, 16 channels", ceiling["history"], ceiling["bot_step_ms"],
                         ceiling["step_ms"], ceiling["bot_tokens_per_s"],
                         ceiling["tokens_per_s"]))
    for label, result in (report.get("warm") or {}).items():
        warm = result.get("warm") or {}
        bare = warm.get("bare")
        if bare and warm.get("decode16_tokens_per_s"):
            name, channels = label.split(" | ")[:2]
            rows.append((name, f"warm, {channels} channels, {label.rsplit('| ', 1)[1]}",
                         bare["history"], warm["step16_ms"], bare["step_ms"],
                         warm["decode16_tokens_per_s"], bare["tokens_per_s"]))
    if not rows:
        return []
    lines = ["", "Ceiling: the bot's 16-row decode steps against the bare batched forward (the "
             "model alone on 16 left-padded rows of the same cache lengths, preallocated fp32 "
             "cache, transformers' sdpa attention, no sampling, no scheduling)", "",
             "| option | workload | cache lengths | bot step ms | bare step ms | bot decode "
             "tokens/s | bare tokens/s | bot / bare |", "|" + "---|" * 8]
    for name, what, history, bot_ms, bare_ms, bot_tps, bare_tps in rows:
        lines.append(f"| {name} | {what} | {history} | {bot_ms:.0f} | {bare_ms:.0f} | "
                     f"{bot_tps:.1f} | {bare_tps:.1f} | {bot_tps / bare_tps:.2f} |")
    return lines


def memory_table(report: dict) -> list[str]:
    base = report["baseline"].get("peak_rss_mb")
    lines = ["", "Memory (each option in its own process): resident after loading the model, "
             "the peak over the whole run (caches included), and at its end the RSS and the "
             "keys/values the prefix cache holds", "",
             "| option | RSS after load MB | peak during load MB | peak RSS MB | peak / model-card "
             "loop's peak | RSS at the end MB | of which KV cache MB |", "|" + "---|" * 7,
             f"| model-card loop | - | - | {fmt(base, '.0f')} | 1.00 | | |"]
    for name, result in [*report["options"].items(), *(report.get("warm") or {}).items()]:
        if "error" in result or not result.get("peak_rss_mb"):
            continue
        ratio = result["peak_rss_mb"] / base if base else None
        lines.append(f"| {name.replace(' | ', ', ')} | {fmt(result.get('load_rss_mb'), '.0f')} | "
                     f"{fmt(result.get('load_peak_rss_mb'), '.0f')} | "
                     f"{result['peak_rss_mb']:.0f} | {fmt(ratio)} | "
                     f"{fmt(result.get('end_rss_mb'), '.0f')} | "
                     f"{fmt(result.get('kv_cache_mb'), '.0f')} |")
    return lines


def turn_table(report: dict) -> list[str]:
    rows = [(name, r["conversation"]) for name, r in report["conversations"].items()
            if r.get("conversation", {}).get("turn1_decode_s") is not None]
    if not rows:
        return []
    lines = ["", "Where a conversation turn's time goes (batching generators; late = median "
             "over the late turns)", "", "| conversation | turn | prefill tokens | prefill s | "
             "decode s | ms per decode step | late turns that missed the cache |",
             "|---|---|---|---|---|---|---|"]
    for name, conv in rows:
        lines.append(f"| {name} | 1 | {conv['turn1_prefill_tokens']:.0f} | "
                     f"{conv['turn1_prefill_s']:.2f} | {conv['turn1_decode_s']:.2f} | "
                     f"{conv['turn1_step_ms']:.0f} | |")
        lines.append(f"| {name} | {conv['late_turns']} | {conv['late_prefill_tokens']:.0f} | "
                     f"{conv['late_prefill_s']:.2f} | {conv['late_decode_s']:.2f} | "
                     f"{conv['late_step_ms']:.0f} | {conv['late_misses']:.0f} |")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=("small", "medium", "tiny"), default="medium",
                        help="model shape (medium: the bot's default model; tiny: only to "
                             "check that the script runs)")
    parser.add_argument("--runs", type=int, default=3, help="runs per measurement (median)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--quick", action="store_true",
                        help="fewer requests; one-by-one generators skip 16 channels")
    parser.add_argument("--threads", type=int, help="torch / CTranslate2 intra-op threads")
    parser.add_argument("--only", help="comma-separated option names to run")
    parser.add_argument("--no-warm", dest="warm", action="store_false",
                        help="skip the warm (mid-conversation) workloads")
    parser.add_argument("--cache", type=Path,
                        default=Path(tempfile.gettempdir()) / "dialogbot-bench")
    # internal: one measurement in a subprocess
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="all", help=argparse.SUPPRESS)
    parser.add_argument("--model-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--first-run", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--warm-channels", type=int, default=16, help=argparse.SUPPRESS)
    parser.add_argument("--warm-budget", default="auto", help=argparse.SUPPRESS)
    parser.add_argument("--warm-rounds", type=int, default=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick and "--runs" not in sys.argv:
        args.runs = 1

    if args.worker:  # inside a subprocess
        if args.worker == "baseline":
            result = run_baseline(args)
        else:
            result = asyncio.run(run_option(args))
        result.setdefault("peak_rss_mb", peak_rss_mb())
        args.out.write_text(json.dumps(result))
        return 0

    args.cache.mkdir(parents=True, exist_ok=True)
    os.environ["HF_HOME"] = str(args.cache / "hf")  # CTranslate2 conversions land here
    args.model_dir = str(model_dir(args.size, args.cache))
    names, skipped = available_options()
    if args.only:
        wanted = set(args.only.split(","))
        names = [n for n in names if n in wanted]
    started = time.perf_counter()
    print(f"bench: DialoGPT-{args.size} shape, runs={args.runs}, quick={args.quick}",
          flush=True)
    report = dict(size=args.size, runs=args.runs, quick=args.quick, new_tokens=NEW_TOKENS,
                  machine=machine(), skipped=skipped, options={}, conversations={})
    if "ct2-int8" in names:  # convert once here, so no measured process pays for it
        from bot.ct2 import ensure_converted

        ensure_converted(args.model_dir)
    labels = {"torch-fp32": "torch-fp32 (one by one, no cache)",
              "torch-fp32-batching": "torch-fp32-batching (KV cache reuse)",
              "torch-fp32-batching-nocache": "torch-fp32-batching, kv_cache_mb=0"}
    conversations = [n for n in ("torch-fp32", "torch-fp32-batching") if n in names]
    if "torch-fp32-batching" in conversations:
        conversations.append("torch-fp32-batching-nocache")
        if args.quick and "torch-fp32" in conversations:
            conversations.remove("torch-fp32")  # --quick: cache on/off is what matters
    warm_runs = []
    if args.warm:
        for name in ("torch-fp32-batching", "torch-fp32-batching-fp16kv",
                     "torch-int8-batching"):
            if name in names:
                warm_runs.append((name, (16, "auto")))
        if "torch-fp32-batching" in names:
            warm_runs += [("torch-fp32-batching", (64, "auto")),
                          ("torch-fp32-batching", (16, "512"))]
    # Runs are rounds: the baseline, then every option, once per round. The machine's speed
    # drifts (shared hosts), so each option is compared with its own round's baseline and
    # the ratios' median is reported, next to the medians of the figures themselves.
    rounds = []
    for run in range(args.runs):
        one = dict(baseline=subprocess_run(args, "baseline", run=run), options={})
        for name in names:  # an option with a conversation runs both in one process
            mode = "all" if name in conversations else "throughput"
            one["options"][name] = subprocess_run(args, name, mode, run)
        for name in conversations:
            if name not in names:
                one["options"][name] = subprocess_run(args, name, "conversation", run)
        for name, warm in warm_runs:
            one["options"][warm_label(name, warm)] = subprocess_run(args, name, "warm", run,
                                                                    warm)
        rounds.append(one)
    report["baseline"] = merge_runs([r["baseline"] for r in rounds])
    for name in [*names, *(n for n in conversations if n not in names)]:
        merged = merge_runs([r["options"][name] for r in rounds],
                            [r["baseline"] for r in rounds])
        if name in names:
            report["options"][name] = merged
        if name in conversations:
            report["conversations"][labels[name]] = merged
    report["warm"] = {}
    for name, warm in warm_runs:
        label = warm_label(name, warm)
        report["warm"][label] = merge_runs([r["options"][label] for r in rounds])
        report["warm"][label]["ratios"] = [
            r["options"][label]["warm"]["tokens_per_s"] / r["baseline"]["warm_tokens_per_s"]
            for r in rounds if "warm" in r["options"][label]
            and r["baseline"].get("warm_tokens_per_s")]
    report["seconds"] = time.perf_counter() - started
    print()
    print(table(report))
    print(f"\nbench took {report['seconds']:.0f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2))
        print(f"JSON written to {args.json}")
    else:
        print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
