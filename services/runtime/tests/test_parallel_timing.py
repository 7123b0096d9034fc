"""Parallel branches run by wall-clock time (ckp.md §3.8 step 3, §3.15): a branch of quick nodes is not held back by
a sibling's slow call, the first branch to finish wins ``any``, and a sibling ended by a winner, a failed branch
under ``branch_failure: fail`` or a ``terminate`` has its in-flight call aborted. Also: a branch routed back into
its own parallel node nests a bounded number of times (``max_hops``)."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from langorch_runtime.machine import DispatchRequest
from runtime_harness import ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit

SLOW_S = 1.5


class SlowCall:
    """An agent action that takes ``SLOW_S`` seconds; records whether it was aborted or answered."""

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.aborted = False
        self.answered = False

    async def __call__(self, request: DispatchRequest) -> Any:
        self.started.set()
        try:
            await asyncio.sleep(SLOW_S)
        except asyncio.CancelledError:
            self.aborted = True
            raise
        self.answered = True
        return "slow"


def setv(step_id: str, variable: str, value: Any) -> dict[str, Any]:
    return {"step_id": step_id, "action": "set_variable", "variable": variable, "value": value}


def fan(wait_strategy: str = "all", branch_failure: str = "continue", quick: dict[str, Any] | None = None,
        **config: Any) -> dict[str, Any]:
    """``fan`` with a slow branch (one agent call) and a quick branch of three internal nodes."""
    nodes: dict[str, Any] = {
        "fan": {"type": "parallel", "wait_strategy": wait_strategy, "branch_failure": branch_failure,
                "next_node": "join", "branches": [{"branch_id": "slow", "start_node": "call"},
                                                  {"branch_id": "quick", "start_node": "q1"}]},
        "call": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "wait", "action": "slow", "output_variable": "slow_out"}]},
        "q1": {"type": "sequence", "next_node": "q2", "steps": [setv("s1", "q", 1)]},
        "q2": {"type": "sequence", "next_node": "q3", "steps": [setv("s2", "q", 2)]},
        "q3": {"type": "sequence", "next_node": "join", "steps": [setv("s3", "q", 3)]},
        "join": {"type": "terminate", "outputs": {"q": "{{q}}", "slow": "{{slow_out}}",
                                                  "results": "{{parallel_results}}"}},
        **(quick or {}),
    }
    return doc(nodes, start="fan", **({"global_config": config} if config else {}))


async def test_any_is_won_by_the_branch_that_finishes_first_and_the_loser_call_is_aborted() -> None:
    slow = SlowCall()
    run = await run_doc(fan("any"), dispatcher=ScriptedDispatcher({"slow": [slow]}))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"]["results"]["winner"] == "quick"
    assert run.outcome["outputs"]["q"] == 3
    assert run.outcome["outputs"]["slow"] is None
    assert run.outcome["outputs"]["results"]["branches"]["slow"] == {"status": "canceled", "error": None}
    assert slow.started.is_set()
    assert slow.aborted
    assert not slow.answered
    # the slow step was started and cut off: no completion of it, and its node never completed
    assert [e.step_id for e in run.of("step_started") if e.step_id == "wait"] == ["wait"]
    assert not [e for e in run.of("step_completed") if e.step_id == "wait"]
    assert "call" not in [e.node_id for e in run.of("node_completed")]
    completed = {e.branch_id: e.status for e in run.of("parallel_branch_completed")}
    assert completed == {"quick": "completed", "slow": "canceled"}


async def test_all_lets_a_quick_branch_run_its_nodes_while_a_sibling_call_is_in_flight() -> None:
    slow = SlowCall()
    run = await run_doc(fan("all"), dispatcher=ScriptedDispatcher({"slow": [slow]}))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"]["q"] == 3
    assert run.outcome["outputs"]["slow"] == "slow"
    assert slow.answered
    assert not slow.aborted
    order = [(e.TYPE, getattr(e, "node_id", None)) for e in run.events
             if e.TYPE in ("node_completed", "parallel_branch_completed")]
    quick_done = order.index(("node_completed", "q3"))
    slow_done = order.index(("node_completed", "call"))
    assert quick_done < slow_done, order
    # the quick branch ended first, so its completion is reported first
    assert [e.branch_id for e in run.of("parallel_branch_completed")] == ["quick", "slow"]


async def test_terminate_in_a_branch_ends_the_run_at_once_and_aborts_the_sibling_call() -> None:
    slow = SlowCall()
    document = fan("all", quick={"q3": {"type": "terminate", "status": "success", "outputs": {"by": "quick"}}})
    run = await run_doc(document, dispatcher=ScriptedDispatcher({"slow": [slow]}))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"] == {"by": "quick"}
    assert slow.aborted
    assert not slow.answered
    assert not [e for e in run.of("step_completed") if e.step_id == "wait"]


async def test_a_failed_branch_under_branch_failure_fail_aborts_the_sibling_call() -> None:
    slow = SlowCall()
    document = fan("all", "fail", quick={"q2": {"type": "sequence", "next_node": "q3", "steps": [
        {"step_id": "boom", "action": "calculate", "expression": "1 / 0"}]}})
    run = await run_doc(document, dispatcher=ScriptedDispatcher({"slow": [slow]}))
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "parallel_branch_failed"
    assert run.outcome["error"]["details"] == {"branch_id": "quick"}
    assert slow.aborted
    assert not slow.answered


async def test_any_with_a_paused_sibling_still_goes_on_when_the_other_branch_wins() -> None:
    """A loser that is not in flight (paused on an approval) is canceled too, its wait dropped."""
    document = fan("any", quick={"call": {"type": "human_approval", "prompt": "ok?", "on_approve": "join",
                                          "on_reject": "join"}})
    run = await run_doc(document)
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"]["results"]["winner"] == "quick"
    assert run.waits == []


async def test_a_branch_routed_back_into_its_own_parallel_node_nests_a_bounded_number_of_times() -> None:
    document = doc({
        "fan": {"type": "parallel", "next_node": "join", "branches": [{"branch_id": "b", "start_node": "again"}]},
        "again": {"type": "sequence", "next_node": "fan", "steps": [setv("s", "x", 1)]},
        "join": {"type": "terminate", "outputs": {}},
    }, start="fan", global_config={"max_hops": 5})
    run = await asyncio.wait_for(run_doc(document), 60)
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    hops = [e for e in run.of("node_error") if e.error.code == "max_hops_exceeded"]
    assert len(hops) == 1, [e.error for e in run.of("node_error")]
    assert hops[0].node_id == "fan"
    # the main frame's budget of 5 was spent by the re-entries: four nested copies of fan ran inside it
    assert len([e for e in run.of("parallel_started")]) == 5
