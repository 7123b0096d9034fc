"""A frame's node from entry to outcome (ckp.md §3.2, §3.3, §3.14, §4.10): entering the node at the frame's cursor
(hop and visit counts, ``max_hops``), executing it by its kind under its SLA, node-scope error handlers, the state
size check, and applying the outcome to the frame; frames ending, and the run ending with them.
"""

from __future__ import annotations

import asyncio
import time
from typing import Literal

from ckp_core.events import (
    ErrorObject,
    NodeCompleted,
    NodeError,
    NodePaused,
    NodeStarted,
    RecoveryStarted,
    StepErrorNotification,
    StepEscalated,
)
from ckp_core.ir import ErrorHandlerIR, NodeIR
from langorch_infra import tracing
from langorch_runtime.errors import StepError
from langorch_runtime.frames import (
    Frame,
    FrameResult,
    NodeState,
    RunOutcome,
    RunState,
    frame_string,
    new_frame,
    vars_of,
)
from langorch_runtime.machine.nodes import execute
from langorch_runtime.machine.outcomes import (
    Next,
    NodeFailure,
    Outcome,
    Pause,
    RetryNode,
    Routed,
    Spawn,
    Terminate,
    dump,
)
from langorch_runtime.machine.policies import (
    elapsed_ms,
    forget_retries,
    handler_delay,
    handler_matches,
    sla_breach,
    sla_escalates,
    sla_overrun,
    state_too_large,
    take_node_retry,
)
from langorch_runtime.machine.steps import StepRunner


class NodeLifecycle(StepRunner):
    """Runs one node of a frame and applies its outcome."""

    async def unit(self, state: RunState, frame: Frame) -> None:
        """One node of ``frame``: the one in progress, else the one at its cursor (entered now); in a span
        ``node <id>`` when spans are exported."""
        current = frame.get("node")
        node_id = current["id"] if current is not None else frame.get("cursor")
        if node_id is None:
            await self.run_unit(state, frame)
            return
        with tracing.span(f"node {node_id}", attributes={
                "langorch.run_id": self.run.run_id, "langorch.node_id": node_id, "langorch.frame": frame["id"],
                "langorch.node_type": self.ir.nodes[node_id].type if node_id in self.ir.nodes else ""}):
            await self.run_unit(state, frame)

    async def run_unit(self, state: RunState, frame: Frame) -> None:
        self._woken.discard(frame["id"])  # the node sees every child frame that ended up to now
        current = frame.get("node")
        if current is None:
            current = await self.enter(state, frame)
            if current is None:
                return
        self.note_vars(state, frame)
        node = self.ir.nodes[current["id"]]
        try:
            sla = node.sla
            if sla is not None and sla.enforce:
                left = sla.max_duration_ms / 1000 - (time.time() - current["started"])
                try:
                    outcome = await asyncio.wait_for(execute(self, state, frame, node, current), max(0.0, left))
                except TimeoutError:
                    outcome = await self.sla_enforced(state, frame, node, current)
            else:
                outcome = await execute(self, state, frame, node, current)
        except NodeFailure as failure:
            outcome = await self.node_error(state, frame, node, current, failure)
        except StepError as failure:
            outcome = await self.node_error(state, frame, node, current, NodeFailure(failure.error))
        if isinstance(outcome, Next | Terminate):  # §2.3: a write over the state limits fails the writing node
            too_large = state_too_large(vars_of(state, frame))
            if too_large is not None:
                outcome = await self.node_error(state, frame, node, current, NodeFailure(too_large))
        if outcome is not None:
            await self.apply(state, frame, node, current, outcome)

    async def enter(self, state: RunState, frame: Frame) -> NodeState | None:
        """Enter the node at the frame's cursor (``node_started``); None when the frame ended instead: its path
        is done (no cursor, or its ``stop_at``), or ``max_hops`` is spent."""
        cursor = frame.get("cursor")
        if cursor is None or cursor == frame.get("stop_at"):
            await self.finish(state, frame, {"status": "completed", "error": None})
            return None
        limit = self.ir.global_config.max_hops
        owner = self.reentered(state, frame, cursor)
        if frame.get("hops", 0) >= limit or (owner is not None and owner.get("hops", 0) >= limit):
            where = "this frame" if frame.get("hops", 0) >= limit else \
                f"the frame '{frame_string(owner or frame)}', whose node '{cursor}' this frame re-entered"
            error = ErrorObject(code="max_hops_exceeded", message=f"max_hops {limit} reached in {where}",
                                node_id=cursor, frame=frame_string(frame))
            await self.emit(NodeError(node_id=cursor, frame=frame_string(frame), error=error))
            await self.finish(state, frame, {"status": "failed", "error": dump(error)})
            return None
        if owner is not None:
            owner["hops"] = owner.get("hops", 0) + 1
        frame["hops"] = frame.get("hops", 0) + 1
        visits = frame.setdefault("visits", {})
        visits[cursor] = visits.get(cursor, 0) + 1
        node = self.ir.nodes[cursor]
        current: NodeState = {"id": cursor, "visit": visits[cursor], "started": time.time(), "data": {}}
        frame["node"] = current
        await self.emit(NodeStarted(node_id=cursor, frame=frame_string(frame, cursor, visits[cursor]),
                                    node_type=node.type, node_name=node.description, visit=visits[cursor]))
        return current

    def reentered(self, state: RunState, frame: Frame, node_id: str) -> Frame | None:
        """The outermost enclosing frame whose node in progress is ``node_id``: a branch routed back into its own
        parallel node (or a path into an enclosing loop node) nests a new copy of that node inside it. Every such
        re-entry is a hop of that outer frame, so nesting is bounded by its ``max_hops`` (each frame's own hop
        count starts at 0 and could never trip)."""
        owner: Frame | None = None
        for f in self.ancestors(state, frame):
            in_progress = f.get("node")
            if in_progress and in_progress.get("id") == node_id:
                owner = f
        return owner

    async def apply(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                    outcome: Outcome) -> None:
        fs = frame_string(frame, node.id, current["visit"])
        if isinstance(outcome, Routed):
            return
        if isinstance(outcome, Spawn):
            # a child frame that ended while the node ran found the frame running and woke nothing: the node runs
            # again (it records that child) instead of waiting for an end that already happened
            frame["status"] = "running" if frame["id"] in self._woken else "waiting"
            return
        if isinstance(outcome, Pause):
            frame["status"] = "paused"
            frame["pending"] = [outcome.wait_id]
            await self.emit(NodePaused(node_id=node.id, frame=fs, reason=outcome.reason, wait_id=outcome.wait_id))
            return
        if isinstance(outcome, RetryNode):
            if outcome.delay_ms:
                await self.sleep(outcome.delay_ms / 1000)
            frame["node"] = None
            frame["cursor"] = node.id
            return
        if isinstance(outcome, Next):
            checked = await self.sla(state, frame, node, current, outcome)
            if checked is None:
                return
            outcome = checked
        duration = int((time.time() - current["started"]) * 1000)
        target = outcome.target if isinstance(outcome, Next) else None
        await self.emit(NodeCompleted(node_id=node.id, frame=fs, node_type=node.type, next_node=target,
                                      duration_ms=duration, variables=self.node_vars(state, frame)))
        if node.is_checkpoint:
            self.save(state, "is_checkpoint", node.id, fs)
        frame["node"] = None
        forget_retries(frame, node.id)
        if isinstance(outcome, Terminate):
            await self.terminate(state, frame, node, outcome)
            return
        if outcome.error is not None:
            frame["error"] = outcome.error
        frame["cursor"] = outcome.target

    # -- SLA (§3.14) ------------------------------------------------------------------------------------------------
    async def sla_enforced(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState) -> Outcome:
        """An enforced SLA expired: the node was canceled at its deadline; the breach is handled at once."""
        sla = node.sla
        assert sla is not None
        current["sla_reported"] = True
        fs = frame_string(frame, node.id, current["visit"])
        event, error = sla_breach(node, sla, fs, elapsed_ms(current), canceled=True)
        await self.emit(event)
        if sla.on_breach == "fail":
            raise NodeFailure(error)
        if sla_escalates(sla):
            return Next(sla.escalation_handler, error=dump(error))
        return Next(node.next_node)

    async def sla(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                  outcome: Next) -> Next | None:
        """A node that completed past its SLA: reported once; ``fail`` fails it (its handlers apply, None: the
        replacement outcome was applied), ``escalate`` routes to the escalation handler."""
        elapsed = sla_overrun(node, current)
        sla = node.sla
        if elapsed is None or sla is None:
            return outcome
        current["sla_reported"] = True  # emitted once: a handler's replacement outcome is not checked again
        fs = frame_string(frame, node.id, current["visit"])
        event, error = sla_breach(node, sla, fs, elapsed, canceled=False)
        await self.emit(event)
        if sla.on_breach == "fail":
            replacement = await self.node_error(state, frame, node, current, NodeFailure(error))
            if replacement is not None:
                await self.apply(state, frame, node, current, replacement)
            return None
        if sla_escalates(sla):
            return Next(sla.escalation_handler, error=dump(error))
        return outcome

    # -- node errors and handlers (§3.3, §4.10) ----------------------------------------------------------------
    async def node_error(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                         failure: NodeFailure) -> Outcome | None:
        fs = frame_string(frame, node.id, current["visit"])
        error = failure.error.model_copy(update={"node_id": failure.error.node_id or node.id,
                                                 "frame": failure.error.frame or fs})
        if not failure.bypass and not failure.step_level and error.code != "canceled":
            for handler in node.error_handlers:
                if not handler_matches(handler, error):
                    continue
                routed = await self.node_handler(state, frame, node, current, handler, error)
                if routed is not None:
                    return routed
                break
        await self.emit(NodeError(node_id=node.id, frame=fs, error=error, routed_to=None))
        if state.get("recovery") is None:  # §7.12: a failing recovery path keeps the main path's failure point
            state["failure_point"] = {"node_id": node.id, "frame_id": frame["id"]}
        await self.finish(state, frame, {"status": "failed", "error": dump(error)})
        return None

    async def node_handler(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                           handler: ErrorHandlerIR, error: ErrorObject) -> Outcome | None:
        fs = frame_string(frame, node.id, current["visit"])
        if handler.error_metadata:
            error = error.model_copy(update={"details": {**error.details, "handler_metadata": handler.error_metadata}})
        if handler.notify_on_error:
            await self.alert(StepErrorNotification(node_id=node.id, frame=fs, error_type=handler.error_type or "*",
                                                   error=error, handler_action=handler.action))
        await self.recovery_steps(state, frame, node, current, handler, None, None)
        if handler.action in ("retry", "retry_node"):
            used = take_node_retry(frame, f"{node.id}#handler{handler.index}", handler.max_retries)
            if used is not None:
                return RetryNode(delay_ms=handler_delay(handler, used))
            return None
        if handler.action == "screenshot_and_fail":
            await self.screenshot(node, None, fs, None, "screenshot_and_fail", error)
            return None
        if handler.action == "ignore":
            target = handler.fallback_node or node.next_node
            if handler.fallback_node:
                return await self.route_to_fallback(frame, node, fs, error, handler.fallback_node)
            return Next(target)
        if handler.action == "escalate":
            await self.emit(StepEscalated(node_id=node.id, frame=fs, handler_index=handler.index,
                                          fallback_node=handler.fallback_node, error=error))
            if handler.fallback_node:
                return await self.route_to_fallback(frame, node, fs, error, handler.fallback_node)
        return None

    # -- frames ending ------------------------------------------------------------------------------------------
    async def finish(self, state: RunState, frame: Frame, result: FrameResult) -> None:
        frame["status"] = "done"
        frame["result"] = result
        frame["node"] = None
        self._found_vars.pop(frame["id"], None)
        parent_id = frame.get("parent")
        if parent_id is not None:
            parent = state["frames"][parent_id]
            if parent.get("status") == "waiting":
                parent["status"] = "running"
            elif parent.get("status") == "running":  # its node may be running now, past looking at this frame
                self._woken.add(parent_id)
            return
        if frame["kind"] == "main":
            if result["status"] == "completed":
                state["outcome"] = {"status": "completed", "outputs": {}}
                return
            on_failure = self.ir.global_config.on_failure
            error = result["error"]
            if on_failure is not None:
                state["recovery"] = {"node": on_failure, "error": error}
                await self.emit(RecoveryStarted(on_failure_node=on_failure, error=ErrorObject.model_validate(error)))
                new_frame(state, "recovery", None, "recovery", on_failure, None, error=error)
                return
            state["outcome"] = {"status": "failed", "error": error, "outputs": {}}
            return
        # the recovery frame
        recovery = state.get("recovery")
        via, main_error = (recovery.get("node"), recovery.get("error")) if recovery is not None else (None, None)
        if result["status"] == "completed":
            state["outcome"] = {"status": "completed", "outputs": {}, "recovered_via": via}
        else:
            state["outcome"] = {"status": "failed", "error": main_error, "outputs": {},
                                "recovered_via": via, "recovery_error": result["error"]}

    async def terminate(self, state: RunState, frame: Frame, node: NodeIR, outcome: Terminate) -> None:
        """A ``terminate`` node completed: every other frame is canceled and the run ends with its status."""
        recovery = state.get("recovery")
        in_recovery = frame["kind"] == "recovery" or any(
            f["kind"] == "recovery" for f in self.ancestors(state, frame))
        status: Literal["completed", "failed"] = "completed" if outcome.status == "success" else "failed"
        out: RunOutcome
        if in_recovery and recovery is not None:
            out = {"outputs": outcome.outputs, "recovered_via": recovery.get("node"), "status": status}
        else:
            out = {"outputs": outcome.outputs, "status": status}
        if status == "failed":
            terminated = ErrorObject(code="terminated_failed", message=f"run ended at terminate node '{node.id}' "
                                     "with status failed", node_id=node.id,
                                     frame=frame_string(frame, node.id, (frame.get("visits") or {}).get(node.id, 1)))
            if in_recovery and recovery is not None:
                out["error"] = recovery.get("error")
            else:
                out["error"] = dump(terminated)
                # §7.12: the terminate node is the failure point (a retry runs it again)
                state["failure_point"] = {"node_id": node.id, "frame_id": frame["id"]}
        self.cancel_frames(state, [f for f in state["frames"].values() if f.get("status") != "done"])
        state["waits"] = {}
        state["outcome"] = out
