"""Operations: Prometheus metrics and the /metrics, /healthz, /readyz web server.

`Metrics` is the pipeline's hook object; its methods do nothing, so the pipeline always calls
them. `PrometheusMetrics` counts them in its own `CollectorRegistry` (prometheus-client).
`TimedStore` wraps any `Store` and times each call into the database latency histogram.
`OpsServer` (aiohttp) serves, on DIALOGBOT_METRICS_PORT:

- `/metrics`  the registry in Prometheus text format;
- `/healthz`  200 while the event loop answers (liveness);
- `/readyz`   200 when every readiness check passes within `check_timeout` seconds
              (database reachable, generator ready, adapters connected, Redis), else 503;
              the body is JSON naming each check's result.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

log = logging.getLogger(__name__)

Check = Callable[[], Awaitable[bool]]
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 120)
DB_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 5)


class Metrics:
    """The hooks the pipeline calls where it already decides; no-ops here."""

    def received(self, platform: str) -> None: ...

    def ignored(self, platform: str) -> None: ...

    def refused(self, platform: str, reason: str) -> None: ...

    def answered(self, platform: str) -> None: ...

    def rate_limited(self, platform: str, scope: str) -> None: ...

    def generated(self, seconds: float, tokens: int, character: str = "default") -> None: ...

    def character_loaded(self, character: str, seconds: float) -> None: ...

    def characters_loaded(self, count: int) -> None: ...

    def error(self, kind: str) -> None: ...

    def database(self, operation: str, seconds: float) -> None: ...


class PrometheusMetrics(Metrics):
    """Every hook as a prometheus-client metric (names start with `dialogbot_`)."""

    def __init__(self, queue_depth: Callable[[], float] | None = None):
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        reg = dict(registry=self.registry)
        self._received = Counter("dialogbot_messages_received", "Messages handed to the bot",
                                 ["platform"], **reg)
        self._answered = Counter("dialogbot_messages_answered",
                                 "Model replies sent", ["platform"], **reg)
        self._ignored = Counter("dialogbot_messages_ignored",
                                "Messages not addressed to the bot", ["platform"], **reg)
        self._refused = Counter("dialogbot_messages_refused",
                                "Messages refused (rate_limited, busy)",
                                ["platform", "reason"], **reg)
        self._limited = Counter("dialogbot_rate_limit_hits",
                                "Inbound limit hits by scope (user, channel)",
                                ["platform", "scope"], **reg)
        self._latency = Histogram("dialogbot_generation_seconds",
                                  "Time from generation request to reply, by character",
                                  ["character"], buckets=LATENCY_BUCKETS, **reg)
        self._tokens = Counter("dialogbot_tokens_generated", "Tokens generated, by character",
                               ["character"], **reg)
        self._loads = Histogram("dialogbot_character_load_seconds",
                                "Time to load a character's model", ["character"],
                                buckets=LATENCY_BUCKETS, **reg)
        self._loaded = Gauge("dialogbot_characters_loaded",
                             "Character models in memory", **reg)
        self._errors = Counter("dialogbot_errors", "Errors by kind", ["kind"], **reg)
        self._db = Histogram("dialogbot_database_seconds", "Database call latency",
                             ["operation"], buckets=DB_BUCKETS, **reg)
        self._queue = Gauge("dialogbot_generation_queue_depth",
                            "Generation requests waiting or running", **reg)
        if queue_depth is not None:
            self.watch_queue(queue_depth)

    def watch_queue(self, depth: Callable[[], float]) -> None:
        self._queue.set_function(depth)

    def watch_kv_cache(self, stats: Callable[[], Any]) -> None:
        """Export the batching generator's prefix cache (`stats()` -> `CacheStats`):
        dialogbot_kv_cache_lookups_total{result=hit|miss}, dialogbot_kv_cache_bytes."""
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        class KVCacheCollector:
            def collect(self):
                now = stats()
                lookups = CounterMetricFamily(
                    "dialogbot_kv_cache_lookups", "Prompt lookups in the KV cache by result "
                    "(hit: the conversation's earlier keys/values were reused)",
                    labels=["result"])
                lookups.add_metric(["hit"], now.hits)
                lookups.add_metric(["miss"], now.misses)
                yield lookups
                yield GaugeMetricFamily("dialogbot_kv_cache_bytes",
                                        "Bytes of keys/values kept between turns",
                                        value=now.bytes_used)

        self.registry.register(KVCacheCollector())

    def received(self, platform: str) -> None:
        self._received.labels(platform).inc()

    def ignored(self, platform: str) -> None:
        self._ignored.labels(platform).inc()

    def refused(self, platform: str, reason: str) -> None:
        self._refused.labels(platform, reason).inc()

    def answered(self, platform: str) -> None:
        self._answered.labels(platform).inc()

    def rate_limited(self, platform: str, scope: str) -> None:
        self._limited.labels(platform, scope).inc()

    def generated(self, seconds: float, tokens: int, character: str = "default") -> None:
        self._latency.labels(character).observe(seconds)
        self._tokens.labels(character).inc(max(0, tokens))

    def character_loaded(self, character: str, seconds: float) -> None:
        self._loads.labels(character).observe(seconds)

    def characters_loaded(self, count: int) -> None:
        self._loaded.set(count)

    def error(self, kind: str) -> None:
        self._errors.labels(kind).inc()

    def database(self, operation: str, seconds: float) -> None:
        self._db.labels(operation).observe(seconds)

    def render(self) -> tuple[bytes, str]:
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

        return generate_latest(self.registry), CONTENT_TYPE_LATEST


class TimedStore:
    """A `bot.ports.Store` that reports each call's latency to `metrics.database`."""

    _TIMED = ("append", "add_reply", "recent", "reset", "forget", "count", "pending", "mark",
              "get_settings", "set_settings", "update_settings", "claim", "renew", "release",
              "unclaimed", "claim_outbox", "confirm_part", "sent_ids", "claim_owners", "chain",
              "find_message", "reset_branch", "channels")

    def __init__(self, inner: Any, metrics: Metrics):
        self.inner = inner
        self.metrics = metrics

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self.inner, name)
        if name not in self._TIMED:
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                self.metrics.database(name, time.perf_counter() - start)

        return timed


class OpsServer:
    """aiohttp server for /metrics, /healthz and /readyz (see module docstring)."""

    def __init__(self, metrics: PrometheusMetrics, checks: dict[str, Check], *,
                 host: str = "0.0.0.0", port: int = 9090, check_timeout: float = 2.0):
        self.metrics = metrics
        self.checks = checks
        self.host = host
        self.port = port
        self.check_timeout = check_timeout
        self._runner = None

    async def start(self) -> None:
        from aiohttp import web

        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        log.info("metrics on http://%s:%d/metrics", self.host, self.port)

    async def stop(self) -> None:
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def readiness(self) -> dict[str, bool]:
        names = list(self.checks)
        results = await asyncio.gather(*(self._check(n) for n in names))
        return dict(zip(names, results))

    async def _check(self, name: str) -> bool:
        try:
            return bool(await asyncio.wait_for(self.checks[name](), self.check_timeout))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed check is "not ready"
            log.debug("readiness check %s failed: %s", name, type(exc).__name__)
            return False

    async def _metrics(self, request: Any) -> Any:
        from aiohttp import web

        body, content_type = self.metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def _healthz(self, request: Any) -> Any:
        from aiohttp import web

        return web.json_response({"status": "alive"})

    async def _readyz(self, request: Any) -> Any:
        from aiohttp import web

        checks = await self.readiness()
        ready = all(checks.values())
        return web.json_response({"ready": ready, "checks": checks},
                                 status=200 if ready else 503)


def adapters_connected(adapters: Sequence[Any], started: Callable[[], Sequence[Any]]) -> Check:
    """Ready when every adapter was started and (if it says) is still connected."""
    async def check() -> bool:
        running = started()
        return all(a in running and getattr(a, "connected", True) for a in adapters)

    return check
