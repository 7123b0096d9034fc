"""The super-step scheduler (ckp.md §3.8 step 3, §3.15, §7.3, §7.11): runs every runnable frame's node as an
asyncio task by wall-clock time, cuts them off at the run deadline, persists at the points the checkpoint strategy
asks for, and applies resumes (approval decisions, callbacks, child run ends) to the state.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import Mapping
from typing import Any, cast

from ckp_core import runs
from ckp_core.events import CallbackTimedOut, ErrorObject, EventData, NodeError, RunSuspended, WorkflowCallbackReceived
from ckp_core.ir import HumanApprovalPayload
from langorch_runtime.frames import ApprovalData, Frame, RunState, frame_string, new_frame, tree_copy
from langorch_runtime.machine.lifecycle import NodeLifecycle
from langorch_runtime.machine.nodes.human_approval import decision_received, decision_record
from langorch_runtime.machine.outcomes import dump
from langorch_runtime.machine.policies import remaining_s

WAIT_FIELDS = ("kind", "id", "node_id", "step_id", "frame", "expires_at")  # a pending wait in ``run_suspended``


class Machine(NodeLifecycle):
    """Executes the frames of one run against its IR.

    :meth:`advance` is one LangGraph super-step: it runs one node (or the continuation of a container node: a loop
    or parallel node whose child frames finished, a node whose wait was resolved) of every runnable frame,
    concurrently; it returns the state after one super-step (``checkpoint_strategy: every_node``) or after the
    super-steps up to the next point its strategy persists (§7.3), and the PostgreSQL checkpointer persists it
    before the graph goes on. External side effects are made exactly once through the step store (§7.4): a
    super-step re-executed after a crash replays completed steps from their records instead of executing them
    again."""

    def initial_state(self, inputs: dict[str, Any]) -> RunState:
        state: RunState = {"vars": dict(inputs), "frames": {}, "order": [], "waits": {}, "resolutions": {},
                           "outcome": None, "warned": [], "seq": 0, "recovery": None, "failure_point": None}
        new_frame(state, "main", None, "", self.ir.start_node, None)
        return state

    async def advance(self, state: RunState) -> RunState:
        """Advance the run; returns the new state, which LangGraph persists (§7.3).

        Under ``every_node`` that is one super-step (every runnable frame by one node). Under the other
        strategies super-steps follow each other here, unpersisted, until the run reaches a point where its
        state is persisted: a save was asked (``is_checkpoint``, ``set_checkpoint``), a wait was added (before
        the pause), the run ended or suspended, or a node failed (the failure point, §7.12: the state from
        before that node started travels with it, since a retry restarts the node from there)."""
        state = tree_copy(state)
        state["saves"] = []
        self.affinity = state.setdefault("affinity", {})
        if self.ir.global_config.checkpoint_strategy == "every_node":
            await self.super_step(state)
            return state
        starts: dict[str, RunState] = {}  # frame id → the state before its node in progress started
        while True:
            starting = [f["id"] for f in self.runnable(state) if f.get("node") is None]
            if starting:
                before = tree_copy(state)
                starts.update((fid, before) for fid in starting)
            waits, point = set(state.get("waits") or {}), state.get("failure_point")
            await self.super_step(state)
            if state.get("failure_point") != point:
                self.keep_failure_image(state, starts)
                return state
            if state["saves"] or set(state.get("waits") or {}) - waits or state.get("outcome") is not None \
                    or not self.runnable(state):
                return state
            for fid in [fid for fid in starts if state["frames"].get(fid, {}).get("status") == "done"]:
                del starts[fid]

    @staticmethod
    def keep_failure_image(state: RunState, starts: dict[str, RunState]) -> None:
        """Attach to the failure point the state from just before the failing node started, when that was
        in this (unpersisted) stretch of super-steps; a retry restores it (:func:`restore_state`)."""
        point = state.get("failure_point")
        if not point:
            return
        image = starts.get(point["frame_id"])
        frame = image.get("frames", {}).get(point["frame_id"]) if image is not None else None
        if image is None or frame is None or frame.get("cursor") != point["node_id"]:
            return
        image = copy.deepcopy(image)
        earlier = image.get("failure_point")
        if earlier:
            earlier.pop("restore", None)  # the image's own (a copy): only the newest failure point keeps one
        state["failure_point"] = {**point, "restore": image}

    async def super_step(self, state: RunState) -> None:
        """One super-step on ``state`` (in place): every runnable frame advances by at least one node.

        Frames run concurrently and by wall-clock time (ckp.md §3.8 step 3, §3.15): while a node that began the
        super-step is still executing, a frame that finished its node goes on with its next one, and a frame that
        becomes runnable (a parallel node whose branch just ended) runs at once. So a branch of quick nodes is not
        held back by a sibling's slow call, a parallel ``any`` is won by the first branch to finish in time, and a
        frame ended by another one (a losing branch, ``branch_failure: fail``, a ``terminate``) has its node in
        progress canceled on the spot — its in-flight agent, LLM or MCP call is aborted (:meth:`abort_frame`).
        No node starts once every node that began the super-step has finished; the super-step ends when the
        nodes in progress are done, and the state is persisted after it."""
        frames = self.runnable(state)
        remaining = self.remaining_s(state)
        began = time.monotonic()
        if remaining is not None and remaining <= 0:
            await self.deadline(state, frames)
        elif len(frames) == 1 and remaining is None:
            await self.unit(state, frames[0])
        elif frames:
            await self.concurrently(state, frames, remaining)
        state["executed_ms"] = state.get("executed_ms", 0) + int((time.monotonic() - began) * 1000)
        if state.get("outcome") is None and not self.runnable(state) and state.get("waits"):
            pending = [w for w in state["waits"].values() if not w.get("announced")]
            if any(not w.get("suspends_run") for w in pending):
                status = runs.suspended_status(state["waits"].values())
                await self.emit(RunSuspended(status=status, waiting_on=[  # the pending waits of §7.3
                    {k: w.get(k) for k in WAIT_FIELDS} for w in state["waits"].values()]))
            for w in pending:
                w["announced"] = True

    async def concurrently(self, state: RunState, frames: list[Frame], remaining: float | None) -> None:
        """The frames' nodes of one super-step as tasks, scheduled by wall-clock time (see :meth:`super_step`)."""
        loop = asyncio.get_running_loop()
        until = None if remaining is None else loop.time() + remaining
        tasks: dict[str, asyncio.Task[None]] = {}
        self._in_flight = tasks
        for f in frames:
            tasks[f["id"]] = asyncio.create_task(self.unit(state, f), name=f"frame-{f['id']}")
        first = set(tasks.values())  # the nodes that began the super-step
        try:
            while tasks:
                timeout = None if until is None else max(0.0, until - loop.time())
                done, _ = await asyncio.wait(tasks.values(), timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
                if not done:  # the run deadline passed (§7.11): the nodes in progress are cut off
                    await self._settle(tasks)
                    await self.deadline(state, self.runnable(state))
                    return
                for fid, task in list(tasks.items()):
                    if not task.done():
                        continue
                    del tasks[fid]
                    failure = None if task.cancelled() else task.exception()
                    if failure is not None:
                        raise failure
                if state.get("outcome") is None and any(t in first for t in tasks.values()):
                    for f in self.runnable(state):
                        if f["id"] not in tasks:
                            tasks[f["id"]] = asyncio.create_task(self.unit(state, f), name=f"frame-{f['id']}")
        finally:
            await self._settle(tasks)
            self._in_flight = {}

    @staticmethod
    async def _settle(tasks: dict[str, asyncio.Task[None]]) -> None:
        for task in tasks.values():
            task.cancel()
        if tasks:
            await asyncio.gather(*tasks.values(), return_exceptions=True)
        tasks.clear()

    # -- the run deadline (§7.11) ------------------------------------------------------------------------------
    def remaining_s(self, state: RunState) -> float | None:
        """Executing time left before the run deadline (§7.11); None without a deadline."""
        return remaining_s(self.ir.global_config.timeout_ms, state, self.recovery_grace_ms)

    async def deadline(self, state: RunState, frames: list[Frame]) -> None:
        """The run deadline passed: every executing frame fails with ``deadline_exceeded`` (bypassing node
        handlers; the recovery path, when configured, gets its own grace period)."""
        state["deadline_hit"] = state.get("executed_ms", 0)
        limit = self.ir.global_config.timeout_ms
        for frame in frames:
            if frame.get("status") == "done":
                continue
            current = frame.get("node")
            node_id = (current.get("id") if current else None) or frame.get("cursor")
            error = ErrorObject(code="deadline_exceeded", message=f"the run exceeded its deadline of {limit} ms of "
                                "execution", node_id=node_id, frame=frame_string(frame))
            if node_id is not None:
                await self.emit(NodeError(node_id=node_id, frame=frame_string(frame), error=error))
                if not state.get("failure_point"):  # §7.12: a retry restarts the node the deadline cut off
                    state["failure_point"] = {"node_id": node_id, "frame_id": frame["id"]}
            await self.finish(state, frame, {"status": "failed", "error": dump(error)})

    # -- resumes (§7.1, §7.12) -----------------------------------------------------------------------------------
    def renew_approvals(self, state: RunState) -> RunState:
        """For a retried run: approvals it was waiting on were canceled when it ended, so every approval wait is
        dropped and its node asks again (a new approval) when the run continues."""
        state = copy.deepcopy(state)
        for wait_id, wait in list((state.get("waits") or {}).items()):
            if wait.get("kind") != "approval":
                continue
            del state["waits"][wait_id]
            frame = state["frames"].get(wait["frame_id"])
            if frame is None:
                continue
            current = frame.get("node")
            if current and current.get("data"):  # an approval wait: the node is a human_approval node
                cast(ApprovalData, current["data"]).pop("wait_id", None)
            frame["pending"] = [w for w in frame.get("pending", []) if w != wait_id]
            if not frame["pending"] and frame.get("status") == "paused":
                frame["status"] = "running"
        return state

    def resolve(self, state: RunState, resolution: Mapping[str, Any]) -> RunState:
        """Apply a resume payload ``{"wait_id": …, …}`` to the state: the waiting frame becomes runnable."""
        state = copy.deepcopy(state)
        wait_id = str(resolution.get("wait_id"))
        wait = state.get("waits", {}).pop(wait_id, None)
        if wait is None:
            return state
        state.setdefault("resolutions", {})[wait_id] = dict(resolution)
        frame = state["frames"].get(wait["frame_id"])
        if frame is not None and frame.get("status") == "paused":
            frame["pending"] = [w for w in frame.get("pending", []) if w != wait_id]
            if not frame["pending"]:
                frame["status"] = "running"
        return state

    def resume_event(self, state: RunState, resolution: Mapping[str, Any]) -> EventData | None:
        """The event that moves a suspended run to ``queued`` for this resume (§7.1), emitted before
        ``execution_resumed``; the node continuation then does not emit it again."""
        wait = (state.get("waits") or {}).get(str(resolution.get("wait_id")))
        if wait is None:
            return None
        node = self.ir.nodes.get(wait["node_id"])
        if node is None:
            return None
        if wait["kind"] == "approval" and isinstance(node.payload, HumanApprovalPayload):
            decision = decision_record(node.payload, resolution, wait["id"])
            return decision_received(node, wait["frame"], node.payload, decision, resumes_run=True)
        if wait["kind"] == "callback":
            status = resolution.get("status", "success")
            if status == "timed_out":
                return CallbackTimedOut(node_id=node.id, step_id=wait.get("step_id"), frame=wait["frame"],
                                        delegation_id=wait["id"], timeout_s=self.callbacks.timeout_s
                                        if self.callbacks else 0.0, resumes_run=True)
            return WorkflowCallbackReceived(node_id=node.id, step_id=wait.get("step_id"), frame=wait["frame"],
                                            delegation_id=wait["id"], status=status,
                                            output=resolution.get("output"), error=resolution.get("error"),
                                            error_code=resolution.get("error_code"), resumes_run=True)
        return None
