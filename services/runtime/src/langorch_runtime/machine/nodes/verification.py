"""``verification`` (ckp.md §3.10): its checks; a failing ``fail`` check fails the node past its handlers."""

from __future__ import annotations

from ckp_core.events import ErrorObject, VerificationWarning
from ckp_core.expressions import truthy
from ckp_core.ir import NodeIR, VerificationPayload
from langorch_runtime.frames import Frame, NodeState, RunState, frame_string
from langorch_runtime.machine.context import path_in_node
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: VerificationPayload) -> Outcome | None:
    in_progress = frame.get("node")
    fs = frame_string(frame, node.id, in_progress.get("visit", 1) if in_progress else 1)
    for check in p.checks:
        where = path_in_node(node, check) or f"/checks/{check.id}"
        if truthy(await m.evaluate(check.condition, state, frame, node.id, f"{where}/condition")):
            continue
        if check.on_fail == "warn":
            await m.emit(VerificationWarning(node_id=node.id, frame=fs, check_id=check.id, message=check.message))
            continue
        if check.on_fail == "continue":
            continue
        raise NodeFailure(ErrorObject(code="verification_failed", message=check.message or
                                      f"verification check '{check.id}' failed", node_id=node.id, frame=fs,
                                      details={"check_id": check.id}), bypass=True)
    return Next(node.next_node)
