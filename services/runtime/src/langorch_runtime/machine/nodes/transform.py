"""``transform`` (ckp.md §3.11): its transformations in order, each into its output variable."""

from __future__ import annotations

from ckp_core.ir import NodeIR, TransformPayload
from langorch_runtime.errors import StepError
from langorch_runtime.frames import Frame, NodeState, RunState, vars_of
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome
from langorch_runtime.machine.steps import StepRunner
from langorch_runtime.transforms import run_transformation


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: TransformPayload) -> Outcome | None:
    namespace = vars_of(state, frame)
    for t in p.transformations:
        params = await m.render(t.params, state, frame, node.id, None, f"/transformations/{t.index}/params")
        try:
            value = run_transformation(t, params, m.scope(state, frame, node.id))
        except StepError as exc:
            raise NodeFailure(exc.error.model_copy(update={"node_id": node.id})) from exc
        namespace[t.output_variable] = value
    return Next(node.next_node)
