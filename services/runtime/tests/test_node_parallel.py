"""The parallel node (ckp.md §3.8), run in-process through the interpreter."""

from __future__ import annotations

import pytest

from runtime_harness import JOIN, calc, doc, error, fan, outputs, run_doc, setv

pytestmark = pytest.mark.unit


# --- §3.8 parallel ---------------------------------------------------------------------------------------


async def test_parallel_continue_keeps_completed_branches_and_drops_failed_writes() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "next_node": "join", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "next_node": "join", "steps": [setv("s", "b", 2), calc("c", "1 / 0")]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert (out["a"], out["b"], out["c"]) == (1, None, 3)
    branches = out["results"]["branches"]
    assert branches["b1"] == {"status": "completed", "error": None}
    assert branches["b2"]["status"] == "failed"
    assert branches["b2"]["error"]["code"] == "expression_error"
    assert out["results"]["winner"] is None
    [done] = run.of("parallel_completed")
    assert (done.succeeded, done.failed, done.canceled) == (2, 1, 0)
    statuses = {e.branch_id: e.status for e in run.of("parallel_branch_completed")}
    assert statuses == {"b1": "completed", "b2": "failed", "b3": "completed"}


async def test_parallel_every_branch_failing_is_parallel_all_failed() -> None:
    failing = {"type": "sequence", "steps": [calc("c", "1 / 0")]}
    run = await run_doc(doc({"fan": fan(), "one": failing, "two": failing, "three": failing, "join": JOIN},
                            start="fan"))
    assert error(run)["code"] == "parallel_all_failed"


@pytest.mark.parametrize("mode", ["fail", "stop"])
async def test_parallel_branch_failure_fail_cancels_the_rest(mode: str) -> None:
    run = await run_doc(doc({
        "fan": fan(branch_failure=mode, max_concurrency=1),
        "one": {"type": "sequence", "steps": [calc("c", "1 / 0")]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    err = error(run)
    assert err["code"] == "parallel_branch_failed"
    assert err["details"] == {"branch_id": "b1"}
    assert err["cause"]["code"] == "expression_error"
    assert run.of("step_started")[-1].frame == "fan/b1"


async def test_parallel_any_skips_a_failed_branch_and_takes_the_first_completed() -> None:
    run = await run_doc(doc({
        "fan": fan(wait_strategy="any", max_concurrency=1),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1), calc("c", "1 / 0")]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert out["results"]["winner"] == "b2"
    assert run.of("parallel_started")[0].wait_strategy == "any"
    assert (out["a"], out["b"], out["c"]) == (None, 2, None)
    assert out["results"]["branches"]["b3"]["status"] == "canceled"
    [done] = run.of("parallel_completed")
    assert (done.succeeded, done.failed, done.canceled) == (1, 1, 1)


async def test_parallel_branches_run_on_private_copies_and_deltas_use_deep_equality() -> None:
    run = await run_doc(doc({
        "init": {"type": "sequence", "next_node": "fan", "steps": [
            setv("s", "cfg", {"k": [1, 2]}), setv("t", "a", 0), setv("u", "gone", 1)]},
        "fan": fan(max_concurrency=1),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1), setv("t", "cfg", {"k": [1, 2]})]},
        # b2 does not see b1's write of a
        "two": {"type": "sequence", "steps": [setv("s", "b", "{{a}}"), setv("t", "cfg", {"k": [1, 2]})]},
        "three": {"type": "sequence", "steps": [setv("s", "c", "{{a}}")]},
        "join": {"type": "terminate", "outputs": {"a": "{{a}}", "b": "{{b}}", "c": "{{c}}", "cfg": "{{cfg}}",
                                                  "gone": "{{gone}}"}}}, start="init"))
    assert outputs(run) == {"a": 1, "b": 0, "c": 0, "cfg": {"k": [1, 2]}, "gone": 1}
    assert run.of("parallel_merge_conflict") == []


async def test_parallel_three_way_conflict_lists_every_branch_and_last_wins() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "steps": [setv("s", "a", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "a", 3)]},
        "join": JOIN}, start="fan"))
    assert outputs(run)["a"] == 3
    conflicts = run.of("parallel_merge_conflict")
    assert [c.variable for c in conflicts] == ["a"]
    assert conflicts[0].branches == ["b1", "b2", "b3"]


async def test_terminate_in_a_branch_ends_the_run_with_its_status() -> None:
    run = await run_doc(doc({
        "fan": fan(max_concurrency=1),
        "one": {"type": "terminate", "status": "failure", "outputs": {"from": "b1"}},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["outputs"] == {"from": "b1"}
    assert run.of("parallel_completed") == []
    assert "join" not in [e.node_id for e in run.of("node_started")]


async def test_branch_path_stops_at_the_join() -> None:
    run = await run_doc(doc({
        "fan": fan(),
        "one": {"type": "sequence", "next_node": "join", "steps": [setv("s", "a", 1)]},
        "two": {"type": "sequence", "next_node": "join", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "next_node": "join", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    assert outputs(run)["a"] == 1
    assert [e.frame for e in run.of("node_started") if e.node_id == "join"] == ["-"]


async def test_parallel_max_concurrency_starts_branches_in_declaration_order() -> None:
    run = await run_doc(doc({
        "fan": fan(max_concurrency=2),
        "one": {"type": "sequence", "next_node": "one2", "steps": [setv("s", "a", 1)]},
        "one2": {"type": "sequence", "steps": [setv("s", "a2", 1)]},
        "two": {"type": "sequence", "steps": [setv("s", "b", 2)]},
        "three": {"type": "sequence", "steps": [setv("s", "c", 3)]},
        "join": JOIN}, start="fan"))
    out = outputs(run)
    assert (out["a"], out["b"], out["c"]) == (1, 2, 3)
    firsts: list[str] = []
    for e in run.of("node_started"):
        branch = e.frame.split("/")[-1] if e.frame and "/" in e.frame else None
        if branch and branch not in firsts:
            firsts.append(branch)
    assert firsts == ["b1", "b2", "b3"]
    # b3 starts only once b2 (one node) has finished, while b1 is still on its second node
    started = [(e.node_id, e.frame) for e in run.of("node_started")]
    assert started.index(("three", "fan/b3")) > started.index(("two", "fan/b2"))
