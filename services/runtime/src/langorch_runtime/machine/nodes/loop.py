"""``loop`` (ckp.md §3.7): one iteration frame per item, in order; results collected after each."""

from __future__ import annotations

import copy
from typing import cast

from ckp_core.events import ErrorObject, LoopCompleted, LoopIteration, LoopIterationFailed, LoopStarted
from ckp_core.expressions import format_embedded
from ckp_core.ir import LoopPayload, NodeIR
from langorch_runtime.frames import Frame, FrameResult, LoopData, NodeState, RunState, frame_string, new_frame, vars_of
from langorch_runtime.machine.context import join
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome, Spawn, dump
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: LoopPayload) -> Outcome | None:
    data = cast(LoopData, current["data"])
    fs = frame_string(frame, node.id, current["visit"])
    namespace = vars_of(state, frame)
    if "items" not in data:
        items = await m.evaluate(p.iterator, state, frame, node.id, "/iterator")
        if items is None:
            items = []
        if not isinstance(items, list):
            raise NodeFailure(ErrorObject(code="loop_iterator_invalid", message=f"Node '{node.id}': the iterator "
                                          f"is a {type(items).__name__}, not a list", node_id=node.id, frame=fs))
        n = len(items) if p.max_iterations is None else min(len(items), p.max_iterations)
        data.update({"items": items, "n": n, "i": 0, "collected": [], "errors": [], "child": None,
                     "succeeded": 0, "failed": 0})
        await m.emit(LoopStarted(node_id=node.id, frame=fs, total=len(items), iterations=n))
    elif (child_id := data.get("child")) is not None:
        await iteration_ended(m, state, frame, node, data, p, fs, child_id)
    i = data["i"]
    if i < data["n"]:
        item = data["items"][i]
        namespace[p.iterator_variable] = copy.deepcopy(item)
        if p.index_variable:
            namespace[p.index_variable] = i
        written = {p.iterator_variable: item, **({p.index_variable: i} if p.index_variable else {})}
        await m.emit(LoopIteration(node_id=node.id, frame=fs, iteration=i, total=data["n"],
                                   item_preview=format_embedded(item)[:256], variables=written))
        segment = f"{node.id}{'#' + str(current['visit']) if current['visit'] > 1 else ''}[{i}]"
        child = new_frame(state, "iteration", frame, join(frame.get("path", ""), segment), p.body_node, node.id,
                          loop={"index": i, "item": item})
        data["child"] = child["id"]
        return Spawn()
    if p.collect_variable:
        namespace[p.collect_variable] = data["collected"]
    if p.errors_variable:
        namespace[p.errors_variable] = data["errors"]
    await m.emit(LoopCompleted(node_id=node.id, frame=fs, iterations=data["n"], succeeded=data["succeeded"],
                               failed=data["failed"]))
    return Next(node.next_node)


async def iteration_ended(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, data: LoopData,
                          p: LoopPayload, fs: str, child_id: str) -> None:
    """The iteration frame in progress is done: collect its value, or record (or fail on) its error."""
    child = state["frames"][child_id]
    i = data["i"]
    result = child.get("result") or FrameResult(status="failed", error=None)  # a done frame has its own
    if result.get("status") == "completed":
        data["succeeded"] += 1
        if p.collect_variable:
            if p.collect_expression is not None:
                value = await m.render(p.collect_expression, state, frame, node.id, None, "/collect_expression")
            else:
                value = data["items"][i]
            data["collected"].append(value)
    else:
        data["failed"] += 1
        error = ErrorObject.model_validate(result.get("error") or {
            "code": "internal_error", "message": "iteration failed", "retryable": True})
        await m.emit(LoopIterationFailed(node_id=node.id, frame=fs, iteration=i, error=error))
        if not p.continue_on_error:
            raise NodeFailure(ErrorObject(code="loop_iteration_failed", message=f"Node '{node.id}': "
                                          f"iteration {i} failed: {error.message}", node_id=node.id, frame=fs,
                                          details={"iteration": i}, cause=error.model_dump(mode="json")))
        data["errors"].append({"iteration": i, "error": dump(error)})
    data["i"] = i + 1
    data["child"] = None
