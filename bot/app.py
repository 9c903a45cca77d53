"""The composition root: the one place that wires config, store, generator, limiter, lock and
adapters together. Adapters and storage are imported here, inside functions, and only the ones
the configuration turns on (a console-only run never imports discord or telegram)."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import Sequence
from typing import TYPE_CHECKING

from bot.config import Config
from bot.generator import LocalGenerator
from bot.limits import MemoryChannelLock, MemoryLimiter
from bot.pipeline import Pipeline
from bot.ports import Adapter, Generator, Store
from bot.quality import ReplyRules

if TYPE_CHECKING:
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)


def make_store(config: Config) -> Store:
    from storage.store import SQLAlchemyStore

    return SQLAlchemyStore(config.database_url)


def make_generator(config: Config) -> Generator:
    from bot.hf import TransformersBackend

    backend = TransformersBackend(config.model, device=config.device,
                                  threads=config.torch_threads)
    return LocalGenerator(backend, queue_size=config.queue_size,
                          timeout=config.generation_timeout,
                          fallback_reply=config.fallback_reply,
                          rules=reply_rules(config), rankers=make_rankers(config))


def reply_rules(config: Config) -> ReplyRules:
    return ReplyRules(max_candidates=config.max_candidates, repeat_window=config.repeat_window,
                      blocklist=config.blocklist, neutral_reply=config.neutral_reply)


def make_rankers(config: Config) -> "Ensemble | None":
    """DialogRPT rankers, or None; built here, loaded and run in the generator's worker."""
    from bot.rankers import Ensemble, parse_rankers

    specs = parse_rankers(config.rankers)
    return Ensemble(specs, device=config.device) if specs else None


def make_adapters(config: Config, platforms: Sequence[str] | None = None) -> list[Adapter]:
    adapters: list[Adapter] = []
    for platform in platforms or config.enabled_platforms():
        if platform == "telegram":
            from adapters.telegram import TelegramAdapter

            adapters.append(TelegramAdapter(config))
        elif platform == "discord":
            from adapters.discord import DiscordAdapter

            adapters.append(DiscordAdapter(config))
        elif platform == "console":
            from adapters.console import ConsoleAdapter

            adapters.append(ConsoleAdapter(config))
        else:
            raise ValueError(f"unknown platform {platform!r}")
    return adapters


class App:
    """Starts the parts in dependency order and stops them in reverse."""

    def __init__(self, config: Config, store: Store, generator: Generator,
                 adapters: Sequence[Adapter], pipeline: Pipeline):
        self.config = config
        self.store = store
        self.generator = generator
        self.adapters = list(adapters)
        self.pipeline = pipeline
        self._started: list = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        try:
            for part in (self.store, self.pipeline.limiter, self.generator):
                await part.start()
                self._started.append(part)
            for adapter in self.adapters:
                self.pipeline.attach(adapter)
                await adapter.start(self.pipeline)
                self._started.append(adapter)
                log.info("%s adapter running", adapter.name)
            await self.pipeline.recover(self.config.recover_window)
        except BaseException:
            await self.stop()
            raise

    async def stop(self, drain_timeout: float | None = None) -> None:
        """Stop intake, finish replies in flight (up to the deadline), close everything."""
        await self.pipeline.drain(self.config.shutdown_timeout if drain_timeout is None
                                  else drain_timeout)
        while self._started:
            part = self._started.pop()
            try:
                await part.stop()
            except Exception:  # noqa: BLE001 - keep closing the rest
                log.exception("error while stopping %s", type(part).__name__)

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Start, serve until SIGINT/SIGTERM (or the console's end of input), stop."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                loop.add_signal_handler(sig, self.request_stop)
            except (NotImplementedError, RuntimeError):
                pass
        await self.start()
        waiters = [asyncio.create_task(self._stop.wait())]
        waiters += [asyncio.create_task(a.done.wait()) for a in self.adapters
                    if isinstance(getattr(a, "done", None), asyncio.Event)]
        try:
            await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()
            log.info("stopping")
            await self.stop()


def build_app(config: Config, adapters: Sequence[Adapter] | None = None, *,
              store: Store | None = None, generator: Generator | None = None) -> App:
    store = store or make_store(config)
    generator = generator or make_generator(config)
    pipeline = Pipeline(config, store, generator, MemoryLimiter(), MemoryChannelLock())
    if adapters is None:
        adapters = make_adapters(config)
    return App(config, store, generator, adapters, pipeline)
