"""The CKP interpreter (ckp.md §3, §4.7, §7): executes a run's frames node by node.

:meth:`Machine.advance` is one LangGraph super-step: it runs one node (or the continuation of a container node:
a loop or parallel node whose child frames finished, a node whose wait was resolved) of every runnable frame,
concurrently; :meth:`Machine.advance` returns the state after one super-step (``checkpoint_strategy: every_node``)
or after the super-steps up to the next point its strategy persists (§7.3), and the PostgreSQL checkpointer
persists it before the graph goes on.
External side effects are made exactly once through the step store (§7.4): a super-step re-executed after a
crash replays completed steps from their records instead of executing them again.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json as _jsonlib
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ckp_core.events import (
    ErrorObject,
    EventData,
    NodeCompleted,
    NodeError,
    NodeStarted,
    StepCompleted,
    StepFailed,
    StepReplayed,
    StepStarted,
    TemplateWarning,
    format_time,
)
from ckp_core.expressions import ExpressionError, MappingScope, evaluate, format_embedded, truthy
from ckp_core.ids import new_id
from ckp_core.ir import (
    ErrorHandlerIR,
    ExpressionIR,
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    LoopPayload,
    NodeIR,
    OperationIR,
    ParallelPayload,
    ProcedureIR,
    ProcessingPayload,
    SequencePayload,
    StepIR,
    SubflowPayload,
    TemplateIR,
    TerminatePayload,
    TransformPayload,
    ValidationIR,
    VerificationPayload,
)
from ckp_core.run_events import (
    ApprovalAutoResolved,
    ApprovalDecisionReceived,
    ApprovalRequested,
    ArtifactCreated,
    AuditLog,
    CallbackTimedOut,
    DryRunStepSkipped,
    LoopCompleted,
    LoopIteration,
    LoopIterationFailed,
    LoopStarted,
    NodePaused,
    ParallelBranchCompleted,
    ParallelCompleted,
    ParallelMergeConflict,
    ParallelStarted,
    RecoveryStarted,
    RunSuspended,
    ScreenshotRequested,
    SlaBreached,
    StepErrorNotification,
    StepEscalated,
    StepMockApplied,
    StepRetrying,
    StepTestOverrideApplied,
    StepTimeout,
    SubflowCompleted,
    SubflowFailed,
    SubflowStarted,
    ValidationFailed,
    VerificationWarning,
    WorkflowCallbackReceived,
    WorkflowDelegated,
)
from ckp_core.templates import render, render_text
from langorch_infra.callbacks import GRACE_S, make_token
from langorch_runtime.errors import StepError
from langorch_runtime.frames import (
    APPROVALS_KEY,
    Frame,
    NodeState,
    RunState,
    descendants,
    frame_string,
    json_equal,
    loop_context,
    new_frame,
    vars_of,
)
from langorch_runtime.machine.outcomes import (
    Next,
    NodeFailure,
    Outcome,
    Pause,
    RetryNode,
    Routed,
    Spawn,
    Terminate,
)
from langorch_runtime.machine.outcomes import dump as _dump
from langorch_runtime.machine.policies import (
    HANDLER_NAME_ALIASES,
    MAX_NAMESPACE_BYTES,
    MAX_VARIABLE_BYTES,
    NEVER_RETRIED,
    RECOVERY_GRACE_MS,
    after_retry_after,
    forget_retries,
    handler_matches,
    retry_allowed,
    retry_delay,
)
from langorch_runtime.machine.policies import handler_delay as _handler_delay
from langorch_runtime.machine.policies import state_too_large as _state_too_large
from langorch_runtime.machine.ports import (
    ArtifactStore,
    CallbackConfig,
    CallbackInfo,
    ChildRuns,
    ContentArtifacts,
    Delegated,
    Dispatcher,
    DispatchRequest,
    Emit,
    Limiter,
    RunInfo,
    SecretsAccess,
    WebhookPoster,
)
from langorch_runtime.steps import (
    StepRecord,
    StepStore,
    custom_idempotency_key,
    idempotency_key,
    natural_identity,
    now_iso,
)

log = logging.getLogger(__name__)


@dataclass
class Machine:
    """Executes the frames of one run against its IR."""

    ir: ProcedureIR
    run: RunInfo
    emit: Emit
    steps: StepStore
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    on_approval: Callable[[dict[str, Any]], Awaitable[None]] | None = None  # publishes lo.cmd.approval.request
    callbacks: CallbackConfig | None = None
    children: ChildRuns | None = None
    secrets: SecretsAccess | None = None
    limiter: Limiter | None = None
    llm: Any = None  # langorch_runtime.llm.LlmClient
    artifacts: ArtifactStore | None = None
    affinity: dict[str, str] = field(default_factory=dict)  # channel → agent, mirrored into the run state
    on_sensitive: Callable[[set[str], set[str]], None] | None = None  # (variable names, values) to redact
    webhooks: WebhookPoster | None = None  # the server's notification and alert webhooks (scheduled POSTs)
    recovery_grace_ms: int = RECOVERY_GRACE_MS  # LANGORCH_RECOVERY_GRACE_S: the recovery path's time past the deadline
    _in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)

    @property
    def root_run_id(self) -> str:
        """The root of this run's tree (itself unless it is a child run): owner of the artifacts it stores."""
        return str(self.run.run_created.get("root_run_id") or self.run.run_id)

    # -- webhooks (ckp.md §4.3 notify, §4.10 notify_on_error) ------------------------------------------------
    def rehearsal(self) -> bool:
        """A dry run or a run under mocks: nothing is posted to the webhooks."""
        return self.dry_run() or self.ir.global_config.mock_external_calls

    def dry_run(self) -> bool:
        """§7.9: the document's mode, or the run's own (a child run of a dry run inherits it, §3.9)."""
        return self.ir.global_config.execution_mode == "dry_run" or \
            self.run.run_created.get("execution_mode") == "dry_run"

    async def rehearsed(self, node: NodeIR, override_id: str, step_id: str, fs: str, attempt: int, action: str,
                        channel: str | None) -> tuple[bool, Any]:
        """Executor resolution before a real dispatch (§4.5, §7.9): ``test_data_overrides`` (under
        ``<node_id>.<override_id>``, else ``<override_id>``) → dry-run skip → mock. Returns ``(True, answer)`` when
        one of them answered, else ``(False, None)``."""
        gc = self.ir.global_config
        for override_key in (f"{node.id}.{override_id}", override_id):
            if override_key in gc.test_data_overrides:
                await self.emit(StepTestOverrideApplied(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                        override_key=override_key))
                return True, copy.deepcopy(gc.test_data_overrides[override_key])
        if self.dry_run():
            await self.emit(DryRunStepSkipped(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                              action=action, binding_kind="channel", channel=channel))
            return True, {"dry_run": True, "skipped_action": action, "channel": channel}
        if gc.mock_external_calls:
            await self.emit(StepMockApplied(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            action=action, binding_kind="channel", channel=channel))
            return True, {"mocked": True, "action": action, "channel": channel}
        return False, None

    def admitted(self, node_id: str, step_id: str, fs: str, attempt: int) -> contextlib.AbstractAsyncContextManager[
            None]:
        """The procedure's rate limits (§7.6) around one external dispatch attempt (a no-op when disabled)."""
        limits = self.ir.global_config.rate_limiting
        if self.limiter is None or not limits.enabled:
            return contextlib.nullcontext()
        position = {"node_id": node_id, "step_id": step_id, "frame": fs, "attempt": attempt}
        return self.limiter.admit(self.ir.procedure_id, limits, self.emit, position)

    async def side_dispatch(self, node: NodeIR, step_id: str, fs: str, attempt: int, action: str,
                            params: dict[str, Any]) -> tuple[Any, bool]:
        """A screen validation or failure screenshot dispatch (§4.10, §4.11) resolved like a step's: override →
        dry-run skip → mock → real dispatch under the rate limits. Returns ``(result, dispatched)``; a failed
        dispatch raises :class:`StepError`."""
        answered, answer = await self.rehearsed(node, step_id, step_id, fs, attempt, action, node.channel)
        if answered:
            return answer, False
        request = DispatchRequest(node=node, step_id=step_id, action=action, channel=node.channel, params=params,
                                  attempt=attempt, idempotency_key=idempotency_key(self.run.run_id, node.id, step_id,
                                                                                   fs, attempt),
                                  frame=fs, timeout_ms=None, dispatch_mode="sync", run_id=self.run.run_id,
                                  procedure_id=self.ir.procedure_id, emit=self.emit)
        async with self.admitted(node.id, step_id, fs, attempt):
            return await self.dispatcher.dispatch(request), True

    def notifier(self) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
        """The ``notify`` operation's webhook: schedules the POST and returns at once."""
        webhooks = self.webhooks
        if webhooks is None or self.rehearsal():
            return None

        async def post(payload: dict[str, Any]) -> None:
            webhooks.post("notify", payload)

        return post

    async def alert(self, event: StepErrorNotification) -> None:
        """Emit ``step_error_notification`` and post it to the alert webhook (best effort)."""
        await self.emit(event)
        if self.webhooks is not None and not self.rehearsal():
            self.webhooks.post("alert", event.model_dump(mode="json"))

    # -- scopes and templates -------------------------------------------------------------------------------
    def builtins(self, state: RunState, frame: Frame, node_id: str | None, step_id: str | None,
                 user_vars: dict[str, Any]) -> dict[str, Any]:
        """The built-in names (§2.4); ``user_vars`` is the namespace without engine-only keys (``vars``)."""
        now = datetime.now(UTC)
        rc = self.run.run_created
        namespace = vars_of(state, frame)
        loop = loop_context(state, frame)
        return {
            "run_id": self.run.run_id, "root_run_id": rc.get("root_run_id") or self.run.run_id,
            "parent_run_id": rc.get("parent_run_id"), "procedure_id": self.ir.procedure_id,
            "procedure_version": self.ir.version, "trigger_type": rc.get("trigger_type", "api"),
            "triggered_by": rc.get("triggered_by"), "node_id": node_id, "step_id": step_id,
            "loop_index": loop["index"] if loop else None, "loop_item": loop["item"] if loop else None,
            "error": frame.get("error"), "approval": dict(namespace.get(APPROVALS_KEY, {})),
            "now": format_time(now), "today": now.date().isoformat(), "run_started_at": self.run.started_at,
            "vars": user_vars,
        }

    def scope(self, state: RunState, frame: Frame, node_id: str | None, step_id: str | None = None,
              locals_: Mapping[str, Any] | None = None) -> MappingScope:
        namespace = {k: v for k, v in vars_of(state, frame).items() if k != APPROVALS_KEY}
        layers: list[Mapping[str, Any]] = [locals_] if locals_ else []
        return MappingScope(*layers, namespace, self.builtins(state, frame, node_id, step_id, namespace))

    def warnings(self, state: RunState, node_id: str, step_id: str | None, base: str) -> _Warnings:
        return _Warnings(state.setdefault("warned", []), node_id, step_id, base)

    async def render(self, tpl: TemplateIR, state: RunState, frame: Frame, node_id: str, step_id: str | None,
                     base: str, text: bool = False, locals_: Mapping[str, Any] | None = None) -> Any:
        warnings = self.warnings(state, node_id, step_id, base)
        try:
            scope = self.scope(state, frame, node_id, step_id, locals_)
            value = render_text(tpl.compiled, scope, warnings) if text else render(tpl.compiled, scope, warnings)
        except ExpressionError as exc:
            await warnings.flush(self.emit)
            raise NodeFailure(_expression_error(exc, node_id, step_id)) from exc
        await warnings.flush(self.emit)
        return value

    async def evaluate(self, expr: ExpressionIR, state: RunState, frame: Frame, node_id: str, base: str,
                       step_id: str | None = None) -> Any:
        warnings = self.warnings(state, node_id, step_id, base)
        try:
            value = evaluate(expr.compiled, self.scope(state, frame, node_id, step_id),
                             lambda v, r: warnings(v, r))
        except ExpressionError as exc:
            await warnings.flush(self.emit)
            raise NodeFailure(_expression_error(exc, node_id, step_id)) from exc
        await warnings.flush(self.emit)
        return value

    # -- the super-step -------------------------------------------------------------------------------------
    def initial_state(self, inputs: dict[str, Any]) -> RunState:
        state: RunState = {"vars": dict(inputs), "frames": {}, "order": [], "waits": {}, "resolutions": {},
                           "outcome": None, "warned": [], "seq": 0, "recovery": None, "failure_point": None}
        new_frame(state, "main", None, "", self.ir.start_node, None)
        return state

    def runnable(self, state: RunState) -> list[Frame]:
        return [f for f in (state["frames"][fid] for fid in state.get("order", [])) if f.get("status") == "running"]

    async def advance(self, state: RunState) -> RunState:
        """Advance the run; returns the new state, which LangGraph persists (§7.3).

        Under ``every_node`` that is one super-step (every runnable frame by one node). Under the other
        strategies super-steps follow each other here, unpersisted, until the run reaches a point where its
        state is persisted: a save was asked (``is_checkpoint``, ``set_checkpoint``), a wait was added (before
        the pause), the run ended or suspended, or a node failed (the failure point, §7.12: the state from
        before that node started travels with it, since a retry restarts the node from there)."""
        state = copy.deepcopy(state)
        state["saves"] = []
        self.affinity = state.setdefault("affinity", {})
        if self.ir.global_config.checkpoint_strategy == "every_node":
            await self.super_step(state)
            return state
        starts: dict[str, RunState] = {}  # frame id → the state before its node in progress started
        while True:
            starting = [f["id"] for f in self.runnable(state) if f.get("node") is None]
            if starting:
                before = copy.deepcopy(state)
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
        point = state.get("failure_point") or {}
        image = starts.get(point.get("frame_id", ""))
        frame = (image or {}).get("frames", {}).get(point.get("frame_id", ""))
        if image is None or frame is None or frame.get("cursor") != point.get("node_id"):
            return
        image = copy.deepcopy(image)
        if image.get("failure_point"):
            image["failure_point"] = {k: v for k, v in (image["failure_point"] or {}).items() if k != "restore"}
        state["failure_point"] = {**point, "restore": image}

    def save(self, state: RunState, reason: str, node_id: str, fs: str) -> None:
        """Ask for a save when the super-step ends (``is_checkpoint``, ``set_checkpoint``; none under
        ``disabled``): the graph persists the state, then emits ``checkpoint_saved`` with the saved id."""
        if self.ir.global_config.checkpoint_strategy != "disabled":
            state.setdefault("saves", []).append({"reason": reason, "node_id": node_id, "frame": fs})

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
                status = "waiting_approval" if any(w["kind"] == "approval" for w in state["waits"].values()) \
                    else "paused"
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

    def abort_frame(self, frame_id: str) -> None:
        """Cancel the node in progress of a frame another frame just ended (§3.8 step 3, §3.15): its in-flight
        external call is aborted and, like one cut off by a run cancel (§7.10), stays ``started`` in the step
        store. Synchronous, so a canceled frame cannot record anything more."""
        task = self._in_flight.get(frame_id)
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()

    def remaining_s(self, state: RunState) -> float | None:
        """Executing time left before the run deadline (§7.11); None without a deadline."""
        limit = self.ir.global_config.timeout_ms
        if limit is None:
            return None
        hit = state.get("deadline_hit")
        if state.get("recovery") is not None and hit is not None:
            limit = hit + self.recovery_grace_ms
        return (limit - state.get("executed_ms", 0)) / 1000

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
            await self.finish(state, frame, {"status": "failed", "error": _dump(error)})

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
            if current and current.get("data"):
                current["data"].pop("wait_id", None)
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

    # -- one frame, one node ----------------------------------------------------------------------------------
    async def unit(self, state: RunState, frame: Frame) -> None:
        current = frame.get("node")
        if current is None:
            cursor = frame.get("cursor")
            if cursor is None or cursor == frame.get("stop_at"):
                await self.finish(state, frame, {"status": "completed", "error": None})
                return
            limit = self.ir.global_config.max_hops
            owner = self.reentered(state, frame, cursor)
            if frame.get("hops", 0) >= limit or (owner is not None and owner.get("hops", 0) >= limit):
                where = "this frame" if frame.get("hops", 0) >= limit else \
                    f"the frame '{frame_string(owner or frame)}', whose node '{cursor}' this frame re-entered"
                error = ErrorObject(code="max_hops_exceeded", message=f"max_hops {limit} reached in {where}",
                                    node_id=cursor, frame=frame_string(frame))
                await self.emit(NodeError(node_id=cursor, frame=frame_string(frame), error=error))
                await self.finish(state, frame, {"status": "failed", "error": _dump(error)})
                return
            if owner is not None:
                owner["hops"] = owner.get("hops", 0) + 1
            frame["hops"] = frame.get("hops", 0) + 1
            visits = frame.setdefault("visits", {})
            visits[cursor] = visits.get(cursor, 0) + 1
            node = self.ir.nodes[cursor]
            current = frame["node"] = {"id": cursor, "visit": visits[cursor], "started": time.time(), "data": {}}
            await self.emit(NodeStarted(node_id=cursor, frame=frame_string(frame, cursor, visits[cursor]),
                                        node_type=node.type, node_name=node.description, visit=visits[cursor]))
        node = self.ir.nodes[current["id"]]
        try:
            sla = node.sla
            if sla is not None and sla.enforce:
                left = sla.max_duration_ms / 1000 - (time.time() - current["started"])
                try:
                    outcome = await asyncio.wait_for(self.execute(state, frame, node, current), max(0.0, left))
                except TimeoutError:
                    outcome = await self.sla_enforced(state, frame, node, current)
            else:
                outcome = await self.execute(state, frame, node, current)
        except NodeFailure as failure:
            outcome = await self.node_error(state, frame, node, current, failure)
        except StepError as failure:
            outcome = await self.node_error(state, frame, node, current, NodeFailure(failure.error))
        if isinstance(outcome, Next | Terminate):  # §2.3: a write over the state limits fails the writing node
            too_large = _state_too_large(vars_of(state, frame))
            if too_large is not None:
                outcome = await self.node_error(state, frame, node, current, NodeFailure(too_large))
        if outcome is not None:
            await self.apply(state, frame, node, current, outcome)

    async def apply(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                    outcome: Outcome) -> None:
        fs = frame_string(frame, node.id, current["visit"])
        if isinstance(outcome, Routed):
            return
        if isinstance(outcome, Spawn):
            frame["status"] = "waiting"
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
                                      duration_ms=duration))
        if node.is_checkpoint:
            self.save(state, "is_checkpoint", node.id, fs)
        frame["node"] = None
        forget_retries(frame, node.id)
        if isinstance(outcome, Terminate):
            await self.terminate(state, frame, node, outcome)
            return
        assert isinstance(outcome, Next)
        if outcome.error is not None:
            frame["error"] = outcome.error
        frame["cursor"] = outcome.target

    async def sla_enforced(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState) -> Outcome:
        """An enforced SLA expired: the node was canceled at its deadline; the breach is handled at once."""
        sla = node.sla
        assert sla is not None
        current["sla_reported"] = True
        fs = frame_string(frame, node.id, current["visit"])
        elapsed = int((time.time() - current["started"]) * 1000)
        await self.emit(SlaBreached(node_id=node.id, frame=fs, limit_ms=sla.max_duration_ms, elapsed_ms=elapsed,
                                    on_breach=sla.on_breach, escalation_handler=sla.escalation_handler,
                                    enforced=True))
        error = ErrorObject(code="sla_breached", message=f"Node '{node.id}' was canceled at its SLA of "
                            f"{sla.max_duration_ms} ms", node_id=node.id, frame=fs,
                            details={"limit_ms": sla.max_duration_ms, "elapsed_ms": elapsed})
        if sla.on_breach == "fail":
            raise NodeFailure(error)
        if sla.on_breach == "escalate" and sla.escalation_handler is not None:
            return Next(sla.escalation_handler, error=_dump(error))
        return Next(node.next_node)

    async def sla(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                  outcome: Next) -> Next | None:
        sla = node.sla
        if sla is None or current.get("sla_reported"):
            return outcome
        elapsed = int((time.time() - current["started"]) * 1000)
        if elapsed <= sla.max_duration_ms:
            return outcome
        current["sla_reported"] = True  # emitted once: a handler's replacement outcome is not checked again
        fs = frame_string(frame, node.id, current["visit"])
        await self.emit(SlaBreached(node_id=node.id, frame=fs, limit_ms=sla.max_duration_ms, elapsed_ms=elapsed,
                                    on_breach=sla.on_breach, escalation_handler=sla.escalation_handler,
                                    enforced=sla.enforce))
        error = ErrorObject(code="sla_breached", message=f"Node '{node.id}' took {elapsed} ms; its SLA is "
                            f"{sla.max_duration_ms} ms", node_id=node.id, frame=fs,
                            details={"limit_ms": sla.max_duration_ms, "elapsed_ms": elapsed})
        if sla.on_breach == "fail":
            replacement = await self.node_error(state, frame, node, current, NodeFailure(error))
            if replacement is not None:
                await self.apply(state, frame, node, current, replacement)
            return None
        if sla.on_breach == "escalate" and sla.escalation_handler is not None:
            return Next(sla.escalation_handler, error=_dump(error))
        return outcome

    # -- frames ending ------------------------------------------------------------------------------------------
    async def finish(self, state: RunState, frame: Frame, result: dict[str, Any]) -> None:
        frame["status"] = "done"
        frame["result"] = result
        frame["node"] = None
        parent_id = frame.get("parent")
        if parent_id is not None:
            parent = state["frames"][parent_id]
            if parent.get("status") == "waiting":
                parent["status"] = "running"
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
        recovery = state.get("recovery") or {}
        if result["status"] == "completed":
            state["outcome"] = {"status": "completed", "outputs": {}, "recovered_via": recovery.get("node")}
        else:
            state["outcome"] = {"status": "failed", "error": recovery.get("error"), "outputs": {},
                                "recovered_via": recovery.get("node"), "recovery_error": result["error"]}

    async def terminate(self, state: RunState, frame: Frame, node: NodeIR, outcome: Terminate) -> None:
        recovery = state.get("recovery")
        in_recovery = frame["kind"] == "recovery" or any(
            f["kind"] == "recovery" for f in self.ancestors(state, frame))
        out: dict[str, Any] = {"outputs": outcome.outputs}
        if in_recovery and recovery is not None:
            out["recovered_via"] = recovery.get("node")
        if outcome.status == "success":
            out["status"] = "completed"
        else:
            out["status"] = "failed"
            terminated = ErrorObject(code="terminated_failed", message=f"run ended at terminate node '{node.id}' "
                                     "with status failed", node_id=node.id,
                                     frame=frame_string(frame, node.id, (frame.get("visits") or {}).get(node.id, 1)))
            if in_recovery and recovery is not None:
                out["error"] = recovery.get("error")
            else:
                out["error"] = _dump(terminated)
                # §7.12: the terminate node is the failure point (a retry runs it again)
                state["failure_point"] = {"node_id": node.id, "frame_id": frame["id"]}
        self.cancel_frames(state, [f for f in state["frames"].values() if f.get("status") != "done"])
        state["waits"] = {}
        state["outcome"] = out

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

    def ancestors(self, state: RunState, frame: Frame) -> list[Frame]:
        out: list[Frame] = []
        parent = frame.get("parent")
        while parent is not None:
            f = state["frames"][parent]
            out.append(f)
            parent = f.get("parent")
        return out

    def cancel_frames(self, state: RunState, frames: list[Frame]) -> None:
        for f in frames:
            for d in [f, *descendants(state, f)]:
                if d.get("status") != "done":
                    d["status"] = "done"
                    d["result"] = {"status": "canceled", "error": None}
                    for wait_id in d.get("pending", []):
                        state.get("waits", {}).pop(wait_id, None)
                    self.abort_frame(d["id"])

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
        await self.finish(state, frame, {"status": "failed", "error": _dump(error)})
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
            retries = frame.setdefault("retries", {})
            key = f"{node.id}#handler{handler.index}"
            used = retries.get(key, 0)
            if used < handler.max_retries:
                retries[key] = used + 1
                return RetryNode(delay_ms=_handler_delay(handler, used))
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

    async def recovery_steps(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                             handler: ErrorHandlerIR, step: StepIR | None, attempt: int | None) -> None:
        """Run before the handler's action each time it applies (§4.10): once per failing attempt of ``step``."""
        for rs in handler.recovery_steps:
            prefix = f"{step.step_id if step else node.id}/recovery/"
            try:
                await self.run_step(state, frame, node, current, rs, identity_step_id=prefix + rs.step_id,
                                    allow_handlers=False, application=attempt)
            except (StepError, NodeFailure):
                continue  # failures of recovery steps are reported (step_failed) and otherwise ignored

    # -- node types -----------------------------------------------------------------------------------------------
    async def execute(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState) -> Outcome | None:
        p = node.payload
        if isinstance(p, SequencePayload):
            return await self.sequence(state, frame, node, current, p)
        if isinstance(p, LogicPayload):
            for i, rule in enumerate(p.rules):
                if truthy(await self.evaluate(rule.condition, state, frame, node.id, f"/rules/{i}/condition")):
                    return Next(rule.next_node)
            if p.default_next_node is None:
                raise NodeFailure(ErrorObject(code="logic_no_route", message=f"Node '{node.id}': no rule matched and "
                                              "there is no default_next_node"))
            return Next(p.default_next_node)
        if isinstance(p, LoopPayload):
            return await self.loop(state, frame, node, current, p)
        if isinstance(p, ParallelPayload):
            return await self.parallel(state, frame, node, current, p)
        if isinstance(p, ProcessingPayload):
            for op in p.operations:
                await self.operation(state, frame, node, current, op, f"/operations/{op.index}")
            return Next(node.next_node)
        if isinstance(p, VerificationPayload):
            return await self.verification(state, frame, node, p)
        if isinstance(p, TransformPayload):
            return await self.transform(state, frame, node, p)
        if isinstance(p, HumanApprovalPayload):
            return await self.approval(state, frame, node, current, p)
        if isinstance(p, LlmActionPayload):
            return await self.llm_action(state, frame, node, current, p)
        if isinstance(p, SubflowPayload):
            return await self.subflow(state, frame, node, current, p)
        assert isinstance(p, TerminatePayload)
        return await self.terminate_node(state, frame, node, current, p)

    async def sequence(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                       p: SequencePayload) -> Outcome | None:
        data = current["data"]
        start = data.get("index", 0)
        for index in range(start, len(p.steps)):
            data["index"] = index
            step = p.steps[index]
            routed = await self.run_step(state, frame, node, current, step)
            if routed is not None:
                return routed
        data["index"] = len(p.steps)
        for validation in p.validations:
            outcome = await self.validation(state, frame, node, current, validation)
            if outcome is not None:
                return outcome
        return Next(node.next_node)

    async def validation(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                         v: ValidationIR) -> Outcome | None:
        fs = frame_string(frame, node.id, current["visit"])
        base = _path_in_node(node, v) or f"/validations/{v.id}"
        passed = True
        if v.condition is not None:
            passed = truthy(await self.evaluate(v.condition, state, frame, node.id, f"{base}/condition"))
        else:
            action = "wait_for_text" if v.check == "screen_text_contains" else "wait_for_element"
            for i, expected in enumerate(v.expected_values):
                params = {"text": expected} if action == "wait_for_text" else {"target": expected}
                try:
                    result, _ = await self.side_dispatch(node, f"validation/{v.id}/{i}", fs, 1, action, params)
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
            message = await self.render(v.message, state, frame, node.id, None, f"{base}/message", text=True)
        await self.emit(ValidationFailed(node_id=node.id, frame=fs, validation_id=v.id, message=message,
                                         on_failure=v.on_failure))
        error = ErrorObject(code="validation_failed", message=message or f"validation '{v.id}' failed",
                            node_id=node.id, frame=fs, details={"validation_id": v.id})
        if v.on_failure == "retry_node":
            retries = frame.setdefault("retries", {})
            key = f"{node.id}#validation:{v.id}"
            if retries.get(key, 0) < v.max_node_retries:
                retries[key] = retries.get(key, 0) + 1
                return RetryNode()
        raise NodeFailure(error, bypass=v.on_failure == "fail_workflow")

    async def verification(self, state: RunState, frame: Frame, node: NodeIR, p: VerificationPayload) -> Outcome:
        in_progress = frame.get("node")
        fs = frame_string(frame, node.id, in_progress.get("visit", 1) if in_progress else 1)
        for check in p.checks:
            where = _path_in_node(node, check) or f"/checks/{check.id}"
            if truthy(await self.evaluate(check.condition, state, frame, node.id, f"{where}/condition")):
                continue
            if check.on_fail == "warn":
                await self.emit(VerificationWarning(node_id=node.id, frame=fs, check_id=check.id,
                                                    message=check.message))
                continue
            if check.on_fail == "continue":
                continue
            raise NodeFailure(ErrorObject(code="verification_failed", message=check.message or
                                          f"verification check '{check.id}' failed", node_id=node.id, frame=fs,
                                          details={"check_id": check.id}), bypass=True)
        return Next(node.next_node)

    async def loop(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                   p: LoopPayload) -> Outcome:
        data = current["data"]
        fs = frame_string(frame, node.id, current["visit"])
        namespace = vars_of(state, frame)
        if "items" not in data:
            items = await self.evaluate(p.iterator, state, frame, node.id, "/iterator")
            if items is None:
                items = []
            if not isinstance(items, list):
                raise NodeFailure(ErrorObject(code="loop_iterator_invalid", message=f"Node '{node.id}': the iterator "
                                              f"is a {type(items).__name__}, not a list", node_id=node.id, frame=fs))
            n = len(items) if p.max_iterations is None else min(len(items), p.max_iterations)
            data.update({"items": items, "n": n, "i": 0, "collected": [], "errors": [], "child": None,
                         "succeeded": 0, "failed": 0})
            await self.emit(LoopStarted(node_id=node.id, frame=fs, total=len(items), iterations=n))
        elif data.get("child") is not None:
            child = state["frames"][data["child"]]
            i = data["i"]
            result = child.get("result") or {}
            if result.get("status") == "completed":
                data["succeeded"] += 1
                if p.collect_variable:
                    if p.collect_expression is not None:
                        value = await self.render(p.collect_expression, state, frame, node.id, None,
                                                  "/collect_expression")
                    else:
                        value = data["items"][i]
                    data["collected"].append(value)
            else:
                data["failed"] += 1
                error = ErrorObject.model_validate(result.get("error") or {
                    "code": "internal_error", "message": "iteration failed", "retryable": True})
                await self.emit(LoopIterationFailed(node_id=node.id, frame=fs, iteration=i, error=error))
                if not p.continue_on_error:
                    raise NodeFailure(ErrorObject(code="loop_iteration_failed", message=f"Node '{node.id}': "
                                                  f"iteration {i} failed: {error.message}", node_id=node.id, frame=fs,
                                                  details={"iteration": i}, cause=_dump(error)))
                data["errors"].append({"iteration": i, "error": _dump(error)})
            data["i"] = i + 1
            data["child"] = None
        i = data["i"]
        if i < data["n"]:
            item = data["items"][i]
            namespace[p.iterator_variable] = copy.deepcopy(item)
            if p.index_variable:
                namespace[p.index_variable] = i
            await self.emit(LoopIteration(node_id=node.id, frame=fs, iteration=i, total=data["n"],
                                          item_preview=format_embedded(item)[:256]))
            segment = f"{node.id}{'#' + str(current['visit']) if current['visit'] > 1 else ''}[{i}]"
            child = new_frame(state, "iteration", frame, _join(frame.get("path", ""), segment), p.body_node, node.id,
                              loop={"index": i, "item": item})
            data["child"] = child["id"]
            return Spawn()
        if p.collect_variable:
            namespace[p.collect_variable] = data["collected"]
        if p.errors_variable:
            namespace[p.errors_variable] = data["errors"]
        await self.emit(LoopCompleted(node_id=node.id, frame=fs, iterations=data["n"], succeeded=data["succeeded"],
                                      failed=data["failed"]))
        return Next(node.next_node)

    async def parallel(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                       p: ParallelPayload) -> Outcome:
        data = current["data"]
        fs = frame_string(frame, node.id, current["visit"])
        namespace = vars_of(state, frame)
        segment_base = f"{node.id}{'#' + str(current['visit']) if current['visit'] > 1 else ''}"
        if "snapshot" not in data:
            data.update({"snapshot": copy.deepcopy(namespace), "frames": {}, "queue": [b.branch_id for b in
                                                                                       p.branches],
                         "status": {}, "errors": {}, "winner": None})
            await self.emit(ParallelStarted(node_id=node.id, frame=fs, branches=[b.branch_id for b in p.branches],
                                            wait_strategy=p.wait_strategy))
        starts = {b.branch_id: b.start_node for b in p.branches}
        # record finished branches
        for bid, fid in data["frames"].items():
            if bid in data["status"]:
                continue
            child = state["frames"][fid]
            if child.get("status") != "done":
                continue
            result = child.get("result") or {}
            status = result.get("status", "failed")
            data["status"][bid] = status
            error = result.get("error")
            data["errors"][bid] = error
            await self.emit(ParallelBranchCompleted(node_id=node.id, frame=fs, branch_id=bid, status=status,
                                                    error=ErrorObject.model_validate(error) if error else None))
            if status == "completed" and p.wait_strategy == "any" and data["winner"] is None:
                data["winner"] = bid
            if status == "failed" and p.branch_failure == "fail":
                await self.cancel_branches(state, node, fs, data)
                raise NodeFailure(ErrorObject(code="parallel_branch_failed", message=f"Node '{node.id}': branch "
                                              f"'{bid}' failed", node_id=node.id, frame=fs,
                                              details={"branch_id": bid}, cause=error))
        if data["winner"] is not None:
            await self.cancel_branches(state, node, fs, data)
        # start queued branches up to max_concurrency
        running = [bid for bid in data["frames"] if bid not in data["status"]]
        limit = p.max_concurrency or len(p.branches)
        while data["queue"] and len(running) < limit and data["winner"] is None:
            bid = data["queue"].pop(0)
            child = new_frame(state, "branch", frame, _join(frame.get("path", ""), f"{segment_base}/{bid}"),
                              starts[bid], node.next_node, vars_=copy.deepcopy(data["snapshot"]))
            data["frames"][bid] = child["id"]
            running.append(bid)
        if running:
            return Spawn()
        # merge (§3.8 step 5)
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
                await self.emit(ParallelMergeConflict(node_id=node.id, frame=fs, variable=key, branches=branches))
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
        await self.emit(ParallelCompleted(node_id=node.id, frame=fs, succeeded=succeeded, failed=failed,
                                          canceled=canceled, winner=data["winner"]))
        return Next(node.next_node)

    async def cancel_branches(self, state: RunState, node: NodeIR, fs: str, data: dict[str, Any]) -> None:
        for bid, fid in data["frames"].items():
            if bid in data["status"]:
                continue
            self.cancel_frames(state, [state["frames"][fid]])
            data["status"][bid] = "canceled"
            data["errors"][bid] = None
            await self.emit(ParallelBranchCompleted(node_id=node.id, frame=fs, branch_id=bid, status="canceled"))
        for bid in data["queue"]:  # never started (max_concurrency): canceled too, and reported like the others
            data["status"][bid] = "canceled"
            data["errors"][bid] = None
            await self.emit(ParallelBranchCompleted(node_id=node.id, frame=fs, branch_id=bid, status="canceled"))
        data["queue"] = []

    async def transform(self, state: RunState, frame: Frame, node: NodeIR, p: TransformPayload) -> Outcome:
        from langorch_runtime.transforms import run_transformation

        namespace = vars_of(state, frame)
        for t in p.transformations:
            params = await self.render(t.params, state, frame, node.id, None, f"/transformations/{t.index}/params")
            try:
                value = run_transformation(t, params, self.scope(state, frame, node.id))
            except StepError as exc:
                raise NodeFailure(exc.error.model_copy(update={"node_id": node.id})) from exc
            namespace[t.output_variable] = value
        return Next(node.next_node)

    async def approval(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                       p: HumanApprovalPayload) -> Outcome:
        data = current["data"]
        fs = frame_string(frame, node.id, current["visit"])
        gc = self.ir.global_config
        resolution: dict[str, Any] | None = None
        if "wait_id" in data:
            resolution = state.get("resolutions", {}).pop(data["wait_id"], None)
            if resolution is None:
                return Pause(data["wait_id"], "awaiting_approval")
            decision = self.decision_record(p, resolution, data["wait_id"])
        elif node.id in gc.test_data_overrides:
            override = gc.test_data_overrides[node.id]
            await self.emit(StepTestOverrideApplied(node_id=node.id, frame=fs, override_key=node.id))
            raw = override if isinstance(override, dict) else {"decision": override}
            decision = self.decision_record(p, {**raw, "source": "test_override"}, None)
        elif self.dry_run():
            auto = p.options[0] if p.decision_type == "select_option" and p.options else "approved"
            decision = self.decision_record(p, {"decision": auto, "payload": {} if p.decision_type ==
                                                "provide_input" else None, "source": "dry_run"}, None)
            route = self.route_decision(p, decision)
            await self.emit(ApprovalAutoResolved(node_id=node.id, frame=fs, decision=auto,
                                                 payload=decision.get("payload"), routed_to=route))
            self.store_decision(state, frame, node, p, decision)
            return Next(route)
        else:
            prompt = await self.render(p.prompt, state, frame, node.id, None, "/prompt", text=True)
            context = None
            if p.context_data is not None:
                context = await self.render(p.context_data, state, frame, node.id, None, "/context_data")
            # a retried run asks again: its earlier approvals were canceled when it ended
            identity = f"{node.id}:approval:{fs}" + (f":retry{self.run.retry_epoch}" if self.run.retry_epoch else "")
            record = await self.steps.get(identity)
            known = (record.result or {}) if record is not None else {}
            approval_id = str(known.get("approval_id") or new_id())
            expires_at = known.get("expires_at")
            if record is None:
                if p.timeout_ms is not None:
                    expires_at = format_time(datetime.now(UTC) + timedelta(milliseconds=p.timeout_ms))
                await self.steps.put(identity, StepRecord(
                    status="started", attempt=1, idempotency_key=approval_id, node_id=node.id, step_id="approval",
                    frame=fs, result={"approval_id": approval_id, "expires_at": expires_at, "announced": False},
                    updated_at=now_iso()))
            suspends = len(self.runnable(state)) <= 1
            state.setdefault("waits", {})[approval_id] = {
                "kind": "approval", "id": approval_id, "node_id": node.id, "step_id": None, "frame_id": frame["id"],
                "frame": fs, "expires_at": expires_at, "suspends_run": suspends,
            }
            data["wait_id"] = approval_id
            if not known.get("announced"):
                input_schema = {k: v.model_dump(mode="json", exclude={"has_default"}, exclude_none=True)
                                for k, v in p.input_schema.items()}
                await self.emit(ApprovalRequested(
                    node_id=node.id, frame=fs, approval_id=approval_id, node_name=node.description,
                    decision_type=p.decision_type, options=p.options, prompt=prompt, context_data=context,
                    expires_at=expires_at, timeout_action=p.timeout_action, approval_level=p.approval_level,
                    escalation_contact=p.escalation_contact, input_schema=input_schema, suspends_run=suspends))
                if self.on_approval is not None:
                    await self.on_approval({
                        "approval_id": approval_id, "run_id": self.run.run_id,
                        "procedure_id": self.ir.procedure_id, "procedure_version": self.ir.version,
                        "project_id": self.run.run_created.get("project_id"), "node_id": node.id,
                        "node_name": node.description, "prompt": prompt, "context_data": context,
                        "decision_type": p.decision_type, "options": p.options, "input_schema": input_schema,
                        "expires_at": expires_at, "timeout_action": p.timeout_action,
                        "approval_level": p.approval_level, "escalation_contact": p.escalation_contact})
                await self.steps.put(identity, StepRecord(
                    status="started", attempt=1, idempotency_key=approval_id, node_id=node.id, step_id="approval",
                    frame=fs, result={"approval_id": approval_id, "expires_at": expires_at, "announced": True},
                    updated_at=now_iso()))
            return Pause(approval_id, "awaiting_approval")
        route = self.route_decision(p, decision)
        self.store_decision(state, frame, node, p, decision)
        if not (resolution or {}).get("_announced"):
            await self.emit(self.decision_received(node, fs, p, decision, resumes_run=resolution is not None))
        return Next(route)

    def decision_received(self, node: NodeIR, fs: str, p: HumanApprovalPayload, decision: dict[str, Any],
                          resumes_run: bool) -> ApprovalDecisionReceived:
        return ApprovalDecisionReceived(
            node_id=node.id, frame=fs, approval_id=decision.get("approval_id"), status=decision["status"],
            decision=decision.get("decision"), decided_by=decision.get("decided_by"), comment=decision.get("comment"),
            source=decision.get("source") or "human", routed_to=self.route_decision(p, decision),
            resumes_run=resumes_run)

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
            decision = self.decision_record(node.payload, resolution, wait["id"])
            return self.decision_received(node, wait["frame"], node.payload, decision, resumes_run=True)
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

    def decision_record(self, p: HumanApprovalPayload, raw: Mapping[str, Any], approval_id: str | None
                        ) -> dict[str, Any]:
        decision = raw.get("decision")
        if decision in ("approve", "reject"):
            decision = f"{decision}d"
        status = raw.get("status")
        if status is None:
            status = decision if decision in ("approved", "rejected") else "decided"
        return {"approval_id": approval_id or raw.get("approval_id"), "status": status, "decision": decision,
                "decided_by": raw.get("decided_by"), "decided_at": raw.get("decided_at") or now_iso(),
                "comment": raw.get("comment"), "payload": raw.get("payload"), "source": raw.get("source") or "human"}

    def route_decision(self, p: HumanApprovalPayload, d: Mapping[str, Any]) -> str | None:
        decision, status = d.get("decision"), d.get("status")
        if status == "escalated" or decision == "timeout":
            return p.on_timeout if p.on_timeout is not None else p.on_reject
        if decision == "approved":
            return p.on_approve
        if decision == "rejected":
            return p.on_reject
        if isinstance(decision, str) and decision in p.options:
            return p.option_routes.get(decision, p.on_approve)
        return p.on_reject

    def store_decision(self, state: RunState, frame: Frame, node: NodeIR, p: HumanApprovalPayload,
                       decision: dict[str, Any]) -> None:
        namespace = vars_of(state, frame)
        records = dict(namespace.get(APPROVALS_KEY, {}))
        records[node.id] = decision
        namespace[APPROVALS_KEY] = records
        if p.decision_variable:
            namespace[p.decision_variable] = decision.get("decision")
        if p.decision_type == "provide_input" and p.input_variable:
            namespace[p.input_variable] = decision.get("payload")

    async def llm_action(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                         p: LlmActionPayload) -> Outcome:
        from langorch_runtime.mappings import apply_output_mapping

        fs = frame_string(frame, node.id, current["visit"])
        gc = self.ir.global_config
        if node.id in gc.test_data_overrides:
            value = gc.test_data_overrides[node.id]
            text = value if isinstance(value, str) else _json(value)
            await self.emit(StepTestOverrideApplied(node_id=node.id, step_id="llm", frame=fs, override_key=node.id))
        elif self.dry_run():
            text = ""
            await self.emit(DryRunStepSkipped(node_id=node.id, step_id="llm", frame=fs, action="chat",
                                              binding_kind="llm"))
        elif gc.mock_external_calls:
            text = ""
            await self.emit(StepMockApplied(node_id=node.id, step_id="llm", frame=fs, action="chat",
                                            binding_kind="llm"))
        else:
            text = await self.llm_call(state, frame, node, current, p, fs)
        namespace = vars_of(state, frame)
        if p.outputs:
            for var, mapping in p.outputs.items():
                try:
                    value, warns = apply_output_mapping(mapping, text, self.scope(state, frame, node.id), llm=True)
                except StepError as exc:
                    raise NodeFailure(exc.error.model_copy(update={"node_id": node.id})) from exc
                namespace[var] = value
                for w in warns:
                    await self.emit(TemplateWarning(variable=var, reason=w, location={
                        "node_id": node.id, "step_id": None, "field": f"/outputs/{var}"}))
        else:
            namespace["llm_output"] = text
        if p.orchestration_mode:
            requested = None
            try:
                import json as _jsonlib

                parsed = _jsonlib.loads(text)
                requested = parsed.get("_next_node") if isinstance(parsed, dict) else None
            except ValueError:
                requested = None
            valid = isinstance(requested, str) and requested in p.branches
            chosen = requested if valid else (node.next_node or (p.branches[0] if p.branches else None))
            from ckp_core.run_events import LlmRouteSelected

            await self.emit(LlmRouteSelected(node_id=node.id, frame=fs, requested=requested
                                             if isinstance(requested, str) else None, chosen=chosen or "",
                                             valid=valid))
            return Next(chosen)
        return Next(node.next_node)

    async def llm_call(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                       p: LlmActionPayload, fs: str) -> str:
        """The model call of an ``llm_action`` (§3.12, §7.13), recorded under step id ``llm`` so a replay
        reuses the completion instead of calling again (§7.4)."""
        from langorch_runtime.llm import build_messages, request_for, resolve_image_artifacts

        if self.llm is None:
            raise NodeFailure(ErrorObject(code="llm_error", node_id=node.id, frame=fs, message="this runtime has "
                                          "no LLM client", details={"reason": "not_configured"}))
        identity = f"{node.id}:llm:{fs}"
        record = await self.steps.get(identity)
        if record is not None and record.status == "completed" and isinstance(record.result, dict):
            await self.emit(StepReplayed(node_id=node.id, step_id="llm", frame=fs, action="chat",
                                         output_variable=None, original_attempt=record.attempt))
            return str(record.result.get("text") or "")
        system = None
        if p.system_prompt is not None:
            system = await self.render(p.system_prompt, state, frame, node.id, None, "/system_prompt", text=True)
        prompt = await self.render(p.prompt, state, frame, node.id, None, "/prompt", text=True)
        attachments = [(a, await self.render(a.source, state, frame, node.id, None, f"/attachments/{i}/source"))
                       for i, a in enumerate(p.attachments)]
        try:
            if self.artifacts is not None:
                attachments = await resolve_image_artifacts(attachments, self.artifacts, self.root_run_id)
            messages = build_messages(p, system, prompt, attachments)
        except StepError as exc:
            raise NodeFailure(exc.error.model_copy(update={"node_id": node.id, "frame": fs})) from exc
        attempt = (record.attempt + (1 if record.status == "failed" else 0)) if record is not None else 1
        retries = 0
        counters = state.setdefault("llm", {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
        while True:
            key = idempotency_key(self.run.run_id, node.id, "llm", fs, attempt)
            await self.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=key,
                                                      node_id=node.id, step_id="llm", frame=fs, updated_at=now_iso()))
            request = request_for(p, self.ir.global_config, messages, spent_usd=float(counters["cost_usd"]),
                                  idempotency_key=key, emit=self.emit, node_id=node.id, frame=fs, attempt=attempt)
            try:
                async with self.admitted(node.id, "llm", fs, attempt):
                    result = await self.llm.complete(request)
                break
            except StepError as exc:
                error = exc.error.model_copy(update={"node_id": node.id, "step_id": "llm", "frame": fs,
                                                     "attempt": attempt})
            policy = p.retry
            if policy is not None and retries < policy.max_retries and retry_allowed(policy, error):
                delay = after_retry_after(retry_delay(policy, retries), error)
                retries += 1
                await self.emit(StepRetrying(node_id=node.id, step_id="llm", frame=fs, attempt=attempt, action="chat",
                                             delay_ms=delay, next_attempt=attempt + 1, source="retry_policy",
                                             error=error))
                await self.sleep(delay / 1000)
                attempt += 1
                continue
            await self.record_failed(identity, key, node, "llm", fs, attempt, error)
            raise NodeFailure(error)
        counters["prompt_tokens"] += result.usage.prompt_tokens
        counters["completion_tokens"] += result.usage.completion_tokens
        counters["cost_usd"] += result.estimated_cost_usd or 0.0
        await self.steps.put(identity, StepRecord(status="completed", attempt=attempt, idempotency_key=key,
                                                  node_id=node.id, step_id="llm", frame=fs,
                                                  result={"text": result.text, "model": result.model},
                                                  updated_at=now_iso()))
        return str(result.text)

    async def subflow(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                      p: SubflowPayload) -> Outcome:
        """A child run (§3.9): started once per visit, awaited, its outputs mapped back."""
        fs = frame_string(frame, node.id, current["visit"])
        gc = self.ir.global_config
        data = current["data"]
        namespace = vars_of(state, frame)
        if node.id in gc.test_data_overrides and "child" not in data:
            outputs = gc.test_data_overrides[node.id]
            await self.emit(StepTestOverrideApplied(node_id=node.id, step_id="subflow", frame=fs,
                                                    override_key=node.id))
            await self.map_child_outputs(state, frame, node, p, outputs if isinstance(outputs, dict) else {}, {})
            return Next(node.next_node)
        if self.children is None:
            raise NodeFailure(ErrorObject(code="subflow_failed", node_id=node.id, frame=fs, message="this runtime "
                                          "has no child-run support configured", details={"reason": "no_children"}))
        if "child" in data:
            child_id = data["child"]
            resolution = state.setdefault("resolutions", {}).pop(child_id, None)
            if resolution is None:
                state.setdefault("waits", {}).setdefault(child_id, {
                    "kind": "child_run", "id": child_id, "node_id": node.id, "step_id": None,
                    "frame_id": frame["id"], "frame": fs, "expires_at": None, "suspends_run": True})
                return Pause(child_id, "child_run")
            status = resolution.get("status")
            base = {"node_id": node.id, "frame": fs, "child_run_id": child_id, "procedure_id": p.procedure_id,
                    "version": data.get("version") or "", "resumes_run": True}
            if status == "completed":
                mapped = await self.map_child_outputs(state, frame, node, p, resolution.get("outputs") or {},
                                                      resolution.get("variables") or {})
                await self.emit(SubflowCompleted(**base, mapped_variables=mapped))
                return Next(node.next_node)
            error = ErrorObject.model_validate(resolution.get("error") or {
                "code": "canceled" if status == "canceled" else "internal_error", "retryable": status != "canceled",
                "message": f"child run {child_id} ended {status}"})
            await self.emit(SubflowFailed(**base, on_failure=p.on_failure, error=error))
            if p.on_failure == "continue":
                return Next(node.next_node)
            if p.on_failure == "retry" and data.get("attempt", 1) <= p.max_retries:
                return await self.start_child(state, frame, node, current, p, fs, rerun_of=child_id)
            raise NodeFailure(ErrorObject(code="subflow_failed", node_id=node.id, frame=fs,
                                          message=f"child run {child_id} of '{p.procedure_id}' {status}: "
                                          f"{error.message}", cause=_dump(error)))
        del namespace  # the child gets inputs only through its mapping
        return await self.start_child(state, frame, node, current, p, fs, rerun_of=None)

    async def start_child(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                          p: SubflowPayload, fs: str, rerun_of: str | None) -> Outcome:
        assert self.children is not None
        data = current["data"]
        chain = list(self.run.run_created.get("call_chain") or [self.ir.procedure_id])
        if p.procedure_id in chain:
            raise NodeFailure(ErrorObject(code="subflow_recursion", node_id=node.id, frame=fs,
                                          message=f"subflow '{p.procedure_id}' is already on the call chain "
                                          f"({' -> '.join([*chain, p.procedure_id])})"))
        if len(chain) >= 10:
            raise NodeFailure(ErrorObject(code="subflow_depth_exceeded", node_id=node.id, frame=fs,
                                          message=f"a chain of {len(chain)} runs may not start another child"))
        namespace = vars_of(state, frame)
        inputs: dict[str, Any] = {}
        if p.inherit_context:
            inputs.update({k: copy.deepcopy(v) for k, v in namespace.items() if k != APPROVALS_KEY})
        for key, path in p.input_paths.items():
            inputs[key] = await self.evaluate(path, state, frame, node.id, f"/input_mapping/{key}")
        mapped = await self.render(p.input_mapping, state, frame, node.id, None, "/input_mapping")
        if isinstance(mapped, dict):
            inputs.update(mapped)
        attempt = data.get("attempt", 0) + 1
        identity = f"{node.id}:subflow:{fs}:{attempt}"
        record = await self.steps.get(identity)
        child_id = str((record.result or {}).get("child_run_id")) if record and record.result else new_id()
        if record is None:
            await self.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=child_id,
                                                      node_id=node.id, step_id="subflow", frame=fs,
                                                      result={"child_run_id": child_id}, updated_at=now_iso()))
        version = await self.children.start(
            parent_run_id=self.run.run_id, parent_node_id=node.id,
            root_run_id=self.run.run_created.get("root_run_id") or self.run.run_id,
            call_chain=[*chain, p.procedure_id], procedure_id=p.procedure_id, version=p.version, inputs=inputs,
            child_run_id=child_id, rerun_of=rerun_of,
            dry_run=self.dry_run(),
            project_id=self.run.run_created.get("project_id"))
        data.update({"child": child_id, "version": version, "attempt": attempt})
        suspends = len(self.runnable(state)) <= 1
        state.setdefault("waits", {})[child_id] = {
            "kind": "child_run", "id": child_id, "node_id": node.id, "step_id": None, "frame_id": frame["id"],
            "frame": fs, "expires_at": None, "suspends_run": suspends}
        await self.emit(SubflowStarted(node_id=node.id, frame=fs, child_run_id=child_id, procedure_id=p.procedure_id,
                                       version=version, attempt=attempt, suspends_run=suspends))
        return Pause(child_id, "child_run")

    async def map_child_outputs(self, state: RunState, frame: Frame, node: NodeIR, p: SubflowPayload,
                                outputs: dict[str, Any], variables: dict[str, Any]) -> list[str]:
        namespace = vars_of(state, frame)
        if not p.output_mapping:
            namespace["subflow_output"] = copy.deepcopy(outputs)
            return ["subflow_output"]
        for var, path in p.output_mapping.items():
            root = path.roots[0] if path.roots else None
            source = outputs if root is not None and root in outputs else variables
            unresolved: list[tuple[str, str]] = []
            namespace[var] = evaluate(path.compiled, MappingScope(source), _collector(unresolved))
            for variable, reason in unresolved[:1]:
                await self.emit(TemplateWarning(variable=variable, reason=reason, location={
                    "node_id": node.id, "step_id": None, "field": f"/output_mapping/{var}"}))
        return list(p.output_mapping)

    async def terminate_node(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                             p: TerminatePayload) -> Outcome:
        fs = frame_string(frame, node.id, current["visit"])
        in_recovery = frame["kind"] == "recovery" or any(f["kind"] == "recovery" for f in self.ancestors(state, frame))
        action_lists = [("cleanup", p.cleanup_actions)]
        if p.status == "failed" or in_recovery:
            action_lists.append(("error_actions", p.error_actions))
        for label, actions in action_lists:
            for op in actions:
                try:
                    await self.operation(state, frame, node, current, op,
                                         f"/{'cleanup_actions' if label == 'cleanup' else label}/{op.index}")
                except (StepError, NodeFailure) as exc:
                    error = exc.error
                    await self.emit(StepFailed(node_id=node.id, step_id=f"{label}[{op.index}]", frame=fs, attempt=1,
                                               action=op.action, error=error))
        outputs = await self.render(p.outputs, state, frame, node.id, None, "/outputs")
        if p.final_audit_log is not None and self.ir.global_config.audit_enabled:
            entry = await self.render(p.final_audit_log, state, frame, node.id, None, "/final_audit_log")
            await self.emit(AuditLog(node_id=node.id, frame=fs, entry=entry))
        return Terminate(p.status, outputs if isinstance(outputs, dict) else {})

    # -- operations and steps (§4.3, §4.7) ---------------------------------------------------------------------
    async def operation(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                        op: OperationIR, base: str, step_id: str | None = None) -> Any:
        from langorch_runtime.operations import OpContext, apply_writes, run_operation

        layer = None
        if op.secrets:
            as_step = StepIR(step_id=step_id or f"op{op.index}", action=op.action, params=op.params,
                             binding={"kind": "internal", "action": op.action}, secrets=op.secrets)
            layer = await self.secret_layer(node, as_step, as_step.step_id, internal=True)
        params = await self.render(op.params, state, frame, node.id, step_id, base, locals_=layer)
        namespace = vars_of(state, frame)
        ctx = OpContext(node_id=node.id, step_id=step_id, frame=frame_string(frame, node.id, current.get("visit", 1)),
                        logging_level=self.ir.global_config.logging_level, sleep=self.sleep,
                        scope=self.scope(state, frame, node.id, step_id), notifier=self.notifier())
        try:
            outcome = await run_operation(op, params, namespace, ctx)
        except StepError as exc:
            raise NodeFailure(exc.error.model_copy(update={"node_id": node.id, "step_id": step_id})) from exc
        if self.on_sensitive is not None and (outcome.sensitive_outputs or outcome.sensitive_values):
            self.on_sensitive(set(outcome.sensitive_outputs), set(outcome.sensitive_values))
        for event in outcome.events:
            await self.emit(event)
        if outcome.checkpoint:
            self.save(state, "set_checkpoint", node.id, frame_string(frame, node.id, current.get("visit", 1)))
        writes = dict(outcome.writes)
        if op.output_variable:
            writes[op.output_variable] = outcome.result
        apply_writes(namespace, writes)
        return outcome.result

    async def run_step(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState, step: StepIR,
                       identity_step_id: str | None = None, allow_handlers: bool = True,
                       application: int | None = None) -> Outcome | None:
        """Run one step to completion (§4.7). Returns an outcome when a handler routes the node elsewhere.
        ``application``: a recovery step's run for the failing step's attempt ``application``; a record completed
        for an earlier attempt is run again (as attempt ``application``), one for this attempt is replayed."""
        from langorch_runtime.operations import apply_writes

        step_id = identity_step_id or step.step_id
        fs = frame_string(frame, node.id, current["visit"])
        namespace = vars_of(state, frame)
        base = _path_in_node(node, step) or f"/steps/{step.step_id}"
        if step.idempotency_key is not None:
            rendered = await self.render(step.idempotency_key, state, frame, node.id, step.step_id,
                                         f"{base}/idempotency_key", text=True)
            identity = f"custom:{rendered}"
            key_base = f"lo1:{rendered}"
        elif node.idempotency_key is not None:
            data = current.setdefault("data", {})
            rendered = data.get("idempotency_key")
            if rendered is None:  # rendered once per node visit, before its first step: writes of steps don't count
                rendered = data["idempotency_key"] = await self.render(
                    node.idempotency_key, state, frame, node.id, None, "/idempotency_key", text=True)
            identity = f"custom:{rendered}/{step_id}"
            key_base = f"lo1:{rendered}/{step_id}"
        else:
            identity = natural_identity(node.id, step_id, fs)
            key_base = None
        record = await self.steps.get(identity)
        again = application is not None and record is not None and record.attempt < application
        if record is not None and record.status == "completed" and not again:
            apply_writes(namespace, record.writes)
            await self.emit(StepReplayed(node_id=node.id, step_id=step_id, frame=fs, action=step.action,
                                         output_variable=step.output_variable, original_attempt=record.attempt))
            return None
        attempt = record.attempt if record is not None else 1
        if record is not None and record.status == "failed":
            attempt += 1  # a retried run (or re-run node) executes the failed step as a new attempt (§7.12)
        if again and application is not None:
            attempt, record = max(attempt, application), None  # recovery steps run each time a handler applies
        preset: tuple[Any] | ErrorObject | None = None
        delegation = (record.result or {}).get("delegation") if record is not None and record.status == "started" \
            and isinstance(record.result, dict) else None
        if delegation is not None:
            resolution = state.setdefault("resolutions", {}).pop(delegation["id"], None)
            if resolution is None:
                state.setdefault("waits", {}).setdefault(delegation["id"], {
                    "kind": "callback", "id": delegation["id"], "node_id": node.id, "step_id": step_id,
                    "frame_id": frame["id"], "frame": fs, "expires_at": delegation.get("expires_at"),
                    "suspends_run": True})
                return Pause(delegation["id"], "workflow_pending")
            status = resolution.get("status", "success")
            if resolution.get("_announced"):
                pass
            elif status == "timed_out":
                await self.emit(CallbackTimedOut(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                 delegation_id=delegation["id"],
                                                 timeout_s=float(delegation.get("timeout_s") or 0), resumes_run=True))
            else:
                await self.emit(WorkflowCallbackReceived(
                    node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, delegation_id=delegation["id"],
                    status=status, output=resolution.get("output"), error=resolution.get("error"),
                    error_code=resolution.get("error_code"), resumes_run=True))
            if status == "success":
                preset = (resolution.get("output"),)
            elif status == "timed_out":
                preset = ErrorObject(code="callback_timeout", retryable=True, message=f"no callback for step "
                                     f"'{step_id}' within {delegation.get('timeout_s')} s")
            else:
                preset = ErrorObject(code=resolution.get("error_code") or "workflow_failed",
                                     error_code=resolution.get("error_code"),
                                     message=str(resolution.get("error") or "the agent reported a failure"))
            if isinstance(resolution.get("artifacts"), list) and resolution["artifacts"]:
                # the callback's own artifacts (api.md §5.10, ckp.md §4.12), whatever its status
                await self.harvest(node, step_id, fs, attempt, {"artifacts": resolution["artifacts"]})
        if step.wait_ms and record is None:
            await self.sleep(step.wait_ms / 1000)
        # retry budgets of this step instance live in the node's persisted data: an async step pauses the run
        # between attempts and must not get a fresh budget on every resume (§4.8, §4.10); a run retry does
        books = current.setdefault("data", {}).setdefault("retry_budgets", {})
        budget = books.get(identity)
        if budget is None or budget.get("epoch") != self.run.retry_epoch:
            budget = books[identity] = {"epoch": self.run.retry_epoch, "policy": 0, "handlers": {}}
        handler_retries: dict[str, int] = budget["handlers"]
        policy_retries = int(budget["policy"])
        while True:
            key = custom_idempotency_key(key_base, attempt) if key_base else idempotency_key(
                self.run.run_id, node.id, step_id, fs, attempt)
            internal = step.binding.kind == "internal"
            binding_kind = "internal" if internal else "channel"
            started = time.monotonic()
            if preset is not None:
                outcome_preset, preset = preset, None
                if isinstance(outcome_preset, tuple):
                    result = outcome_preset[0]
                    writes = {} if step.output_variable or not isinstance(result, dict) else dict(result)
                    break
                error = outcome_preset.model_copy(update={"node_id": node.id, "step_id": step_id, "frame": fs,
                                                          "attempt": attempt})
            else:
                layer = await self.secret_layer(node, step, step_id, internal) if step.secrets else None
                params = await self.render(step.params, state, frame, node.id, step.step_id, base, locals_=layer)
                same = record is not None and record.attempt == attempt and isinstance(record.result, dict)
                delegation_id = str((record.result or {}).get("delegation_id") if same and record else "") or new_id()
                await self.steps.put(identity, StepRecord(
                    status="started", attempt=attempt, idempotency_key=key, node_id=node.id, step_id=step_id,
                    frame=fs, result={"delegation_id": delegation_id}, updated_at=now_iso()))
                announce = _Announcement(self.emit, StepStarted(
                    node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, action=step.action,
                    binding_kind=binding_kind, channel=step.binding.channel, idempotency_key=key, params=params))
                if internal or not self.dispatcher.announces_agent:
                    await announce(None)
                try:
                    result, writes = await self.attempt(state, frame, node, step, step_id, fs, params, attempt, key,
                                                        namespace, delegation_id, announce)
                    await announce(None)
                    break
                except StepError as exc:
                    await announce(None)
                    binding_kind = announce.binding_kind
                    error = exc.error.model_copy(update={"node_id": node.id, "step_id": step_id, "frame": fs,
                                                         "attempt": attempt})
                except Delegated as delegated:
                    await announce(None)
                    return await self.delegated(state, frame, node, step, step_id, fs, attempt, key, identity,
                                                delegated)
            if error.code == "step_timeout":
                await self.emit(StepTimeout(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            action=step.action, timeout_ms=step.timeout_ms or
                                            int(error.details.get("timeout_ms") or 0),  # the binding default
                                            binding_kind=binding_kind))
            policy = step.retry
            if policy is not None and policy_retries < policy.max_retries and retry_allowed(policy, error):
                delay = after_retry_after(retry_delay(policy, policy_retries), error)
                policy_retries += 1
                budget["policy"] = policy_retries
                await self.emit(StepRetrying(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                             action=step.action, delay_ms=delay, next_attempt=attempt + 1,
                                             source="retry_policy", error=error))
                await self.sleep(delay / 1000)
                attempt += 1
                continue
            if self.ir.global_config.screenshot_on_fail:  # every step (§4.7), internal ones included
                await self.screenshot(node, step_id, fs, attempt, "screenshot_on_fail", error)
            if allow_handlers:
                handled = await self.step_handlers(state, frame, node, current, step, step_id, fs, attempt, error,
                                                   handler_retries)
                if handled == "retry":
                    attempt += 1
                    continue
                if isinstance(handled, tuple):
                    kind, value = handled
                    if kind == "suppress":
                        namespace_writes: dict[str, Any] = {}
                        if step.output_variable:
                            namespace_writes[step.output_variable] = None
                        apply_writes(namespace, namespace_writes)
                        await self.steps.put(identity, StepRecord(
                            status="completed", attempt=attempt, idempotency_key=key, node_id=node.id,
                            step_id=step_id, frame=fs, result=None, writes=namespace_writes, updated_at=now_iso()))
                        await self.emit(StepCompleted(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                      action=step.action, output_variable=step.output_variable,
                                                      duration_ms=int((time.monotonic() - started) * 1000),
                                                      retry_count=attempt - 1, suppressed_error=error))
                        return None
                    if kind == "route":
                        await self.fail_step(identity, key, node, step, step_id, fs, attempt, error)
                        return await self.route_to_fallback(frame, node, fs, error, value)
                    if kind == "retry_node":
                        await self.fail_step(identity, key, node, step, step_id, fs, attempt, error)
                        return RetryNode(delay_ms=int(value))
            await self.fail_step(identity, key, node, step, step_id, fs, attempt, error)
            raise NodeFailure(error, step_level=True)
        await self.complete_step(state, frame, node, step, step_id, fs, attempt, key, identity, base, namespace,
                                 internal, result, writes, started)
        return None

    async def complete_step(self, state: RunState, frame: Frame, node: NodeIR, step: StepIR, step_id: str, fs: str,
                            attempt: int, key: str, identity: str, base: str, namespace: dict[str, Any],
                            internal: bool, result: Any, writes: dict[str, Any], started: float) -> None:
        """A step succeeded: artifacts, output variable and mappings, the completed record, ``wait_after_ms``."""
        from langorch_runtime.operations import apply_writes

        if result is not None and not internal:
            result = await self.harvest(node, step_id, fs, attempt, result)
        if step.output_variable:
            writes[step.output_variable] = result
        if step.output_mapping:
            from langorch_runtime.mappings import apply_output_mapping

            for var, mapping in step.output_mapping.items():
                try:
                    value, warns = apply_output_mapping(mapping, result, self.scope(state, frame, node.id,
                                                                                     step.step_id))
                except StepError as exc:
                    raise NodeFailure(exc.error.model_copy(update={"node_id": node.id, "step_id": step_id}),
                                      step_level=True) from exc
                writes[var] = value
                for w in warns:
                    await self.emit(TemplateWarning(variable=var, reason=w, location={
                        "node_id": node.id, "step_id": step.step_id, "field": f"{base}/output_mapping/{var}"}))
        apply_writes(namespace, writes)
        await self.steps.put(identity, StepRecord(status="completed", attempt=attempt, idempotency_key=key,
                                                  node_id=node.id, step_id=step_id, frame=fs, result=result,
                                                  writes=writes, updated_at=now_iso()))
        await self.emit(StepCompleted(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, action=step.action,
                                      output_variable=step.output_variable,
                                      duration_ms=int((time.monotonic() - started) * 1000), retry_count=attempt - 1))
        if step.screenshot_on_complete:
            await self.screenshot(node, step_id, fs, attempt, "on_complete", None)
        if step.wait_after_ms:
            await self.sleep(step.wait_after_ms / 1000)

    async def screenshot(self, node: NodeIR, step_id: str | None, fs: str, attempt: int | None, reason: str,
                         error: ErrorObject | None) -> None:
        """A failure or completion screenshot (§4.10): dispatched as ``screenshot`` to the node's channel (identity
        ``<step_id>~screenshot``, artifacts harvested, failures ignored), else ``screenshot_requested``."""
        shot_id = f"{step_id or node.id}~screenshot"
        if not node.orchestrator:
            try:
                result, dispatched = await self.side_dispatch(node, shot_id, fs, attempt or 1, "screenshot",
                                                              {"reason": reason})
            except StepError as exc:
                if exc.error.code != "no_executor":
                    return  # the screenshot's own failure is ignored
            else:
                if dispatched:
                    await self.harvest(node, shot_id, fs, attempt or 1, result)
                return
        await self.emit(ScreenshotRequested(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            reason=reason, error=error))

    async def secret_layer(self, node: NodeIR, step: StepIR, step_id: str, internal: bool) -> dict[str, Any]:
        """The ``secrets`` local of a step's parameters: values (internal keys) or grants (agents), masked."""
        layer: dict[str, Any] = {}
        handed: set[str] = set()
        for ref in step.secrets:
            declared = self.ir.secrets.get(ref.alias)
            name = declared.key if declared else ref.alias
            fld = ref.field or (declared.field if declared else None)
            if internal or self.secrets is None:
                raw = await self.secrets.value(name) if self.secrets is not None else None
                if raw is None:
                    raise StepError(ErrorObject(code="secret_not_found", message=f"secret '{ref.alias}' "
                                                f"({name}) has no value in the configured provider"))
                value: Any = raw
                if fld is not None:
                    try:
                        value = _jsonlib.loads(raw)[fld]
                    except (ValueError, KeyError, TypeError):
                        raise StepError(ErrorObject(code="secret_not_found", message=f"secret '{ref.alias}' has "
                                                    f"no field '{fld}'")) from None
            else:
                value = self.secrets.grant(run_id=self.run.run_id, secret_name=name, node_id=node.id,
                                           step_id=step_id, field=fld)
            handed.add(str(value))
            if ref.field is not None:
                entry = layer.setdefault(ref.alias, {})
                if isinstance(entry, dict):
                    entry[ref.field] = value
            else:
                layer[ref.alias] = value
        if self.on_sensitive is not None:
            self.on_sensitive(set(), handed)
        return {"secrets": layer}

    async def attempt(self, state: RunState, frame: Frame, node: NodeIR, step: StepIR, step_id: str, fs: str,
                      params: dict[str, Any], attempt: int, key: str, namespace: dict[str, Any],
                      delegation_id: str, announce: _Announcement | None = None) -> tuple[Any, dict[str, Any]]:
        """One attempt of a step: an internal operation, or an external dispatch (§4.5)."""
        from langorch_runtime.operations import OpContext, run_operation

        if step.binding.kind == "internal":
            ctx = OpContext(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                            logging_level=self.ir.global_config.logging_level, sleep=self.sleep,
                            scope=self.scope(state, frame, node.id, step.step_id), notifier=self.notifier())
            if step.timeout_ms is None:
                op_outcome = await run_operation(step, params, namespace, ctx)
            else:  # §4.9: a step's own (or the default) timeout bounds internal operations too
                try:
                    op_outcome = await asyncio.wait_for(run_operation(step, params, namespace, ctx),
                                                        step.timeout_ms / 1000)
                except TimeoutError:
                    raise StepError(ErrorObject(code="step_timeout", retryable=True, message=f"step '{step_id}' "
                                                f"timed out after {step.timeout_ms} ms")) from None
            if self.on_sensitive is not None and (op_outcome.sensitive_outputs or op_outcome.sensitive_values):
                self.on_sensitive(set(op_outcome.sensitive_outputs), set(op_outcome.sensitive_values))
            for event in op_outcome.events:
                await self.emit(event)
            if op_outcome.checkpoint:  # "now": the state is persisted when this super-step ends
                self.save(state, "set_checkpoint", node.id, fs)
            return op_outcome.result, dict(op_outcome.writes)
        callback = None
        if self.callbacks is not None:
            expires = datetime.now(UTC) + timedelta(seconds=self.callbacks.timeout_s)
            expires_unix = int(expires.timestamp()) + GRACE_S
            token = make_token(self.callbacks.key, self.run.run_id, node.id, step_id, delegation_id, expires_unix)
            callback = CallbackInfo(delegation_id=delegation_id, token=token, expires_at=format_time(expires),
                                    url=f"{self.callbacks.public_url.rstrip('/')}/api/runs/{self.run.run_id}/callback")
        result = await self.external(state, frame, node, step, step_id, fs, params, attempt, key, callback,
                                     announce)
        return result, {}

    async def delegated(self, state: RunState, frame: Frame, node: NodeIR, step: StepIR, step_id: str, fs: str,
                        attempt: int, key: str, identity: str, delegated: Delegated) -> Outcome:
        """An agent accepted an async workflow step: suspend the frame until its callback (§4.6)."""
        timeout_s = self.callbacks.timeout_s if self.callbacks else None
        expires_at = format_time(datetime.now(UTC) + timedelta(seconds=timeout_s)) if timeout_s else None
        delegation = {"id": delegated.delegation_id, "expires_at": expires_at, "timeout_s": timeout_s,
                      "agent_id": delegated.agent_id}
        await self.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=key,
                                                  node_id=node.id, step_id=step_id, frame=fs,
                                                  result={"delegation_id": delegated.delegation_id,
                                                          "delegation": delegation}, updated_at=now_iso()))
        suspends = len(self.runnable(state)) <= 1
        state.setdefault("waits", {})[delegated.delegation_id] = {
            "kind": "callback", "id": delegated.delegation_id, "node_id": node.id, "step_id": step_id,
            "frame_id": frame["id"], "frame": fs, "expires_at": expires_at, "suspends_run": suspends}
        callback_url = None
        if self.callbacks is not None:
            callback_url = f"{self.callbacks.public_url.rstrip('/')}/api/runs/{self.run.run_id}/callback"
        await self.emit(WorkflowDelegated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                          delegation_id=delegated.delegation_id, action=step.action,
                                          agent_id=delegated.agent_id, agent_url=delegated.agent_url,
                                          callback_url=callback_url, expires_at=expires_at, suspends_run=suspends))
        return Pause(delegated.delegation_id, "workflow_pending")

    async def harvest(self, node: NodeIR, step_id: str, fs: str, attempt: int, result: Any) -> Any:
        """Record the artifacts a step result names (§4.12): screenshots, artifact links and inline content
        (stored through ``artifacts.put`` and replaced by ``{artifact_id, uri}`` in the result)."""
        if isinstance(result, ContentArtifacts):
            return await self.harvest_content(node, step_id, fs, attempt, result)
        if not isinstance(result, dict):
            return result
        found: list[tuple[str | None, dict[str, Any]]] = []  # (key to replace, spec)
        if isinstance(result.get("screenshot"), str):
            found.append((None, {"kind": "screenshot", "uri": result["screenshot"]}))
        if isinstance(result.get("artifact"), dict):
            found.append(("artifact", result["artifact"]))
        for item in result.get("artifacts") or [] if isinstance(result.get("artifacts"), list) else []:
            if isinstance(item, dict):
                found.append((None, item))
        if isinstance(result.get("artifact_uri"), str) and isinstance(result.get("artifact_kind"), str):
            found.append((None, {"kind": result["artifact_kind"], "uri": result["artifact_uri"]}))
        if not found:
            return result
        out = dict(result)
        for replace, spec in found:
            artifact_id = new_id()
            uri = spec.get("uri")
            stored = False
            size = None
            content = spec.get("content_base64")
            if isinstance(content, str) and self.artifacts is not None:
                uri, size = await self.artifacts.put(artifact_id, spec, run_id=self.run.run_id,
                                                     root_run_id=self.root_run_id)
                stored = True
            elif isinstance(content, str):
                continue  # no artifact store in this runtime: the content stays in the result
            await self.emit(ArtifactCreated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            artifact_id=artifact_id, kind=str(spec.get("kind") or "file"),
                                            name=spec.get("name"), uri=uri, mime_type=spec.get("mime_type"),
                                            size_bytes=size, stored=stored))
            if replace is not None and stored:
                out[replace] = {"artifact_id": artifact_id, "uri": uri}
        return out

    async def harvest_content(self, node: NodeIR, step_id: str, fs: str, attempt: int,
                              result: ContentArtifacts) -> Any:
        """Record the content artifacts of an MCP result; the output links them where they were."""
        value = await self.harvest(node, step_id, fs, attempt, copy.deepcopy(result.value))
        for spec in result.artifacts:
            artifact_id = new_id()
            uri, size, stored = spec.get("uri"), None, False
            if isinstance(spec.get("content_base64"), str):
                if self.artifacts is None:
                    continue  # no artifact store in this runtime: the content stays in the output
                uri, size = await self.artifacts.put(artifact_id, spec, run_id=self.run.run_id,
                                                     root_run_id=self.root_run_id)
                stored = True
            await self.emit(ArtifactCreated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                            artifact_id=artifact_id, kind=str(spec.get("kind") or "file"),
                                            name=spec.get("name"), uri=uri, mime_type=spec.get("mime_type"),
                                            size_bytes=size, stored=stored))
            at = spec.get("at")
            if isinstance(at, int) and isinstance(value, list) and 0 <= at < len(value):
                value[at] = {"type": spec.get("type"), "artifact_id": artifact_id, "uri": uri,
                             "name": spec.get("name"), "mime_type": spec.get("mime_type")}
        return value

    async def fail_step(self, identity: str, key: str, node: NodeIR, step: StepIR, step_id: str, fs: str,
                        attempt: int, error: ErrorObject) -> None:
        """A step failed for good: its record says so and ``step_failed`` is emitted."""
        await self.record_failed(identity, key, node, step_id, fs, attempt, error)
        await self.emit(StepFailed(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, action=step.action,
                                   error=error))

    async def route_to_fallback(self, frame: Frame, node: NodeIR, fs: str, error: ErrorObject,
                                target: str) -> Outcome:
        """A handler routes the failed node to its ``fallback_node``; the built-in ``error`` is set there."""
        await self.emit(NodeError(node_id=node.id, frame=fs, error=error, routed_to=target))
        frame["node"] = None
        forget_retries(frame, node.id)
        frame["error"] = _dump(error)
        frame["cursor"] = target
        return Routed()

    async def record_failed(self, identity: str, key: str, node: NodeIR, step_id: str, fs: str, attempt: int,
                            error: ErrorObject) -> None:
        await self.steps.put(identity, StepRecord(status="failed", attempt=attempt, idempotency_key=key,
                                                  node_id=node.id, step_id=step_id, frame=fs,
                                                  result={"error": _dump(error)}, updated_at=now_iso()))

    async def step_handlers(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                            step: StepIR, step_id: str, fs: str, attempt: int, error: ErrorObject,
                            handler_retries: dict[str, int]) -> str | tuple[str, Any] | None:
        for handler in node.error_handlers:
            if not handler_matches(handler, error):
                continue
            if handler.error_metadata:
                error.details["handler_metadata"] = handler.error_metadata
            if handler.notify_on_error:
                await self.alert(StepErrorNotification(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                       error_type=handler.error_type or "*", error=error,
                                                       handler_action=handler.action))
            await self.recovery_steps(state, frame, node, current, handler, step, attempt)
            if handler.action == "retry":
                used = handler_retries.get(str(handler.index), 0)
                if used < handler.max_retries:
                    handler_retries[str(handler.index)] = used + 1
                    delay = after_retry_after(_handler_delay(handler, used), error)
                    await self.emit(StepRetrying(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                 action=step.action, delay_ms=delay, next_attempt=attempt + 1,
                                                 source="error_handler", error=error))
                    await self.sleep(delay / 1000)
                    return "retry"
                return None
            if handler.action == "retry_node":
                retries = frame.setdefault("retries", {})
                rkey = f"{node.id}#handler{handler.index}"
                used = retries.get(rkey, 0)
                if used < handler.max_retries:
                    retries[rkey] = used + 1
                    return ("retry_node", _handler_delay(handler, used))
                return None
            if handler.action == "screenshot_and_fail":
                await self.screenshot(node, step_id, fs, attempt, "screenshot_and_fail", error)
                return None
            if handler.action == "ignore":
                if handler.fallback_node:
                    return ("route", handler.fallback_node)
                return ("suppress", None)
            if handler.action == "escalate":
                await self.emit(StepEscalated(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                              handler_index=handler.index, fallback_node=handler.fallback_node,
                                              error=error))
                if handler.fallback_node:
                    return ("route", handler.fallback_node)
                return None
            return None
        return None

    async def external(self, state: RunState, frame: Frame, node: NodeIR, step: StepIR, step_id: str, fs: str,
                       params: dict[str, Any], attempt: int, key: str, callback: CallbackInfo | None = None,
                       announce: _Announcement | None = None) -> Any:
        """Executor resolution of a dispatched step (§4.5): override → dry run → mock → dispatch. ``step_started``
        (``announce``) is emitted once the agent is chosen, or at once when no agent will be."""
        gc = self.ir.global_config
        if announce is not None and (self.dry_run() or gc.mock_external_calls or any(
                k in gc.test_data_overrides for k in (f"{node.id}.{step.step_id}", step.step_id))):
            await announce(None)
        answered, answer = await self.rehearsed(node, step.step_id, step_id, fs, attempt, step.action,
                                                step.binding.channel)
        if answered:
            return answer
        async with self.admitted(node.id, step_id, fs, attempt):
            return await self.dispatch_step(node, step, step_id, fs, params, attempt, key, callback, announce)

    async def dispatch_step(self, node: NodeIR, step: StepIR, step_id: str, fs: str, params: dict[str, Any],
                            attempt: int, key: str, callback: CallbackInfo | None,
                            announce: _Announcement | None = None) -> Any:
        channel = step.binding.channel or ""
        request = DispatchRequest(node=node, step_id=step_id, action=step.action, channel=step.binding.channel,
                                  params=params, attempt=attempt, idempotency_key=key, frame=fs,
                                  timeout_ms=step.timeout_ms, dispatch_mode=step.dispatch_mode,
                                  run_id=self.run.run_id, procedure_id=self.ir.procedure_id, emit=self.emit,
                                  callback=callback, affinity=self.affinity.get(channel), on_selected=announce)
        try:
            return await self._dispatch(request, step)
        finally:
            if request.agent_id:
                self.affinity[channel] = request.agent_id

    async def _dispatch(self, request: DispatchRequest, step: StepIR) -> Any:
        if step.timeout_ms is None or getattr(self.dispatcher, "enforces_step_timeout", False):
            return await self.dispatcher.dispatch(request)
        try:
            return await asyncio.wait_for(self.dispatcher.dispatch(request), step.timeout_ms / 1000)
        except TimeoutError:
            raise StepError(ErrorObject(code="step_timeout", retryable=True,
                                        message=f"step '{request.step_id}' timed out after {step.timeout_ms} ms")) \
                from None


class _Announcement:
    """``step_started`` of one attempt, emitted once: with the agent chosen for a dispatched step (ckp.md §8),
    or without one when the step fails or completes before any agent is chosen."""

    def __init__(self, emit: Emit, event: StepStarted) -> None:
        self.emit = emit
        self.event: StepStarted | None = event
        self.binding_kind = event.binding_kind  # ``channel`` until an agent is chosen (ckp.md §8)

    async def __call__(self, agent_id: str | None, binding_kind: str | None = None) -> None:
        event, self.event = self.event, None
        if event is not None:
            if binding_kind:
                self.binding_kind = binding_kind
            await self.emit(event.model_copy(update={"agent_id": agent_id, "binding_kind": self.binding_kind}))


class _Warnings:
    """Collects template warnings so each (variable, location) is emitted once per run."""

    def __init__(self, warned: list[str], node_id: str, step_id: str | None, base: str) -> None:
        self.warned = warned
        self.pending: list[TemplateWarning] = []
        self.node_id = node_id
        self.step_id = step_id
        self.base = base

    def __call__(self, variable: str, reason: str, path: str = "") -> None:
        field_path = self.base + path
        key = f"{variable}|{self.node_id}|{self.step_id}|{field_path}"
        if key in self.warned:
            return
        self.warned.append(key)
        self.pending.append(TemplateWarning(variable=variable, reason=reason, location={
            "node_id": self.node_id, "step_id": self.step_id, "field": field_path}))

    async def flush(self, emit: Emit) -> None:
        for w in self.pending:
            await emit(w)
        self.pending.clear()



def _expression_error(exc: ExpressionError, node_id: str, step_id: str | None) -> ErrorObject:
    return ErrorObject(code="expression_error", message=str(exc), node_id=node_id, step_id=step_id,
                       details=exc.details())



WAIT_FIELDS = ("kind", "id", "node_id", "step_id", "frame", "expires_at")  # a pending wait in ``run_suspended``

def _path_in_node(node: NodeIR, item: object) -> str | None:
    """The JSON path of a step, validation, check or recovery step inside its node: ``location.field`` of a
    ``template_warning`` is the template's JSON path in the node (ckp.md §5.1), so ``/steps/0/body``, not the id."""
    for name in ("steps", "validations", "checks"):
        for i, candidate in enumerate(getattr(node.payload, name, None) or []):
            if candidate is item:
                return f"/{name}/{i}"
    for handler in node.error_handlers:
        for i, candidate in enumerate(handler.recovery_steps):
            if candidate is item:
                return f"/error_handlers/{handler.index}/recovery_steps/{i}"
    return None



def _collector(into: list[tuple[str, str]]) -> Callable[[str, str], None]:
    def collect(variable: str, reason: str) -> None:
        into.append((variable, reason))

    return collect


def _join(path: str, segment: str) -> str:
    return f"{path}/{segment}" if path else segment


def _json(value: Any) -> str:
    import json

    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


__all__ = [
    "HANDLER_NAME_ALIASES",
    "MAX_NAMESPACE_BYTES",
    "MAX_VARIABLE_BYTES",
    "NEVER_RETRIED",
    "RECOVERY_GRACE_MS",
    "WAIT_FIELDS",
    "ArtifactStore",
    "CallbackConfig",
    "CallbackInfo",
    "ChildRuns",
    "ContentArtifacts",
    "Delegated",
    "DispatchRequest",
    "Dispatcher",
    "Emit",
    "Limiter",
    "Machine",
    "Next",
    "NodeFailure",
    "Outcome",
    "Pause",
    "RetryNode",
    "Routed",
    "RunInfo",
    "SecretsAccess",
    "Spawn",
    "StepError",
    "Terminate",
    "WebhookPoster",
    "after_retry_after",
    "forget_retries",
    "handler_matches",
    "retry_allowed",
    "retry_delay",
]
