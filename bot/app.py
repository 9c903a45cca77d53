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
from bot.generator import QueuedGenerator
from bot.limits import MemoryChannelLock, MemoryLimiter
from bot.metrics import Metrics, OpsServer, PrometheusMetrics, TimedStore, adapters_connected
from bot.pipeline import Pipeline
from bot.ports import Adapter, ChannelLock, Generator, Limiter, Store
from bot.quality import ReplyRules
from bot.router import CharacterRouter, SharedRankers

if TYPE_CHECKING:
    from bot.generator import Backend
    from bot.rankers import Ensemble

log = logging.getLogger(__name__)


def make_store(config: Config) -> Store:
    from storage.store import SQLAlchemyStore

    return SQLAlchemyStore(config.database_url)


def make_backend(config: Config) -> "Backend":
    """The model backend DIALOGBOT_GENERATOR_BACKEND and DIALOGBOT_QUANTIZE choose (built
    here, loaded in the generator's worker); a combination that cannot run is a ConfigError."""
    if config.generator_backend == "openai":
        from bot.remote import RemoteBackend

        key = config.generator_api_key
        return RemoteBackend(config.model, config.generator_url or "",
                             model=config.generator_model, timeout=config.generation_timeout,
                             api_key=key.get_secret_value() if key else None)
    if config.generator_backend == "ct2":
        from bot.ct2 import CT2Backend

        return CT2Backend(config.model, device=config.device, threads=config.torch_threads,
                          quantize=config.quantize)
    from bot.hf import TransformersBackend
    from bot.quant import check_quantize

    check_quantize(config.quantize, config.device)
    return TransformersBackend(config.model, device=config.device,
                               threads=config.torch_threads, quantize=config.quantize,
                               pack_weights=config.pack_weights)


def make_generator(config: Config) -> Generator:
    """One model's generator, or with DIALOGBOT_CHARACTERS a router over one per character
    (built lazily, sharing one set of rankers)."""
    if config.characters:
        ensemble = make_rankers(config)
        rankers = SharedRankers(ensemble) if ensemble is not None else None
        return CharacterRouter.from_config(
            config, lambda one: make_model_generator(one, rankers))
    return make_model_generator(config, make_rankers(config))


def make_model_generator(config: Config, rankers: "Ensemble | SharedRankers | None"
                         ) -> Generator:
    """The generator of DIALOGBOT_MODEL with the backend, batching and quality settings."""
    backend = make_backend(config)
    if config.batching and config.generator_backend == "torch":
        from bot.batching import BatchingGenerator

        return BatchingGenerator(
            backend, queue_size=config.queue_size, timeout=config.generation_timeout,
            fallback_reply=config.fallback_reply, max_batch_size=config.max_batch_size,
            max_wait_ms=config.max_batch_wait_ms, kv_cache_mb=config.kv_cache_mb,
            kv_dtype=config.kv_dtype, window_step=config.window_step,
            rules=reply_rules(config), rankers=rankers)
    return QueuedGenerator(backend, queue_size=config.queue_size,
                           timeout=config.generation_timeout,
                           fallback_reply=config.fallback_reply,
                           rules=reply_rules(config), rankers=rankers)


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
                 adapters: Sequence[Adapter], pipeline: Pipeline,
                 ops: OpsServer | None = None):
        self.config = config
        self.store = store
        self.generator = generator
        self.adapters = list(adapters)
        self.pipeline = pipeline
        self.ops = ops  # /metrics, /healthz, /readyz: up first, down last
        self._started: list = []
        self._stop = asyncio.Event()

    async def start(self) -> None:
        try:
            if self.ops is not None and self.ops not in self._started:
                await self.ops.start()
                self._started.append(self.ops)
            for part in (self.store, self.pipeline.limiter, self.generator):
                await part.start()
                self._started.append(part)
            for adapter in self.adapters:
                self.pipeline.attach(adapter)
            # what the last run left (the outbox, unanswered messages) is claimed before the
            # adapters deliver anything new; its sends start once they run
            await self.pipeline.recover(self.config.recover_window)
            for adapter in self.adapters:
                await adapter.start(self.pipeline)
                self._started.append(adapter)
                log.info("%s adapter running", adapter.name)
            self.pipeline.start_delivering()
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


def make_shared_state(config: Config) -> tuple[Limiter, ChannelLock]:
    """Redis-backed limiter and channel lock when DIALOGBOT_REDIS_URL is set (shared by every
    instance), else the in-process ones."""
    if not config.redis_url:
        return MemoryLimiter(), MemoryChannelLock()
    from storage.redis import RedisChannelLock, RedisLimiter, RedisState

    state = RedisState(config.redis_url, config.redis_prefix)
    return RedisLimiter(state), RedisChannelLock(state, lease=config.lock_lease)


def build_app(config: Config, adapters: Sequence[Adapter] | None = None, *,
              store: Store | None = None, generator: Generator | None = None) -> App:
    store = store or make_store(config)
    generator = generator or make_generator(config)
    metrics: Metrics = Metrics()
    if config.metrics_port is not None:
        metrics = PrometheusMetrics(lambda: generator.queue_depth)
        cache_stats = getattr(generator, "cache_stats", None)
        if cache_stats is not None:
            metrics.watch_kv_cache(cache_stats)
        store = TimedStore(store, metrics)
        if isinstance(generator, CharacterRouter):  # loads and unloads are counted
            generator.metrics = metrics
    limiter, lock = make_shared_state(config)
    pipeline = Pipeline(config, store, generator, limiter, lock, metrics)
    if adapters is None:
        adapters = make_adapters(config)
    app = App(config, store, generator, adapters, pipeline)
    if isinstance(metrics, PrometheusMetrics):
        app.ops = OpsServer(metrics, readiness_checks(app), host=config.metrics_host,
                            port=config.metrics_port or 0)
    return app


def readiness_checks(app: App) -> dict:
    """/readyz: the database answers a cheap query, the generator (and for a remote one, its
    server) answers, every adapter is connected, Redis answers (when configured)."""
    async def database() -> bool:
        await app.store.count(platform="-readyz-")
        return True

    async def generator() -> bool:
        if app.generator not in app._started or not app.generator.ready:
            return False
        ping = getattr(getattr(app.generator, "backend", None), "ping", None)
        return await asyncio.to_thread(ping) if ping is not None else True

    checks = {"database": database, "generator": generator,
              "adapters": adapters_connected(app.adapters, lambda: app._started)}
    state = getattr(app.pipeline.limiter, "state", None)
    if state is not None:
        checks["redis"] = state.ping
    return checks
