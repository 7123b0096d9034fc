"""Randomised crashes inside parallel nodes under wall-clock scheduling (ckp.md §3.8, §7.3, §7.4): the run is
cut off at a random moment (its task canceled, as a SIGKILL leaves it: only what the saver and the step store hold
survives), then resumed from the last checkpoint by a fresh interpreter. Whatever the moment and the
checkpoint_strategy, the resumed run ends with the outputs of an uninterrupted run, no step recorded completed
before the cut is dispatched again (it is replayed), and a step cut off mid-call is re-sent with the same key.
Seeds are fixed, so a failure is reproducible. (The end-to-end SIGKILL tests with real processes are in
tests/test_chaos.py.)"""

from __future__ import annotations

import asyncio
import random
from typing import Any

import pytest
from langgraph.checkpoint.memory import InMemorySaver

from ckp_core.variables import validate_inputs
from langorch_runtime.executor import build_graph
from langorch_runtime.machine import Dispatcher, DispatchRequest, Machine, RunInfo
from langorch_runtime.steps import MemoryStepStore
from runtime_harness import compile_ok, doc

pytestmark = pytest.mark.unit


def scenario(seed: int) -> tuple[dict[str, Any], dict[str, float], float]:
    rng = random.Random(seed)
    latency = {f"b{i}": rng.choice([0.0, 0.005, 0.02, 0.04]) for i in range(rng.randint(2, 3))}
    strategy = rng.choice(["every_node", "critical_nodes_only", "disabled"])
    limit = rng.choice([None, 1])
    nodes: dict[str, Any] = {
        "pre": {"type": "sequence", "next_node": "fan", "steps": [
            {"step_id": "p", "action": "set_variable", "variable": "base", "value": seed}]},
        "fan": {"type": "parallel", "next_node": "post",
                "branches": [{"branch_id": b, "start_node": f"{b}_0"} for b in latency],
                **({"max_concurrency": limit} if limit else {})},
        "post": {"type": "sequence", "agent": "API", "next_node": "end", "is_checkpoint": rng.random() < 0.5,
                 "steps": [{"step_id": "sum", "action": "work", "branch": "post", "hop": 0,
                            "output_variable": "post_out"}]},
        "end": {"type": "terminate", "outputs": {"post": "{{post_out}}", **{b: f"{{{{{b}_out}}}}" for b in latency}}},
    }
    for b in latency:
        length = rng.randint(1, 3)
        for j in range(length):
            nodes[f"{b}_{j}"] = {"type": "sequence", "agent": "API", "is_checkpoint": rng.random() < 0.3,
                                 "next_node": f"{b}_{j + 1}" if j + 1 < length else "post",
                                 "steps": [{"step_id": "call", "action": "work", "branch": b, "hop": j,
                                            "prev": f"{{{{{b}_out}}}}", "output_variable": f"{b}_out"}]}
    return doc(nodes, start="pre", global_config={"checkpoint_strategy": strategy}), latency, rng.uniform(0, 0.12)


class Agent(Dispatcher):
    """Answers deterministically from the request; de-duplicates by Idempotency-Key like a real agent (§9.1)."""

    def __init__(self, latency: dict[str, float]) -> None:
        self.latency = latency
        self.requests: list[str] = []
        self.answers: dict[str, Any] = {}

    async def dispatch(self, request: DispatchRequest) -> Any:
        self.requests.append(request.idempotency_key)
        if request.idempotency_key in self.answers:
            return self.answers[request.idempotency_key]
        await asyncio.sleep(self.latency.get(request.params["branch"], 0.01))
        answer = f"{request.params['branch']}:{request.params['hop']}<{request.params.get('prev')}>"
        self.answers[request.idempotency_key] = answer
        return answer


async def execute(document: dict[str, Any], latency: dict[str, float], cut_at: float | None) -> tuple[
        dict[str, Any], Agent, set[str], list[str]]:
    ir = compile_ok(document)
    run_id = "run-crash"
    values = validate_inputs(ir.variables, {}, {"run_id": run_id})
    saver, steps, agent = InMemorySaver(), MemoryStepStore(run_id), Agent(latency)
    config: dict[str, Any] = {"configurable": {"thread_id": run_id}, "recursion_limit": 100_000}

    def graph() -> Any:
        async def emit(event: Any) -> int:
            return 0

        async def no_sleep(seconds: float) -> None:
            return None

        machine = Machine(ir=ir, run=RunInfo(run_id=run_id, run_created={"input_vars": values, "root_run_id": run_id},
                                             started_at="2026-01-01T00:00:00.000000Z"),
                          emit=emit, steps=steps, dispatcher=agent, sleep=no_sleep)
        return build_graph(machine, saver), machine

    g, machine = graph()
    first = asyncio.create_task(g.ainvoke(machine.initial_state(values), config, durability="sync"))
    if cut_at is None:
        return await first, agent, set(), []
    done, _ = await asyncio.wait({first}, timeout=cut_at)
    if done:  # finished before the cut: nothing to recover
        return first.result(), agent, set(), []
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first
    completed = {r.idempotency_key for r in steps.records.values() if r.status == "completed"}
    before = len(agent.requests)
    g, machine = graph()  # a fresh interpreter, as a new replica builds one
    final = await g.ainvoke(None, config, durability="sync")
    return final, agent, completed, agent.requests[before:]


@pytest.mark.parametrize("seed", range(60))
async def test_a_run_cut_off_at_a_random_moment_resumes_to_the_same_outputs_exactly_once(seed: int) -> None:
    document, latency, cut_at = scenario(seed)
    reference, _, _, _ = await execute(document, latency, None)
    final, agent, completed, resent = await asyncio.wait_for(execute(document, latency, cut_at), 30)
    assert final["outcome"] is not None
    assert final["outcome"]["status"] == "completed", final["outcome"]
    assert final["outcome"]["outputs"] == reference["outcome"]["outputs"]
    # a step recorded completed before the cut is replayed from the step store, never dispatched again
    assert not completed & set(resent), sorted(completed & set(resent))
    # every step instance was answered once by the agent (re-sent keys are the same keys)
    assert len(agent.answers) == len(set(agent.requests))
