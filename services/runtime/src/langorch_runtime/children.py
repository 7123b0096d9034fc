"""Child runs of subflow nodes (ckp.md §3.9): version resolution, input validation, creation and the
parent's resumption when a child ends."""

from __future__ import annotations

import contextlib
from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue

from ckp_core.commands import ResumeRun, StartRun
from ckp_core.errors import ConcurrencyError, InvalidInputVars
from ckp_core.events import Actor, ErrorObject, RunCreated, format_time, make_event
from ckp_core.eventstore import EventStore
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import fold
from ckp_core.variables import validate_inputs
from langorch_infra.jetstream import publish_command
from langorch_runtime.errors import StepError

RUNNABLE = ("draft", "active")


class JetStreamChildRuns:
    """Creates child runs the way the gateway creates API runs: ``run_created`` (expected sequence 0) then
    ``lo.cmd.run.start``; both steps are idempotent, so a re-executed super-step never starts a second child."""

    def __init__(self, store: EventStore, js: JetStreamContext, procedures: KeyValue, actor: Actor) -> None:
        self.store = store
        self.js = js
        self.procedures = procedures
        self.actor = actor

    async def resolve(self, procedure_id: str, version: str | None) -> tuple[str, ProcedureIR]:
        events = await self.store.read("procedure", procedure_id)
        state = fold(procedure_id, ((e.envelope, e.position) for e in events))
        if version is None:
            active = [v for v in state.versions.values() if v.status == "active"]
            chosen = active[-1] if active else None
        else:
            found = state.versions.get(version)
            chosen = found if found is not None and found.status in RUNNABLE else None
        if chosen is None:
            raise StepError(ErrorObject(code="subflow_not_found", message=f"no runnable version "
                                        f"'{version or 'newest active'}' of procedure '{procedure_id}'"))
        try:
            entry = await self.procedures.get(chosen.ir_key)
        except (KeyNotFoundError, NotFoundError):
            raise StepError(ErrorObject(code="subflow_not_found", message=f"procedure {procedure_id}@"
                                        f"{chosen.version} has no compiled IR")) from None
        return chosen.version, ProcedureIR.model_validate_json(entry.value or b"{}")

    async def start(self, *, parent_run_id: str, parent_node_id: str, root_run_id: str, call_chain: list[str],
                    procedure_id: str, version: str | None, inputs: dict[str, Any], child_run_id: str,
                    rerun_of: str | None, dry_run: bool, project_id: str | None) -> str:
        existing = await self.store.read("run", child_run_id)
        if existing:
            return str(existing[0].envelope.data["procedure_version"])
        chosen, ir = await self.resolve(procedure_id, version)
        now = datetime.now(UTC)
        builtins = {"run_id": child_run_id, "root_run_id": root_run_id, "parent_run_id": parent_run_id,
                    "procedure_id": procedure_id, "procedure_version": chosen, "trigger_type": "subflow",
                    "triggered_by": f"subflow:{parent_run_id}:{parent_node_id}", "now": format_time(now),
                    "today": now.date().isoformat()}
        try:
            values = validate_inputs(ir.variables, inputs, builtins)
        except InvalidInputVars as exc:
            raise StepError(ErrorObject(code="subflow_input_invalid", message=exc.message,
                                        details={"errors": exc.errors})) from exc
        data = RunCreated(procedure_id=procedure_id, procedure_version=chosen, input_vars=values,
                          trigger_type="subflow", triggered_by=builtins["triggered_by"], parent_run_id=parent_run_id,
                          parent_node_id=parent_node_id, root_run_id=root_run_id, rerun_of=rerun_of,
                          execution_mode="dry_run" if dry_run else ir.global_config.execution_mode,
                          project_id=project_id, call_chain=call_chain)
        command = StartRun(actor=self.actor, run_id=child_run_id)
        event = make_event(data, aggregate_id=child_run_id, seq=1, actor=self.actor,
                           causation_id=command.command_id, correlation_id=child_run_id)
        with contextlib.suppress(ConcurrencyError):  # created by an earlier execution of this super-step
            await self.store.append([event], expected_position=0)
        await publish_command(self.js, command, msg_id=f"start-{child_run_id}")
        return chosen


async def resume_parent(js: JetStreamContext, run_created: dict[str, Any], run_id: str, outcome: dict[str, Any],
                        variables: dict[str, Any], actor: Actor) -> None:
    """Tell a child's parent that the child ended (idempotent per child: one Nats-Msg-Id)."""
    parent = run_created.get("parent_run_id")
    if not parent:
        return
    resolution = {"wait_id": run_id, "status": outcome.get("status"), "outputs": outcome.get("outputs") or {},
                  "error": outcome.get("error"), "variables": variables}
    await publish_command(js, ResumeRun(actor=actor, run_id=str(parent), resume_reason="child_run_finished",
                                        resolution=resolution), msg_id=f"child-finished-{run_id}")
