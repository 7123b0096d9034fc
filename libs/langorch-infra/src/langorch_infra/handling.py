"""The one command-handler mechanism of every aggregate owner: load → decide → append → audit.

An aggregate's owner (the compiler for procedures, the approvals service, the runtime for runs and agents, and
later triggers and users) handles a command the same way:

1. **load**: read the aggregate's events from the :class:`~ckp_core.eventstore.EventStore` and fold them into
   its state; an event whose ``causation_id`` is the command's id means the command was handled before (a
   redelivery after a crash between the append and the ack);
2. **decide**: call the owner's decide function with the state. It returns the payload(s) to append (``None``
   or an empty list: accepted, nothing changes) or raises :class:`~ckp_core.errors.CommandRefused`, which
   becomes one ``command_rejected`` event on the aggregate (or, for commands whose refusals were never
   events, only a rejected audit record);
3. **append** the events with the aggregate's expected position (OCC). When another writer landed first
   (:class:`~ckp_core.errors.ConcurrencyError`) the aggregate is read again and the command decided again, a
   few times with a small jittered backoff; then the conflict is raised, and the consumer naks the message so
   JetStream redelivers it;
4. **audit** the command's one record (api.md §12) with :func:`ckp_core.audit.outcome_entry`. A redelivery
   publishes it again: within the duplicate window JetStream drops it (``Nats-Msg-Id = audit:<command id>``),
   and after it the projection keeps one record per command, so a record lost before a crash is written now.

The handler returns what happened (:class:`Handled`): the events the command caused, new or found again on a
redelivery, so the owner can do its follow-up work (store an IR, publish a resume, start a run) idempotently.
"""

from __future__ import annotations

import asyncio
import copy
import inspect
import logging
import random
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, Literal, Protocol, TypeVar

from ckp_core.audit import AuditEntry, command_entry, outcome_entry
from ckp_core.commands import Command
from ckp_core.errors import CommandRefused, ConcurrencyError
from ckp_core.events import Actor, CommandRejected, EventData, EventEnvelope, make_event
from ckp_core.eventstore import EventStore, StoredEvent
from langorch_infra import logs

log = logging.getLogger(__name__)

S = TypeVar("S")
T = TypeVar("T")

Decision = EventData | Sequence[EventData] | None
"""What a decide function returns: the payload(s) to append, in order; ``None`` (or ``[]``) accepts the command
without changing the aggregate (a no-op)."""
Decide = Callable[[S], Decision | Awaitable[Decision]]
"""The owner's decision on the folded state. Pure where it can be; an owner whose decision needs a look-up (the
compiler compiling a document, the registry of other agents) passes a coroutine function."""
Fold = Callable[[str, Sequence[StoredEvent]], S]
"""Folds an aggregate's stored events (in order) into its state: ``fold(aggregate_id, events)``."""
Evolve = Callable[[S, StoredEvent], None]
"""Applies one more stored event to a state in place (what ``fold`` does for each event)."""
Refusals = Literal["event", "audit"]
"""Where a refusal is recorded: as a ``command_rejected`` event on the aggregate (and its audit record), or only
in the audit log (commands whose refusals were never events: a cancel of an ended run)."""

AuditMeta = (Mapping[str, Any] | Callable[["Handled[S]"], Mapping[str, Any] | Awaitable[Mapping[str, Any]]]
             | None)
"""Keyword arguments of :func:`ckp_core.audit.command_entry` for a command's record, or a function of its
outcome returning them (the record of a creation names what was created), or a coroutine function: what it awaits
is part of handling the command, so its errors are the command's (a record that cannot be *built* from them is
only logged)."""

MAX_ATTEMPTS = 4
BACKOFF_S = 0.01
BACKOFF_CAP_S = 0.2


class AuditSink(Protocol):
    """Where the records go (``langorch_infra.audit.AuditWriter`` on ``LO_AUDIT``)."""

    async def write(self, entry: AuditEntry) -> bool: ...


@dataclass(frozen=True)
class Loaded(Generic[S]):
    """An aggregate as read for one command: its state, its head and the events that command already caused."""

    state: S
    seq: int
    position: int
    done: tuple[StoredEvent, ...] = ()


@dataclass(frozen=True)
class Handled(Generic[S]):
    """What became of a command.

    ``events``/``positions`` are the events it caused: appended now, or found on the aggregate when it had been
    handled before (``replayed``). None of them and no ``refusal``: accepted without a change. ``state`` is the
    state the decision was made on (the aggregate before these events); ``position`` the aggregate's position
    after them.
    """

    state: S
    events: tuple[EventEnvelope, ...]
    positions: tuple[int, ...]
    position: int
    replayed: bool = False
    refusal: CommandRefused | None = None
    attempts: int = 1

    @property
    def event(self) -> EventEnvelope | None:
        """The command's outcome event (its first), if it caused one."""
        return self.events[0] if self.events else None

    @property
    def rejected(self) -> bool:
        return self.refusal is not None or (self.event is not None and self.event.type == "command_rejected")

    @property
    def accepted(self) -> bool:
        return not self.rejected


@dataclass
class _Cached(Generic[S]):
    state: S
    seq: int = 0
    position: int = 0
    caused: dict[str, list[StoredEvent]] = field(default_factory=dict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AggregateCache(Generic[S]):
    """The states of recently handled aggregates of one type, each brought up to date by reading only the events
    appended after it (one head look-up when nothing changed), for aggregates whose history keeps growing — a
    trigger gains an event per fire, so folding its whole history for every fire would slow each fire down with
    the trigger's age.

    The stream stays the truth: another writer's events are read before every decision, and a conflicting append
    still makes the handler load again. Every event's ``causation_id`` is remembered, so a redelivered command is
    recognised as exactly as when the whole history is read. At most ``max_aggregates`` are kept (least recently
    used go first; a dropped one is read in full the next time).
    """

    def __init__(self, initial: Callable[[str], S], evolve: Evolve[S], *, max_aggregates: int = 10_000) -> None:
        self.initial = initial
        self.evolve = evolve
        self.max_aggregates = max_aggregates
        self._entries: OrderedDict[str, _Cached[S]] = OrderedDict()

    def _entry(self, aggregate_id: str) -> _Cached[S]:
        entry = self._entries.get(aggregate_id)
        if entry is None:
            entry = self._entries[aggregate_id] = _Cached(self.initial(aggregate_id))
            while len(self._entries) > self.max_aggregates:
                self._entries.popitem(last=False)
        else:
            self._entries.move_to_end(aggregate_id)
        return entry

    async def load(self, store: EventStore, aggregate: str, aggregate_id: str,
                   command: Command | None = None) -> Loaded[S]:
        entry = self._entry(aggregate_id)
        async with entry.lock:  # one refresh at a time: concurrent loads must not apply the same events twice
            await self._refresh(entry, store, aggregate, aggregate_id)
            done = tuple(entry.caused.get(command.command_id, ())) if command is not None else ()
            # a copy: the decision may take a while (a run's creation), while other loads move the cached state on
            return Loaded(copy.deepcopy(entry.state), entry.seq, entry.position, done)

    async def view(self, store: EventStore, aggregate: str, aggregate_id: str, pick: Callable[[S], T]) -> T:
        """``pick`` of the aggregate's current state, without copying the whole state as :meth:`load` does:
        ``pick`` runs under the entry's lock and returns what the caller keeps (a copy of the part it reads)."""
        entry = self._entry(aggregate_id)
        async with entry.lock:
            await self._refresh(entry, store, aggregate, aggregate_id)
            return pick(entry.state)

    async def _refresh(self, entry: _Cached[S], store: EventStore, aggregate: str, aggregate_id: str) -> None:
        for stored in await store.read(aggregate, aggregate_id, entry.position):
            self.evolve(entry.state, stored)
            entry.seq, entry.position = stored.envelope.seq, stored.position
            if stored.envelope.causation_id:
                entry.caused.setdefault(stored.envelope.causation_id, []).append(stored)


def rejection(command: Command, command_type: str, refusal: CommandRefused) -> CommandRejected:
    """The ``command_rejected`` payload of a refused command."""
    return CommandRejected(command_id=command.command_id, command_type=command_type, code=refusal.code,
                           detail=refusal.message, extra=refusal.extra)


class CommandHandler(Generic[S]):
    """Handles the commands of ONE aggregate type (``aggregate``) on an event store.

    ``fold`` builds the state from the aggregate's events; ``audit`` receives the one record per command (None:
    the owner writes no records). ``max_attempts`` decisions are tried on concurrency conflicts, ``backoff_s``
    doubling between them with ±50 % jitter (capped at ``BACKOFF_CAP_S``). With a ``cache``
    (:class:`AggregateCache`) an aggregate is read from where the last decision left it instead of from its start.
    """

    def __init__(self, store: EventStore, aggregate: str, fold: Fold[S], *, audit: AuditSink | None = None,
                 max_attempts: int = MAX_ATTEMPTS, backoff_s: float = BACKOFF_S,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep, rng: random.Random | None = None,
                 cache: AggregateCache[S] | None = None) -> None:
        if max_attempts < 1:
            raise ValueError("max_attempts must be at least 1")
        self.store = store
        self.aggregate = aggregate
        self.fold = fold
        self.audit = audit
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.sleep = sleep
        self.rng = rng or random.Random()
        self.cache = cache

    async def load(self, aggregate_id: str, command: Command | None = None) -> Loaded[S]:
        """The aggregate's state and head, and the events ``command`` already caused (a redelivery)."""
        if self.cache is not None:
            return await self.cache.load(self.store, self.aggregate, aggregate_id, command)
        history = await self.store.read(self.aggregate, aggregate_id)
        state = self.fold(aggregate_id, history)
        seq, position = (history[-1].envelope.seq, history[-1].position) if history else (0, 0)
        done: tuple[StoredEvent, ...] = ()
        if command is not None:
            done = tuple(e for e in history if e.envelope.causation_id == command.command_id)
        return Loaded(state, seq, position, done)

    async def handle(
        self,
        aggregate_id: str,
        command: Command,
        decide: Decide[S],
        *,
        command_type: str,
        actor: Actor | None = None,
        correlation_id: str | Callable[[S], str | None] | None = None,
        refusals: Refusals = "event",
        audit_as: Command | None = None,
        audit_meta: AuditMeta[S] = None,
    ) -> Handled[S]:
        """Decide ``command`` on the aggregate ``aggregate_id`` and append its outcome (see the module).

        ``command_type`` names the command in ``command_rejected``; the events carry ``actor`` (default: the
        command's), the command's id as ``causation_id`` and ``correlation_id`` (a value, or computed from the
        state after the decision). The audit record is the one of ``audit_as`` (default: the command) with
        ``audit_meta`` passed to :func:`ckp_core.audit.command_entry` (``sensitive_keys``, ``extra_meta`` …;
        or a function of the outcome returning them).
        Raises :class:`ConcurrencyError` when the aggregate kept moving for ``max_attempts`` decisions.
        """
        ids = {k: getattr(command, k, None) for k in ("run_id", "procedure_id")}
        if self.aggregate in ("run", "procedure"):
            ids[f"{self.aggregate}_id"] = aggregate_id
        with logs.fields(command_id=command.command_id, **ids):  # on the records logged while deciding
            for attempt in range(1, self.max_attempts + 1):
                loaded = await self.load(aggregate_id, command)
                if loaded.done:
                    handled = Handled(loaded.state, tuple(e.envelope for e in loaded.done),
                                      tuple(e.position for e in loaded.done), loaded.done[-1].position,
                                      replayed=True, attempts=attempt)
                    await self._audit(command, handled, audit_as, audit_meta)
                    return handled
                refusal: CommandRefused | None = None
                try:
                    decided = decide(loaded.state)
                    decision = await decided if inspect.isawaitable(decided) else decided
                except CommandRefused as refused:
                    refusal = refused
                    decision = rejection(command, command_type, refused) if refusals == "event" else None
                payloads = _payloads(decision)
                if not payloads:
                    handled = Handled(loaded.state, (), (), loaded.position, refusal=refusal, attempts=attempt)
                    await self._audit(command, handled, audit_as, audit_meta)
                    return handled
                correlation = correlation_id(loaded.state) if callable(correlation_id) else correlation_id
                events = tuple(
                    make_event(data, aggregate_id=aggregate_id, seq=loaded.seq + i, actor=actor or command.actor,
                               causation_id=command.command_id, correlation_id=correlation, aggregate=self.aggregate)
                    for i, data in enumerate(payloads, start=1))
                try:
                    positions = await self.store.append(list(events), expected_position=loaded.position)
                except ConcurrencyError:
                    if attempt >= self.max_attempts:
                        log.info("%s %s kept changing while %s was decided (%d attempts); left to redelivery",
                                 self.aggregate, aggregate_id, command_type, attempt)
                        raise
                    await self.sleep(self._backoff(attempt))
                    continue
                handled = Handled(loaded.state, events, tuple(positions), positions[-1], refusal=refusal,
                                  attempts=attempt)
                log.debug("%s %s: %s appended %s", self.aggregate, aggregate_id, command_type,
                          ", ".join(e.type for e in events))
                await self._audit(command, handled, audit_as, audit_meta)
                return handled
            raise AssertionError("unreachable: the last attempt returns or raises")  # pragma: no cover

    def _backoff(self, attempt: int) -> float:
        """Seconds before decision ``attempt + 1``: exponential, jittered by ±50 %, capped."""
        base: float = min(BACKOFF_CAP_S, self.backoff_s * 2 ** (attempt - 1))
        return base * (0.5 + self.rng.random())

    async def _audit(self, command: Command, handled: Handled[S], audit_as: Command | None,
                     audit_meta: AuditMeta[S]) -> None:
        if self.audit is None:
            return
        subject = audit_as or command
        try:
            meta = audit_meta(handled) if callable(audit_meta) else audit_meta
        except Exception:  # a record that cannot be built must not fail the command: its outcome is in LO_EVT
            log.warning("audit record of command %s not built", command.command_id, exc_info=True)
            return
        if inspect.isawaitable(meta):
            meta = await meta  # what it awaits is part of handling the command: its errors are the command's
        try:
            kwargs = dict(meta or {})
            entry: AuditEntry
            if handled.event is None and handled.refusal is not None:  # refused without an event
                entry = command_entry(subject, "rejected", code=handled.refusal.code, detail=handled.refusal.message,
                                      **kwargs)
            else:
                entry = outcome_entry(subject, handled.event, **kwargs)
        except Exception:  # a record that cannot be built must not fail the command: its outcome is in LO_EVT
            log.warning("audit record of command %s not built", command.command_id, exc_info=True)
            return
        await self.audit.write(entry)


def _payloads(decision: Decision) -> list[EventData]:
    if decision is None:
        return []
    if isinstance(decision, EventData):
        return [decision]
    return list(decision)
