"""Test doubles for the pipeline's unit tests: a platform that records what the bot sends and a
generator wrapper that counts calls. Real adapters are tested against fake platform servers."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace

from bot.events import GenerationRequest, Incoming, Reply
from bot.text import clean_outgoing, split_message

_ids = iter(range(1, 10**9))


def message(text: str, *, platform: str = "telegram", channel: str = "100", author: str = "7",
            direct: bool = True, to_me: bool | None = None, attachments: bool = False,
            platform_admin: bool | None = None) -> Incoming:
    return Incoming(platform=platform, channel=channel, message_id=str(next(_ids)),
                    author_id=author, author_name=f"user{author}", text=text, is_direct=direct,
                    is_to_me=direct if to_me is None else to_me, has_attachments=attachments,
                    platform_admin=platform_admin)


@dataclass
class RecordingAdapter:
    name: str = "telegram"
    max_message_length: int = 4096
    rate_limited: bool = True
    outbound_rate: tuple[int, float] | None = None
    admins: set[str] = field(default_factory=set)  # author ids the platform calls admin
    sent: list[Reply] = field(default_factory=list)  # one entry per part delivered
    sent_at: list[float] = field(default_factory=list)
    splitter: Callable[[str], list[str]] | None = None  # default: split_message at the limit
    typing_entered: int = 0
    admin_checks: int = 0

    async def start(self, pipeline) -> None:  # noqa: ANN001
        self.pipeline = pipeline

    async def stop(self) -> None:
        pass

    def split(self, text: str) -> list[str]:
        if self.splitter is not None:
            return self.splitter(text)
        return split_message(clean_outgoing(text), self.max_message_length)

    async def send_part(self, reply: Reply, index: int, part: str) -> str:
        self.sent.append(replace(reply, text=part))
        self.sent_at.append(time.monotonic())
        return f"sent-{len(self.sent)}"

    async def is_admin(self, event: Incoming) -> bool:
        self.admin_checks += 1
        return event.author_id in self.admins

    @asynccontextmanager
    async def typing(self, event: Incoming):
        self.typing_entered += 1
        yield

    def texts(self) -> list[str]:
        return [r.text for r in self.sent]


class CountingGenerator:
    """Wraps a real generator; counts calls, keeps the requests, can fail or stall on demand."""

    def __init__(self, inner):
        self.inner = inner
        self.requests: list[GenerationRequest] = []
        self.spans: list[tuple[float, float]] = []  # (start, end) of each reply, monotonic
        self.fail_next: list[BaseException] = []
        self.gate: asyncio.Event | None = None

    async def start(self):
        await self.inner.start()

    async def stop(self):
        await self.inner.stop()

    def forget_channel(self, key):
        self.inner.forget_channel(key)

    @property
    def queue_depth(self):
        return self.inner.queue_depth

    @property
    def ready(self):
        return self.inner.ready

    @property
    def backend(self):
        return self.inner.backend

    async def reply(self, request):
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            raise self.fail_next.pop(0)
        start = time.monotonic()
        try:
            return await self.inner.reply(request)
        finally:
            self.spans.append((start, time.monotonic()))

    def prompts(self) -> list[list[str]]:
        """The texts of each request's turns, in order (what the model was asked with)."""
        return [[t.text for t in r.turns] for r in self.requests]


async def send_all(adapter, reply: Reply) -> list[str | None]:
    """Every part of `reply` through the adapter's own split and send_part, in order (what the
    pipeline does, without its pacing and retries)."""
    return [await adapter.send_part(reply, index, part)
            for index, part in enumerate(adapter.split(reply.text))]
