"""The registry of event types: every payload class by its ``TYPE``, and their JSON Schemas.

Each aggregate's module lists its classes in ``EVENTS``; the registry is their union, built here explicitly (no
import registers anything as a side effect). A type name may belong to one class only.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from types import MappingProxyType
from typing import Any

from ckp_core.events import agent, api_key, approval, lease, procedure, project, run, secret, trigger, user
from ckp_core.events.envelope import EventData, EventEnvelope


def _by_type(classes: Iterable[type[EventData]]) -> dict[str, type[EventData]]:
    registry: dict[str, type[EventData]] = {}
    for cls in classes:
        if cls.TYPE in registry:
            raise ValueError(f"event type {cls.TYPE!r} is defined twice: {registry[cls.TYPE].__name__}, {cls.__name__}")
        registry[cls.TYPE] = cls
    return registry


EVENT_TYPES: Mapping[str, type[EventData]] = MappingProxyType(_by_type(
    cls for module in (procedure, run, approval, project, agent, lease, user, api_key, secret, trigger)
    for cls in module.EVENTS
))
"""Every event type's payload class, by type name."""


def event_json_schemas() -> dict[str, Any]:
    """JSON Schemas of the envelope and every payload type (served at ``/api/schemas/events``)."""
    return {
        "envelope": EventEnvelope.model_json_schema(),
        "types": {
            name: {"schema_version": cls.SCHEMA_VERSION, "schema": cls.model_json_schema()}
            for name, cls in EVENT_TYPES.items()
        },
    }
