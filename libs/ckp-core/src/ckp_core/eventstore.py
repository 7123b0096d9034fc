"""The ``EventStore`` port and its in-memory adapter.

The JetStream adapter lives in ``langorch_infra.jetstream``; both pass the same contract tests. Positions are
stream sequences: ``expected_position`` is the position of the aggregate's last event (0 when it has none),
which is exactly JetStream's ``Nats-Expected-Last-Subject-Sequence`` scoped to the aggregate's subjects.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from ckp_core.errors import ConcurrencyError
from ckp_core.events import EventEnvelope


@dataclass(frozen=True)
class StoredEvent:
    """An event together with its position in the log."""

    envelope: EventEnvelope
    position: int


@dataclass(frozen=True)
class AggregateHead:
    """Where an aggregate's stream currently ends."""

    seq: int
    position: int


class EventStore(Protocol):
    """Append-only, per-aggregate optimistic-concurrency event log."""

    async def append(self, events: Sequence[EventEnvelope], *, expected_position: int) -> list[int]:
        """Append events of ONE aggregate, failing with ConcurrencyError if its head moved.

        Re-appending an event already stored (same ``event_id`` as the aggregate's last event) is a no-op
        that returns the stored position: appends are idempotent.
        """
        ...

    async def head(self, aggregate: str, aggregate_id: str) -> AggregateHead | None:
        """The last event's seq and position, or None for a new aggregate."""
        ...

    async def read(self, aggregate: str, aggregate_id: str, after_position: int = 0) -> list[StoredEvent]:
        """Every event of one aggregate after ``after_position``, in order."""
        ...


class MemoryEventStore:
    """A real in-memory implementation for unit tests (never a stand-in for NATS in integration tests)."""

    def __init__(self) -> None:
        self._log: list[StoredEvent] = []
        self._lock = asyncio.Lock()

    def _of(self, aggregate: str, aggregate_id: str) -> list[StoredEvent]:
        return [
            e for e in self._log
            if e.envelope.aggregate == aggregate and e.envelope.aggregate_id == aggregate_id
        ]

    async def append(self, events: Sequence[EventEnvelope], *, expected_position: int) -> list[int]:
        async with self._lock:
            positions: list[int] = []
            expected = expected_position
            for ev in events:
                mine = self._of(ev.aggregate, ev.aggregate_id)
                last = mine[-1] if mine else None
                if last is not None and last.envelope.event_id == ev.event_id:
                    positions.append(last.position)
                    expected = last.position
                    continue
                actual = last.position if last else 0
                if actual != expected:
                    raise ConcurrencyError(
                        f"{ev.aggregate} {ev.aggregate_id}: expected position {expected}, found {actual}",
                        details={"expected": expected, "actual": actual},
                    )
                stored = StoredEvent(ev, len(self._log) + 1)
                self._log.append(stored)
                positions.append(stored.position)
                expected = stored.position
            return positions

    async def head(self, aggregate: str, aggregate_id: str) -> AggregateHead | None:
        mine = self._of(aggregate, aggregate_id)
        if not mine:
            return None
        return AggregateHead(mine[-1].envelope.seq, mine[-1].position)

    async def read(self, aggregate: str, aggregate_id: str, after_position: int = 0) -> list[StoredEvent]:
        return [e for e in self._of(aggregate, aggregate_id) if e.position > after_position]
