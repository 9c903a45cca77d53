"""`dialogbot`: run the bot, chat in the terminal, reset a channel, train and export."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from collections.abc import Callable
from typing import TYPE_CHECKING, Annotated, Optional

import typer

from bot import __version__
from bot.errors import BotError, ConfigError

if TYPE_CHECKING:
    from bot.config import Config

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="Chat with Microsoft's DialoGPT on Discord, Telegram and the console.")

ConfigOption = Annotated[Optional[Path], typer.Option(
    "--config", "-c", help="TOML file with settings (environment variables win).")]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"dialogbot {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(version: Annotated[bool, typer.Option(
        "--version", callback=_version, is_eager=True, help="Show the version and exit.")]
        = False) -> None:
    """Settings come from DIALOGBOT_* environment variables, a .env file or --config."""


def _fail(exc: BaseException) -> None:
    typer.echo(f"dialogbot: {exc}", err=True)
    raise typer.Exit(2 if isinstance(exc, ConfigError) else 1)


def _serve(config_file: Optional[Path],
           adapters: Callable[[Config], list] | None = None) -> None:
    """Load settings, set up logging, build the app (with `adapters(config)` or the ones the
    settings turn on) and run it until a signal or the console's end of input."""
    from bot.app import build_app
    from bot.config import configure_logging, load_config

    if hasattr(sys.stdin, "reconfigure"):  # broken bytes on a console become U+FFFD
        sys.stdin.reconfigure(errors="replace")
    try:
        config = load_config(config_file)
        configure_logging(config)
        bot_app = build_app(config, adapters(config) if adapters else None)
        asyncio.run(bot_app.run())
    except BotError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


@app.command()
def run(config: ConfigOption = None) -> None:
    """Start every adapter whose token is set (the console when none is)."""
    _serve(config)


@app.command()
def chat(config: ConfigOption = None,
         channel: Annotated[str, typer.Option(help="Console conversation name.")] = "local",
         group: Annotated[bool, typer.Option(
             help="A group chat: each line is 'name: text' from that person.")] = False
         ) -> None:
    """Chat in the terminal. Piped input: one output line per input line."""
    from adapters.console import ConsoleAdapter

    _serve(config, lambda cfg: [ConsoleAdapter(cfg, channel=channel, group=group)])


@app.command()
def reset(platform: Annotated[str, typer.Option(help="console, telegram or discord")],
          channel: Annotated[str, typer.Option(help="The chat or channel id.")],
          config: ConfigOption = None) -> None:
    """Clear one channel's conversation history."""
    from bot.app import make_store
    from bot.config import PLATFORMS, configure_logging, load_config

    if platform not in PLATFORMS:
        _fail(ConfigError(f"--platform must be one of {', '.join(PLATFORMS)}"))

    async def go() -> int:
        store = make_store(cfg)
        await store.start()
        try:
            return await store.reset(platform, channel)
        finally:
            await store.stop()

    try:
        cfg = load_config(config)
        configure_logging(cfg)
        removed = asyncio.run(go())
    except BotError as exc:
        _fail(exc)
    typer.echo(f"removed {removed} messages from {platform}/{channel}")


@app.command()
def train(
        data: Annotated[Path, typer.Argument(help="Training data: .csv, .jsonl or .txt.")],
        out: Annotated[Path, typer.Option(help="Directory for the trained model.")],
        base: Annotated[str, typer.Option(help="Model to start from (hub id or directory).")]
        = "microsoft/DialoGPT-small",
        format: Annotated[Optional[str], typer.Option(
            "--format", help="csv, jsonl or txt (default: from the extension).")] = None,
        character: Annotated[Optional[str], typer.Option(
            help="CSV: only this speaker's lines are responses.")] = None,
        speaker_column: Annotated[str, typer.Option(help="CSV speaker column.")] = "name",
        text_column: Annotated[str, typer.Option(help="CSV text column.")] = "line",
        context_lines: Annotated[int, typer.Option(
            min=1, help="CSV: lines before a response that make its context.")] = 7,
        loss: Annotated[str, typer.Option(
            help="response: learn the responses only; all: every token.")] = "response",
        epochs: Annotated[float, typer.Option(min=0.01)] = 3.0,
        max_steps: Annotated[Optional[int], typer.Option(
            min=1, help="Stop after this many optimizer steps (overrides --epochs).")] = None,
        lr: Annotated[float, typer.Option(help="Learning rate (AdamW, linear decay).")] = 5e-5,
        batch_size: Annotated[int, typer.Option(min=1, help="Examples per step and process.")]
        = 4,
        grad_accum: Annotated[int, typer.Option(min=1)] = 1,
        block_size: Annotated[int, typer.Option(
            min=8, max=1024, help="Tokens per example at most (context + response).")] = 512,
        seed: int = 42,
        eval_fraction: Annotated[float, typer.Option(
            min=0.0, max=0.9, help="Share of examples held out for perplexity.")] = 0.1,
        save_steps: Annotated[int, typer.Option(min=1, help="Checkpoint every N steps.")]
        = 500,
        resume: Annotated[bool, typer.Option(
            help="Continue the interrupted run in <out>.partial.")] = False,
        overwrite: Annotated[bool, typer.Option(
            help="Replace --out even if it is not a model dialogbot trained.")] = False,
) -> None:
    """Fine-tune DialoGPT on a character's lines or your chats; the result is a directory
    DIALOGBOT_MODEL can point at."""
    import shlex

    from bot.train import TrainOptions, rank, train as run_training, world_size
    from bot.trainingdata import CsvColumns

    options = TrainOptions(
        data=data, out=out, base=base, format=format, character=character,
        columns=CsvColumns(speaker_column, text_column), context_lines=context_lines,
        loss=loss, epochs=epochs, max_steps=max_steps, lr=lr, batch_size=batch_size,
        grad_accum=grad_accum, block_size=block_size, seed=seed, eval_fraction=eval_fraction,
        save_steps=save_steps, resume=resume, overwrite=overwrite)
    try:
        result = run_training(options, say=lambda line: typer.echo(line))
    except BotError as exc:
        if rank() != 0:  # rank 0 says it once
            raise typer.Exit(2)
        _fail(exc)
    except KeyboardInterrupt:
        typer.echo("dialogbot: interrupted; nothing more was saved", err=True)
        raise typer.Exit(130)
    if result.interrupted:
        if rank() == 0:
            again = shlex.join(["dialogbot", *sys.argv[1:]])
            again += "" if "--resume" in sys.argv else " --resume"
            if world_size() > 1:
                again = f"the same torchrun / accelerate launch command ({again})"
            typer.echo(f"stopped at step {result.steps}; checkpoint saved in "
                       f"{result.checkpoint}\nresume with: {again}", err=True)
        raise typer.Exit(130)


@app.command()
def export(
        out: Annotated[Path, typer.Option(help="JSONL file to write (one dialogue a line).")],
        platform: Annotated[str, typer.Option(help="console, telegram or discord")],
        channel: Annotated[Optional[list[str]], typer.Option(
            help="A chat or channel id; repeat for several.")] = None,
        all_channels: Annotated[bool, typer.Option(
            "--all", help="Every channel of the platform.")] = False,
        overwrite: Annotated[bool, typer.Option(help="Replace --out if it exists.")] = False,
        config: ConfigOption = None) -> None:
    """Write the bot's conversations as training data for `dialogbot train` (JSONL)."""
    from bot.app import make_store
    from bot.config import PLATFORMS, configure_logging, load_config
    from bot.export import export_channels

    if platform not in PLATFORMS:
        _fail(ConfigError(f"--platform must be one of {', '.join(PLATFORMS)}"))
    if bool(channel) == all_channels:
        _fail(ConfigError("give --channel (one or more) or --all"))
    if out.exists() and not overwrite:
        _fail(ConfigError(f"--out {out} exists; add --overwrite to replace it"))

    async def go() -> tuple[int, int]:
        store = make_store(cfg)
        await store.start()
        try:
            return await export_channels(store, platform, channel or None, out)
        finally:
            await store.stop()

    try:
        cfg = load_config(config)
        configure_logging(cfg)
        dialogues, turns = asyncio.run(go())
    except BotError as exc:
        _fail(exc)
    typer.echo(f"wrote {dialogues} dialogues ({turns} turns) to {out}")


def main() -> None:
    app()
