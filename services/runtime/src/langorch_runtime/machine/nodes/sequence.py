"""``sequence`` (ckp.md §3.4, §4.7, §4.11): its steps in order, then its validations."""

from __future__ import annotations

from typing import cast

from ckp_core.events import ErrorObject, ValidationFailed
from ckp_core.expressions import truthy
from ckp_core.ir import NodeIR, SequencePayload, ValidationIR
from langorch_runtime.errors import StepError
from langorch_runtime.frames import Frame, NodeState, RunState, SequenceData, frame_string
from langorch_runtime.machine.context import path_in_node
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome, RetryNode
from langorch_runtime.machine.policies import take_node_retry
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: SequencePayload) -> Outcome | None:
    data = cast(SequenceData, current["data"])  # the step in progress (and run_step's own keys)
    start = data.get("index", 0)
    for index in range(start, len(p.steps)):
        data["index"] = index
        step = p.steps[index]
        routed = await m.run_step(state, frame, node, current, step)
        if routed is not None:
            return routed
    data["index"] = len(p.steps)
    for validation in p.validations:
        outcome = await validate(m, state, frame, node, current, validation)
        if outcome is not None:
            return outcome
    return Next(node.next_node)


async def validate(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                   v: ValidationIR) -> Outcome | None:
    """One validation (§4.11): a condition, or a screen check dispatched to the node's channel."""
    fs = frame_string(frame, node.id, current["visit"])
    base = path_in_node(node, v) or f"/validations/{v.id}"
    passed = True
    if v.condition is not None:
        passed = truthy(await m.evaluate(v.condition, state, frame, node.id, f"{base}/condition"))
    else:
        action = "wait_for_text" if v.check == "screen_text_contains" else "wait_for_element"
        for i, expected in enumerate(v.expected_values):
            params = {"text": expected} if action == "wait_for_text" else {"target": expected}
            try:
                result, _ = await m.side_dispatch(node, f"validation/{v.id}/{i}", fs, 1, action, params)
            except StepError:
                passed = False
                break
            if result is False:  # an override (§7.9) of false: the check did not find what it waits for
                passed = False
                break
    if passed:
        return None
    message = None
    if v.message is not None:
        message = await m.render(v.message, state, frame, node.id, None, f"{base}/message", text=True)
    await m.emit(ValidationFailed(node_id=node.id, frame=fs, validation_id=v.id, message=message,
                                  on_failure=v.on_failure))
    error = ErrorObject(code="validation_failed", message=message or f"validation '{v.id}' failed",
                        node_id=node.id, frame=fs, details={"validation_id": v.id})
    if v.on_failure == "retry_node" and take_node_retry(frame, f"{node.id}#validation:{v.id}",
                                                        v.max_node_retries) is not None:
        return RetryNode()
    raise NodeFailure(error, bypass=v.on_failure == "fail_workflow")
