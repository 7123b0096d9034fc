"""The gateway's clients as typed FastAPI dependencies.

``create_app(settings)`` (the composition root) builds every client once and keeps it on ``app.state``; this
module is the one place that reads it back. Route handlers receive what they use as parameters
(``db: deps.Pool``, ``js: deps.JetStream`` …), which FastAPI resolves per request and leaves out of the OpenAPI
document; helpers that take the request for its own state (dispatch, auditing, idempotency) read the app-level
clients through :func:`clients`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Annotated, cast

import asyncpg
from fastapi import Depends, Request
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from starlette.datastructures import State

from langorch_gateway import metrics as metrics_module
from langorch_gateway import projector as projector_module
from langorch_gateway.streams import StreamSlots
from langorch_infra.hosting import Drain
from langorch_infra.jetstream import JetStreamEventStore
from langorch_infra.secret_providers import SecretResolver
from langorch_infra.settings import GatewaySettings

if TYPE_CHECKING:
    from langorch_gateway.admission import Admission
    from langorch_gateway.auth import Authenticator

__all__ = [
    "AuditProjector",
    "Clients",
    "EventStore",
    "JetStream",
    "Metrics",
    "NamesLock",
    "Nats",
    "Pool",
    "Projector",
    "Settings",
    "Slots",
    "clients",
]


class Clients:
    """Typed view of what ``create_app`` put on ``app.state`` (read on each access: a test may swap the
    projector of a running app)."""

    def __init__(self, state: State) -> None:
        self._state = state

    @property
    def settings(self) -> GatewaySettings:
        return cast(GatewaySettings, self._state.settings)

    @property
    def metrics(self) -> metrics_module.GatewayMetrics:
        return cast(metrics_module.GatewayMetrics, self._state.metrics)

    @property
    def drain(self) -> Drain:
        return cast(Drain, self._state.drain)

    @property
    def stream_slots(self) -> StreamSlots:
        return cast(StreamSlots, self._state.stream_slots)

    @property
    def names_lock(self) -> asyncio.Lock:
        return cast(asyncio.Lock, self._state.project_names_lock)

    @property
    def nc(self) -> NATS:
        return cast(NATS, self._state.nc)

    @property
    def admission(self) -> Admission:
        return cast("Admission", self._state.admission)

    @property
    def js(self) -> JetStreamContext:
        return cast(JetStreamContext, self._state.js)

    @property
    def pool(self) -> asyncpg.Pool:
        return cast(asyncpg.Pool, self._state.pool)

    @property
    def projector(self) -> projector_module.Projector:
        return cast(projector_module.Projector, self._state.projector)

    @property
    def audit_projector(self) -> projector_module.AuditProjector:
        return cast(projector_module.AuditProjector, self._state.audit_projector)

    @property
    def authenticator(self) -> Authenticator:
        return cast("Authenticator", self._state.authenticator)

    @property
    def store(self) -> JetStreamEventStore:
        return cast(JetStreamEventStore, self._state.store)

    @property
    def secret_resolver(self) -> SecretResolver:
        """Secret values at the moment of use (grant redemption, ``check``); records from ``LO_EVT``."""
        return cast(SecretResolver, self._state.secret_resolver)


def clients(request: Request) -> Clients:
    """The application's clients, for helpers that are handed the request."""
    return Clients(request.app.state)


# The dependencies are coroutines so that FastAPI calls them on the event loop (a plain function would be run
# in its thread pool).
async def _settings(request: Request) -> GatewaySettings:
    return clients(request).settings


async def _metrics(request: Request) -> metrics_module.GatewayMetrics:
    return clients(request).metrics


async def _stream_slots(request: Request) -> StreamSlots:
    return clients(request).stream_slots


async def _names_lock(request: Request) -> asyncio.Lock:
    return clients(request).names_lock


async def _nats(request: Request) -> NATS:
    return clients(request).nc


async def _jetstream(request: Request) -> JetStreamContext:
    return clients(request).js


async def _pool(request: Request) -> asyncpg.Pool:
    return clients(request).pool


async def _projector(request: Request) -> projector_module.Projector:
    return clients(request).projector


async def _audit_projector(request: Request) -> projector_module.AuditProjector:
    return clients(request).audit_projector


async def _store(request: Request) -> JetStreamEventStore:
    return clients(request).store


Settings = Annotated[GatewaySettings, Depends(_settings)]
Metrics = Annotated[metrics_module.GatewayMetrics, Depends(_metrics)]
Slots = Annotated[StreamSlots, Depends(_stream_slots)]
NamesLock = Annotated[asyncio.Lock, Depends(_names_lock)]
"""Serialises the project-name checks and appends of this replica (names are unique, case-insensitively)."""
Nats = Annotated[NATS, Depends(_nats)]
JetStream = Annotated[JetStreamContext, Depends(_jetstream)]
Pool = Annotated[asyncpg.Pool, Depends(_pool)]
Projector = Annotated[projector_module.Projector, Depends(_projector)]
AuditProjector = Annotated[projector_module.AuditProjector, Depends(_audit_projector)]
EventStore = Annotated[JetStreamEventStore, Depends(_store)]
