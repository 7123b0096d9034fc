"""``terminate`` (ckp.md §3.13): cleanup actions (and error actions when failing or recovering), the run's
outputs, the final audit entry; the scheduler then ends the run (``Terminate``)."""

from __future__ import annotations

from ckp_core.events import AuditLog, StepFailed
from ckp_core.ir import NodeIR, OperationIR, TerminatePayload
from langorch_runtime.errors import StepError
from langorch_runtime.frames import Frame, NodeState, RunState, frame_string
from langorch_runtime.machine.outcomes import NodeFailure, Outcome, Terminate
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: TerminatePayload) -> Outcome | None:
    fs = frame_string(frame, node.id, current["visit"])
    in_recovery = frame["kind"] == "recovery" or any(f["kind"] == "recovery" for f in m.ancestors(state, frame))
    action_lists: list[tuple[str, list[OperationIR]]] = [("cleanup", p.cleanup_actions)]
    if p.status == "failed" or in_recovery:
        action_lists.append(("error_actions", p.error_actions))
    for label, actions in action_lists:
        for op in actions:
            try:
                await m.operation(state, frame, node, current, op,
                                  f"/{'cleanup_actions' if label == 'cleanup' else label}/{op.index}")
            except (StepError, NodeFailure) as exc:
                error = exc.error
                await m.emit(StepFailed(node_id=node.id, step_id=f"{label}[{op.index}]", frame=fs, attempt=1,
                                        action=op.action, error=error))
    outputs = await m.render(p.outputs, state, frame, node.id, None, "/outputs")
    if p.final_audit_log is not None and m.ir.global_config.audit_enabled:
        entry = await m.render(p.final_audit_log, state, frame, node.id, None, "/final_audit_log")
        await m.emit(AuditLog(node_id=node.id, frame=fs, entry=entry))
    return Terminate(p.status, outputs if isinstance(outputs, dict) else {})
