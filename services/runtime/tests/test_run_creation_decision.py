"""The run-creation decision of the runtime (``langorch_runtime.creation.decide_create``) and its handling on the
in-memory event store: ``run_created`` at expected position 0 with the submitter as actor, the refusals the gateway
answers with, idempotent redelivery, and the start record audited once under the creating command's id."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest

from ckp_core import runs
from ckp_core.audit import AuditEntry
from ckp_core.commands import CreateRun
from ckp_core.compiler import compile_document
from ckp_core.errors import CommandRefused
from ckp_core.events import ANONYMOUS
from ckp_core.eventstore import MemoryEventStore
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import VersionState
from langorch_infra.handling import CommandHandler
from langorch_runtime.creation import decide_create, fold_run, run_redactor, start_meta

pytestmark = pytest.mark.unit

NOW = datetime(2026, 3, 1, 12, 0, tzinfo=UTC)
DOC: dict[str, Any] = {
    "procedure_id": "dc", "version": "1",
    "global_config": {"execution_mode": "dry_run"},
    "variables_schema": {"n": {"type": "integer", "required": True},
                         "pin": {"type": "string", "sensitive": True},
                         "when": {"type": "string", "default": "{{today}}"}},
    "workflow_graph": {"start_node": "done", "nodes": {"done": {"type": "terminate"}}},
}


def compiled(doc: dict[str, Any]) -> ProcedureIR:
    result = compile_document(doc)
    assert result.ir is not None, result.errors
    return result.ir


def version(status: str = "active") -> VersionState:
    return VersionState(version="1", status=status, release_channel="dev", revision=1, ckp_json=DOC,
                        content_hash="h", ir_key="dc.1")


def command(**fields: Any) -> CreateRun:
    return CreateRun(actor=ANONYMOUS, run_id="r1", procedure_id="dc", procedure_version="1", **fields)


class Records:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def write(self, entry: AuditEntry) -> bool:
        self.entries.append(entry)
        return True


def test_run_created_carries_the_validated_inputs_and_the_versions_mode() -> None:
    created = decide_create(runs.RunState("r1"), command(input_vars={"n": "3", "pin": "1234", "extra": True},
                                                         release_channel="dev", project_id="p"),
                            version(), compiled(DOC), NOW)
    assert created is not None
    assert created.input_vars == {"n": 3, "pin": "1234", "when": "2026-03-01", "extra": True}
    assert (created.root_run_id, created.execution_mode, created.release_channel, created.project_id) == (
        "r1", "dry_run", "dev", "p")
    assert "call_chain" not in created.model_dump()  # only child runs carry their call chain
    child = decide_create(runs.RunState("c1"), command(input_vars={"n": 1}, execution_mode="validation_only",
                                                       root_run_id="root", parent_run_id="root",
                                                       call_chain=["dc"], trigger_type="subflow"),
                          version("draft"), compiled(DOC), NOW)
    assert child is not None
    assert (child.root_run_id, child.execution_mode, child.model_dump()["call_chain"]) == (
        "root", "validation_only", ["dc"])


@pytest.mark.parametrize(("state", "ir_present", "effective", "code", "detail"), [
    ("archived", True, None, "procedure_not_runnable", "version 1 is archived"),
    ("deprecated", True, None, "procedure_not_runnable", "version 1 is deprecated"),
    (None, True, None, "procedure_not_runnable", "version 1 is deleted"),
    ("active", False, None, "procedure_not_runnable", "procedure dc@1 is not available to the runtime"),
    ("active", True, "2026-03-02", "procedure_not_effective", "version 1 is effective from 2026-03-02"),
])
def test_refusals_name_the_gateways_codes(state: str | None, ir_present: bool, effective: str | None, code: str,
                                          detail: str) -> None:
    ir = compiled({**DOC, **({"effective_date": effective} if effective else {})}) if ir_present else None
    with pytest.raises(CommandRefused) as refused:
        decide_create(runs.RunState("r1"), command(input_vars={"n": 1}), version(state) if state else None, ir, NOW)
    assert (refused.value.code, refused.value.message, refused.value.extra) == (code, detail, {})


def test_invalid_inputs_are_refused_with_every_field_path() -> None:
    with pytest.raises(CommandRefused) as refused:
        decide_create(runs.RunState("r1"), command(input_vars={"n": "x"}), version(), compiled(DOC), NOW)
    assert refused.value.code == "invalid_input_vars"
    assert list(refused.value.extra["errors"]) == ["input_vars.n"]


def test_an_effective_date_of_today_runs() -> None:
    assert decide_create(runs.RunState("r1"), command(input_vars={"n": 1}), version(),
                         compiled({**DOC, "effective_date": "2026-03-01"}), NOW) is not None


def test_a_child_of_a_version_not_effective_yet_is_created_for_its_start_gate() -> None:
    later = compiled({**DOC, "effective_date": "2026-03-02"})
    with pytest.raises(CommandRefused):
        decide_create(runs.RunState("c1"), command(input_vars={"n": 1}), version(), later, NOW)
    assert decide_create(runs.RunState("c1"), command(input_vars={"n": 1}), version(), later, NOW,
                         effective_gate=False) is not None


def test_a_run_that_has_events_is_not_created_again() -> None:
    existing = runs.RunState("r1", seq=1, exists=True)
    assert decide_create(existing, command(input_vars={"n": 1}), version(), compiled(DOC), NOW) is None


async def test_the_creation_is_appended_at_position_zero_once_and_audited_as_the_runs_start() -> None:
    store, records = MemoryEventStore(), Records()
    handler = CommandHandler(store, "run", fold_run, audit=records)
    ir = compiled(DOC)
    create = command(input_vars={"n": 2, "pin": "4321"}, causation_id="req-7")
    start = create.start()

    def meta(handled: Any) -> dict[str, Any]:
        redactor = run_redactor(ir, handled.event.data["input_vars"])
        return {"sensitive_keys": redactor.extra_keys, "sensitive_values": redactor.values,
                "extra_meta": start_meta(handled.event.data)}

    for _ in range(2):  # the second is a redelivery
        handled = await handler.handle("r1", create, lambda run: decide_create(run, create, version(), ir, NOW),
                                       command_type="create_run", correlation_id="r1", audit_as=start,
                                       audit_meta=meta)
    assert handled.replayed
    [stored] = await store.read("run", "r1")
    assert (stored.envelope.type, stored.envelope.seq, stored.envelope.actor) == ("run_created", 1, ANONYMOUS)
    assert (stored.envelope.causation_id, stored.envelope.correlation_id) == (create.command_id, "r1")
    assert (start.command_id, start.causation_id, start.run_id) == (create.command_id, "req-7", "r1")
    assert create.msg_id != start.command_id  # the start keeps the command id as its message id
    first, again = records.entries
    assert first.model_dump(exclude={"ts"}) == again.model_dump(exclude={"ts"})
    assert (first.category, first.action, first.outcome, first.request_id) == ("run", "start", "accepted", "req-7")
    assert first.meta["input_vars"] == {"n": 2, "pin": "***REDACTED***", "when": "2026-03-01"}
    assert first.meta["procedure_id"] == "dc"
    assert "4321" not in first.model_dump_json()
