"""`dialogbot train`: fine-tune DialoGPT on a script or dialogues with Hugging Face `Trainer`.

    data (bot.trainingdata) -> examples built with the bot's own prompt builder -> Trainer
    (response-only loss by default) -> perplexity before/after -> `<out>` (bot.trainoutput)

- Runs on whatever `Trainer` finds: a GPU (bf16 where supported, else fp16) or the CPU (fp32);
  under `torchrun` / `accelerate launch` data-parallel, rank 0 writing the output once.
- Checkpoints every `save_steps` in `<out>.partial/`; `resume=True` continues from the newest.
- Ctrl-C (or SIGTERM) asks to stop: the current step ends, a checkpoint is saved, and the
  result says `interrupted`; a second Ctrl-C stops at once.
- Every bad input is a one-line `ConfigError` / `DataError` raised before training starts.
Processes and stopping: bot.trainprocess; the output directory and model card: bot.trainoutput.
torch and transformers are imported inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import math
import random
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bot import __version__
from bot.errors import ConfigError
from bot.trainingdata import (IGNORE, LOSSES, Corpus, CsvColumns, Encoded, detect_format,
                              encode_corpus, file_sha256, read_corpus)
from bot.trainoutput import OutputDir, same_run
from bot.trainprocess import (Say, StopRequest, barrier, in_process_group,
                               leave_process_group, rank, stop_on_signals, world_size)


@dataclass(frozen=True, slots=True)
class TrainOptions:
    data: Path
    out: Path
    base: str = "microsoft/DialoGPT-small"
    format: str | None = None
    character: str | None = None
    columns: CsvColumns = field(default_factory=CsvColumns)
    context_lines: int = 7
    loss: str = "response"
    epochs: float = 3.0
    max_steps: int | None = None
    lr: float = 5e-5
    batch_size: int = 4
    grad_accum: int = 1
    block_size: int = 512
    seed: int = 42
    eval_fraction: float = 0.1
    save_steps: int = 500
    resume: bool = False
    overwrite: bool = False

    def settings(self) -> dict[str, Any]:
        """What decides the result (run.json, the model card, --resume's check)."""
        return dict(base=self.base, format=self.format, character=self.character,
                    speaker_column=self.columns.speaker, text_column=self.columns.text,
                    context_lines=self.context_lines, loss=self.loss, epochs=self.epochs,
                    max_steps=self.max_steps, lr=self.lr, batch_size=self.batch_size,
                    grad_accum=self.grad_accum, block_size=self.block_size, seed=self.seed,
                    eval_fraction=self.eval_fraction)


@dataclass(frozen=True, slots=True)
class TrainResult:
    out: Path
    steps: int
    perplexity_before: float | None
    perplexity_after: float | None
    tokens_per_second: float
    interrupted: bool = False
    checkpoint: Path | None = None


def load_base(base: str) -> tuple[Any, Any, int]:
    """(model in fp32, tokenizer, positions) from a hub id or directory; ConfigError naming
    --base when it cannot be loaded."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base)
        model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    except Exception as exc:  # noqa: BLE001 - hub, file and format errors of every kind
        reason = " ".join(str(exc).split())[:200] or type(exc).__name__
        raise ConfigError(f"--base {base!r} could not be loaded ({reason}); give a hub id "
                          "such as microsoft/DialoGPT-small or a directory holding "
                          "config.json, the weights and the tokenizer") from None
    if len(tokenizer) == 0 or tokenizer.eos_token_id is None:
        raise ConfigError(f"--base {base!r}: the tokenizer is empty or has no end-of-text "
                          "token")
    model.loss_type = "ForCausalLM"  # what GPT-2 uses; left unset transformers warns about it
    positions = int(getattr(model.config, "n_positions", None)
                    or model.config.max_position_embeddings)
    return model, tokenizer, positions


class Collator:
    """Right-pads a batch with end-of-text; the attention mask comes from each example's real
    length (never from the token value: end-of-text is also the turn separator) and padding
    is IGNORE in the labels. Counts the real tokens it has batched."""

    def __init__(self, pad: int):
        self.pad = pad
        self.tokens = 0

    def __call__(self, rows: Sequence[Encoded]) -> dict[str, Any]:
        import torch

        width = max(len(row.input_ids) for row in rows)
        input_ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            n = len(row.input_ids)
            input_ids[i, :n] = torch.tensor(row.input_ids)
            labels[i, :n] = torch.tensor(row.labels)
            mask[i, :n] = 1
        self.tokens += int(mask.sum())
        return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def split(count: int, fraction: float, seed: int) -> tuple[list[int], list[int]]:
    """(train, eval) indices: a seeded shuffle, round(count * fraction) held out (at least one
    when the fraction is above zero and there are two examples or more)."""
    order = list(range(count))
    random.Random(seed).shuffle(order)
    held = 0 if fraction <= 0 or count < 2 else min(count - 1, max(1, round(count * fraction)))
    return sorted(order[held:]), sorted(order[:held])


def precision() -> tuple[str, str]:
    """(device, precision) Trainer will use: a GPU in bf16 where supported, else fp16; fp32
    on a CPU."""
    import torch

    if torch.cuda.is_available():
        return "cuda", "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "cpu", "fp32"


@dataclass(slots=True)
class Plan:
    """Everything checked and loaded before anything is written."""

    run: dict[str, Any]  # the settings and data hash (run.json, the model card)
    saved: dict[str, Any] | None  # run.json of the interrupted run being resumed
    corpus: Corpus
    model: Any
    tokenizer: Any
    train_set: list[Encoded]
    eval_set: list[Encoded]
    skipped: int


def plan(options: TrainOptions, report: Say) -> Plan:
    """Check the settings, data, output directory and base model; encode the examples.
    Every problem is a one-line ConfigError / DataError; nothing is written."""
    if options.loss not in LOSSES:
        raise ConfigError(f"--loss must be one of {', '.join(LOSSES)}, not {options.loss!r}")
    if not options.lr > 0:
        raise ConfigError(f"--lr must be above 0, not {options.lr}")
    fmt = detect_format(options.data, options.format)
    corpus = read_corpus(options.data, fmt, character=options.character,
                         columns=options.columns, context_lines=options.context_lines)
    paths = OutputDir(options.out)
    paths.check(resume=options.resume, overwrite=options.overwrite)
    run = dict(options.settings(), format=fmt, data_sha256=file_sha256(options.data))
    saved = paths.read_run() if options.resume else None
    if saved is not None:
        same_run(saved["run"], run)
    model, tokenizer, positions = load_base(options.base)
    if options.block_size > positions:
        raise ConfigError(f"--block-size {options.block_size} is more than the model's "
                          f"{positions} positions")
    encoded, skipped = encode_corpus(corpus, tokenizer.encode, tokenizer.eos_token_id,
                                     options.block_size, options.loss)
    if not encoded:
        raise ConfigError(f"{options.data}: every response is longer than --block-size "
                          f"{options.block_size}")
    train_idx, eval_idx = split(len(encoded), options.eval_fraction, options.seed)
    report(f"{options.data}: {len(corpus.examples)} examples ({len(train_idx)} to train on, "
           f"{len(eval_idx)} held out, {skipped} skipped as longer than the block)")
    return Plan(run, saved, corpus, model, tokenizer, [encoded[i] for i in train_idx],
                [encoded[i] for i in eval_idx], skipped)


def train(options: TrainOptions, say: Say = print, callbacks: Sequence[Any] = (),
          stop: StopRequest | None = None) -> TrainResult:
    """Check everything, train, write `options.out` (see module docstring)."""
    try:
        with _quiet_transformers():
            result = _train(options, say, callbacks, stop)
    except BaseException:
        leave_process_group(wait=False)
        raise
    leave_process_group(wait=True)
    return result


def _train(options: TrainOptions, say: Say, callbacks: Sequence[Any],
           stop: StopRequest | None) -> TrainResult:
    main = rank() == 0
    report: Say = say if main else (lambda _line: None)
    p = plan(options, report)
    paths = OutputDir(options.out)
    stop = stop or StopRequest()
    trainer, collator = _trainer(options, p.model, paths, p.train_set, callbacks, stop, report)
    barrier()  # every rank has checked the output directory before rank 0 touches it
    if main:
        paths.prepare(resume=options.resume)
    barrier()
    before = (p.saved["perplexity_before"] if p.saved
              else _perplexity(trainer, p.eval_set, collator, options.batch_size))
    if main:
        paths.write_run({"run": p.run, "perplexity_before": before})
    if p.eval_set:
        report(f"perplexity before training: {before:.4g} (on {len(p.eval_set)} held-out "
               "examples)")
    resume_from = paths.last_checkpoint() if options.resume else None
    if resume_from is not None:
        report(f"resuming from {resume_from}")
    collator.tokens = 0
    with stop_on_signals(stop, report):
        output = trainer.train(resume_from_checkpoint=str(resume_from) if resume_from
                               else None)
    seconds = float(output.metrics.get("train_runtime", 0.0)) or 1e-9
    speed = collator.tokens * world_size() / seconds
    state = trainer.state
    if stop.is_set() and state.global_step < state.max_steps:
        return TrainResult(options.out, state.global_step, before, None, speed, True,
                           paths.work / f"checkpoint-{state.global_step}")
    after = _perplexity(trainer, p.eval_set, collator, options.batch_size)
    if p.eval_set:
        report(f"perplexity after training: {after:.4g} (before: {before:.4g})")
    trainer.save_model(str(paths.staged))
    if main:
        p.tokenizer.save_pretrained(str(paths.staged))
        (paths.staged / "training_args.bin").unlink(missing_ok=True)  # a pickle, not needed
        paths.finish(_summary(options, p, state, seconds, speed, before, after))
        report(f"model written to {options.out} ({state.global_step} steps, "
               f"{speed:.0f} tokens/s); chat with it: DIALOGBOT_MODEL={options.out} "
               "dialogbot chat")
    return TrainResult(options.out, state.global_step, before, after, speed)


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    """Only transformers' errors and no loading bars while training; put back afterwards."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _trainer(options: TrainOptions, model: Any, paths: OutputDir, train_set: list[Encoded],
             callbacks: Sequence[Any], stop: StopRequest, report: Say) -> tuple[Any, Collator]:
    from transformers import Trainer, TrainerCallback, TrainingArguments

    class StopAndSkipFinalCheckpoint(TrainerCallback):
        """Save and stop when asked; no checkpoint for the finished last step (the model is
        saved whole right after, and optimizer state would only take disk)."""

        def on_train_begin(self, args, state, control, **kwargs):  # noqa: ANN001
            report(f"training: {state.max_steps} steps of {options.batch_size} x "
                   f"{options.grad_accum} examples per process ({world_size()} process"
                   f"{'es' if world_size() > 1 else ''})")

        def on_step_end(self, args, state, control, **kwargs):  # noqa: ANN001
            if stop.agreed():
                control.should_save = True
                control.should_training_stop = True
            elif state.global_step >= state.max_steps:
                control.should_save = False
            return control

    device, kind = precision()
    args = TrainingArguments(
        output_dir=str(paths.work), num_train_epochs=options.epochs,
        max_steps=options.max_steps or -1, learning_rate=options.lr,
        per_device_train_batch_size=options.batch_size,
        per_device_eval_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum, lr_scheduler_type="linear",
        warmup_steps=0, weight_decay=0.0, seed=options.seed, data_seed=options.seed,
        save_strategy="steps", save_steps=options.save_steps, save_total_limit=2,
        eval_strategy="no", logging_steps=0.1, report_to="none",
        disable_tqdm=not sys.stderr.isatty(),  # a progress bar on a terminal, lines in a log
        remove_unused_columns=False,
        bf16=kind == "bf16", fp16=kind == "fp16", dataloader_pin_memory=device == "cuda",
        ddp_backend="gloo" if device == "cpu" and world_size() > 1 else None,
        ddp_find_unused_parameters=False,
        # each process's loss is its own tokens' mean and DDP averages the gradients: the
        # logged loss stays per token (True multiplies it by the number of processes)
        average_tokens_across_devices=False)
    collator = Collator(model.config.eos_token_id if model.config.eos_token_id is not None
                        else model.config.pad_token_id)
    trainer = Trainer(model=model, args=args, train_dataset=train_set, data_collator=collator,
                      callbacks=[*callbacks, StopAndSkipFinalCheckpoint()])
    return trainer, collator


def _perplexity(trainer: Any, eval_set: list[Encoded], collator: Collator,
                batch_size: int) -> float | None:
    """exp(mean cross-entropy per labelled token) over the held-out examples, each process
    scoring its share; None without held-out examples."""
    if not eval_set:
        return None
    import torch
    import torch.distributed as dist
    import torch.nn.functional as F

    model = trainer.model
    was_training = model.training
    model.eval()
    totals = torch.zeros(2, dtype=torch.float64, device=trainer.args.device)
    mine = eval_set[rank()::world_size()]
    with torch.no_grad(), trainer.autocast_smart_context_manager():
        for start in range(0, len(mine), batch_size):
            batch = {k: v.to(trainer.args.device)
                     for k, v in collator(mine[start:start + batch_size]).items()}
            logits = model(input_ids=batch["input_ids"],
                           attention_mask=batch["attention_mask"]).logits[:, :-1].float()
            labels = batch["labels"][:, 1:]
            totals[0] += F.cross_entropy(logits.reshape(-1, logits.shape[-1]),
                                         labels.reshape(-1), ignore_index=IGNORE,
                                         reduction="sum").double()
            totals[1] += int((labels != IGNORE).sum())
    model.train(was_training)
    if in_process_group():
        dist.all_reduce(totals)
    return math.exp(min(float(totals[0] / totals[1]), 700.0))


def _summary(options: TrainOptions, p: Plan, state: Any, seconds: float, speed: float,
             before: float | None, after: float | None) -> dict[str, Any]:
    device, kind = precision()
    return dict(
        name=options.out.name, out=str(options.out), base=options.base, data=str(options.data),
        format=p.run["format"], data_sha256=p.run["data_sha256"], character=options.character,
        examples=dict(train=len(p.train_set), eval=len(p.eval_set), skipped=p.skipped,
                      dialogues=len(p.corpus.dialogues)),
        tokens=dict(input=sum(len(e.input_ids) for e in p.train_set),
                    trained=sum(sum(v != IGNORE for v in e.labels) for e in p.train_set)),
        settings={k: v for k, v in p.run.items() if k != "data_sha256"},
        steps=state.global_step, epochs_done=state.epoch, train_seconds=round(seconds, 1),
        tokens_per_second=round(speed, 1), device=device, precision=kind,
        processes=world_size(), perplexity=dict(before=before, after=after),
        version=__version__, finished_at=datetime.now(timezone.utc).isoformat(timespec="seconds"))
