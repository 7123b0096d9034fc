"""The trigger aggregate's pure rules (api.md §10.2): per-type validation, the registration decisions, the fold."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.commands import DeleteTrigger, DisableTrigger, EnableTrigger, UpsertTrigger
from ckp_core.errors import CommandRefused
from ckp_core.events import Actor, EventData, make_event
from ckp_core.triggers import (
    TriggerState,
    decide_delete,
    decide_disable,
    decide_enable,
    decide_upsert,
    event_subject,
    ever_fires,
    fire_inputs,
    fold,
    trigger_id,
    valid_cron,
)

pytestmark = pytest.mark.unit
OPERATOR = Actor(kind="user", id="ops")
TID = trigger_id("invoice", "1.0.0")


def upsert(**fields: Any) -> UpsertTrigger:
    return UpsertTrigger(actor=OPERATOR, procedure_id="invoice", version="1.0.0", **fields)


def refusal(state: TriggerState, cmd: UpsertTrigger) -> CommandRefused:
    with pytest.raises(CommandRefused) as caught:
        decide_upsert(state, cmd)
    return caught.value


def apply(*payloads: EventData) -> TriggerState:
    events = [make_event(p, aggregate_id=TID, seq=i, actor=OPERATOR, aggregate="trigger")
              for i, p in enumerate(payloads, start=1)]
    return fold(TID, ((e, i * 10) for i, e in enumerate(events, start=1)))


def test_the_aggregate_id_is_procedure_at_version() -> None:
    assert trigger_id("invoice.v2", "1.0.0") == "invoice.v2@1.0.0"


def test_a_valid_schedule_registers_with_its_zone_and_defaults() -> None:
    event = decide_upsert(TriggerState(TID), upsert(trigger_type="scheduled", schedule="0  9 * * MON-FRI",
                                                    timezone="Europe/Berlin", input_vars={"a": 1}))
    assert event is not None
    assert event.TYPE == "trigger_registered"
    data = event.model_dump()
    assert data["schedule"] == "0 9 * * MON-FRI"
    assert data["timezone"] == "Europe/Berlin"
    assert data["enabled"] is True
    assert data["source"] == "api"
    assert data["input_vars"] == {"a": 1}


@pytest.mark.parametrize(("fields", "path", "code"), [
    ({"trigger_type": "scheduled"}, "schedule", "validation_failed"),
    ({"trigger_type": "scheduled", "schedule": "* * * *"}, "schedule", "validation_failed"),
    ({"trigger_type": "scheduled", "schedule": "61 * * * *"}, "schedule", "validation_failed"),
    ({"trigger_type": "scheduled", "schedule": "* * * * *", "timezone": "Mars/Olympus"}, "timezone",
     "validation_failed"),
    ({"trigger_type": "webhook"}, "webhook_secret", "validation_failed"),
    ({"trigger_type": "webhook", "webhook_secret": "k", "signature_scheme": "body"}, "dedupe_window_seconds",
     "validation_failed"),
    ({"trigger_type": "webhook", "webhook_secret": "k", "signature_scheme": "hmac"}, "signature_scheme",
     "validation_failed"),
    ({"trigger_type": "event"}, "event_source", "validation_failed"),
    ({"trigger_type": "event", "event_source": "kafka://orders"}, "event_source", "unsupported_event_source"),
    ({"trigger_type": "event", "event_source": "nats://lo.evt.run.x"}, "event_source", "unsupported_event_source"),
    ({"trigger_type": "file_watch"}, "event_source", "validation_failed"),
    ({"trigger_type": "manual"}, "trigger_type", "validation_failed"),
    ({"trigger_type": "webhook", "webhook_secret": "k", "dedupe_window_seconds": -1}, "dedupe_window_seconds",
     "validation_failed"),
    ({"trigger_type": "webhook", "webhook_secret": "k", "max_concurrent_runs": 0}, "max_concurrent_runs",
     "validation_failed"),
])
def test_each_type_is_validated_with_the_failing_field_named(fields: dict[str, Any], path: str, code: str) -> None:
    refused = refusal(TriggerState(TID), upsert(**fields))
    assert refused.code == code
    assert list(refused.extra["errors"]) == [path]
    assert refused.extra["errors"][path][0]


def test_every_failing_field_is_reported_at_once() -> None:
    refused = refusal(TriggerState(TID), upsert(trigger_type="scheduled", schedule="nope", timezone="Nowhere/X",
                                                dedupe_window_seconds=-5))
    assert refused.code == "validation_failed"
    assert set(refused.extra["errors"]) == {"schedule", "timezone", "dedupe_window_seconds"}


def test_event_sources_accept_wildcards_under_lo_ext_only() -> None:
    assert event_subject("nats://lo.ext.orders.created") == "lo.ext.orders.created"
    assert event_subject("nats://lo.ext.orders.*") == "lo.ext.orders.*"
    assert event_subject("nats://lo.ext.>") == "lo.ext.>"
    assert event_subject("nats://lo.ext") is None
    assert event_subject("nats://lo.ext.>.x") is None
    assert event_subject("nats://lo.cmd.run.start") is None
    assert event_subject("sqs://queue") is None


def test_cron_needs_exactly_five_valid_fields() -> None:
    assert valid_cron("*/5 * * * *")
    assert valid_cron("0 0 1 JAN *")
    assert not valid_cron("* * * * * *")
    assert not valid_cron("@hourly")
    assert not valid_cron("0 25 * * *")


@pytest.mark.parametrize(("expr", "valid"), [
    ("*/5 * * * *", True), ("0 12 * * MON#2", True), ("0 0 L * *", True), ("0 9 ? * mon-fri", True),
    ("61 * * * *", False), ("0 0 9 * * MON", False), ("@hourly", False), ("0 0 * * MON;", False), ("", False),
])
def test_the_registration_the_compiler_and_the_scheduler_accept_the_same_cron(expr: str, valid: bool) -> None:
    """One rule (``schedules.validate_cron``) for the three places a cron expression is checked; a refused
    registration names the field at fault as the scheduler would."""
    from ckp_core.compiler import compile_document
    from ckp_core.schedules import ScheduleError, validate_cron

    try:
        validate_cron(expr)
        scheduler_accepts = True
    except ScheduleError:
        scheduler_accepts = False
    doc = {"procedure_id": "p", "version": "1", "trigger": {"type": "scheduled", "schedule": expr},
           "workflow_graph": {"start_node": "z", "nodes": {"z": {"type": "terminate"}}}}
    compiled = [d.code for d in compile_document(doc).diagnostics if d.path == "/trigger/schedule"]
    assert scheduler_accepts is valid
    assert valid_cron(expr) is valid
    assert (not compiled) is valid, compiled
    if not valid and expr:
        refused = refusal(TriggerState(TID), upsert(trigger_type="scheduled", schedule=expr))
        assert list(refused.extra["errors"]) == ["schedule"]


def test_a_schedule_that_never_fires_is_refused() -> None:
    assert ever_fires("0 0 29 2 *")  # leap years
    assert not ever_fires("0 0 31 2 *")
    refused = refusal(TriggerState(TID), upsert(trigger_type="scheduled", schedule="0 0 31 2 *"))
    assert refused.extra["errors"] == {"schedule": ["Never fires: no date matches (such as 31 February)"]}


def test_a_replacement_is_an_update_even_with_the_same_configuration() -> None:
    registered = decide_upsert(TriggerState(TID), upsert(trigger_type="webhook", webhook_secret="hook"))
    assert registered is not None
    state = apply(registered)
    assert (state.exists, state.revision, state.enabled) == (True, 1, True)
    same = decide_upsert(state, upsert(trigger_type="webhook", webhook_secret="hook"))
    assert same.TYPE == "trigger_updated"
    updated = decide_upsert(state, upsert(trigger_type="webhook", webhook_secret="hook2", expected_revision=1))
    assert updated is not None
    assert updated.TYPE == "trigger_updated"
    after = apply(registered, updated)
    assert after.revision == 2
    assert after.config["webhook_secret"] == "hook2"
    assert after.created_by == OPERATOR.render()


def test_if_match_must_name_the_current_revision() -> None:
    registered = decide_upsert(TriggerState(TID), upsert(trigger_type="file_watch", event_source="/tmp/x"))
    assert registered is not None
    state = apply(registered)
    refused = refusal(state, upsert(trigger_type="file_watch", event_source="/tmp/y", expected_revision=7))
    assert refused.code == "precondition_failed"
    assert refused.extra["current_revision"] == 1
    assert refusal(TriggerState(TID), upsert(trigger_type="file_watch", event_source="/tmp/y",
                                             expected_revision=1)).code == "precondition_failed"


def test_enable_disable_and_delete() -> None:
    registered = decide_upsert(TriggerState(TID), upsert(trigger_type="webhook", webhook_secret="hook"))
    assert registered is not None
    state = apply(registered)
    assert decide_enable(state, EnableTrigger(actor=OPERATOR, procedure_id="invoice", version="1.0.0")).TYPE == (
        "trigger_enabled")
    disabled = decide_disable(state, DisableTrigger(actor=OPERATOR, procedure_id="invoice", version="1.0.0"))
    assert disabled is not None
    state = apply(registered, disabled)
    assert (state.enabled, state.revision) == (False, 2)
    assert not apply(registered, disabled, disabled).enabled
    deleted = decide_delete(state, DeleteTrigger(actor=OPERATOR, procedure_id="invoice", version="1.0.0"))
    state = apply(registered, disabled, deleted)
    assert not state.exists
    for decide, cmd in ((decide_enable, EnableTrigger), (decide_disable, DisableTrigger),
                        (decide_delete, DeleteTrigger)):
        with pytest.raises(CommandRefused) as caught:
            decide(state, cmd(actor=OPERATOR, procedure_id="invoice", version="1.0.0"))
        assert caught.value.code == "not_found"
    again = decide_upsert(state, upsert(trigger_type="webhook", webhook_secret="hook"))
    assert again is not None
    assert again.TYPE == "trigger_registered"
    assert apply(registered, disabled, deleted, again).revision == 1


def test_fire_inputs_merge_the_fire_over_the_static_inputs() -> None:
    registered = decide_upsert(TriggerState(TID), upsert(trigger_type="webhook", webhook_secret="hook",
                                                         input_vars={"a": 1, "b": 2}))
    assert registered is not None
    assert fire_inputs(apply(registered), {"b": 3}) == {"a": 1, "b": 3}


def test_a_document_never_replaces_an_api_registration() -> None:
    registered = decide_upsert(TriggerState(TID), upsert(trigger_type="webhook", webhook_secret="hook"))
    refused = refusal(apply(registered), upsert(trigger_type="webhook", webhook_secret="other", source="ckp"))
    assert refused.code == "trigger_registered_by_api"
    from_document = decide_upsert(TriggerState(TID), upsert(trigger_type="webhook", webhook_secret="k",
                                                            source="ckp"))
    replaced = decide_upsert(apply(from_document), upsert(trigger_type="webhook", webhook_secret="k2",
                                                           source="ckp"))
    assert replaced.model_dump()["source"] == "ckp"
