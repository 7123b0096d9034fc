"""Triggers metrics (api.md §13.1), derived from the trigger events this replica appends: fires by how the run was
started and by outcome (``started`` or the skip's outcome), and registration changes by event type."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter

from ckp_core.events import EventEnvelope
from langorch_infra.metrics import package_version, register_build_info

VERSION = package_version("langorch-triggers")
REGISTRATION_EVENTS = ("trigger_registered", "trigger_updated", "trigger_deleted", "trigger_enabled",
                       "trigger_disabled")


class TriggersMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        register_build_info(r, "triggers", VERSION)
        self.fires = Counter("langorch_trigger_fires_total", "Trigger fires, by how the run was started and outcome "
                             "(started, duplicate, throttled, skipped, invalid)", ["trigger_type", "outcome"],
                             registry=r)
        self.registrations = Counter("langorch_trigger_registration_changes_total", "Trigger registration changes, "
                                     "by event type", ["type"], registry=r)

    async def observe(self, event: EventEnvelope) -> None:
        """Count one appended trigger event."""
        data = event.data
        if event.type == "trigger_fired":
            self.fires.labels(trigger_type=str(data.get("trigger_type")), outcome="started").inc()
        elif event.type == "trigger_fire_skipped":
            self.fires.labels(trigger_type=str(data.get("trigger_type")), outcome=str(data.get("outcome"))).inc()
        elif event.type in REGISTRATION_EVENTS:
            self.registrations.labels(type=event.type).inc()
