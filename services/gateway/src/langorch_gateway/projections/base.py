"""What a projection is made of: handlers keyed by the event class they take, and the recorded facts of the event
being applied (its envelope and ``LO_EVT`` position).

A handler names the events it handles by the annotation of its ``event`` parameter (a union names several), as
``functools.singledispatch`` does, so the class it is registered for and the type its body is checked against
are one declaration::

    @PROJECTION.handles
    async def completed(conn: Conn, event: RunCompleted, rec: Recorded) -> None: ...
"""

from __future__ import annotations

import json
import types
import typing
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Generic, TypeVar

from ckp_core.events import Aggregate, DecodedEvent, EventData, EventEnvelope, UnknownEvent

Conn = Any
"""Where a handler writes: the projector's :class:`~langorch_gateway.projector.StatementBatch` (or an asyncpg
connection inside the batch transaction). Handlers only ``execute`` statements, never read, and write only rows of
the aggregate whose event they apply, so the batch may group the statements of different aggregates."""


def to_json(value: Any) -> str:
    """Compact JSON for a ``jsonb`` parameter."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def to_json_or_null(value: Any) -> str | None:
    """Compact JSON, or SQL NULL for None."""
    return to_json(value) if value is not None else None


@dataclass(frozen=True)
class Recorded:
    """The envelope of the event being applied (upcast to its current schema version) and its ``LO_EVT`` position."""

    envelope: EventEnvelope
    position: int

    @property
    def aggregate_id(self) -> str:
        return self.envelope.aggregate_id

    @property
    def seq(self) -> int:
        return self.envelope.seq

    @property
    def at(self) -> datetime:
        """When the event occurred."""
        return self.envelope.occurred_at

    @property
    def actor(self) -> str:
        """The actor rendered ``kind:id`` (api.md §1.1)."""
        return self.envelope.actor.render()


F = TypeVar("F", bound=Callable[..., Any])


def event_classes(fn: Callable[..., Any]) -> tuple[type[EventData], ...]:
    """The event classes ``fn``'s ``event`` parameter is annotated with."""
    annotation = typing.get_type_hints(fn).get("event")
    union = typing.get_origin(annotation) in (typing.Union, types.UnionType)
    classes = typing.get_args(annotation) if union else (annotation,)
    if not classes or not all(isinstance(c, type) and issubclass(c, EventData) for c in classes):
        raise TypeError(f"{fn.__qualname__}: annotate its 'event' parameter with event classes, not {annotation!r}")
    return classes


class ByEventClass(Generic[F]):
    """Functions keyed by the event classes of their ``event`` parameter; one function per class."""

    def __init__(self) -> None:
        self._by_class: dict[type[EventData], F] = {}

    def register(self, fn: F) -> F:
        """Decorator: ``fn`` handles the classes its ``event`` parameter names."""
        for cls in event_classes(fn):
            if cls in self._by_class:
                raise ValueError(f"{cls.__name__} already has a handler: {self._by_class[cls].__qualname__}")
            self._by_class[cls] = fn
        return fn

    def get(self, event: DecodedEvent) -> F | None:
        """The function registered for the event's class (None for an :class:`UnknownEvent`)."""
        return None if isinstance(event, UnknownEvent) else self._by_class.get(type(event))

    @property
    def classes(self) -> frozenset[type[EventData]]:
        return frozenset(self._by_class)


Handler = Callable[[Conn, Any, Recorded], Awaitable[None]]
H = TypeVar("H", bound=Handler)


class Projection:
    """One projection: its tables and, for the events of one aggregate, the handler of each event class.

    ``otherwise`` handles the aggregate's events no handler names (known ones and :class:`UnknownEvent`); without
    it they leave the tables as they are.
    """

    def __init__(self, name: str, aggregate: Aggregate, tables: tuple[str, ...]) -> None:
        self.name = name
        self.aggregate = aggregate
        self.tables = tables
        self._handlers: ByEventClass[Handler] = ByEventClass()
        self._otherwise: Handler | None = None

    def handles(self, handler: H) -> H:
        """Decorator: register a handler for the classes its ``event`` parameter names."""
        self._handlers.register(handler)
        return handler

    def otherwise(self, handler: H) -> H:
        """Decorator: the handler of this aggregate's events that no other handler names."""
        if self._otherwise is not None:
            raise ValueError(f"projection {self.name} already has a fallback handler")
        self._otherwise = handler
        return handler

    @property
    def handled(self) -> frozenset[type[EventData]]:
        """The event classes with a handler of their own."""
        return self._handlers.classes

    async def apply(self, conn: Conn, event: DecodedEvent, rec: Recorded) -> None:
        """Apply one decoded event (events of other aggregates are not this projection's)."""
        if rec.envelope.aggregate != self.aggregate:
            return
        handler = self._handlers.get(event) or self._otherwise
        if handler is not None:
            await handler(conn, event, rec)
