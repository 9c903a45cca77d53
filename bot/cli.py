"""`dialogbot`: run the bot, chat in the terminal, reset a channel."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from bot import __version__
from bot.errors import BotError, ConfigError

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


def _serve(config_file: Optional[Path], platforms: list[str] | None, **overrides) -> None:
    from bot.app import build_app, make_adapters
    from bot.config import configure_logging, load_config

    try:
        config = load_config(config_file, **overrides)
        configure_logging(config)
        bot_app = build_app(config, make_adapters(config, platforms))
        asyncio.run(bot_app.run())
    except BotError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


@app.command()
def run(config: ConfigOption = None) -> None:
    """Start every adapter whose token is set (the console when none is)."""
    _serve(config, None)


@app.command()
def chat(config: ConfigOption = None,
         channel: Annotated[str, typer.Option(help="Console conversation name.")] = "local"
         ) -> None:
    """Chat in the terminal. Piped input: one output line per input line."""
    from adapters.console import ConsoleAdapter

    if hasattr(sys.stdin, "reconfigure"):
        sys.stdin.reconfigure(errors="replace")
    from bot.app import build_app
    from bot.config import configure_logging, load_config

    try:
        cfg = load_config(config)
        configure_logging(cfg)
        bot_app = build_app(cfg, [ConsoleAdapter(cfg, channel=channel)])
        asyncio.run(bot_app.run())
    except BotError as exc:
        _fail(exc)
    except KeyboardInterrupt:
        pass


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
