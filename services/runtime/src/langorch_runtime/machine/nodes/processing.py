"""``processing`` (ckp.md §4.3): its internal operations in order."""

from __future__ import annotations

from ckp_core.ir import NodeIR, ProcessingPayload
from langorch_runtime.frames import Frame, NodeState, RunState
from langorch_runtime.machine.outcomes import Next, Outcome
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: ProcessingPayload) -> Outcome | None:
    for op in p.operations:
        await m.operation(state, frame, node, current, op, f"/operations/{op.index}")
    return Next(node.next_node)
