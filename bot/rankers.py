"""DialogRPT rankers: score (context, candidate) pairs and combine them the DialogRPT way.

A ranker is a `GPT2ForSequenceClassification` with one label (Microsoft's
`microsoft/DialogRPT-<name>` checkpoints, or a local directory), scoring
`context <|endoftext|> candidate` as `sigmoid(logit)` of the last token. The ranker models use
GPT-2's vocabulary, so they take the generator's token ids directly (the generator's tokenizer
is shared: nothing is re-encoded).

Combination (DialogRPT's `restore/ensemble.yml`, `JointScorer.core` in its `src/model.py`):

    prior = sum(w * s for human-like rankers) / sum(w)     (human-vs-rand, human-vs-machine)
    cond  = sum(w * s for feedback rankers) / sum(w)       (updown, depth, width)
    final = prior * cond                                   (a group with no ranker counts as 1)

The divisor is the plain sum of the weights (not of their absolute values), as there; a group
whose weights sum to 0 is refused. Every model call happens in the generator's worker thread.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from bot.errors import ConfigError

log = logging.getLogger(__name__)

HUMAN_LIKE = "human-like"  # DialogRPT's "prior" group
FEEDBACK = "feedback"  # DialogRPT's "cond" group
# name -> (group, default weight), from restore/ensemble.yml
KNOWN = {
    "human-vs-rand": (HUMAN_LIKE, 0.5),
    "human-vs-machine": (HUMAN_LIKE, 0.5),
    "updown": (FEEDBACK, 1.0),
    "depth": (FEEDBACK, 0.48),
    "width": (FEEDBACK, -0.5),
}
HUB_PREFIX = "microsoft/DialogRPT-"


@dataclass(frozen=True, slots=True)
class RankerSpec:
    """One configured ranker: where it loads from, its ensemble group and weight."""

    name: str  # e.g. "updown", or the directory's name
    source: str  # hub id or local directory
    group: str
    weight: float

    def __str__(self) -> str:
        return f"{self.name}:{self.weight:g}"


def parse_rankers(value: str) -> tuple[RankerSpec, ...]:
    """"human-vs-rand:0.5,updown" -> specs. Entries: a DialogRPT name (human-vs-rand,
    human-vs-machine, updown, depth, width), a hub id or a local directory, each with an
    optional ":weight". A directory or hub id whose last part ends in a known name (e.g.
    ".../DialogRPT-depth") takes that name's group and default weight; any other goes to the
    feedback group with weight 1. Raises ValueError naming the bad entry."""
    specs: list[RankerSpec] = []
    for entry in value.replace("\n", ",").split(","):
        entry = entry.strip()
        if not entry:
            continue
        source, weight = entry, None
        head, sep, tail = entry.rpartition(":")
        if sep and head:
            try:
                weight = float(tail)
            except ValueError:
                pass
            else:
                source = head.strip()
        if weight is not None and weight != weight:  # NaN
            raise ValueError(f"{entry!r}: weight is not a number")
        name = _known_name(source)
        if source in KNOWN:
            source = HUB_PREFIX + source
        group, default = KNOWN.get(name, (FEEDBACK, 1.0))
        specs.append(RankerSpec(name or Path(source).name or source, source, group,
                                default if weight is None else weight))
    names = [s.name for s in specs]
    if len(set(names)) != len(names):
        raise ValueError(f"a ranker is listed twice: {', '.join(names)}")
    for group in (HUMAN_LIKE, FEEDBACK):
        weights = [s.weight for s in specs if s.group == group]
        if weights and sum(weights) == 0:
            raise ValueError(f"the {group} rankers' weights sum to 0 (the group mean divides "
                             "by that sum)")
    return tuple(specs)


def _known_name(source: str) -> str | None:
    last = source.rstrip("/").rsplit("/", 1)[-1].lower().replace("_", "-")
    for name in sorted(KNOWN, key=len, reverse=True):
        if last == name or last.endswith("-" + name):
            return name
    return None


def combine(scores: Mapping[str, Sequence[float]], specs: Sequence[RankerSpec]) -> list[float]:
    """Final DialogRPT ensemble score per candidate from each ranker's scores (by spec name)."""
    n = len(next(iter(scores.values()))) if scores else 0

    def group_mean(group: str, i: int) -> float:
        members = [s for s in specs if s.group == group]
        if not members:
            return 1.0
        return (sum(s.weight * scores[s.name][i] for s in members)
                / sum(s.weight for s in members))

    return [group_mean(HUMAN_LIKE, i) * group_mean(FEEDBACK, i) for i in range(n)]


def ranker_input(context: Sequence[int], candidate: Sequence[int], n_positions: int,
                 eos: int) -> list[int]:
    """`context <eos> candidate` cut to `n_positions` by dropping the start of the context.

    `context` is the generator's prompt (each turn followed by end-of-text), so it already
    ends with the separator; one is added when it does not."""
    ctx = list(context)
    if not ctx or ctx[-1] != eos:
        ctx.append(eos)
    room = n_positions - len(candidate)
    if room < 1:  # a candidate as long as the window keeps its start and one separator
        return [eos] + list(candidate)[: n_positions - 1]
    return ctx[-room:] + list(candidate)


def load_failure(source: str, exc: BaseException) -> str:
    """A few words on why `from_pretrained(source)` failed (its own text is a paragraph)."""
    path = Path(source)
    if path.is_dir():
        if not (path / "config.json").exists():
            return "the directory has no config.json"
        return f"{type(exc).__name__} reading the model in it"
    if source.startswith((".", "/", "~")) or source.count("/") > 1:
        return "no such local directory"
    return "not a hub id with a model (or not downloadable)"


class DialogRPTRanker:
    """One DialogRPT model. `load` and `score` run in the generator's worker thread."""

    def __init__(self, spec: RankerSpec, *, device: str = "cpu", eos_token_id: int = 50256):
        self.spec = spec
        self.device = device
        self.eos_token_id = eos_token_id
        self.model = None
        self.n_positions = 1024

    def load(self) -> None:
        from transformers import AutoModelForSequenceClassification

        from bot.hf import pretrained_options

        source = self.spec.source
        options = pretrained_options(source, "DIALOGBOT_RANKERS")
        try:
            model = AutoModelForSequenceClassification.from_pretrained(source, **options)
        except (OSError, ValueError, KeyError, ImportError) as exc:
            raise ConfigError(f"DIALOGBOT_RANKERS: {source!r} could not be loaded: "
                              f"{load_failure(source, exc)}") from None
        if model.config.num_labels != 1 or not hasattr(model, "score"):
            raise ConfigError(f"DIALOGBOT_RANKERS: {self.spec.source!r} is not a DialogRPT "
                              "ranker (GPT-2 sequence classifier with one label)")
        self.n_positions = int(getattr(model.config, "n_positions", 1024))
        self.model = model.to(self.device).eval()
        log.info("ranker %s loaded from %s (weight %g, %s)", self.spec.name, self.spec.source,
                 self.spec.weight, self.spec.group)

    def score(self, context: Sequence[int], candidates: Sequence[Sequence[int]]) -> list[float]:
        """sigmoid(logit) per candidate, all candidates in one forward pass.

        Rows are right-padded and the logit is read at each row's own last token (as
        DialogRPT's `Scorer.core` does), not where `GPT2ForSequenceClassification` would pool:
        it looks for the last token that is not the pad id, and pad == end-of-text is also
        the separator inside every row."""
        import torch

        rows = [ranker_input(context, c, self.n_positions, self.eos_token_id)
                for c in candidates]
        if not rows:
            return []
        width = max(map(len, rows))
        ids = torch.full((len(rows), width), self.eos_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = 1
        last = torch.tensor([len(r) - 1 for r in rows])
        with torch.inference_mode():
            hidden = self.model.base_model(input_ids=ids.to(self.device),
                                           attention_mask=mask.to(self.device))[0]
            pooled = hidden[torch.arange(len(rows)), last.to(self.device)]
            logits = self.model.score(pooled).squeeze(-1)
        return torch.sigmoid(logits.float()).tolist()


class Ensemble:
    """The configured rankers and their combination; `best` picks a candidate index."""

    def __init__(self, specs: Sequence[RankerSpec], *, device: str = "cpu",
                 eos_token_id: int = 50256):
        self.specs = tuple(specs)
        self.rankers = [DialogRPTRanker(s, device=device, eos_token_id=eos_token_id)
                        for s in self.specs]

    def load(self, eos_token_id: int | None = None) -> None:
        """Load every model (in the worker thread); `eos_token_id` is the generator's."""
        for ranker in self.rankers:
            if eos_token_id is not None:
                ranker.eos_token_id = eos_token_id
            ranker.load()

    def scores(self, context: Sequence[int],
               candidates: Sequence[Sequence[int]]) -> list[float]:
        each = {r.spec.name: r.score(context, candidates) for r in self.rankers}
        return combine(each, self.specs)

    def best(self, context: Sequence[int], candidates: Sequence[Sequence[int]]) -> int:
        """Index of the candidate with the highest combined score (the first on a tie)."""
        if len(candidates) <= 1:
            return 0
        final = self.scores(context, candidates)
        log.debug("ranker scores %s", [round(s, 4) for s in final])
        return max(range(len(final)), key=final.__getitem__)

    def describe(self) -> str:
        return ", ".join(map(str, self.specs)) or "none"
