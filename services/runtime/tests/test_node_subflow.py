"""The subflow node on the interpreter's side (ckp.md §3.9); end-to-end runs are in tests/test_subflow_runs.py."""

from __future__ import annotations

from typing import Any

import pytest

from runtime_harness import END, Run, doc, error, outputs, setv

pytestmark = pytest.mark.unit


# --- §3.9 subflow (interpreter side; end-to-end runs are in tests/test_subflow_runs.py) -------------


class FakeChildren:
    """Records child-run starts; the parent is resumed by the test as the child-finished command would."""

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.starts: list[dict[str, Any]] = []

    async def start(self, **kwargs: Any) -> str:
        self.starts.append(kwargs)
        return self.version


async def run_with_children(document: dict[str, Any], children: FakeChildren,
                            run_created: dict[str, Any] | None = None,
                            inputs: dict[str, Any] | None = None) -> Run:
    from langgraph.checkpoint.memory import InMemorySaver

    from ckp_core.events import EventData
    from ckp_core.variables import validate_inputs
    from langorch_runtime.executor import build_graph
    from langorch_runtime.machine import Machine, RunInfo
    from langorch_runtime.steps import MemoryStepStore
    from runtime_harness import compile_ok

    ir = compile_ok(document)
    events: list[EventData] = []

    async def emit(event: EventData) -> int:
        events.append(event)
        return len(events)

    async def no_sleep(seconds: float) -> None:
        return None

    values = validate_inputs(ir.variables, inputs or {}, {"run_id": "run-1"})
    created = {"input_vars": values, "root_run_id": "run-1", **(run_created or {})}
    machine = Machine(ir=ir, run=RunInfo(run_id="run-1", run_created=created,
                                         started_at="2026-01-01T00:00:00.000000Z"),
                      emit=emit, steps=MemoryStepStore("run-1"), sleep=no_sleep, children=children)
    graph = build_graph(machine, InMemorySaver())
    config: dict[str, Any] = {"configurable": {"thread_id": "run-1"}, "recursion_limit": 100_000}
    run = Run(ir=ir, machine=machine, graph=graph, config=config, events=events)
    run.final = await graph.ainvoke(machine.initial_state(values), config, durability="sync")
    return run


def call(**extra: Any) -> dict[str, Any]:
    return {"type": "subflow", "procedure_id": "child", "next_node": "z", **extra}


async def test_subflow_refuses_a_procedure_already_on_the_call_chain() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({"a": call(), "z": END}), kids, {"call_chain": ["child", "mid", "p"]})
    err = error(run)
    assert err["code"] == "subflow_recursion"
    assert "child -> mid -> p -> child" in err["message"]
    assert kids.starts == []


@pytest.mark.parametrize(("chain_length", "started"), [(9, True), (10, False)])
async def test_subflow_depth_bound_is_ten_runs(chain_length: int, started: bool) -> None:
    kids = FakeChildren()
    chain = [f"p{i}" for i in range(chain_length - 1)] + ["p"]
    run = await run_with_children(doc({"a": call(), "z": END}), kids, {"call_chain": chain})
    if started:
        assert run.outcome is None
        assert kids.starts[0]["call_chain"] == [*chain, "child"]
    else:
        assert error(run)["code"] == "subflow_depth_exceeded"
        assert kids.starts == []


async def test_subflow_inputs_inherit_context_then_mapping_and_bare_paths_keep_types() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(inherit_context=True, input_mapping={"id": "order.id", "label": "n-{{order.id}}", "flag": False,
                                                       "keep": "plain text"}),
        "z": END}, variables_schema={"order": {"type": "object", "default": {"id": 7}},
                                     "flag": {"type": "boolean", "default": True}}), kids)
    assert run.outcome is None
    inputs = kids.starts[0]["inputs"]
    assert inputs == {"order": {"id": 7}, "flag": False, "id": 7, "label": "n-7", "keep": "plain text"}


async def test_subflow_output_mapping_prefers_outputs_then_final_variables_and_warns_when_missing() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(output_mapping={"x": "result.value", "y": "internal", "w": "result.nope", "v": "ghost"}),
        "z": {"type": "terminate", "outputs": {"x": "{{x}}", "y": "{{y}}", "w": "{{w}}", "v": "{{v}}"}}}), kids)
    child_id = kids.starts[0]["child_run_id"]
    await run.resume(wait_id=child_id, status="completed", outputs={"result": {"value": 3}},
                     variables={"result": {"value": "shadowed"}, "internal": [1]})
    assert outputs(run) == {"x": 3, "y": [1], "w": None, "v": None}
    fields = sorted(w.location["field"] for w in run.of("template_warning"))
    assert fields == ["/output_mapping/v", "/output_mapping/w"]


async def test_subflow_with_an_empty_output_mapping_sets_subflow_output() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(), "z": {"type": "terminate", "outputs": {"out": "{{subflow_output}}"}}}), kids)
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"k": [1, 2]},
                     variables={"other": 1})
    assert outputs(run) == {"out": {"k": [1, 2]}}


@pytest.mark.parametrize(("on_failure", "max_retries", "children_started", "status"), [
    ("fail_parent", 1, 1, "failed"), ("continue", 1, 1, "completed"), ("retry", 0, 1, "failed"),
    ("retry", 2, 3, "failed")])
async def test_subflow_on_failure_modes(on_failure: str, max_retries: int, children_started: int,
                                        status: str) -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(on_failure=on_failure, max_retries=max_retries, output_mapping={"r": "r"}),
        "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}}), kids)
    while run.outcome is None:
        await run.resume(wait_id=kids.starts[-1]["child_run_id"], status="failed",
                         error={"code": "terminated_failed", "message": "child said no"})
    assert len(kids.starts) == children_started
    assert [s["rerun_of"] for s in kids.starts] == [None] + [s["child_run_id"] for s in kids.starts[:-1]]
    assert run.outcome["status"] == status
    if status == "failed":
        assert run.outcome["error"]["code"] == "subflow_failed"
        assert run.outcome["error"]["cause"]["code"] == "terminated_failed"
    else:
        assert run.outcome["outputs"] == {"r": None}
    assert len(run.of("subflow_failed")) == children_started


async def test_subflow_retry_succeeding_on_the_second_child_maps_its_outputs() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "a": call(on_failure="retry", output_mapping={"r": "r"}),
        "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}}), kids)
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="canceled")
    await run.resume(wait_id=kids.starts[1]["child_run_id"], status="completed", outputs={"r": 5})
    assert outputs(run) == {"r": 5}
    assert [e.attempt for e in run.of("subflow_started")] == [1, 2]


async def test_subflows_in_parallel_branches_and_a_dry_run_parent() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "fan": {"type": "parallel", "next_node": "z", "branches": [{"branch_id": "l", "start_node": "cl"},
                                                                   {"branch_id": "r", "start_node": "cr"}]},
        "cl": call(output_mapping={"left": "v"}, next_node=None),
        "cr": call(output_mapping={"right": "v"}, next_node=None),
        "z": {"type": "terminate", "outputs": {"l": "{{left}}", "r": "{{right}}"}}}, start="fan",
        global_config={"execution_mode": "dry_run"}), kids)
    assert len(kids.starts) == 2
    assert all(s["dry_run"] for s in kids.starts)
    assert len(run.waits) == 2
    await run.resume(wait_id=kids.starts[1]["child_run_id"], status="completed", outputs={"v": "R"})
    assert run.outcome is None
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"v": "L"})
    assert outputs(run) == {"l": "L", "r": "R"}


async def test_subflow_in_a_loop_starts_one_child_per_iteration() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "each": {"type": "loop", "iterator": "[1, 2]", "iterator_variable": "n", "body_node": "c",
                 "collect_variable": "got", "collect_expression": "{{sub}}", "next_node": "z"},
        "c": call(input_mapping={"n": "{{n}}"}, output_mapping={"sub": "double"}, next_node=None),
        "z": {"type": "terminate", "outputs": {"got": "{{got}}"}}}, start="each"), kids)
    for expected in (1, 2):
        start = kids.starts[-1]
        assert start["inputs"] == {"n": expected}
        await run.resume(wait_id=start["child_run_id"], status="completed", outputs={"double": expected * 2})
    assert outputs(run) == {"got": [2, 4]}
    assert len({s["child_run_id"] for s in kids.starts}) == 2


async def test_a_late_result_of_a_child_whose_branch_was_canceled_is_ignored() -> None:
    kids = FakeChildren()
    run = await run_with_children(doc({
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "ask",
                "branches": [{"branch_id": "sub", "start_node": "c"}, {"branch_id": "fast", "start_node": "w"}]},
        "c": call(output_mapping={"from_child": "v"}, next_node=None),
        "w": {"type": "sequence", "steps": [setv("s", "fast", True)]},
        "ask": {"type": "human_approval", "on_approve": "z", "on_reject": "z"},
        "z": {"type": "terminate", "outputs": {"fast": "{{fast}}", "from_child": "{{from_child}}",
                                               "winner": "{{parallel_results.winner}}"}}}, start="fan"), kids)
    assert [w["kind"] for w in run.waits] == ["approval"]
    await run.resume(wait_id=kids.starts[0]["child_run_id"], status="completed", outputs={"v": "late"})
    assert run.outcome is None
    assert [w["kind"] for w in run.waits] == ["approval"]
    await run.resume(wait_id=run.waits[0]["id"], decision="approved", status="approved")
    assert outputs(run) == {"fast": True, "from_child": None, "winner": "fast"}
