"""Executes one run: the compiled IR becomes a LangGraph ``StateGraph`` (one graph node per CKP node, routed
on what each node returns) checkpointed with the PostgreSQL saver under ``thread_id = run_id``.

Nodes append run events as they go through a :class:`RunWriter`, the run's single writer: every append
carries the expected position of the run's last event, so a second replica working on the same run fails
instead of interleaving.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypedDict

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph

from ckp_core.events import (
    Actor,
    ErrorObject,
    EventData,
    Log,
    NodeCompleted,
    NodeError,
    NodeStarted,
    StepCompleted,
    StepReplayed,
    StepStarted,
    TemplateWarning,
    format_time,
    make_event,
)
from ckp_core.eventstore import AggregateHead, EventStore
from ckp_core.expressions import ExpressionError, MappingScope, evaluate, truthy
from ckp_core.ir import LogicPayload, NodeIR, ProcedureIR, SequencePayload, StepIR, TerminatePayload
from ckp_core.redaction import Redactor
from ckp_core.templates import render
from langorch_runtime.steps import StepRecord, StepStore, idempotency_key, natural_identity, now_iso

log = logging.getLogger(__name__)

LEVELS = {"DEBUG": 10, "INFO": 20, "WARNING": 30, "ERROR": 40}


class RunState(TypedDict, total=False):
    """The persisted state of a run (LangGraph channels)."""

    vars: dict[str, Any]
    cursor: str | None
    hops: int
    visits: dict[str, int]
    outcome: dict[str, Any] | None
    warned: list[str]


class NodeFailure(Exception):
    """A node ended with an error object (ckp.md §3.2 ``error(e)``)."""

    def __init__(self, error: ErrorObject) -> None:
        super().__init__(error.message)
        self.error = error


class RunWriter:
    """Appends a run's events in order, as the run's single writer."""

    def __init__(self, store: EventStore, run_id: str, head: AggregateHead, redactor: Redactor,
                 actor: Actor, causation_id: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.seq = head.seq
        self.position = head.position
        self.redactor = redactor
        self.actor = actor
        self.causation_id = causation_id

    async def emit(self, data: EventData) -> int:
        clean = type(data).model_validate(self.redactor.redact(data.model_dump(mode="json")))
        envelope = make_event(clean, aggregate_id=self.run_id, seq=self.seq + 1, actor=self.actor,
                              causation_id=self.causation_id, correlation_id=self.run_id)
        [position] = await self.store.append([envelope], expected_position=self.position)
        self.seq += 1
        self.position = position
        return position


SUPPORTED_OPERATIONS = frozenset({"log", "set_variable", "wait"})


def unsupported_features(ir: ProcedureIR) -> list[str]:
    """What this runtime cannot execute yet, as JSON-path-like descriptions (empty: the IR is runnable).

    The compiler accepts the whole CKP language; the runtime executes ``sequence`` (internal ``log``,
    ``set_variable`` and ``wait`` steps; channel steps fail with ``no_executor``), ``logic`` and ``terminate``.
    A run of a procedure using anything else fails at start with ``procedure_not_runnable`` naming it.
    """
    out: list[str] = []
    gc = ir.global_config
    if gc.on_failure is not None:
        out.append("global_config.on_failure")
    if gc.timeout_ms is not None:
        out.append("global_config.timeout_ms")
    if gc.execution_mode != "production":
        out.append(f"global_config.execution_mode={gc.execution_mode}")
    if gc.mock_external_calls or gc.test_data_overrides:
        out.append("global_config.mock_external_calls/test_data_overrides")
    for node in ir.nodes.values():
        where = f"nodes.{node.id}"
        if node.type not in ("sequence", "logic", "terminate"):
            out.append(f"{where} (type {node.type})")
        if node.error_handlers:
            out.append(f"{where}.error_handlers")
        if node.sla is not None:
            out.append(f"{where}.sla")
        if node.idempotency_key is not None:
            out.append(f"{where}.idempotency_key")
        p = node.payload
        if isinstance(p, SequencePayload):
            if p.validations:
                out.append(f"{where}.validations")
            for step in p.steps:
                sw = f"{where}.steps.{step.step_id}"
                if step.binding.kind == "internal" and step.action not in SUPPORTED_OPERATIONS:
                    out.append(f"{sw} (operation {step.action})")
                if step.retry is not None:
                    out.append(f"{sw}.retry")
                if step.output_mapping:
                    out.append(f"{sw}.output_mapping")
                if step.idempotency_key is not None:
                    out.append(f"{sw}.idempotency_key")
                if step.screenshot_on_complete:
                    out.append(f"{sw}.screenshot_on_complete")
        if isinstance(p, TerminatePayload) and (p.cleanup_actions or p.error_actions or p.final_audit_log):
            out.append(f"{where} (cleanup_actions/error_actions/final_audit_log)")
    return out


@dataclass
class RunContext:
    """Everything a node needs that is not persisted state: the run's identity, writer and step store."""

    ir: ProcedureIR
    run_id: str
    run_created: dict[str, Any]
    writer: RunWriter
    steps: StepStore
    started_at: str

    def builtins(self, node_id: str | None, step_id: str | None, vars_: dict[str, Any]) -> dict[str, Any]:
        now = datetime.now(UTC)
        rc = self.run_created
        return {
            "run_id": self.run_id, "root_run_id": rc.get("root_run_id") or self.run_id,
            "parent_run_id": rc.get("parent_run_id"), "procedure_id": self.ir.procedure_id,
            "procedure_version": self.ir.version, "trigger_type": rc.get("trigger_type", "api"),
            "triggered_by": rc.get("triggered_by"), "node_id": node_id, "step_id": step_id,
            "loop_index": None, "loop_item": None, "error": None, "now": format_time(now),
            "today": now.date().isoformat(), "run_started_at": self.started_at, "vars": vars_,
        }


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

    async def flush(self, writer: RunWriter) -> None:
        for w in self.pending:
            await writer.emit(w)
        self.pending.clear()


def _set_path(vars_: dict[str, Any], dotted: str, value: Any) -> None:
    root, *rest = dotted.split(".")
    if not rest:
        vars_[root] = value
        return
    current = vars_.get(root)
    current = dict(current) if isinstance(current, dict) else ({} if current is None else current)
    if not isinstance(current, dict):
        raise NodeFailure(ErrorObject(code="operation_failed", message=f"set_variable: '{root}' is not an "
                                      "object", details={"reason": "not_an_object"}))
    vars_[root] = current
    for i, part in enumerate(rest):
        if i == len(rest) - 1:
            current[part] = value
            break
        nxt = current.get(part)
        if nxt is None:
            nxt = {}
        elif isinstance(nxt, dict):
            nxt = dict(nxt)
        else:
            raise NodeFailure(ErrorObject(code="operation_failed", message=f"set_variable: '{part}' is not "
                                          "an object", details={"reason": "not_an_object"}))
        current[part] = nxt
        current = nxt


class Interpreter:
    """Node semantics for this slice: ``sequence`` with internal steps, ``logic`` and ``terminate``."""

    def __init__(self, ctx: RunContext) -> None:
        self.ctx = ctx

    def scope(self, state: RunState, node_id: str | None, step_id: str | None) -> MappingScope:
        vars_ = state.get("vars", {})
        return MappingScope(vars_, self.ctx.builtins(node_id, step_id, vars_))

    async def run_node(self, node: NodeIR, state: RunState) -> RunState:
        ctx = self.ctx
        hops = state.get("hops", 0)
        visits = dict(state.get("visits", {}))
        warned = list(state.get("warned", []))
        if hops >= ctx.ir.global_config.max_hops:
            error = ErrorObject(code="max_hops_exceeded", message=f"max_hops {ctx.ir.global_config.max_hops}"
                                " reached", node_id=node.id, frame="-")
            await ctx.writer.emit(NodeError(node_id=node.id, error=error))
            return {"outcome": {"status": "failed", "error": error.model_dump(mode="json")}, "cursor": None}
        visits[node.id] = visits.get(node.id, 0) + 1
        visit = visits[node.id]
        frame = "-" if visit == 1 else f"#{visit}"
        state = {**state, "visits": visits, "hops": hops + 1, "warned": warned}
        started = time.monotonic()
        await ctx.writer.emit(NodeStarted(node_id=node.id, node_type=node.type, node_name=node.description,
                                          visit=visit))
        try:
            update = await self._execute(node, state, frame)
        except NodeFailure as failure:
            error = failure.error.model_copy(update={"node_id": failure.error.node_id or node.id,
                                                     "frame": failure.error.frame or "-"})
            await ctx.writer.emit(NodeError(node_id=node.id, error=error))
            return {"outcome": {"status": "failed", "error": error.model_dump(mode="json")}, "cursor": None,
                    "visits": visits, "hops": hops + 1, "warned": warned}
        await ctx.writer.emit(NodeCompleted(node_id=node.id, node_type=node.type,
                                            next_node=update.get("cursor"),
                                            duration_ms=int((time.monotonic() - started) * 1000)))
        return {**update, "visits": visits, "hops": hops + 1, "warned": warned}

    async def _execute(self, node: NodeIR, state: RunState, frame: str) -> RunState:
        p = node.payload
        if isinstance(p, SequencePayload):
            vars_ = dict(state.get("vars", {}))
            for step in p.steps:
                await self._step(node, step, {**state, "vars": vars_}, frame, vars_)
            return {"vars": vars_, "cursor": node.next_node}
        if isinstance(p, LogicPayload):
            scope = self.scope(state, node.id, None)
            warnings = _Warnings(state["warned"], node.id, None, "")
            for i, rule in enumerate(p.rules):
                expr = rule.condition.compiled
                warnings.base = f"/rules/{i}/condition"
                try:
                    hit = truthy(evaluate(expr, scope, lambda v, r: warnings(v, r)))
                except ExpressionError as exc:
                    await warnings.flush(self.ctx.writer)
                    raise NodeFailure(ErrorObject(code="expression_error", message=str(exc),
                                                  details=exc.details())) from exc
                if hit:
                    await warnings.flush(self.ctx.writer)
                    return {"cursor": rule.next_node}
            await warnings.flush(self.ctx.writer)
            if p.default_next_node is None:
                raise NodeFailure(ErrorObject(code="logic_no_route", message=f"Node '{node.id}': no rule "
                                              "matched and there is no default_next_node"))
            return {"cursor": p.default_next_node}
        assert isinstance(p, TerminatePayload)
        warnings = _Warnings(state["warned"], node.id, None, "/outputs")
        outputs = render(p.outputs.compiled, self.scope(state, node.id, None), warnings)
        await warnings.flush(self.ctx.writer)
        if p.status == "success":
            return {"cursor": None, "outcome": {"status": "completed", "outputs": outputs}}
        error = ErrorObject(code="terminated_failed", message=f"run ended at terminate node '{node.id}' with "
                            "status failed", node_id=node.id)
        return {"cursor": None, "outcome": {"status": "failed", "outputs": outputs,
                                            "error": error.model_dump(mode="json")}}

    async def _step(self, node: NodeIR, step: StepIR, state: RunState, frame: str,
                    vars_: dict[str, Any]) -> None:
        ctx = self.ctx
        identity = natural_identity(node.id, step.step_id, frame)
        record = await ctx.steps.get(identity)
        if record is not None and record.status == "completed":
            for name, value in record.writes.items():
                _set_path(vars_, name, value)
            await ctx.writer.emit(StepReplayed(node_id=node.id, step_id=step.step_id, frame=frame,
                                               action=step.action, output_variable=step.output_variable,
                                               original_attempt=record.attempt))
            return
        attempt = record.attempt if record is not None else 1
        if step.wait_ms and record is None:
            await asyncio.sleep(step.wait_ms / 1000)
        key = idempotency_key(ctx.run_id, node.id, step.step_id, frame, attempt)
        warnings = _Warnings(state["warned"], node.id, step.step_id, f"/steps/{step.step_id}")
        params = render(step.params.compiled, self.scope(state, node.id, step.step_id), warnings)
        await ctx.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=key,
                                                 node_id=node.id, step_id=step.step_id, frame=frame,
                                                 updated_at=now_iso()))
        await warnings.flush(ctx.writer)
        await ctx.writer.emit(StepStarted(node_id=node.id, step_id=step.step_id, frame=frame, attempt=attempt,
                                          action=step.action, binding_kind="internal"
                                          if step.binding.kind == "internal" else "channel",
                                          channel=step.binding.channel, idempotency_key=key, params=params))
        started = time.monotonic()
        if step.binding.kind != "internal":
            raise NodeFailure(ErrorObject(
                code="no_executor", retryable=True, node_id=node.id, step_id=step.step_id, frame=frame,
                attempt=attempt, message=f"no executor for action '{step.action}' on channel "
                f"'{step.binding.channel}': agent dispatch is not available in this LangOrch version yet"))
        result, writes = await self._internal(node, step, params)
        if step.output_variable:
            writes[step.output_variable] = result
        for name, value in writes.items():
            _set_path(vars_, name, value)
        await ctx.steps.put(identity, StepRecord(status="completed", attempt=attempt, idempotency_key=key,
                                                 node_id=node.id, step_id=step.step_id, frame=frame,
                                                 result=result, writes=writes, updated_at=now_iso()))
        await ctx.writer.emit(StepCompleted(node_id=node.id, step_id=step.step_id, frame=frame, attempt=attempt,
                                            action=step.action, output_variable=step.output_variable,
                                            duration_ms=int((time.monotonic() - started) * 1000)))
        if step.wait_after_ms:
            await asyncio.sleep(step.wait_after_ms / 1000)

    async def _internal(self, node: NodeIR, step: StepIR, params: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
        action = step.action
        if action == "log":
            level = str(params.get("level") or "INFO").upper()
            level = level if level in LEVELS else "INFO"
            message = params.get("message")
            text = message if isinstance(message, str) else ("" if message is None else str(message))
            if LEVELS[level] >= LEVELS[self.ctx.ir.global_config.logging_level]:
                await self.ctx.writer.emit(Log(node_id=node.id, step_id=step.step_id, level=level,
                                               message=text[:8192]))
            return None, {}
        if action == "wait":
            duration = params.get("duration_ms")
            if not isinstance(duration, int | float) or isinstance(duration, bool) or duration < 0:
                raise NodeFailure(ErrorObject(code="operation_failed", node_id=node.id, step_id=step.step_id,
                                              message=f"wait: duration_ms must be a non-negative number, got "
                                              f"{duration!r}", details={"reason": "invalid_duration"}))
            started = time.monotonic()
            await asyncio.sleep(duration / 1000)
            return {"waited_ms": int((time.monotonic() - started) * 1000)}, {}
        if action == "set_variable":
            value = params.get("value")
            return value, {step.names["variable"]: value}
        raise NodeFailure(ErrorObject(code="operation_failed", message=f"operation '{action}' is not supported",
                                      node_id=node.id, step_id=step.step_id))


def build_graph(ctx: RunContext, checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """The LangGraph graph of one run: a node per CKP node, each routing on the state's cursor/outcome."""
    interpreter = Interpreter(ctx)
    graph: StateGraph[RunState] = StateGraph(RunState)
    node_names = list(ctx.ir.nodes)

    def route(state: RunState) -> str:
        if state.get("outcome") is not None or state.get("cursor") is None:
            return END
        return str(state["cursor"])

    for node_id, node in ctx.ir.nodes.items():
        graph.add_node(node_id, _node_fn(interpreter, node))  # type: ignore[call-overload]
        graph.add_conditional_edges(node_id, route, [*node_names, END])
    graph.add_conditional_edges(START, route, [*node_names, END])
    return graph.compile(checkpointer=checkpointer)


def _node_fn(interpreter: Interpreter, node: NodeIR) -> Callable[[RunState], Coroutine[Any, Any, RunState]]:
    async def run(state: RunState) -> RunState:
        return await interpreter.run_node(node, state)

    run.__name__ = f"ckp_{node.id}"
    return run
