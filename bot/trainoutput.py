"""Where `dialogbot train` writes: `<out>.partial/` while it runs (checkpoints, `run.json`),
the finished model renamed to `<out>` at the very end, so a directory at `<out>` is always a
whole model. A finished model holds `dialogbot-training.json` (settings, data hash, figures)
and a `README.md` model card made from it. Pure Python (no torch)."""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bot.errors import ConfigError

MARKER = "dialogbot-training.json"
RUN_FILE = "run.json"
_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


@dataclass(frozen=True, slots=True)
class OutputDir:
    out: Path

    @property
    def work(self) -> Path:
        """The run's working directory: checkpoints, run.json, the model before the rename."""
        return self.out.with_name(self.out.name + ".partial")

    @property
    def staged(self) -> Path:
        return self.work / "model"

    def finished(self) -> bool:
        """`out` is a model a previous `dialogbot train` finished."""
        return (self.out / MARKER).is_file()

    def last_checkpoint(self) -> Path | None:
        found = []
        if self.work.is_dir():
            for child in self.work.iterdir():
                match = _CHECKPOINT.match(child.name)
                if match and child.is_dir():
                    found.append((int(match.group(1)), child))
        return max(found)[1] if found else None

    def check(self, *, resume: bool, overwrite: bool) -> None:
        """Refuse (one line, ConfigError) what would lose work: replacing a directory that is
        not a finished model without --overwrite, starting over an interrupted run without
        --resume or --overwrite, resuming without a checkpoint. Reads only."""
        if resume:
            if self.last_checkpoint() is None:
                raise ConfigError(f"--resume: no checkpoint in {self.work} to continue from; "
                                  "run without --resume to start")
        elif self.last_checkpoint() is not None and not overwrite:
            raise ConfigError(f"an interrupted run is in {self.work}: add --resume to continue "
                              "it, or --overwrite to start again")
        if overwrite or not self.out.exists() or self.finished():
            return
        if self.out.is_dir() and not any(self.out.iterdir()):
            return
        what = "a directory" if self.out.is_dir() else "a file"
        raise ConfigError(f"--out {self.out} is {what} that is not a model `dialogbot train` "
                          "finished: choose another --out, or add --overwrite to replace it")

    def prepare(self, *, resume: bool) -> None:
        """Create the working directory; a fresh run first clears an old one."""
        if not resume and self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True, exist_ok=True)

    def read_run(self) -> dict[str, Any] | None:
        path = self.work / RUN_FILE
        return json.loads(path.read_text()) if path.is_file() else None

    def write_run(self, run: dict[str, Any]) -> None:
        _write_json(self.work / RUN_FILE, run)

    def finish(self, summary: dict[str, Any]) -> None:
        """Write the marker and the model card into the staged model, then swap it in for
        `out` (whatever was there goes) and remove the working directory."""
        _write_json(self.staged / MARKER, summary)
        (self.staged / "README.md").write_text(model_card(summary), encoding="utf-8")
        if self.out.exists() or self.out.is_symlink():
            old = self.work / "previous"
            os.replace(self.out, old)
        os.replace(self.staged, self.out)
        shutil.rmtree(self.work, ignore_errors=True)


def _write_json(path: Path, value: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def same_run(saved: dict[str, Any], now: dict[str, Any]) -> None:
    """--resume continues the same run: the data and every setting must match."""
    for key in sorted(set(saved) | set(now)):
        if saved.get(key) != now.get(key):
            flag = "the data file's content" if key == "data_sha256" else \
                "--" + key.replace("_", "-")
            raise ConfigError(f"--resume: {flag} differs from the interrupted run "
                              f"({saved.get(key)!r} then, {now.get(key)!r} now); run the same "
                              "command with --resume, or use --overwrite to start again")


def _fmt(value: Any) -> str:
    if value is None:
        return "not measured"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def model_card(s: dict[str, Any]) -> str:
    """A Hugging Face style model card (YAML front matter + Markdown) from the run summary."""
    settings = s["settings"]
    rows = "\n".join(f"| {key.replace('_', '-')} | {_fmt(settings[key])} |"
                     for key in sorted(settings))
    ppl = s["perplexity"]
    return f"""---
base_model: {s["base"]}
library_name: transformers
pipeline_tag: text-generation
tags:
- conversational
- dialogpt
- dialogbot
---

# {s["name"]}

DialoGPT fine-tuned by `dialogbot train` from **{s["base"]}** on `{s["data"]}`.

Chat with it: `DIALOGBOT_MODEL={s["out"]} dialogbot chat`

## Data

| | |
|---|---|
| file | `{s["data"]}` ({s["format"]}) |
| sha256 | `{s["data_sha256"]}` |
| character | {s.get("character") or "(every line is a response)"} |
| examples | {s["examples"]["train"]} trained, {s["examples"]["eval"]} held out, \
{s["examples"]["skipped"]} skipped (response longer than the block) |
| tokens | {s["tokens"]["input"]} input, {s["tokens"]["trained"]} in the loss |

## Training

Causal language modelling on DialoGPT's layout (each turn followed by end-of-text, built by
the bot's own prompt builder), loss on {"the response only" if settings["loss"] == "response"
                                        else "every token"}; {s["steps"]} optimizer steps,
{_fmt(s["epochs_done"])} epochs, {_fmt(s["train_seconds"])} s on {s["device"]} \
({s["processes"]} process{"es" if s["processes"] > 1 else ""}, {s["precision"]}).

| setting | value |
|---|---|
{rows}

## Evaluation

Perplexity on the held-out examples' {"responses" if settings["loss"] == "response"
                                       else "tokens"} (lower is better):

| before | after |
|---|---|
| {_fmt(ppl["before"])} | {_fmt(ppl["after"])} |

Made with dialogbot {s["version"]} on {s["finished_at"]}.
"""
