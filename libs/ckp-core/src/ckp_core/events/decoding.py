"""Reading events: :func:`decode` turns an envelope into an instance of its payload class, upcasting old shapes.

Events are never rewritten. A payload keeps the shape it was written with, and its envelope says which one
(``schema_version``). When a payload class changes shape, its ``SCHEMA_VERSION`` goes up by one and an
*upcaster* is registered for the version it leaves: a small pure function from the data of version ``n`` to the
data of version ``n + 1``. :func:`upcast` applies the chain on read, so every reader sees the current shape and
no reader keeps a branch for an old one. Every event type is at version 1 today, so :data:`UPCASTERS` is empty.

An event of a type this code does not know (written by a newer release) decodes to :class:`UnknownEvent`
instead of failing: a reader skips it or records it as it is, and keeps going. A known type whose data does not
validate raises :class:`pydantic.ValidationError` (the writer validated it, so the data is damaged), and so does
one whose version is older than its class with no upcaster to bridge the gap (:class:`EventVersionError`). A
version newer than the class (a newer writer's additive change) is read with the current class, whose payloads
allow unknown fields.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.errors import CkpError
from ckp_core.events.envelope import EventData, EventEnvelope
from ckp_core.events.registry import EVENT_TYPES

E = TypeVar("E", bound=EventData)

Upcaster = Callable[[dict[str, Any]], dict[str, Any]]
"""The data of one schema version of an event type → the data of the next version."""


class EventVersionError(CkpError):
    """An event's ``schema_version`` is older than its class and no upcaster leads from it to the current one."""

    code = "event_version_unreadable"


class Upcasters:
    """Upcasters by ``(event type, from_version)``; each takes the data one version forward."""

    def __init__(self) -> None:
        self._steps: dict[tuple[str, int], Upcaster] = {}

    def register(self, event_type: str, from_version: int) -> Callable[[Upcaster], Upcaster]:
        """Decorator: register ``fn`` as the upcaster of ``event_type`` from ``from_version`` to the next one."""

        def add(fn: Upcaster) -> Upcaster:
            key = (event_type, from_version)
            if key in self._steps:
                raise ValueError(f"an upcaster of {event_type} from version {from_version} is already registered")
            self._steps[key] = fn
            return fn

        return add

    @property
    def registered(self) -> frozenset[tuple[str, int]]:
        """Every ``(event type, from_version)`` with an upcaster."""
        return frozenset(self._steps)

    def upcast(self, event_type: str, version: int, data: Mapping[str, Any]) -> tuple[int, dict[str, Any]]:
        """The version and data after every upcaster that applies, in order (``data`` itself is not changed)."""
        current = dict(data)
        while (step := self._steps.get((event_type, version))) is not None:
            current = step(copy.deepcopy(current))
            version += 1
        return version, current


UPCASTERS = Upcasters()
"""The upcasters every reader applies (none yet: every event type is at schema version 1)."""


class UnknownEvent(BaseModel):
    """An event whose type the registry does not know, kept as it was written."""

    model_config = ConfigDict(frozen=True)

    type: str
    schema_version: int
    data: dict[str, Any] = Field(default_factory=dict)


DecodedEvent = EventData | UnknownEvent
"""What :func:`decode` gives: the payload class's instance, or :class:`UnknownEvent`."""


def upcast(envelope: EventEnvelope, *, upcasters: Upcasters = UPCASTERS) -> EventEnvelope:
    """The envelope with its data in the newest shape the upcasters reach (the same object when none applies)."""
    version, data = upcasters.upcast(envelope.type, envelope.schema_version, envelope.data)
    if version == envelope.schema_version:
        return envelope
    return envelope.model_copy(update={"schema_version": version, "data": data})


def decode(envelope: EventEnvelope, *, types: Mapping[str, type[EventData]] = EVENT_TYPES,
           upcasters: Upcasters = UPCASTERS) -> DecodedEvent:
    """The envelope's data as an instance of its event class, upcast to the class's schema version first.

    ``types`` and ``upcasters`` default to the product's registries (a test passes its own)."""
    cls = types.get(envelope.type)
    if cls is None:
        return UnknownEvent(type=envelope.type, schema_version=envelope.schema_version, data=envelope.data)
    return _validate(cls, envelope, upcasters)


def decode_as(envelope: EventEnvelope, cls: type[E], *, upcasters: Upcasters = UPCASTERS) -> E | None:
    """The typed payload when ``envelope`` is a ``cls`` event, else None (other events are not validated).

    For a reader that wants one type out of a stream, e.g.
    ``{s.child_run_id for e in events if (s := decode_as(e.envelope, SubflowStarted))}``."""
    if envelope.type != cls.TYPE:
        return None
    return _validate(cls, envelope, upcasters)


def _validate(cls: type[E], envelope: EventEnvelope, upcasters: Upcasters) -> E:
    current = upcast(envelope, upcasters=upcasters)
    if current.schema_version < cls.SCHEMA_VERSION:
        raise EventVersionError(
            f"{envelope.type} event {envelope.event_id} is at schema version {current.schema_version}, its class "
            f"{cls.__name__} at {cls.SCHEMA_VERSION}, and no upcaster leads from {current.schema_version}",
            details={"type": envelope.type, "schema_version": current.schema_version,
                     "current_version": cls.SCHEMA_VERSION})
    return cls.model_validate(current.data)
