"""Test doubles for the pipeline's unit tests: a platform that records what the bot sends and a
generator wrapper that counts calls. Real adapters are tested against fake platform servers."""

from __future__ import annotations

import asyncio
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

from bot.events import GenerationRequest, Incoming, Reply

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
    sent: list[Reply] = field(default_factory=list)
    typing_entered: int = 0
    admin_checks: int = 0

    async def start(self, pipeline) -> None:  # noqa: ANN001
        self.pipeline = pipeline

    async def stop(self) -> None:
        pass

    async def send(self, reply: Reply) -> None:
        self.sent.append(reply)

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

    async def reply(self, request):
        self.requests.append(request)
        if self.gate is not None:
            await self.gate.wait()
        if self.fail_next:
            raise self.fail_next.pop(0)
        return await self.inner.reply(request)
