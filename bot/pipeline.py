"""One message end to end. Each incoming event runs in its own task; every error goes to
`on_error`, which logs one line and apologises where it can, and the bot keeps running.

    should answer? -> inbound limits -> command? -> store user turn (committed, PENDING)
    -> conversation lock -> claim every PENDING turn of the conversation (atomic, leased)
    -> history up to the newest claimed turn -> generator (off the loop, typing shown)
    -> store reply + mark answered (one transaction; nothing if what it answers changed)
    -> deliver part by part, each confirmed part recorded (the outbox) -> unlock

What holds (issue 13):
- Order: turns are listed by their conversation seq; a reply sorts right after the turns it
  answers, whatever arrived while it was generated.
- Exactly once: a message is answered by whoever claimed it; a claim is renewed while its
  holder works and taken over only when it expired or its holder is known dead. Recovery
  (`recover`) claims what was left before new intake starts.
- At least once: every stored message is answered or explicitly skipped; messages arriving
  during shutdown are stored (and answered after the drain if time allows, else at the next
  start); a reply stays in the outbox until every part is confirmed and is resent, from the
  first unconfirmed part, after a failure or a restart.
- Commands in order: /reset, /forget and /settings take the conversation lock after
  invalidating generations in flight that they affect; an invalidated reply is neither sent,
  stored nor cached, and what it answered is answered again from the new history.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field

from bot.commands import Commands, parse_command
from bot.config import Config
from bot.conversation import (Conversation, conversation_of, for_event, scope_of, talks_freely,
                               with_quotes)
from bot.errors import BotError, BusyError, GenerationTimeout, UndeliverableError
from bot.events import (Generated, GenerationRequest, Incoming, Outgoing, Reply, ReplyKind, Role,
                        Turn, TurnState, utcnow)
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
MAX_REGENERATIONS = 3  # a reply invalidated by a command is regenerated at most this often
RECOVERY_WAIT = 10.0  # seconds start-up waits for one conversation's lock during recovery
SETTINGS_TTL = 5.0  # seconds a channel's settings are cached (other instances' changes show
# after at most this long; this instance's own changes at once)


def make_owner() -> str:
    """This process's claim owner: host, pid and a random part (unique per start)."""
    return f"{socket.gethostname()[:40]}:{os.getpid()}:{uuid.uuid4().hex[:12]}"


def owner_is_dead(owner: str, me: str) -> bool:
    """True when `owner` is certainly a dead process: an earlier start on this host whose pid
    is gone or is now ours (a restarted container). Other hosts' claims wait for their lease."""
    host, _, rest = owner.partition(":")
    pid_text, _, _ = rest.partition(":")
    my_host, _, my_rest = me.partition(":")
    if owner == me or host != my_host or not pid_text.isdigit():
        return False
    pid = int(pid_text)
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


@dataclass(slots=True, eq=False)
class Inflight:
    """A generation running in this process: what a command may invalidate."""

    conversation: Conversation
    authors: frozenset[str]  # authors of every turn in its prompt
    turn_ids: frozenset[int] = frozenset()  # the stored turns of its prompt
    task: asyncio.Future | None = None
    invalidated: bool = False

    def invalidate(self) -> None:
        self.invalidated = True
        if self.task is not None:
            self.task.cancel()


class _Invalidated(Exception):
    """The generation was invalidated by a command while it ran."""


@dataclass(slots=True)
class _Recovery:
    claimed: asyncio.Event = field(default_factory=asyncio.Event)


class Pipeline:
    def __init__(self, config: Config, store: Store, generator: Generator, limiter: Limiter,
                 lock: ChannelLock, metrics: Metrics | None = None, owner: str | None = None):
        self.config = config
        self.metrics = metrics or Metrics()
        self.store = store
        self.generator = generator
        self.limiter = limiter
        self.lock = lock
        self.owner = owner or make_owner()
        self.commands = Commands(config, store, generator, self)
        self.adapters: dict[str, Adapter] = {}
        self._noticed = NoticeOnce()
        self._tasks: set[asyncio.Task] = set()
        self._inflight: dict[str, Inflight] = {}
        self._closing = False
        self._settings: dict[tuple[str, str], tuple[float, dict]] = {}
        self._parents: dict[tuple[str, str], str] = {}  # thread -> parent channel, as seen
        self._delivering = asyncio.Event()  # set once the adapters run (sends may start)
        self._sweeper: asyncio.Task | None = None
        self.retry_base = 1.0  # seconds before the first send retry

    def attach(self, adapter: Adapter) -> None:
        self.adapters[adapter.name] = adapter

    @property
    def lease(self) -> float:
        return self.config.claim_lease

    # --- intake -----------------------------------------------------------------------------
    def submit(self, event: Incoming) -> asyncio.Task:
        """Handle the event in its own task (the adapters' entry point). During shutdown the
        message is still stored; it is answered after the drain or at the next start."""
        return self._spawn(self.process(event), event.channel_key)

    def _spawn(self, coro, name: str) -> asyncio.Task:
        task = asyncio.create_task(coro, name=f"event-{name}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

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
        if not isinstance(exc, UndeliverableError):
            await self._send_quietly(Reply.to(event, SLOW if isinstance(exc, GenerationTimeout)
                                              else APOLOGY, ReplyKind.NOTICE))

    # --- start, sweep, stop -------------------------------------------------------------------
    async def recover(self, window: float) -> int:
        """At start, before the adapters deliver anything: claim the replies left in the outbox
        and the messages left unanswered (unclaimed, expired, or claimed by a dead earlier
        start of this instance) within `window` seconds; older ones are skipped (messages) or
        given up (replies). Each conversation's recovery holds its lock before this returns,
        so new messages of that conversation queue behind it. Returns conversations started."""
        return await self._recover(window, older_than=0.0)

    def start_delivering(self) -> None:
        """The adapters run: sends may start; a periodic sweep takes over what dead instances
        (or failed sends) left behind."""
        self._delivering.set()
        if self._sweeper is None:
            self._sweeper = asyncio.create_task(self._sweep(), name="pipeline-sweeper")

    async def _sweep(self) -> None:
        while not self._closing:
            await asyncio.sleep(self.lease)
            if self._closing:
                return
            try:
                await self._recover(self.config.recover_window, older_than=self.lease)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - try again at the next sweep
                log.warning("recovery sweep failed: %s: %s", type(exc).__name__, exc)

    async def _recover(self, window: float, older_than: float) -> int:
        platforms = list(self.adapters)
        if not platforms:
            return 0
        dead = await self._dead_owners()
        started = 0
        for out in await self.store.claim_outbox(platforms, self.owner, self.lease, older_than,
                                                 dead=dead):
            if window <= 0 or (utcnow() - out.turn.created_at).total_seconds() > window:
                log.info("%s/%s: giving up a reply never confirmed since %s", out.turn.platform,
                         out.turn.channel, out.turn.created_at.isoformat(timespec="seconds"))
                await self.store.mark([out.turn.id], TurnState.FAILED.value)
                continue
            started += await self._start_recovery(self._resend(out),
                                                  await self._conversation_of(out.turn))
        pending = await self.store.unclaimed(platforms, older_than, dead=dead)
        now = utcnow()
        stale = [t.id for t in pending
                 if window <= 0 or (now - t.created_at).total_seconds() > window]
        if stale:
            await self.store.mark(stale, TurnState.SKIPPED.value)
            log.info("skipped %d unanswered messages older than %gs", len(stale), window)
        conversations = {await self._conversation_of(t) for t in pending if t.id not in stale}
        for conversation in sorted(conversations, key=lambda c: c.key):
            log.info("%s: answering messages left unanswered", conversation.key)
            started += await self._start_recovery(
                lambda got, c=conversation: self.answer(c, got, dead=dead), conversation)
        return started

    async def _start_recovery(self, work, conversation: Conversation) -> int:
        """Run `work(claimed_event)` in its own task; wait until it holds the lock and has
        claimed (or found nothing). A lock another instance holds is not waited for longer
        than RECOVERY_WAIT seconds: the task keeps its place in the queue meanwhile."""
        state = _Recovery()
        event = self._event_for(conversation, None)
        task = self._spawn(self._guarded(work(state.claimed), event), conversation.key)
        waiter = asyncio.ensure_future(state.claimed.wait())
        await asyncio.wait({task, waiter}, timeout=RECOVERY_WAIT,
                           return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        return 1

    async def _dead_owners(self) -> tuple[str, ...]:
        owners = await self.store.claim_owners()
        return tuple(o for o in owners if owner_is_dead(o, self.owner))

    async def drain(self, timeout: float) -> None:
        """Stop answering new messages (they are stored), let replies in flight finish, then,
        if time is left, answer what arrived meanwhile; cancel what is still running at the
        deadline (its messages stay PENDING, unclaimed, for the next start)."""
        deadline = time.monotonic() + timeout
        self._closing = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        while self._tasks and time.monotonic() < deadline:
            await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())
        if time.monotonic() < deadline:
            with suppress(Exception):
                platforms = list(self.adapters)
                backlog = await self.store.unclaimed(platforms) if platforms else []
                for conversation in {await self._conversation_of(t) for t in backlog}:
                    self._spawn(self._guarded(self.answer(conversation),
                                              self._event_for(conversation, None)),
                                conversation.key)
            while self._tasks and time.monotonic() < deadline:
                await asyncio.wait(set(self._tasks), timeout=deadline - time.monotonic())
        pending = set(self._tasks)
        for task in pending:
            task.cancel()
        if pending:
            log.warning("abandoned %d replies in flight at shutdown; they are answered at the "
                        "next start", len(pending))
            await asyncio.wait(pending, timeout=5)

    # --- one message ----------------------------------------------------------------------
    async def handle(self, event: Incoming) -> None:
        adapter = self.adapters[event.platform]
        self.metrics.received(event.platform)
        settings = await self.settings_for(event.platform, event.channel, event.parent)
        if not (event.is_direct or event.is_to_me or talks_freely(settings, event)):
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
        conversation = for_event(event, scope_of(settings, self.config.context))
        await self.store.append(Turn.from_event(event))
        if self._closing:
            log.info("%s: shutting down; message stored, answered after the drain or at the "
                     "next start", conversation.key)
            return
        await self.answer(conversation)

    async def conversation_for(self, event: Incoming) -> Conversation:
        settings = await self.settings_for(event.platform, event.channel, event.parent)
        return for_event(event, scope_of(settings, self.config.context))

    async def _conversation_of(self, turn: Turn) -> Conversation:
        settings = await self.settings_for(turn.platform, turn.channel)
        return conversation_of(turn.platform, turn.channel, turn.conversation,
                               scope_of(settings, self.config.context))

    # --- settings -------------------------------------------------------------------------
    async def settings_for(self, platform: str, channel: str, parent: str | None = None
                           ) -> dict:
        """The channel's settings: its own over its parent's (a Discord thread inherits its
        channel's), cached for SETTINGS_TTL seconds."""
        if parent is not None:
            self._parents[(platform, channel)] = parent
            if len(self._parents) > 100_000:
                self._parents.pop(next(iter(self._parents)))
        else:
            parent = self._parents.get((platform, channel))
        own = await self._cached_settings(platform, channel)
        if parent is None:
            return own
        return {**await self._cached_settings(platform, parent), **own}

    async def _cached_settings(self, platform: str, channel: str) -> dict:
        key = (platform, channel)
        now = time.monotonic()
        hit = self._settings.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        values = await self.store.get_settings(platform, channel)
        if len(self._settings) > 10_000:
            self._settings = {k: v for k, v in self._settings.items() if v[0] > now}
        self._settings[key] = (now + SETTINGS_TTL, values)
        return values

    def settings_changed(self, platform: str, channel: str) -> None:
        """This instance changed a channel's settings: read them again next time."""
        self._settings.pop((platform, channel), None)

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

    async def answer(self, conversation: Conversation, claimed: asyncio.Event | None = None,
                     dead: Sequence[str] = ()) -> None:
        """Answer every PENDING message of the conversation that nobody else holds, with one
        reply after the newest (a burst is answered once). A message already claimed (being
        answered by an earlier task, or another instance) is left to its holder."""
        try:
            for _ in range(MAX_REGENERATIONS):
                async with self.lock.hold(conversation.key):
                    turns = await self.store.claim(conversation.platform, conversation.channel,
                                                   conversation.sub, self.owner, self.lease,
                                                   dead=dead)
                    if claimed is not None:
                        claimed.set()
                        claimed = None
                    if not turns or not await self._reply(conversation, turns):
                        return
                # invalidated by a command: the lock is let go so the command (waiting for it)
                # changes the history first; then claim and answer again
            log.warning("%s: reply invalidated %d times in a row; the messages wait for the "
                        "next sweep", conversation.key, MAX_REGENERATIONS)
        finally:
            if claimed is not None:
                claimed.set()

    async def _reply(self, conversation: Conversation, claimed: list[Turn]) -> bool:
        """Generate, store and deliver one reply to `claimed` (the conversation's lock held).
        True when it must be generated again (a command invalidated it)."""
        ids = [t.id for t in claimed]
        newest = claimed[-1]
        event = self._event_for(conversation, newest)
        try:
            async with self._keep_claimed(ids):
                history = await self._context(conversation, claimed)
                overrides = await self.settings_for(conversation.platform, conversation.channel)
                request = GenerationRequest(conversation.key, tuple(with_quotes(history)),
                                            self.commands.effective(overrides),
                                            self.commands.character(overrides))
                inflight = Inflight(conversation,
                                    frozenset(t.author_id for t in history
                                              if t.role is Role.USER),
                                    frozenset(t.id for t in history))
                try:
                    generated = await self._generate(event, request, inflight)
                except _Invalidated:
                    return await self._redo(conversation, ids)
                except BusyError:
                    self.metrics.refused(event.platform, "busy")
                    await self.store.mark(ids, TurnState.SKIPPED.value)
                    await self.send(Reply.to(event, BUSY, ReplyKind.NOTICE))
                    return False
                except BotError:
                    await self.store.mark(ids, TurnState.SKIPPED.value)
                    raise
                if inflight.invalidated:
                    return await self._redo(conversation, ids)
                reply_turn = Turn(conversation.platform, conversation.channel, Role.BOT,
                                  generated.text, token_ids=generated.token_ids or None,
                                  state=TurnState.SENDING, conversation=newest.conversation)
                stored = await self.store.add_reply(
                    reply_turn, ids, owner=self.owner, context=[t.id for t in history],
                    lease=self.lease)
                if stored.id is None:
                    return await self._redo(conversation, ids)
        except asyncio.CancelledError:
            with suppress(Exception):  # shutdown: leave them to the next start at once
                await asyncio.shield(self.store.release(ids, self.owner))
            raise
        await self.deliver(Outgoing(stored, (), newest.message_id))
        self.metrics.answered(event.platform)
        return False

    async def _context(self, conversation: Conversation, claimed: list[Turn]) -> list[Turn]:
        """The stored turns a reply to `claimed` is generated from, oldest first: the reply
        chain of the newest (chain scope), the author's conversation (user scope) or the
        channel's history (channel scope), up to the newest claimed message."""
        newest, limit = claimed[-1], self.config.history_turns
        if conversation.scope == "chain":
            history = await self.store.chain(newest.id, limit)
            inside = {t.id for t in history}
            missing = [t for t in claimed if t.id not in inside]  # a burst on two branches
            return history[:-1] + missing + history[-1:]
        return await self.store.recent(conversation.platform, conversation.channel, limit,
                                       conversation=conversation.sub, until_seq=newest.seq)

    async def _redo(self, conversation: Conversation, ids: list[int]) -> bool:
        """A command changed the history this reply was built from: drop it (and whatever the
        generator cached from it) and let the loop claim and answer again."""
        log.info("%s: reply dropped: the conversation changed while it was generated",
                 conversation.key)
        self.generator.forget_channel(conversation.key)
        await self.store.release(ids, self.owner)
        return True

    @asynccontextmanager
    async def _keep_claimed(self, ids: list[int]) -> AsyncIterator[None]:
        """Renew the claims every lease/3 seconds while the block runs."""
        done = asyncio.Event()

        async def keeper() -> None:
            while True:
                with suppress(TimeoutError):
                    await asyncio.wait_for(done.wait(), self.lease / 3)
                if done.is_set():
                    return
                try:
                    if await self.store.renew(ids, self.owner, self.lease) < len(ids):
                        log.warning("claims on %s were lost (lease %gs)", ids, self.lease)
                except BotError as exc:
                    log.warning("could not renew claims: %s", exc)

        task = asyncio.create_task(keeper(), name="claim-keeper")
        try:
            yield
        finally:
            done.set()
            await asyncio.wait({task}, timeout=self.lease)

    async def _generate(self, event: Incoming, request: GenerationRequest,
                        inflight: Inflight) -> Generated:
        key = request.channel_key
        self._inflight[key] = inflight
        try:
            async with self.adapters[event.platform].typing(event):
                start = time.perf_counter()
                inflight.task = asyncio.ensure_future(self.generator.reply(request))
                try:
                    generated = await inflight.task
                except asyncio.CancelledError:
                    current = asyncio.current_task()
                    if inflight.invalidated and not (current and current.cancelling()):
                        raise _Invalidated() from None
                    raise
        finally:
            if self._inflight.get(key) is inflight:
                del self._inflight[key]
        self.metrics.generated(time.perf_counter() - start, len(generated.token_ids),
                               request.character or "default")
        return generated

    def _event_for(self, conversation: Conversation, turn: Turn | None) -> Incoming:
        """An event standing for the conversation's newest message (typing, apologies)."""
        if turn is None:
            return Incoming(conversation.platform, conversation.channel, "", "", "", "",
                            is_direct=False, is_to_me=True)
        return Incoming(turn.platform, turn.channel, turn.message_id or "", turn.author_id,
                        turn.author_name, turn.text, is_direct=False, is_to_me=True,
                        time=turn.created_at)

    # --- commands ---------------------------------------------------------------------------
    @asynccontextmanager
    async def exclusive(self, key: str, affects: Callable[[Inflight], bool]
                        ) -> AsyncIterator[None]:
        """For a command: invalidate the generations in flight here that it affects (they are
        neither sent, stored nor cached, and are redone from the new history), then hold the
        conversation lock `key` while the command changes the store."""
        for inflight in list(self._inflight.values()):
            if affects(inflight):
                inflight.invalidate()
        async with self.lock.hold(key):
            yield

    # --- outbound ---------------------------------------------------------------------------
    def _resend(self, out: Outgoing):
        """Recovery work for a reply left in the outbox (takes the conversation lock)."""
        async def work(claimed: asyncio.Event) -> None:
            conversation = await self._conversation_of(out.turn)
            try:
                async with self.lock.hold(conversation.key):
                    claimed.set()
                    log.info("%s: resending a reply from part %d", conversation.key,
                             len(out.sent) + 1)
                    await self.deliver(out)
            finally:
                claimed.set()
        return work

    async def deliver(self, out: Outgoing) -> None:
        """Send a stored reply from its first unconfirmed part, recording each confirmed part;
        the reply leaves the outbox when the last one is confirmed. A refusal for good marks it
        FAILED; any other failure (after the retries) leaves it for the sweep or next start."""
        turn = out.turn
        adapter = self.adapters[turn.platform]
        reply = Reply(turn.platform, turn.channel, turn.text, out.reply_to)
        parts = adapter.split(turn.text)
        if len(out.sent) >= len(parts):  # nothing (left) to send
            await self.store.mark([turn.id], TurnState.DONE.value)
            return
        try:
            async with self._keep_claimed([turn.id]):
                await self._delivering.wait()  # the adapters run
                for index in range(len(out.sent), len(parts)):
                    message_id = await self._send_part(adapter, reply, index, parts[index])
                    await self.store.confirm_part(turn.id, index, message_id or "",
                                                  last=index == len(parts) - 1)
        except UndeliverableError:
            await self.store.mark([turn.id], TurnState.FAILED.value)
            raise
        except BaseException:
            with suppress(Exception):  # the sweep (or the next start) sends the rest
                await asyncio.shield(self.store.release([turn.id], self.owner))
            raise

    async def send(self, reply: Reply) -> list[str | None]:
        """Deliver a reply that is not stored (commands, notices), part by part, each part
        retried on its own (a failure never repeats the parts already delivered)."""
        adapter = self.adapters[reply.platform]
        return [await self._send_part(adapter, reply, index, part)
                for index, part in enumerate(adapter.split(reply.text))]

    async def _send_part(self, adapter: Adapter, reply: Reply, index: int,
                         part: str) -> str | None:
        """Paced delivery of one part; a failed send is retried with backoff (network drop,
        5xx); a refusal for good (`UndeliverableError`) is not."""
        retries = self.config.send_retries
        for attempt in range(retries + 1):
            if adapter.outbound_rate is not None:
                rate, period = adapter.outbound_rate
                await self.limiter.pace(f"out:{reply.platform}:{reply.channel}", rate, period)
            try:
                return await adapter.send_part(reply, index, part)
            except (asyncio.CancelledError, UndeliverableError):
                raise
            except Exception as exc:  # noqa: BLE001 - libraries raise their own types
                if attempt == retries:
                    raise
                delay = min(30.0, self.retry_base * 2 ** attempt)
                log.warning("%s/%s: send failed (%s: %s); retry %d/%d in %.1fs", reply.platform,
                            reply.channel, type(exc).__name__, exc, attempt + 1, retries, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

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
