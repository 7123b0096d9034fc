"""Events of the lease aggregate (a step's hold on an agent's resource slot)."""

from __future__ import annotations

from ckp_core.events.envelope import EventData


class LeaseForceReleased(EventData):
    """An operator deleted a lease key; the holding runtime aborts its step with ``lease_revoked``."""

    TYPE = "lease_force_released"
    AGGREGATE = "lease"

    lease_id: str
    resource_key: str
    slot: int | None = None
    run_id: str | None = None
    reason: str | None = None

EVENTS: tuple[type[EventData], ...] = (LeaseForceReleased,)
