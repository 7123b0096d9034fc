"""Runs compiled CKP documents through the interpreter in-process (unit tests: in-memory saver and step store)."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langgraph.checkpoint.memory import InMemorySaver
from langgraph.types import Command

from ckp_core.compiler import compile_document
from ckp_core.events import ErrorObject, EventData
from ckp_core.ir import ProcedureIR
from ckp_core.variables import validate_inputs
from langorch_runtime.executor import build_graph
from langorch_runtime.machine import (
    CallbackConfig,
    Dispatcher,
    DispatchRequest,
    Limiter,
    Machine,
    RunInfo,
    StepError,
)
from langorch_runtime.steps import MemoryStepStore

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"  # the repository's examples/


def compile_ok(doc: dict[str, Any]) -> ProcedureIR:
    result = compile_document(doc)
    assert result.ir is not None, [(d.code, d.path, d.message) for d in result.errors]
    return result.ir


class ScriptedDispatcher(Dispatcher):
    """Answers dispatches from a script: ``{action: [result | StepError-to-raise, …]}`` consumed in order;
    records every request. (Unit tests only; integration tests use real HTTP agents.)"""

    def __init__(self, script: dict[str, list[Any]] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.requests: list[DispatchRequest] = []

    async def dispatch(self, request: DispatchRequest) -> Any:
        self.requests.append(request)
        answers = self.script.get(request.action)
        if not answers:
            return await super().dispatch(request)
        answer = answers.pop(0) if len(answers) > 1 else answers[0]
        if isinstance(answer, ErrorObject):
            raise StepError(answer)
        if callable(answer):
            produced = answer(request)
            return await produced if inspect.isawaitable(produced) else produced
        return answer


@dataclass
class Run:
    ir: ProcedureIR
    machine: Machine
    graph: Any
    config: dict[str, Any]
    events: list[EventData] = field(default_factory=list)
    final: dict[str, Any] = field(default_factory=dict)

    def types(self) -> list[str]:
        return [e.TYPE for e in self.events]

    def of(self, event_type: str) -> list[EventData]:
        return [e for e in self.events if event_type == e.TYPE]

    @property
    def outcome(self) -> dict[str, Any] | None:
        return self.final.get("outcome")

    @property
    def waits(self) -> list[dict[str, Any]]:
        return list(self.final.get("waits", {}).values())

    async def resume(self, **resolution: Any) -> Run:
        self.final = await self.graph.ainvoke(Command(resume=resolution), self.config, durability="sync")
        return self


async def run_doc(doc: dict[str, Any], inputs: dict[str, Any] | None = None,
                  dispatcher: Dispatcher | None = None, run_id: str = "run-1",
                  callbacks: CallbackConfig | None = None,
                  sleep: Callable[[float], Awaitable[None]] | None = None, limiter: Limiter | None = None,
                  appending: Callable[[EventData], Awaitable[None]] | None = None,
                  steps: MemoryStepStore | None = None) -> Run:
    """``appending``: awaited before each event is recorded, as a slow event store append would be (tests that
    orchestrate what other frames do while a node's event is being appended). ``steps``: the step store (a fresh
    :class:`MemoryStepStore` by default)."""
    ir = compile_ok(doc)
    events: list[EventData] = []

    async def emit(event: EventData) -> int:
        if appending is not None:
            await appending(event)
        events.append(event)
        return len(events)

    async def no_sleep(seconds: float) -> None:
        return None

    values = validate_inputs(ir.variables, inputs or {}, {"run_id": run_id})
    machine = Machine(ir=ir, run=RunInfo(run_id=run_id, run_created={"input_vars": values, "root_run_id": run_id},
                                         started_at="2026-01-01T00:00:00.000000Z"),
                      emit=emit, steps=steps or MemoryStepStore(run_id), dispatcher=dispatcher or Dispatcher(),
                      sleep=sleep or no_sleep, callbacks=callbacks, limiter=limiter)
    graph = build_graph(machine, InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": run_id}, "recursion_limit": 100_000}
    run = Run(ir=ir, machine=machine, graph=graph, config=config, events=events)
    run.final = await graph.ainvoke(machine.initial_state(values), config, durability="sync")
    return run


def doc(nodes: dict[str, Any], start: str = "a", **extra: Any) -> dict[str, Any]:
    return {"procedure_id": "p", "version": "1", **extra, "workflow_graph": {"start_node": start, "nodes": nodes}}


# -- small builders and outcome readers of the node-type tests ---------------------------------------------

END = {"type": "terminate"}


def setv(step_id: str, variable: str, value: Any) -> dict[str, Any]:
    return {"step_id": step_id, "action": "set_variable", "variable": variable, "value": value}


def calc(step_id: str, expression: str, out: str | None = None) -> dict[str, Any]:
    step: dict[str, Any] = {"step_id": step_id, "action": "calculate", "expression": expression}
    if out:
        step["output_variable"] = out
    return step


def outputs(run: Run) -> dict[str, Any]:
    assert run.outcome is not None, run.final
    assert run.outcome["status"] == "completed", run.outcome
    result: dict[str, Any] = run.outcome["outputs"]
    return result


def error(run: Run) -> dict[str, Any]:
    assert run.outcome is not None, run.final
    assert run.outcome["status"] == "failed", run.outcome
    result: dict[str, Any] = run.outcome["error"]
    return result


def fan(**extra: Any) -> dict[str, Any]:
    return {"type": "parallel", "next_node": "join", **extra,
            "branches": [{"branch_id": "b1", "start_node": "one"}, {"branch_id": "b2", "start_node": "two"},
                         {"branch_id": "b3", "start_node": "three"}]}


JOIN = {"type": "terminate", "outputs": {"a": "{{a}}", "b": "{{b}}", "c": "{{c}}", "results": "{{parallel_results}}"}}


def diagnostics(nodes: dict[str, Any], start: str = "a", **extra: Any) -> list[tuple[str, str, str]]:
    from ckp_core.compiler import compile_document

    result = compile_document(doc(nodes, start=start, **extra))
    return [(d.severity, d.code, d.path) for d in result.diagnostics]


NODE = "/workflow_graph/nodes"
