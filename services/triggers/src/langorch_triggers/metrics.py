"""Triggers metrics (api.md §13.1), derived from the trigger events this replica appends: fires that started a run
and fires that did not (by reason), by how the run was started; the lag from a fire's receipt to its
``run_created``; registration changes by event type; and the ``LO_EXT`` event consumer's deliveries and backlog
age."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from ckp_core.events import EventEnvelope
from langorch_infra.metrics import package_version, register_build_info

VERSION = package_version("langorch-triggers")
REGISTRATION_EVENTS = ("trigger_registered", "trigger_updated", "trigger_deleted", "trigger_enabled",
                       "trigger_disabled")
LAG_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)
REASONS = {"duplicate_delivery": "duplicate", "max_concurrent_runs": "max_concurrent_runs",
           "invalid_input_vars": "invalid_input", "procedure_not_runnable": "not_runnable",
           "procedure_not_effective": "not_runnable", "misfire": "misfire"}
"""A skipped fire's reason as the metric labels it; any other reason is ``other``."""


class TriggersMetrics:
    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        register_build_info(r, "triggers", VERSION)
        self.fired = Counter("langorch_trigger_fired_total", "Trigger fires that created a run, by how the run "
                             "was started (manual, scheduled, webhook, event, file_watch)", ["trigger_type"],
                             registry=r)
        self.rejected = Counter("langorch_trigger_rejected_total", "Trigger fires that created no run, by how the "
                                "run would have started and why", ["trigger_type", "reason"], registry=r)
        self.lag = Histogram("langorch_trigger_lag_seconds", "From the fire's receipt by the triggers service to "
                             "its run_created", ["trigger_type"], buckets=LAG_BUCKETS, registry=r)
        self.slots_held = Gauge("langorch_trigger_slots_held", "Runs of a procedure that have not ended, as this "
                                "replica last wrote or read its concurrency slots (procedures with a trigger's "
                                "max_concurrent_runs, and every procedure whose runs this replica saw start or "
                                "end)", ["procedure_id"], registry=r)
        self.events = Counter("langorch_trigger_events_total", "Deliveries of LO_EXT messages to the event "
                              "consumer: an enabled event trigger of an active version fired for them (matched), "
                              "matched their subject but its event_filter said no (filtered), or none matched "
                              "(unmatched); a redelivered message counts again", ["result"], registry=r)
        self.event_backlog_age = Gauge("langorch_trigger_event_oldest_pending_age_seconds", "Age of the oldest "
                                       "LO_EXT message the event consumer has not acked (not yet delivered, in "
                                       "flight or waiting for a redelivery); 0 when none is pending",
                                       registry=r)
        self.scheduler_lag = Histogram("langorch_trigger_scheduler_lag_seconds", "From a schedule's slot to the "
                                       "scheduler replica publishing its fire", buckets=LAG_BUCKETS, registry=r)
        self.registrations = Counter("langorch_trigger_registration_changes_total", "Trigger registration changes, "
                                     "by event type", ["type"], registry=r)

    async def observe(self, event: EventEnvelope) -> None:
        """Count one appended trigger event."""
        data = event.data
        if event.type == "trigger_fired":
            self.fired.labels(trigger_type=str(data.get("trigger_type"))).inc()
        elif event.type == "trigger_fire_skipped":
            reason = REASONS.get(str(data.get("reason")), "other")
            self.rejected.labels(trigger_type=str(data.get("trigger_type")), reason=reason).inc()
        elif event.type in REGISTRATION_EVENTS:
            self.registrations.labels(type=event.type).inc()
