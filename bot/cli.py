"""`dialogbot`: run the bot, chat in the terminal, reset a channel."""

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


def main() -> None:
    app()
