"""Operations: /metrics counters that move with traffic, /healthz, /readyz following the
database (cut and restored through a TCP proxy to the real PostgreSQL), JSON log lines."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import uuid
from collections.abc import AsyncIterator

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bot.app import build_app, make_generator
from bot.errors import GenerationError
from bot.logs import REDACTED, setup_logging
from tests.recording import CountingGenerator, RecordingAdapter, message

PG_URL = os.environ.get("TEST_DATABASE_URL", "")
PG_SKIP = ("needs PostgreSQL: set TEST_DATABASE_URL "
           "(e.g. postgresql+asyncpg://postgres@127.0.0.1:5432/test) to run it")


# --- helpers shared with test_scale ------------------------------------------------------------
@contextlib.asynccontextmanager
async def fresh_database(url: str = PG_URL) -> AsyncIterator[str]:
    """A new, empty PostgreSQL database on TEST_DATABASE_URL's server; dropped after.
    Yields its SQLAlchemy URL."""
    import asyncpg
    from sqlalchemy.engine import make_url

    base = make_url(url)
    name = f"dialogbot_{uuid.uuid4().hex[:12]}"
    dsn = base.set(drivername="postgresql").render_as_string(hide_password=False)
    admin = await asyncpg.connect(dsn)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
        yield base.set(database=name).render_as_string(hide_password=False)
    finally:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


class TcpProxy:
    """127.0.0.1:port -> target; `cut()` drops every connection and refuses new ones until
    `restore()`."""

    def __init__(self, host: str, port: int):
        self.target = (host, port)
        self.open = True
        self._pipes: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> "TcpProxy":
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def stop(self) -> None:
        self.cut()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    def cut(self) -> None:
        self.open = False
        for writer in list(self._pipes):
            writer.transport.abort()
        self._pipes.clear()

    def restore(self) -> None:
        self.open = True

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.open:
            writer.transport.abort()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self._pipes |= {writer, up_writer}
        await asyncio.gather(self._pipe(reader, up_writer), self._pipe(up_reader, writer))

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while data := await reader.read(65536):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            self._pipes.discard(writer)
            writer.transport.abort()


def samples(text: str) -> dict[tuple[str, tuple], float]:
    """{(sample name, sorted label items): value} from Prometheus text format."""
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def get(url: str) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.get(url) as response:
        return response.status, await response.text()


# --- tests -------------------------------------------------------------------------------------
@pytest.fixture
async def bot(make_config):
    apps = []

    async def make(**overrides):
        config = make_config(metrics_port=0, metrics_host="127.0.0.1", **overrides)
        platform = RecordingAdapter()
        generator = CountingGenerator(make_generator(config))
        app = build_app(config, [platform], generator=generator)
        await app.start()
        apps.append(app)
        return app, platform, generator, f"http://127.0.0.1:{app.ops.port}"

    yield make
    for app in apps:
        await app.stop(drain_timeout=5)


async def test_metrics_move_with_the_messages(bot):
    app, platform, gen, base = await bot(user_rate=3, user_period=60)
    status, text = await get(base + "/metrics")
    assert status == 200
    before = samples(text)
    assert before[("dialogbot_generation_queue_depth", ())] == 0

    await app.pipeline.process(message("hello", author="1", channel="1"))
    await app.pipeline.process(message("chatter", channel="-5", direct=False, to_me=False))
    for i in range(5):  # 3 admitted, 2 over the user's limit
        await app.pipeline.process(message(f"burst {i}", author="2", channel="2"))
    gen.fail_next.append(GenerationError("boom"))
    await app.pipeline.process(message("fails", author="3", channel="3"))

    now = samples((await get(base + "/metrics"))[1])
    tg = (("platform", "telegram"),)
    assert now[("dialogbot_messages_received_total", tg)] == 8
    assert now[("dialogbot_messages_ignored_total", tg)] == 1
    assert now[("dialogbot_messages_answered_total", tg)] == 4
    assert now[("dialogbot_messages_refused_total",
                (("platform", "telegram"), ("reason", "rate_limited")))] == 2
    assert now[("dialogbot_rate_limit_hits_total",
                (("platform", "telegram"), ("scope", "user")))] == 2
    assert now[("dialogbot_errors_total", (("kind", "GenerationError"),))] == 1
    assert now[("dialogbot_generation_seconds_count", (("character", "default"),))] == 4
    stored = [*await app.store.recent("telegram", "1", 50),
              *await app.store.recent("telegram", "2", 50)]
    assert now[("dialogbot_tokens_generated_total", (("character", "default"),))] == sum(
        len(t.token_ids or ()) for t in stored) > 0
    assert now[("dialogbot_database_seconds_count", (("operation", "append"),))] == 5
    assert now[("dialogbot_database_seconds_count", (("operation", "add_reply"),))] == 4

    status, body = await get(base + "/healthz")
    assert status == 200 and json.loads(body)["status"] == "alive"
    status, body = await get(base + "/readyz")
    assert status == 200 and json.loads(body)["checks"] == {
        "database": True, "generator": True, "adapters": True}


async def test_readyz_follows_the_database_and_the_bot_recovers(make_config):
    if not PG_URL:
        pytest.skip(PG_SKIP)
    from sqlalchemy.engine import make_url

    async with fresh_database() as db_url:
        url = make_url(db_url)
        proxy = await TcpProxy(url.host or "127.0.0.1", url.port or 5432).start()
        config = make_config(metrics_port=0, metrics_host="127.0.0.1",
                             database_url=url.set(host="127.0.0.1", port=proxy.port)
                             .render_as_string(hide_password=False))
        platform = RecordingAdapter()
        app = build_app(config, [platform])
        await app.start()
        ready = f"http://127.0.0.1:{app.ops.port}/readyz"
        try:
            await app.pipeline.process(message("before the cut"))
            assert (await get(ready))[0] == 200

            proxy.cut()
            status, body = await get(ready)
            assert status == 503 and json.loads(body)["checks"]["database"] is False
            await app.pipeline.process(message("during the cut"))  # apology, no crash
            assert platform.texts()[-1].startswith("Sorry")

            proxy.restore()
            for _ in range(50):
                if (await get(ready))[0] == 200:
                    break
                await asyncio.sleep(0.2)
            assert (await get(ready))[0] == 200
            await app.pipeline.process(message("after the cut"))
            assert not platform.texts()[-1].startswith("Sorry")
            texts = [t.text for t in await app.store.recent("telegram", "100", 10)]
            assert "before the cut" in texts and "after the cut" in texts
        finally:
            await app.stop(drain_timeout=5)
            await proxy.stop()


async def test_json_logs_carry_platform_and_channel_and_stay_redacted(bot, capfd):
    secret = "123456789:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw"
    app, platform, gen, base = await bot(user_rate=1, user_period=60)
    setup_logging("INFO", [secret], fmt="json")
    try:
        logging.getLogger("outside").info("no event here, token %s", secret)
        await app.pipeline.process(message("one", author="9", channel="77"))
        await app.pipeline.process(message("two", author="9", channel="77"))  # limited
        gen.fail_next.append(RuntimeError(f"leak {secret}"))
        await app.pipeline.process(message("three", author="8", channel="78"))
    finally:
        setup_logging("INFO", [])
    lines = [json.loads(line) for line in capfd.readouterr().err.splitlines()
             if line.startswith("{")]
    assert lines and all({"time", "level", "logger", "message", "platform", "channel"}
                         <= set(line) for line in lines)
    outside = next(line for line in lines if line["logger"] == "outside")
    assert outside["platform"] is None and REDACTED in outside["message"]
    limited = next(line for line in lines if "rate limited" in line["message"])
    assert (limited["platform"], limited["channel"]) == ("telegram", "77")
    failed = next(line for line in lines if "unexpected error" in line["message"])
    assert failed["channel"] == "78" and "Traceback" in failed["exc"]
    assert secret not in json.dumps(lines)
