"""Randomised parallel nodes under wall-clock scheduling (ckp.md §3.8): branches of agent calls with random
latencies, some failing, under every wait strategy and branch_failure mode. Whatever the interleaving, each run
ends, every branch is reported exactly once, and the merge, winner and failure follow §3.8 steps 3–7.
Seeds are fixed, so a failure is reproducible."""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest

from ckp_core.events import ErrorObject
from langorch_runtime.machine import DispatchRequest, StepError
from runtime_harness import ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit


def scenario(seed: int) -> tuple[dict[str, Any], dict[str, float], set[str], str, str]:
    """A parallel node of 2–4 branches (any max_concurrency), each a chain of 1–3 agent nodes, under any
    checkpoint_strategy; returns the document, each branch's call latency (s), the branches that fail, the wait
    strategy and branch_failure."""
    rng = random.Random(seed)
    n = rng.randint(2, 4)
    wait_strategy = rng.choice(["all", "any"])
    branch_failure = rng.choice(["continue", "fail"])
    latency = {f"b{i}": rng.choice([0.0, 0.005, 0.02, 0.05]) for i in range(n)}
    failing = {b for b in latency if rng.random() < 0.3}
    limit = rng.choice([None, 1, 2])
    strategy = rng.choice(["every_node", "critical_nodes_only", "disabled"])
    nodes: dict[str, Any] = {
        "fan": {"type": "parallel", "wait_strategy": wait_strategy, "branch_failure": branch_failure,
                "next_node": "join", "branches": [{"branch_id": b, "start_node": f"{b}_0"} for b in latency],
                **({"max_concurrency": limit} if limit else {})},
        "join": {"type": "terminate", "outputs": {"results": "{{parallel_results}}",
                                                  **{b: f"{{{{{b}_last}}}}" for b in latency}}},
    }
    for b in latency:
        length = rng.randint(1, 3)
        for j in range(length):
            nodes[f"{b}_{j}"] = {"type": "sequence", "agent": "API",
                                 "next_node": f"{b}_{j + 1}" if j + 1 < length else "join",
                                 "steps": [{"step_id": "call", "action": "work", "branch": b, "hop": j,
                                            "last": j + 1 == length, "output_variable": f"{b}_last"}]}
    return (doc(nodes, start="fan", global_config={"checkpoint_strategy": strategy}), latency, failing,
            wait_strategy, branch_failure)


@pytest.mark.parametrize("seed", range(100))
async def test_random_parallel_nodes_keep_the_section_3_8_invariants(seed: int) -> None:
    document, latency, failing, wait_strategy, branch_failure = scenario(seed)
    finished: list[str] = []  # branches whose last call answered, in order

    async def work(request: DispatchRequest) -> Any:
        branch = request.params["branch"]
        await asyncio.sleep(latency[branch])
        if branch in failing and request.params["last"]:
            raise StepError(ErrorObject(code="agent_error", message=f"{branch} failed"))
        if request.params["last"]:
            finished.append(branch)
        return f"{branch}:{request.params['hop']}"

    run = await asyncio.wait_for(run_doc(document, dispatcher=ScriptedDispatcher({"work": [work]})), 30)
    assert run.outcome is not None, "the run did not end"
    reported = [e.branch_id for e in run.of("parallel_branch_completed")]
    assert sorted(reported) == sorted(latency), reported  # every branch exactly once
    status = {e.branch_id: e.status for e in run.of("parallel_branch_completed")}
    assert {s for b, s in status.items() if b in failing} <= {"failed", "canceled"}
    assert {s for b, s in status.items() if b not in failing} <= {"completed", "canceled"}
    first_failure = next((b for b in reported if status[b] == "failed"), None)
    if branch_failure == "fail" and first_failure is not None and (
            wait_strategy == "all" or not any(status[b] == "completed" for b in reported[:reported.index(
                first_failure)])):
        assert run.outcome["status"] == "failed"
        assert run.outcome["error"]["code"] == "parallel_branch_failed"
        assert run.outcome["error"]["details"] == {"branch_id": first_failure}
        return
    if not any(s == "completed" for s in status.values()):
        assert run.outcome["status"] == "failed"
        assert run.outcome["error"]["code"] == "parallel_all_failed"
        return
    assert run.outcome["status"] == "completed", run.outcome
    outputs = run.outcome["outputs"]
    results = outputs["results"]
    assert {b: r["status"] for b, r in results["branches"].items()} == status
    if wait_strategy == "any":
        winner = results["winner"]
        assert status[winner] == "completed"
        assert winner == next(b for b in reported if status[b] == "completed")  # the first to complete
        assert winner in finished
        # a sibling that reached the join in the same instant is reported completed, never merged
        merged = [b for b in latency if outputs[b] is not None]
        assert merged == [winner]  # only the winner's delta is merged
    else:
        assert results["winner"] is None
        assert "canceled" not in status.values()
        for b in latency:
            assert (outputs[b] is not None) == (status[b] == "completed"), (b, outputs[b], status[b])
