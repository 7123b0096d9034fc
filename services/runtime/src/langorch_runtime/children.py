"""Child runs of subflow nodes (ckp.md §3.9): version resolution, input validation, creation (the run-creation
decision of :mod:`langorch_runtime.creation`) and the parent's resumption when a child ends."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from nats.js import JetStreamContext

from ckp_core.commands import CreateRun, ResumeRun
from ckp_core.errors import InvalidInputVars
from ckp_core.events import Actor, ErrorObject, format_time
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import fold
from ckp_core.variables import validate_inputs
from langorch_infra.jetstream import publish_command
from langorch_runtime.creation import RUNNABLE, RunCreator
from langorch_runtime.errors import StepError


class JetStreamChildRuns:
    """Creates child runs through the same decision as every other run (:class:`RunCreator`, ``run_created`` at
    expected position 0, then ``lo.cmd.run.start``); both steps are idempotent, so a re-executed super-step never
    starts a second child. A child that cannot run is the parent's step error, not a rejected creation: its
    version and inputs are checked first (``subflow_not_found``, ``subflow_input_invalid``)."""

    def __init__(self, creator: RunCreator, actor: Actor) -> None:
        self.creator = creator
        self.store = creator.store
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
        ir = await self.creator.load_ir(procedure_id, chosen.version)
        if ir is None:
            raise StepError(ErrorObject(code="subflow_not_found", message=f"procedure {procedure_id}@"
                                        f"{chosen.version} has no compiled IR"))
        return chosen.version, ir

    async def start(self, *, parent_run_id: str, parent_node_id: str, root_run_id: str, call_chain: list[str],
                    procedure_id: str, version: str | None, inputs: dict[str, Any], child_run_id: str,
                    rerun_of: str | None, dry_run: bool, project_id: str | None) -> str:
        existing = await self.store.read("run", child_run_id)
        if existing:
            return str(existing[0].envelope.data["procedure_version"])
        chosen, ir = await self.resolve(procedure_id, version)
        now = datetime.now(UTC)
        triggered_by = f"subflow:{parent_run_id}:{parent_node_id}"
        builtins = {"run_id": child_run_id, "root_run_id": root_run_id, "parent_run_id": parent_run_id,
                    "procedure_id": procedure_id, "procedure_version": chosen, "trigger_type": "subflow",
                    "triggered_by": triggered_by, "now": format_time(now), "today": now.date().isoformat()}
        try:
            validate_inputs(ir.variables, inputs, builtins)
        except InvalidInputVars as exc:
            raise StepError(ErrorObject(code="subflow_input_invalid", message=exc.message,
                                        details={"errors": exc.errors})) from exc
        command = CreateRun(actor=self.actor, run_id=child_run_id, procedure_id=procedure_id,
                            procedure_version=chosen, input_vars=inputs, trigger_type="subflow",
                            triggered_by=triggered_by, parent_run_id=parent_run_id, parent_node_id=parent_node_id,
                            root_run_id=root_run_id, rerun_of=rerun_of, execution_mode="dry_run" if dry_run else None,
                            project_id=project_id, call_chain=call_chain)
        # a version not effective yet: the child is created and fails at its start gate (procedure_not_effective),
        # which its parent sees in subflow_failed
        handled = await self.creator.create(command, ir=ir, start_msg_id=f"start-{child_run_id}",
                                            effective_gate=False)
        event = handled.event
        if event is None:  # created meanwhile by an earlier execution of this super-step
            created = await self.store.read("run", child_run_id)
            return str(created[0].envelope.data["procedure_version"]) if created else chosen
        if event.type == "command_rejected":  # the version changed between the check and the decision
            code = "subflow_input_invalid" if event.data.get("code") == "invalid_input_vars" else "subflow_not_found"
            raise StepError(ErrorObject(code=code, message=str(event.data.get("detail")),
                                        details=dict(event.data.get("extra") or {})))
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
