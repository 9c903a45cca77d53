"""One message end to end. Each incoming event runs in its own task; every error goes to
`on_error`, which logs one line and apologises where it can, and the bot keeps running.

    should answer? -> inbound limits -> command? -> store user turn (committed)
    -> one generation per channel (newer messages that arrived meanwhile are answered together)
    -> history -> generator (off the loop, typing shown) -> store reply -> paced send
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable

from bot.commands import Commands, parse_command
from bot.config import Config
from bot.errors import BotError, BusyError, GenerationTimeout
from bot.events import (GenerationRequest, Incoming, Reply, ReplyKind, Role, Turn, TurnState,
                        utcnow)
from bot.limits import NoticeOnce
from bot.logs import log_context
from bot.metrics import Metrics
from bot.ports import Adapter, ChannelLock, Generator, Limiter, Store
from bot.text import clean_incoming

log = logging.getLogger(__name__)

LIMITED = "You're sending messages faster than I can answer. I'll skip a few; try again shortly."
BUSY = "I'm busy with a lot of conversations right now. Please try again in a moment."
TEXT_ONLY = "I only read text messages."
EMPTY = "Say something and I'll answer."
APOLOGY = "Sorry, something went wrong on my side. Please try again."
SLOW = "Sorry, that took me too long. Please try again."


class Pipeline:
    def __init__(self, config: Config, store: Store, generator: Generator, limiter: Limiter,
                 lock: ChannelLock, metrics: Metrics | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store
        self.generator = generator
        self.limiter = limiter
        self.lock = lock
        self.commands = Commands(config, store, generator)
        self.adapters: dict[str, Adapter] = {}
        self._noticed = NoticeOnce()
        self._waiting: dict[str, list[int]] = {}  # channel key -> user turn ids to answer
        self._tasks: set[asyncio.Task] = set()
        self._closing = False
        self.retry_base = 1.0  # seconds before the first send retry

    def attach(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter

    # --- intake -----------------------------------------------------------------------------
    def submit(self, event: Incoming) -> asyncio.Task | None:
        """Handle the event in its own task (the adapters' entry point)."""
        if self._closing:
            log.info("shutting down: dropped message on %s/%s", event.platform, event.channel)
            return None
        return self._spawn(self.process(event), event)

    def _spawn(self, coro, event: Incoming) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"event-{event.channel_key}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def recover(self, window: float) -> int:
        """After a restart: answer messages left unanswered in the last `window` seconds (one
        reply per channel, after the newest), mark older ones skipped. Returns channels answered."""
        pending = [t for t in await self.store.pending() if t.platform in self.adapters]
        now = utcnow()
        stale = [t.id for t in pending
                 if window <= 0 or (now - t.created_at).total_seconds() > window]
        if stale:
            await self.store.mark(stale, TurnState.SKIPPED.value)
            log.info("skipped %d unanswered messages older than %gs", len(stale), window)
        newest: dict[str, Turn] = {}
        for turn in pending:
            if turn.id in stale:
                continue
            key = f"{turn.platform}:{turn.channel}"
            self._waiting.setdefault(key, []).append(turn.id)
            newest[key] = turn
        for turn in newest.values():
            event = Incoming(turn.platform, turn.channel, turn.message_id or "", turn.author_id,
                             turn.author_name, turn.text, is_direct=False, is_to_me=True,
                             time=turn.created_at)
            self._waiting[event.channel_key].remove(turn.id)
            log.info("%s/%s: answering a message left unanswered before the restart",
                     turn.platform, turn.channel)
            self._spawn(self._guarded(self.answer(event, turn.id), event), event)
        return len(newest)

    async def _guarded(self, coro, event: Incoming) -> None:
        with log_context(event.platform, event.channel):  # on every log line of this event
            try:
                await coro
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001
                await self.on_error(event, exc)

    async def process(self, event: Incoming) -> None:
        """Handle one event; any error goes to `on_error`, never to the caller."""
        await self._guarded(self.handle(event), event)

    async def on_error(self, event: Incoming, exc: BaseException) -> None:
        self.metrics.error(type(exc).__name__ if isinstance(exc, BotError) else "unexpected")
        if isinstance(exc, BotError):
            log.error("%s/%s: %s: %s", event.platform, event.channel, type(exc).__name__, exc)
        else:
            log.error("%s/%s: unexpected error", event.platform, event.channel,
                      exc_info=(type(exc), exc, exc.__traceback__))
        await self._send_quietly(Reply.to(event, SLOW if isinstance(exc, GenerationTimeout)
                                          else APOLOGY, ReplyKind.NOTICE))

    async def drain(self, timeout: float) -> None:
        """Stop intake; let replies in flight finish for up to `timeout` seconds, then cancel."""
        self._closing = True
        if not self._tasks:
            return
        done, pending = await asyncio.wait(set(self._tasks), timeout=timeout)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("abandoned %d replies in flight at shutdown", len(pending))
            await asyncio.wait(pending, timeout=5)

    # --- one message ----------------------------------------------------------------------
    async def handle(self, event: Incoming) -> None:
        adapter = self.adapters[event.platform]
        self.metrics.received(event.platform)
        if not (event.is_direct or event.is_to_me):
            self.metrics.ignored(event.platform)
            return
        event = event.with_text(clean_incoming(event.text))
        if adapter.rate_limited and not await self._admit(event):
            return
        if not event.text:
            if event.is_direct or not event.has_attachments:
                await self.send(Reply.to(event, TEXT_ONLY if event.has_attachments else EMPTY,
                                         ReplyKind.NOTICE))
            return
        command = parse_command(event.text)
        if command is not None:
            result = await self.commands.dispatch(command, event,
                                                  lambda: adapter.is_admin(event))
            await self.send(Reply.to(event, result.text, ReplyKind.COMMAND,
                                     private=result.refused))
            return
        turn = await self.store.append(Turn.from_event(event))
        await self.answer(event, turn.id)

    async def _admit(self, event: Incoming) -> bool:
        cfg = self.config
        user_ok = await self.limiter.admit(event.user_key, cfg.user_rate, cfg.user_period)
        if user_ok and await self.limiter.admit(event.channel_key, cfg.channel_rate,
                                                cfg.channel_period):
            self._noticed.clear(event.user_key)
            return True
        log.info("%s/%s: rate limited %s", event.platform, event.channel, event.author_id)
        self.metrics.refused(event.platform, "rate_limited")
        self.metrics.rate_limited(event.platform, "channel" if user_ok else "user")
        # told once per episode, and (shared limiter) once across instances per period
        if (self._noticed.should_notify(event.user_key)
                and await self.limiter.admit(f"notice:{event.user_key}", 1, cfg.user_period)):
            await self.send(Reply.to(event, LIMITED, ReplyKind.NOTICE, private=True))
        return False

    async def answer(self, event: Incoming, turn_id: int) -> None:
        """Generate one reply for this channel's waiting turns, unless a newer one will."""
        key = event.channel_key
        waiting = self._waiting.setdefault(key, [])
        waiting.append(turn_id)
        async with self.lock.hold(key):
            if turn_id not in waiting or waiting[-1] != turn_id:
                return  # answered already, or a newer message's task answers them all
            answers = list(waiting)
            waiting.clear()
            if not self._waiting.get(key):
                self._waiting.pop(key, None)
            try:
                text, token_ids = await self._generate(event)
            except BusyError:
                self.metrics.refused(event.platform, "busy")
                await self.store.mark(answers, TurnState.SKIPPED.value)
                await self.send(Reply.to(event, BUSY, ReplyKind.NOTICE))
                return
            except BotError:
                await self.store.mark(answers, TurnState.SKIPPED.value)
                raise
            reply_turn = Turn(event.platform, event.channel, Role.BOT, text,
                              token_ids=token_ids, in_reply_to=answers[-1])
            await self.store.add_reply(reply_turn, answers)
            await self.send(Reply.to(event, text))
            self.metrics.answered(event.platform)

    async def _generate(self, event: Incoming) -> tuple[str, tuple[int, ...] | None]:
        overrides = await self.store.get_settings(event.platform, event.channel)
        history = await self.store.recent(event.platform, event.channel,
                                          self.config.history_turns)
        request = GenerationRequest(event.channel_key, tuple(history),
                                    self.commands.effective(overrides),
                                    self.commands.character(overrides))
        async with self.adapters[event.platform].typing(event):
            start = time.perf_counter()
            generated = await self.generator.reply(request)
        self.metrics.generated(time.perf_counter() - start, len(generated.token_ids),
                               request.character or "default")
        return generated.text, (generated.token_ids or None)

    # --- outbound ---------------------------------------------------------------------------
    async def send(self, reply: Reply) -> None:
        """Paced delivery; a failed send is retried with backoff (network drop, 5xx), then the
        error goes up to `on_error`."""
        adapter = self.adapters[reply.platform]
        retries = self.config.send_retries
        for attempt in range(retries + 1):
            if adapter.outbound_rate is not None:
                rate, period = adapter.outbound_rate
                await self.limiter.pace(f"out:{reply.platform}:{reply.channel}", rate, period)
            try:
                await adapter.send(reply)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - libraries raise their own types
                if attempt == retries:
                    raise
                delay = min(30.0, self.retry_base * 2 ** attempt)
                log.warning("%s/%s: send failed (%s: %s); retry %d/%d in %.1fs", reply.platform,
                            reply.channel, type(exc).__name__, exc, attempt + 1, retries, delay)
                await asyncio.sleep(delay)

    async def _send_quietly(self, reply: Reply) -> None:
        try:
            await self.send(reply)
        except Exception as exc:  # noqa: BLE001 - the apology itself failed: log and go on
            log.error("%s/%s: could not send a notice: %s", reply.platform, reply.channel,
                      type(exc).__name__)

    @property
    def in_flight(self) -> int:
        return len(self._tasks)

    def pending_tasks(self) -> Iterable[asyncio.Task]:
        return tuple(self._tasks)
