"""Local chat in the terminal, on the same pipeline as Discord and Telegram.

Interactive when stdin is a terminal. Otherwise scriptable: each input line gets exactly one
output line (the reply or the command's answer, newlines folded), so
`printf 'hi\\n/reset\\nhello\\n' | dialogbot chat` works.
"""

from __future__ import annotations

import asyncio
import sys
import threading
import uuid
from contextlib import asynccontextmanager
from typing import TextIO

from bot.config import Config
from bot.events import Incoming, Reply
from bot.text import clean_outgoing, one_line, split_message

PLATFORM = "console"


def to_event(line: str, number: int, channel: str = "local", user: str = "local",
             run: str = "", group: bool = False) -> Incoming:
    """A console line is a direct message to the bot; its id is "<run>.<line number>" (the
    run part keeps ids unique across restarts). In a group (`dialogbot chat --group`) a line
    "name: text" is `name` talking to the bot in a group chat (try the context scopes)."""
    text = line.rstrip("\r\n")
    if group:
        name, sep, said = text.partition(":")
        if sep and name.strip() and " " not in name.strip() and not text.startswith("/"):
            user, text = name.strip(), said.strip()
    return Incoming(platform=PLATFORM, channel=channel,
                    message_id=f"{run}.{number}" if run else str(number), author_id=user,
                    author_name=user, text=text, is_direct=not group, is_to_me=True)


class ConsoleAdapter:
    name = PLATFORM
    max_message_length = 100_000
    rate_limited = False
    outbound_rate = None

    def __init__(self, config: Config | None = None, *, stdin: TextIO | None = None,
                 stdout: TextIO | None = None, interactive: bool | None = None,
                 channel: str = "local", group: bool = False):
        self.stdin = stdin or sys.stdin
        self.stdout = stdout or sys.stdout
        self.interactive = self.stdin.isatty() if interactive is None else interactive
        self.channel = channel
        self.group = group  # lines are "name: text" from several people in a group chat
        self.done = asyncio.Event()
        self._task: asyncio.Task | None = None
        self._buffer: dict[str, list[str]] = {}
        self._run = uuid.uuid4().hex[:8]  # message ids stay unique across runs
        self._sent = 0

    async def start(self, pipeline) -> None:  # noqa: ANN001 - bot.pipeline.Pipeline
        self._task = asyncio.create_task(self._serve(pipeline), name="console")

    async def stop(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
        self.done.set()

    def split(self, text: str) -> list[str]:
        return split_message(clean_outgoing(text), self.max_message_length)

    async def send_part(self, reply: Reply, index: int, part: str) -> str:
        if reply.reply_to in self._buffer:
            self._buffer[reply.reply_to].append(part)
        else:
            self._write(f"bot> {part}\n" if self.interactive else one_line(part) + "\n")
        self._sent += 1
        return f"{self._run}.out{self._sent}"

    async def is_admin(self, event: Incoming) -> bool:
        return True  # the person at the terminal owns the bot (in a group too)

    @asynccontextmanager
    async def typing(self, event: Incoming):
        if self.interactive:
            self._write("bot is typing...\r")
        yield

    def _write(self, text: str) -> None:
        self.stdout.write(text)
        self.stdout.flush()

    async def _serve(self, pipeline) -> None:  # noqa: ANN001
        lines = _LineReader(self.stdin)
        number = 0
        try:
            if self.interactive:
                self._write("Chat with DialoGPT. /help for commands, Ctrl-D to quit.\n")
            while True:
                if self.interactive:
                    self._write("you> ")
                line = await lines.next()
                if line is None:
                    break
                number += 1
                event = to_event(line, number, self.channel, run=self._run, group=self.group)
                if not self.interactive:
                    self._buffer[event.message_id] = []
                # submitted like any platform event, so shutdown lets it finish
                await asyncio.shield(pipeline.submit(event))
                if not self.interactive:
                    parts = self._buffer.pop(event.message_id)
                    self._write(one_line(" ".join(parts)) + "\n")
        finally:
            self.done.set()


class _LineReader:
    """Reads stdin in a daemon thread (works for terminals, pipes and files alike) and hands
    lines to the loop; the loop never blocks on input."""

    def __init__(self, stream: TextIO):
        self._loop = asyncio.get_running_loop()
        self._queue: asyncio.Queue[str | None] = asyncio.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True,
                         name="console-stdin").start()

    def _read(self, stream: TextIO) -> None:
        try:
            for line in stream:
                self._put(line)
        except (ValueError, OSError, UnicodeDecodeError):
            pass
        self._put(None)

    def _put(self, item: str | None) -> None:
        try:
            self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
        except RuntimeError:
            pass

    async def next(self) -> str | None:
        return await self._queue.get()
