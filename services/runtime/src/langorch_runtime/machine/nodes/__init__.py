"""The node kinds (ckp.md §3.4–§3.13), one module each. A kind's ``run`` executes one super-step's worth of its
node — to completion, or up to the point where it waits (on child frames, an approval, a child run, a callback)
— on the step runner, and returns the node's outcome."""

from __future__ import annotations

from ckp_core.ir import (
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    LoopPayload,
    NodeIR,
    ParallelPayload,
    ProcessingPayload,
    SequencePayload,
    SubflowPayload,
    TerminatePayload,
    TransformPayload,
    VerificationPayload,
)
from langorch_runtime.frames import Frame, NodeState, RunState
from langorch_runtime.machine.nodes import (
    human_approval,
    llm_action,
    logic,
    loop,
    parallel,
    processing,
    sequence,
    subflow,
    terminate,
    transform,
    verification,
)
from langorch_runtime.machine.outcomes import Outcome
from langorch_runtime.machine.steps import StepRunner

__all__ = ["execute"]


async def execute(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState) -> Outcome | None:
    """Run the node in progress of ``frame`` by its kind."""
    p = node.payload
    if isinstance(p, SequencePayload):
        return await sequence.run(m, state, frame, node, current, p)
    if isinstance(p, LogicPayload):
        return await logic.run(m, state, frame, node, current, p)
    if isinstance(p, LoopPayload):
        return await loop.run(m, state, frame, node, current, p)
    if isinstance(p, ParallelPayload):
        return await parallel.run(m, state, frame, node, current, p)
    if isinstance(p, ProcessingPayload):
        return await processing.run(m, state, frame, node, current, p)
    if isinstance(p, VerificationPayload):
        return await verification.run(m, state, frame, node, current, p)
    if isinstance(p, TransformPayload):
        return await transform.run(m, state, frame, node, current, p)
    if isinstance(p, HumanApprovalPayload):
        return await human_approval.run(m, state, frame, node, current, p)
    if isinstance(p, LlmActionPayload):
        return await llm_action.run(m, state, frame, node, current, p)
    if isinstance(p, SubflowPayload):
        return await subflow.run(m, state, frame, node, current, p)
    assert isinstance(p, TerminatePayload)
    return await terminate.run(m, state, frame, node, current, p)
