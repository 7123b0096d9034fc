"""``logic`` (ckp.md §3.5): the first rule whose condition holds, else ``default_next_node``."""

from __future__ import annotations

from ckp_core.events import ErrorObject
from ckp_core.expressions import truthy
from ckp_core.ir import LogicPayload, NodeIR
from langorch_runtime.frames import Frame, NodeState, RunState
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: LogicPayload) -> Outcome | None:
    for i, rule in enumerate(p.rules):
        if truthy(await m.evaluate(rule.condition, state, frame, node.id, f"/rules/{i}/condition")):
            return Next(rule.next_node)
    if p.default_next_node is None:
        raise NodeFailure(ErrorObject(code="logic_no_route", message=f"Node '{node.id}': no rule matched and "
                                      "there is no default_next_node"))
    return Next(p.default_next_node)
