"""Step execution (ckp.md §4.3, §4.7–§4.10, §7.4): a step from its identity to its completed (or failed) record.

:meth:`StepRunner.run_step` goes through named phases: the step's identity (natural or a custom idempotency key),
a replay of a completed record, the attempt it resumes at, the callback of an async workflow step it was paused
on, then attempts — each one rendered, recorded ``started``, executed (an internal operation or an external
dispatch) — until one succeeds (:meth:`complete_step`) or a failure is final after the retry policy, the failure
screenshot and the node's error handlers (:meth:`after_failure`).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from ckp_core.events import (
    CallbackTimedOut,
    ErrorObject,
    NodeError,
    StepCompleted,
    StepErrorNotification,
    StepEscalated,
    StepFailed,
    StepReplayed,
    StepRetrying,
    StepStarted,
    StepTimeout,
    TemplateWarning,
    WorkflowCallbackReceived,
    WorkflowDelegated,
    format_time,
)
from ckp_core.ids import new_id
from ckp_core.ir import ErrorHandlerIR, NodeIR, OperationIR, StepIR
from ckp_core.redaction import mask_leaves, scalar_strings
from langorch_infra import tracing
from langorch_runtime.creation import sensitive_variables
from langorch_runtime.errors import StepError
from langorch_runtime.frames import Frame, NodeState, RunState, StepBudget, frame_string, vars_of
from langorch_runtime.machine.context import path_in_node
from langorch_runtime.machine.dispatch import Announcement, Dispatching
from langorch_runtime.machine.outcomes import NodeFailure, Outcome, Pause, RetryNode, Routed, dump
from langorch_runtime.machine.policies import (
    after_retry_after,
    forget_retries,
    handler_delay,
    handler_matches,
    retry_allowed,
    retry_delay,
    step_budget,
    take_node_retry,
)
from langorch_runtime.machine.ports import Delegated
from langorch_runtime.mappings import apply_output_mapping
from langorch_runtime.operations import OpContext, apply_writes, run_operation
from langorch_runtime.steps import (
    StepRecord,
    custom_idempotency_key,
    idempotency_key,
    natural_identity,
    now_iso,
)


@dataclass
class StepCall:
    """One run of a step through its attempts: what its phases share."""

    node: NodeIR
    step: StepIR
    step_id: str  # the identity's step id (``<step_id>/recovery/<id>`` for recovery steps)
    fs: str
    base: str  # the step's JSON path in the node (template warnings)
    namespace: dict[str, Any]
    identity: str
    key_base: str | None  # ``lo1:<rendered custom key>`` when the step or node has an idempotency_key
    record: StepRecord | None
    attempt: int
    # its retry budget (policies.step_budget, kept in the node's data): run_step sets it before the first attempt
    budget: StepBudget = field(default_factory=lambda: StepBudget(epoch=0, policy=0, handlers={}))

    def key(self, run_id: str) -> str:
        """The attempt's Idempotency-Key (§7.4)."""
        if self.key_base:
            return custom_idempotency_key(self.key_base, self.attempt)
        return idempotency_key(run_id, self.node.id, self.step_id, self.fs, self.attempt)


@dataclass
class Succeeded:
    result: Any
    writes: dict[str, Any]


@dataclass
class Failed:
    error: ErrorObject
    binding_kind: str  # of ``step_timeout`` (the binding once an agent was chosen)


HandlerDecision = Literal["retry"] | tuple[Literal["suppress", "route", "retry_node"], Any] | None


class StepRunner(Dispatching):
    """Runs steps and internal operations for the node kinds."""

    async def operation(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                        op: OperationIR, base: str, step_id: str | None = None) -> Any:
        """An internal operation of a ``processing`` node or a ``terminate`` action (§4.3)."""
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
        step_id = identity_step_id or step.step_id
        fs = frame_string(frame, node.id, current["visit"])
        namespace = vars_of(state, frame)
        base = path_in_node(node, step) or f"/steps/{step.step_id}"
        identity, key_base = await self.step_identity(state, frame, node, current, step, step_id, fs, base)
        record = await self.steps.get(identity)
        again = application is not None and record is not None and record.attempt < application
        if record is not None and record.status == "completed" and not again:
            apply_writes(namespace, record.writes)
            self.step_vars(state, frame, record.writes)  # reported by the step_completed of its first run
            await self.emit(StepReplayed(node_id=node.id, step_id=step_id, frame=fs, action=step.action,
                                         output_variable=step.output_variable, original_attempt=record.attempt))
            return None
        attempt = record.attempt if record is not None else 1
        if record is not None and record.status == "failed":
            attempt += 1  # a retried run (or re-run node) executes the failed step as a new attempt (§7.12)
        if again and application is not None:
            attempt, record = max(attempt, application), None  # recovery steps run each time a handler applies
        call = StepCall(node=node, step=step, step_id=step_id, fs=fs, base=base, namespace=namespace,
                        identity=identity, key_base=key_base, record=record, attempt=attempt)
        preset: Succeeded | Failed | None = None
        delegation = (record.result or {}).get("delegation") if record is not None and record.status == "started" \
            and isinstance(record.result, dict) else None
        if delegation is not None:
            resumed = await self.resume_delegated(state, frame, call, delegation)
            if isinstance(resumed, Pause):
                return resumed
            preset = resumed
        if step.wait_ms and record is None:
            await self.sleep(step.wait_ms / 1000)
        call.budget = step_budget(current, identity, self.run.retry_epoch)
        while True:
            key = call.key(self.run.run_id)
            started = time.monotonic()
            answer: Succeeded | Failed | Pause
            if preset is not None:
                answer, preset = preset, None
            else:
                answer = await self.try_attempt(state, frame, call, key)
            if isinstance(answer, Pause):
                return answer
            if isinstance(answer, Succeeded):
                break
            handled = await self.after_failure(state, frame, current, call, key, started, answer, allow_handlers)
            if handled == "retry":
                call.attempt += 1
                continue
            return handled
        await self.complete_step(state, frame, call, key, answer.result, answer.writes, started)
        return None

    # -- the phases of run_step ------------------------------------------------------------------------------------
    async def step_identity(self, state: RunState, frame: Frame, node: NodeIR, current: NodeState, step: StepIR,
                            step_id: str, fs: str, base: str) -> tuple[str, str | None]:
        """The step's identity in the step store and its custom key base (§7.4): the step's ``idempotency_key``,
        else the node's (rendered once per node visit), else the natural ``<node_id>:<step_id>:<F>``."""
        if step.idempotency_key is not None:
            rendered = await self.render(step.idempotency_key, state, frame, node.id, step.step_id,
                                         f"{base}/idempotency_key", text=True)
            return f"custom:{rendered}", f"lo1:{rendered}"
        if node.idempotency_key is not None:
            data = current.setdefault("data", {})
            rendered = data.get("idempotency_key")
            if rendered is None:  # rendered once per node visit, before its first step: writes of steps don't count
                rendered = data["idempotency_key"] = await self.render(
                    node.idempotency_key, state, frame, node.id, None, "/idempotency_key", text=True)
            return f"custom:{rendered}/{step_id}", f"lo1:{rendered}/{step_id}"
        return natural_identity(node.id, step_id, fs), None

    async def resume_delegated(self, state: RunState, frame: Frame, call: StepCall,
                               delegation: dict[str, Any]) -> Pause | Succeeded | Failed:
        """An async workflow step the frame was paused on (§4.6): paused again until its callback arrives, else the
        callback's outcome, which the step's attempt loop takes as the delegated attempt's."""
        node, step_id, fs, attempt = call.node, call.step_id, call.fs, call.attempt
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
        preset: Succeeded | Failed
        if status == "success":
            result = resolution.get("output")
            writes = {} if call.step.output_variable or not isinstance(result, dict) else dict(result)
            preset = Succeeded(result, writes)
        else:
            if status == "timed_out":
                error = ErrorObject(code="callback_timeout", retryable=True, message=f"no callback for step "
                                    f"'{step_id}' within {delegation.get('timeout_s')} s")
            else:
                error = ErrorObject(code=resolution.get("error_code") or "workflow_failed",
                                    error_code=resolution.get("error_code"),
                                    message=str(resolution.get("error") or "the agent reported a failure"))
            preset = Failed(error.model_copy(update={"node_id": node.id, "step_id": step_id, "frame": fs,
                                                     "attempt": attempt}),
                            "internal" if call.step.binding.kind == "internal" else "channel")
        if isinstance(resolution.get("artifacts"), list) and resolution["artifacts"]:
            # the callback's own artifacts (api.md §5.10, ckp.md §4.12), whatever its status
            await self.harvest(node, step_id, fs, attempt, {"artifacts": resolution["artifacts"]})
        return preset

    async def try_attempt(self, state: RunState, frame: Frame, call: StepCall, key: str) -> Succeeded | Failed | Pause:
        """One attempt (:meth:`attempt`), in a span ``step <id>`` when spans are exported."""
        with tracing.span(f"step {call.step_id}", attributes={
                "langorch.run_id": self.run.run_id, "langorch.node_id": call.node.id,
                "langorch.step_id": call.step_id, "langorch.action": call.step.action,
                "langorch.attempt": call.attempt}):
            return await self.attempt(state, frame, call, key)

    async def attempt(self, state: RunState, frame: Frame, call: StepCall, key: str) -> Succeeded | Failed | Pause:
        """One attempt: parameters rendered (with the step's secrets), the ``started`` record, then its execution
        (:meth:`execute_attempt`); ``step_started`` is emitted once, with the agent when one is chosen."""
        node, step, step_id, fs, attempt, record = call.node, call.step, call.step_id, call.fs, call.attempt, \
            call.record
        internal = step.binding.kind == "internal"
        layer = await self.secret_layer(node, step, step_id, internal) if step.secrets else None
        params = await self.render(step.params, state, frame, node.id, step.step_id, call.base, locals_=layer)
        announced = params
        if internal and self.writes_sensitive(step):  # the value written to a sensitive variable is never shown
            announced = mask_leaves(params)
            if self.on_sensitive is not None:
                self.on_sensitive(set(), set(scalar_strings(params)))
        same = record is not None and record.attempt == attempt and isinstance(record.result, dict)
        delegation_id = str((record.result or {}).get("delegation_id") if same and record else "") or new_id()
        claim: asyncio.Future[None] | None = None
        if not internal:  # the claim before a side effect (§7.4); an internal operation has none to guard, and
            # after a crash its attempt number comes out the same from its records without a `started` one.
            # Written while the agent is chosen; the announcement waits for it, and the agent is called only after
            # that (Announcement.claimed)
            claim = asyncio.ensure_future(self.steps.put(call.identity, StepRecord(
                status="started", attempt=attempt, idempotency_key=key, node_id=node.id, step_id=step_id,
                frame=fs, result={"delegation_id": delegation_id}, updated_at=now_iso())))
        announce = Announcement(self.emit, StepStarted(
            node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, action=step.action,
            binding_kind="internal" if internal else "channel", channel=step.binding.channel, idempotency_key=key,
            params=announced), None if internal else self.settle, claim)
        try:
            if internal or not self.dispatcher.announces_agent:
                await announce(None)
            try:
                result, writes = await self.execute_attempt(state, frame, call, params, key, delegation_id,
                                                            announce)
                await announce(None)
                return Succeeded(result, writes)
            except StepError as exc:
                await announce(None)
                return Failed(exc.error.model_copy(update={"node_id": node.id, "step_id": step_id, "frame": fs,
                                                           "attempt": attempt}), announce.binding_kind)
            except Delegated as delegated:
                await announce(None)
                return await self.delegated(state, frame, call, key, delegated)
        finally:
            announce.abandon()

    def writes_sensitive(self, step: StepIR) -> bool:
        """The internal step writes a sensitive variable (``variable``/``array`` or ``output_variable``)."""
        targets = [*step.names.values(), *([step.output_variable] if step.output_variable else [])]
        if not targets:
            return False
        sensitive = self.__dict__.get("_sensitive_names")
        if sensitive is None:
            sensitive = self.__dict__["_sensitive_names"] = frozenset(sensitive_variables(self.ir))
        return any(t.split(".", 1)[0].split("[", 1)[0] in sensitive for t in targets)

    async def execute_attempt(self, state: RunState, frame: Frame, call: StepCall, params: dict[str, Any], key: str,
                              delegation_id: str, announce: Announcement | None = None) -> tuple[Any, dict[str, Any]]:
        """One attempt of a step: an internal operation, or an external dispatch (§4.5)."""
        node, step, step_id, fs, attempt = call.node, call.step, call.step_id, call.fs, call.attempt
        if step.binding.kind == "internal":
            ctx = OpContext(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                            logging_level=self.ir.global_config.logging_level, sleep=self.sleep,
                            scope=self.scope(state, frame, node.id, step.step_id), notifier=self.notifier())
            if step.timeout_ms is None:
                op_outcome = await run_operation(step, params, call.namespace, ctx)
            else:  # §4.9: a step's own (or the default) timeout bounds internal operations too
                try:
                    op_outcome = await asyncio.wait_for(run_operation(step, params, call.namespace, ctx),
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
        callback = self.callback_for(node, step_id, delegation_id)
        result = await self.external(node, step, step_id, fs, params, attempt, key, callback, announce)
        return result, {}

    async def delegated(self, state: RunState, frame: Frame, call: StepCall, key: str,
                        delegated: Delegated) -> Pause:
        """An agent accepted an async workflow step: suspend the frame until its callback (§4.6)."""
        node, step_id, fs, attempt = call.node, call.step_id, call.fs, call.attempt
        timeout_s = self.callbacks.timeout_s if self.callbacks else None
        expires_at = format_time(datetime.now(UTC) + timedelta(seconds=timeout_s)) if timeout_s else None
        delegation = {"id": delegated.delegation_id, "expires_at": expires_at, "timeout_s": timeout_s,
                      "agent_id": delegated.agent_id}
        await self.steps.put(call.identity, StepRecord(status="started", attempt=attempt, idempotency_key=key,
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
                                          delegation_id=delegated.delegation_id, action=call.step.action,
                                          agent_id=delegated.agent_id, agent_url=delegated.agent_url,
                                          callback_url=callback_url, expires_at=expires_at, suspends_run=suspends))
        return Pause(delegated.delegation_id, "workflow_pending")

    async def after_failure(self, state: RunState, frame: Frame, current: NodeState, call: StepCall, key: str,
                            started: float, failed: Failed, allow_handlers: bool) -> Literal["retry"] | Outcome | None:
        """A failed attempt: ``"retry"`` (the retry policy or a handler's ``retry``: the next attempt), None (a
        handler suppressed the error: the step completed), an outcome (a handler's fallback route or
        ``retry_node``); else the step failed for good and :class:`NodeFailure` (step level) is raised."""
        node, step, step_id, fs, attempt, error = call.node, call.step, call.step_id, call.fs, call.attempt, \
            failed.error
        if error.code == "step_timeout":
            await self.emit(StepTimeout(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                        action=step.action, timeout_ms=step.timeout_ms or
                                        int(error.details.get("timeout_ms") or 0),  # the binding default
                                        binding_kind=failed.binding_kind))
        policy = step.retry
        policy_retries = int(call.budget["policy"])
        if policy is not None and policy_retries < policy.max_retries and retry_allowed(policy, error):
            delay = after_retry_after(retry_delay(policy, policy_retries), error)
            call.budget["policy"] = policy_retries + 1
            await self.emit(StepRetrying(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                         action=step.action, delay_ms=delay, next_attempt=attempt + 1,
                                         source="retry_policy", error=error))
            await self.sleep(delay / 1000)
            return "retry"
        if self.ir.global_config.screenshot_on_fail:  # every step (§4.7), internal ones included
            await self.screenshot(node, step_id, fs, attempt, "screenshot_on_fail", error)
        if allow_handlers:
            handled = await self.step_handlers(state, frame, current, call, error)
            if handled == "retry":
                return "retry"
            if isinstance(handled, tuple):
                kind, value = handled
                if kind == "suppress":
                    await self.suppress(state, frame, call, key, started, error)
                    return None
                if kind == "route":
                    await self.fail_step(call, key, error)
                    return await self.route_to_fallback(frame, node, fs, error, value)
                if kind == "retry_node":
                    await self.fail_step(call, key, error)
                    return RetryNode(delay_ms=int(value))
        await self.fail_step(call, key, error)
        raise NodeFailure(error, step_level=True)

    async def complete_step(self, state: RunState, frame: Frame, call: StepCall, key: str, result: Any,
                            writes: dict[str, Any], started: float) -> None:
        """A step succeeded: artifacts, output variable and mappings, the completed record, ``wait_after_ms``."""
        node, step, step_id, fs, attempt = call.node, call.step, call.step_id, call.fs, call.attempt
        if result is not None and step.binding.kind != "internal":
            result = await self.harvest(node, step_id, fs, attempt, self.mask_secrets(result))
        if step.output_variable:
            writes[step.output_variable] = result
        if step.output_mapping:
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
                        "node_id": node.id, "step_id": step.step_id, "field": f"{call.base}/output_mapping/{var}"}))
        apply_writes(call.namespace, writes)
        completed = StepRecord(status="completed", attempt=attempt, idempotency_key=key, node_id=node.id,
                               step_id=step_id, frame=fs, result=result, writes=writes, updated_at=now_iso())
        # stored before step_completed is: the run's writer waits for it, and the next checkpoint and the next
        # effect outside the run wait for the writer
        self.steps.put_soon(call.identity, completed)
        await self.emit(StepCompleted(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt, action=step.action,
                                      output_variable=step.output_variable,
                                      duration_ms=int((time.monotonic() - started) * 1000), retry_count=attempt - 1,
                                      variables=self.step_vars(state, frame, writes)))
        if step.screenshot_on_complete:
            await self.screenshot(node, step_id, fs, attempt, "on_complete", None)
        if step.wait_after_ms:
            await self.sleep(step.wait_after_ms / 1000)

    async def suppress(self, state: RunState, frame: Frame, call: StepCall, key: str, started: float,
                       error: ErrorObject) -> None:
        """A handler ``ignore`` without a fallback: the step completes with a null output (``suppressed_error``)."""
        node, step, step_id, fs, attempt = call.node, call.step, call.step_id, call.fs, call.attempt
        namespace_writes: dict[str, Any] = {}
        if step.output_variable:
            namespace_writes[step.output_variable] = None
        apply_writes(call.namespace, namespace_writes)
        await self.steps.put(call.identity, StepRecord(
            status="completed", attempt=attempt, idempotency_key=key, node_id=node.id,
            step_id=step_id, frame=fs, result=None, writes=namespace_writes, updated_at=now_iso()))
        await self.emit(StepCompleted(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                      action=step.action, output_variable=step.output_variable,
                                      duration_ms=int((time.monotonic() - started) * 1000),
                                      retry_count=attempt - 1, suppressed_error=error,
                                      variables=self.step_vars(state, frame, namespace_writes)))

    async def fail_step(self, call: StepCall, key: str, error: ErrorObject) -> None:
        """A step failed for good: its record says so and ``step_failed`` is emitted."""
        await self.record_failed(call.identity, key, call.node, call.step_id, call.fs, call.attempt, error)
        await self.emit(StepFailed(node_id=call.node.id, step_id=call.step_id, frame=call.fs, attempt=call.attempt,
                                   action=call.step.action, error=error))

    async def record_failed(self, identity: str, key: str, node: NodeIR, step_id: str, fs: str, attempt: int,
                            error: ErrorObject) -> None:
        await self.steps.put(identity, StepRecord(status="failed", attempt=attempt, idempotency_key=key,
                                                  node_id=node.id, step_id=step_id, frame=fs,
                                                  result={"error": self.mask_secrets(dump(error))},
                                                  updated_at=now_iso()))

    # -- error handlers at step scope (§4.10) ------------------------------------------------------------------------
    async def step_handlers(self, state: RunState, frame: Frame, current: NodeState, call: StepCall,
                            error: ErrorObject) -> HandlerDecision:
        node, step, step_id, fs, attempt = call.node, call.step, call.step_id, call.fs, call.attempt
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
                handler_retries: dict[str, int] = call.budget["handlers"]
                used = handler_retries.get(str(handler.index), 0)
                if used < handler.max_retries:
                    handler_retries[str(handler.index)] = used + 1
                    delay = after_retry_after(handler_delay(handler, used), error)
                    await self.emit(StepRetrying(node_id=node.id, step_id=step_id, frame=fs, attempt=attempt,
                                                 action=step.action, delay_ms=delay, next_attempt=attempt + 1,
                                                 source="error_handler", error=error))
                    await self.sleep(delay / 1000)
                    return "retry"
                return None
            if handler.action == "retry_node":
                used_node = take_node_retry(frame, f"{node.id}#handler{handler.index}", handler.max_retries)
                if used_node is not None:
                    return ("retry_node", handler_delay(handler, used_node))
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

    async def route_to_fallback(self, frame: Frame, node: NodeIR, fs: str, error: ErrorObject,
                                target: str) -> Outcome:
        """A handler routes the failed node to its ``fallback_node``; the built-in ``error`` is set there."""
        await self.emit(NodeError(node_id=node.id, frame=fs, error=error, routed_to=target))
        frame["node"] = None
        forget_retries(frame, node.id)
        frame["error"] = dump(error)
        frame["cursor"] = target
        return Routed()
