"""What reply quality costs: reply latency and aggregate tokens/s with 1, 4 and 8 candidates,
with and without two DialogRPT rankers, on random-weight models of DialoGPT's and DialogRPT's
shapes (the weights do not change the compute; the hub is not needed).

    .venv/bin/python bench/bench_quality.py                      # medium LM, 2 medium rankers
    .venv/bin/python bench/bench_quality.py --lm-shape small --new-tokens 32 --repeats 3

Each row is one `GenerationWorker.produce` call (prompt, one batched `generate` for all
candidates, repeat/filter rules, one batched scoring pass per ranker), timed in this thread,
median over the prompts x repeats. tokens/s counts every candidate's generated tokens. The
language model never emits end-of-text (tests.modelkit never_eos), so every candidate runs
to --new-tokens and rows compare like with like. Timings are only meaningful on a quiet box.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import threading
import time
from dataclasses import dataclass, replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from bot.events import DecodingSettings, GenerationRequest, Role, Turn  # noqa: E402
from bot.generator import GenerationWorker  # noqa: E402
from bot.hf import TransformersBackend  # noqa: E402
from bot.quality import ReplyRules  # noqa: E402
from bot.rankers import Ensemble, parse_rankers  # noqa: E402

CONVERSATIONS = [
    ["Hi! How was your weekend?", "Pretty good, I went hiking with some friends.",
     "Nice, where did you go? I have been looking for a good trail near the city."],
    ["Do you think robots will ever be able to feel emotions the way people do?"],
    ["I just finished reading a really long novel about a family over three generations.",
     "That sounds intense. Did you like the ending?",
     "Not really, it felt rushed after all that build-up. What do you read lately?",
     "Mostly short stories, I don't have much time.", "Any you'd recommend?"],
]
RANKERS = ("human-vs-rand", "updown")  # one of each DialogRPT group, default weights


@dataclass(frozen=True, slots=True)
class Row:
    candidates: int
    rankers: str
    latency: float  # median seconds per reply
    tokens_per_s: float  # all candidates' generated tokens / time
    ranking: float  # median seconds spent scoring


def model_dirs(root: Path, lm_shape: str, ranker_shape: str) -> tuple[Path, list[Path]]:
    """Random-weight models saved once under `root` and reused by later runs."""
    from tests.modelkit import make_model_dir

    lm = root / f"dialogpt-{lm_shape}-never-eos"
    if not (lm / "config.json").exists():
        make_model_dir(lm, lm_shape, never_eos=True)
    rankers = []
    for seed, name in enumerate(RANKERS, start=1):
        folder = root / f"DialogRPT-{ranker_shape}-{name}"  # the name gives group and weight
        if not (folder / "config.json").exists():
            make_model_dir(folder, ranker_shape, seed=seed, kind="ranker")
        rankers.append(folder)
    return lm, rankers


def requests(settings: DecodingSettings) -> list[GenerationRequest]:
    out = []
    for i, texts in enumerate(CONVERSATIONS):
        turns = tuple(Turn("bench", str(i), Role.USER if j % 2 == 0 else Role.BOT, t)
                      for j, t in enumerate(texts))
        out.append(GenerationRequest(f"bench:{i}", turns, settings))
    return out


def measure(worker: GenerationWorker, settings: DecodingSettings, repeats: int,
            ) -> tuple[float, float, float]:
    """(median latency, aggregate tokens/s, median ranking seconds) for `settings`."""
    spent: list[float] = []
    best = worker.rankers.best if worker.rankers else None
    if worker.rankers is not None:
        def timed_best(*args):
            start = time.perf_counter()
            try:
                return best(*args)
            finally:
                spent.append(time.perf_counter() - start)

        worker.rankers.best = timed_best
    latencies, tokens = [], 0
    cancel = threading.Event()
    try:
        worker.produce(requests(settings)[0], cancel)  # warm-up
        spent.clear()
        for _ in range(repeats):
            for request in requests(settings):
                start = time.perf_counter()
                worker.produce(request, cancel)
                latencies.append(time.perf_counter() - start)
                tokens += settings.max_new_tokens * worker.count(settings)
    finally:
        if best is not None:
            worker.rankers.best = best
    return (statistics.median(latencies), tokens / sum(latencies),
            statistics.median(spent) if spent else 0.0)


def bench_candidates(lm_dir: Path, ranker_dirs: list[Path], counts=(1, 4, 8),
                     new_tokens: int = 32, repeats: int = 2, threads: int | None = None,
                     ) -> list[Row]:
    """Rows for every candidate count, without rankers and with `ranker_dirs`."""
    backend = TransformersBackend(str(lm_dir), threads=threads)
    backend.load()
    rules = ReplyRules(max_candidates=max(counts))
    ensemble = Ensemble(parse_rankers(",".join(map(str, ranker_dirs))))
    ensemble.load(backend.eos_token_id)
    label = f"{len(ranker_dirs)} x " + ", ".join(str(s) for s in ensemble.specs)
    workers = [(GenerationWorker(backend, "fallback", rules), "none"),
               (GenerationWorker(backend, "fallback", rules, ensemble), label)]
    base = DecodingSettings(max_new_tokens=new_tokens)
    rows = []
    for worker, name in workers:
        for n in counts:
            latency, tps, ranking = measure(worker, replace(base, candidates=n), repeats)
            rows.append(Row(n, name, latency, tps, ranking))
            print(f"  measured {n} candidates, rankers {name}: {latency:.2f} s", file=sys.stderr)
    return rows


def table(rows: list[Row]) -> str:
    one = next(r.latency for r in rows if r.candidates == 1 and r.rankers == "none")
    lines = ["| candidates | rankers | reply latency (s) | x 1 candidate | tokens/s (all "
             "candidates) | of which ranking (s) |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r.candidates} | {r.rankers} | {r.latency:.2f} | "
                     f"{r.latency / one:.2f} | {r.tokens_per_s:.1f} | {r.ranking:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lm-shape", default="medium", choices=("tiny", "small", "medium"))
    parser.add_argument("--ranker-shape", default="medium",
                        choices=("tiny", "small", "medium"))
    parser.add_argument("--counts", default="1,4,8", help="candidate counts, comma-separated")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="passes over the prompts")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    parser.add_argument("--models", type=Path,
                        default=Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
                        / "dialogbot-bench", help="where the random-weight models are kept")
    args = parser.parse_args(argv)
    lm, rankers = model_dirs(args.models, args.lm_shape, args.ranker_shape)
    counts = tuple(int(c) for c in args.counts.split(","))
    rows = bench_candidates(lm, rankers, counts, args.new_tokens, args.repeats, args.threads)
    print(f"LM {args.lm_shape}, rankers {args.ranker_shape}, {args.new_tokens} new tokens, "
          f"{len(CONVERSATIONS)} prompts x {args.repeats}, torch threads "
          f"{args.threads or 'default'}")
    print(table(rows))


if __name__ == "__main__":
    main()
