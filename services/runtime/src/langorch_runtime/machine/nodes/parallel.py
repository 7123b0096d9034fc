"""``parallel`` (ckp.md §3.8): one branch frame per branch on a copy of the variables, started up to
``max_concurrency``; finished branches recorded as they end (``any``: the first success wins, ``branch_failure:
fail``: the first failure fails the node), the others canceled; then the branch writes merged (step 5)."""

from __future__ import annotations

import copy
from typing import Any, cast

from ckp_core.events import (
    ErrorObject,
    ParallelBranchCompleted,
    ParallelCompleted,
    ParallelMergeConflict,
    ParallelStarted,
)
from ckp_core.ir import NodeIR, ParallelPayload
from langorch_runtime.frames import (
    APPROVALS_KEY,
    Frame,
    FrameResult,
    NodeState,
    ParallelData,
    RunState,
    frame_string,
    json_equal,
    new_frame,
    vars_of,
)
from langorch_runtime.machine.context import join
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome, Spawn
from langorch_runtime.machine.steps import StepRunner


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: ParallelPayload) -> Outcome | None:
    data = cast(ParallelData, current["data"])
    fs = frame_string(frame, node.id, current["visit"])
    namespace = vars_of(state, frame)
    segment_base = f"{node.id}{'#' + str(current['visit']) if current['visit'] > 1 else ''}"
    if "snapshot" not in data:
        data.update({"snapshot": copy.deepcopy(namespace), "frames": {}, "queue": [b.branch_id for b in p.branches],
                     "status": {}, "errors": {}, "winner": None})
        await m.emit(ParallelStarted(node_id=node.id, frame=fs, branches=[b.branch_id for b in p.branches],
                                     wait_strategy=p.wait_strategy))
    starts = {b.branch_id: b.start_node for b in p.branches}
    await branches_ended(m, state, node, data, p, fs)
    if data["winner"] is not None:
        await cancel_branches(m, state, node, fs, data)
    # start queued branches up to max_concurrency
    running = [bid for bid in data["frames"] if bid not in data["status"]]
    limit = p.max_concurrency or len(p.branches)
    while data["queue"] and len(running) < limit and data["winner"] is None:
        bid = data["queue"].pop(0)
        child = new_frame(state, "branch", frame, join(frame.get("path", ""), f"{segment_base}/{bid}"),
                          starts[bid], node.next_node, vars_=copy.deepcopy(data["snapshot"]))
        data["frames"][bid] = child["id"]
        running.append(bid)
    if running:
        return Spawn()
    return await merge(m, state, node, data, p, fs, namespace)


async def branches_ended(m: StepRunner, state: RunState, node: NodeIR, data: ParallelData, p: ParallelPayload,
                         fs: str) -> None:
    """Record the branches that finished since the node last ran (``parallel_branch_completed``).

    A branch can end while an event of another one is being appended (the node's frame is ``running`` then, so
    that branch's end wakes nothing): the branches are looked at again until a pass records none, so the node
    never goes back to waiting on a branch that is already done."""
    recorded = True
    while recorded:
        recorded = False
        for bid, fid in data["frames"].items():
            if bid in data["status"]:
                continue
            child = state["frames"][fid]
            if child.get("status") != "done":
                continue
            recorded = True
            result = child.get("result") or FrameResult(status="failed", error=None)  # a done frame has its own
            status = result.get("status", "failed")
            data["status"][bid] = status
            error = result.get("error")
            data["errors"][bid] = error
            await m.emit(ParallelBranchCompleted(node_id=node.id, frame=fs, branch_id=bid, status=status,
                                                 error=ErrorObject.model_validate(error) if error else None))
            if status == "completed" and p.wait_strategy == "any" and data["winner"] is None:
                data["winner"] = bid
            if status == "failed" and p.branch_failure == "fail":
                await cancel_branches(m, state, node, fs, data)
                raise NodeFailure(ErrorObject(code="parallel_branch_failed", message=f"Node '{node.id}': branch "
                                              f"'{bid}' failed", node_id=node.id, frame=fs, details={"branch_id": bid},
                                              cause=dict(error) if error is not None else None))


async def merge(m: StepRunner, state: RunState, node: NodeIR, data: ParallelData, p: ParallelPayload, fs: str,
                namespace: dict[str, Any]) -> Outcome:
    """Every branch is finished: merge the contributors' writes into the namespace (§3.8 step 5)."""
    snapshot = data["snapshot"]
    merged = copy.deepcopy(snapshot)
    changed_by: dict[str, list[str]] = {}
    contributors = [data["winner"]] if data["winner"] else [b.branch_id for b in p.branches
                                                             if data["status"].get(b.branch_id) == "completed"]
    for bid in contributors:
        branch_vars = state["frames"][data["frames"][bid]].get("vars") or {}
        for key, value in branch_vars.items():
            if key == APPROVALS_KEY:
                records = merged.setdefault(APPROVALS_KEY, {})
                for node_key, record in value.items():
                    if not json_equal(snapshot.get(APPROVALS_KEY, {}).get(node_key), record):
                        records[node_key] = record
                continue
            if key not in snapshot or not json_equal(snapshot[key], value):
                changed_by.setdefault(key, []).append(bid)
                merged[key] = copy.deepcopy(value)
    for key, branches in changed_by.items():
        if len(branches) > 1:
            await m.emit(ParallelMergeConflict(node_id=node.id, frame=fs, variable=key, branches=branches))
    succeeded = sum(1 for s in data["status"].values() if s == "completed")
    failed = sum(1 for s in data["status"].values() if s == "failed")
    canceled = sum(1 for s in data["status"].values() if s == "canceled")
    merged["parallel_results"] = {
        "branches": {b.branch_id: {"status": data["status"].get(b.branch_id, "canceled"),
                                   "error": data["errors"].get(b.branch_id)} for b in p.branches},
        "winner": data["winner"],
    }
    namespace.clear()
    namespace.update(merged)
    if succeeded == 0:
        raise NodeFailure(ErrorObject(code="parallel_all_failed", message=f"Node '{node.id}': every branch "
                                      "failed", node_id=node.id, frame=fs))
    await m.emit(ParallelCompleted(node_id=node.id, frame=fs, succeeded=succeeded, failed=failed,
                                   canceled=canceled, winner=data["winner"]))
    return Next(node.next_node)


async def cancel_branches(m: StepRunner, state: RunState, node: NodeIR, fs: str, data: ParallelData) -> None:
    """Cancel the branches still running (their node tasks aborted) and those never started: all of them before
    the first ``parallel_branch_completed`` is appended, so no loser goes on while another one's is."""
    running = [bid for bid in data["frames"] if bid not in data["status"]]
    m.cancel_frames(state, [state["frames"][data["frames"][bid]] for bid in running])
    never_started, data["queue"] = data["queue"], []  # max_concurrency: canceled too, and reported like the others
    for bid in [*running, *never_started]:
        data["status"][bid] = "canceled"
        data["errors"][bid] = None
    for bid in [*running, *never_started]:
        await m.emit(ParallelBranchCompleted(node_id=node.id, frame=fs, branch_id=bid, status="canceled"))
