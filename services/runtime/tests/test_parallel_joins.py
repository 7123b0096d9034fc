"""A branch that ends while its parallel node is being evaluated is not lost (ckp.md §3.8 step 3, §3.15).

The parallel node records the branches that ended, appending ``parallel_branch_completed`` for each, and waits for
the others (``Spawn``: its frame goes back to ``waiting``). A branch that reached its join during one of those
appends found its parent ``running`` and had nothing to wake: the node went back to waiting on a branch that was
already done, and the run stayed ``running`` for ever. These tests orchestrate such interleavings explicitly: the
in-memory event store's append of an event blocks (``appending``) until the sibling branch has ended (or its call
has started). Covered: the node looks at its branches again after its appends (and an ``any`` winner found so is
decided at once), the frame does not wait when a child ended after the node last looked (the lifecycle), and every
loser is canceled before the first cancellation is appended.
"""
from __future__ import annotations

import asyncio
from collections import defaultdict
from typing import Any

import pytest

from ckp_core.events import ErrorObject, EventData
from ckp_core.ir import NodeIR
from langorch_runtime.frames import Frame, NodeState, RunState
from langorch_runtime.machine import DispatchRequest, Machine, StepError
from langorch_runtime.machine.outcomes import Outcome, Spawn
from runtime_harness import Run, ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit

LIMIT_S = 5  # every orchestrated wait; the run itself is bounded too, so a regression fails instead of hanging


@pytest.fixture
def ended(monkeypatch: pytest.MonkeyPatch) -> defaultdict[str, asyncio.Event]:
    """Frame path → an event set once that frame has ended (after :meth:`Machine.finish` woke its parent)."""
    events: defaultdict[str, asyncio.Event] = defaultdict(asyncio.Event)
    finish = Machine.finish

    async def finishing(self: Machine, state: RunState, frame: Frame, result: dict[str, Any]) -> None:
        await finish(self, state, frame, result)
        events[frame.get("path", "")].set()

    monkeypatch.setattr(Machine, "finish", finishing)
    return events


def left_running(run: Run) -> str:
    frames = run.final.get("frames") or {}
    return "the run was left running: " + ", ".join(
        f"{f.get('path') or '-'} {f.get('status')} {f.get('result') and f['result'].get('status')}"
        f"{' recorded ' + str(f['node']['data'].get('status')) if f.get('node') else ''}" for f in frames.values())


def is_branch_completed(event: EventData, branch_id: str, status: str | None = None) -> bool:
    return event.TYPE == "parallel_branch_completed" and getattr(event, "branch_id", None) == branch_id and \
        (status is None or getattr(event, "status", None) == status)


def fan(wait_strategy: str, branch_failure: str = "continue", **nodes: Any) -> dict[str, Any]:
    """``fan`` with two branches, ``good`` (``g1`` then ``g2``, an agent call) and ``bad`` (``b1``, an agent
    call), each going on to ``join``; ``nodes`` replace some."""
    graph: dict[str, Any] = {
        "fan": {"type": "parallel", "wait_strategy": wait_strategy, "branch_failure": branch_failure,
                "next_node": "join", "branches": [{"branch_id": "good", "start_node": "g1"},
                                                  {"branch_id": "bad", "start_node": "b1"}]},
        "g1": {"type": "sequence", "next_node": "g2", "steps": [
            {"step_id": "prepare", "action": "set_variable", "variable": "prepared", "value": True}]},
        "g2": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "ask", "action": "answer", "output_variable": "answer"}]},
        "b1": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "break", "action": "fail", "output_variable": "never"}]},
        "join": {"type": "terminate", "outputs": {"answer": "{{answer}}", "results": "{{parallel_results}}"}},
        **nodes,
    }
    return doc(graph, start="fan")


@pytest.mark.parametrize("wait_strategy", ["all", "any"])
async def test_a_branch_that_ends_while_a_sibling_completion_is_appended_is_joined(
        ended: defaultdict[str, asyncio.Event], wait_strategy: str) -> None:
    """The reported hang: ``bad`` fails while ``good`` runs its last node (an agent call); ``good`` answers after
    ``bad`` ended, so the next super-step runs the parallel node and ``good``'s join together, and ``good`` reaches
    its join while ``parallel_branch_completed`` of ``bad`` is being appended."""
    asked = asyncio.Event()

    async def answer(request: DispatchRequest) -> Any:
        asked.set()
        await asyncio.wait_for(ended["fan/bad"].wait(), LIMIT_S)  # answers only once bad has ended
        return "ok"

    async def fail(request: DispatchRequest) -> Any:
        await asyncio.wait_for(asked.wait(), LIMIT_S)  # good's last call is in flight
        raise StepError(ErrorObject(code="agent_error", message="broken", retryable=False))

    joined_during_append: list[bool] = []

    async def appending(event: EventData) -> None:
        if is_branch_completed(event, "bad"):  # the append is slow: good reaches its join meanwhile
            await asyncio.wait_for(ended["fan/good"].wait(), LIMIT_S)
            joined_during_append.append(True)

    run = await asyncio.wait_for(run_doc(fan(wait_strategy), dispatcher=ScriptedDispatcher(
        {"answer": [answer], "fail": [fail]}), appending=appending), LIMIT_S)
    assert joined_during_append == [True]  # the interleaving happened as orchestrated
    assert run.outcome is not None, left_running(run)
    assert run.outcome["status"] == "completed", run.outcome
    results = run.outcome["outputs"]["results"]
    assert results["branches"]["bad"]["status"] == "failed"
    assert results["branches"]["good"] == {"status": "completed", "error": None}
    assert run.outcome["outputs"]["answer"] == "ok"
    assert results["winner"] == ("good" if wait_strategy == "any" else None)
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [  # type: ignore[attr-defined]
        ("bad", "failed"), ("good", "completed")]
    [done] = run.of("parallel_completed")
    assert (done.succeeded, done.failed, done.canceled) == (1, 1, 0)  # type: ignore[attr-defined]


async def test_a_branch_that_fails_while_a_sibling_failure_is_appended_is_joined(
        ended: defaultdict[str, asyncio.Event]) -> None:
    """Both branches fail, the second while the first one's completion is appended (a branch that fails ends in
    its own node task): the node still sees both and fails with ``parallel_all_failed``."""
    document = fan("all", g1={"type": "sequence", "next_node": "join", "steps": [
        {"step_id": "divide", "action": "calculate", "expression": "1 / 0", "output_variable": "never"}]})
    release = asyncio.Event()

    async def fail(request: DispatchRequest) -> Any:
        raise StepError(ErrorObject(code="agent_error", message="broken", retryable=False))

    async def appending(event: EventData) -> None:
        if event.TYPE == "node_error" and getattr(event, "node_id", None) == "g1":
            await asyncio.wait_for(release.wait(), LIMIT_S)  # good's failure waits for bad's completion append
        if is_branch_completed(event, "bad"):
            release.set()
            await asyncio.wait_for(ended["fan/good"].wait(), LIMIT_S)

    run = await asyncio.wait_for(run_doc(document, dispatcher=ScriptedDispatcher({"fail": [fail]}),
                                         appending=appending), LIMIT_S)
    assert run.outcome is not None, left_running(run)
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "parallel_all_failed"
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [  # type: ignore[attr-defined]
        ("bad", "failed"), ("good", "failed")]


async def test_a_branch_that_ends_between_the_node_returning_and_its_wait_is_joined(
        ended: defaultdict[str, asyncio.Event], monkeypatch: pytest.MonkeyPatch) -> None:
    """The node's frame goes to ``waiting`` when the lifecycle applies the node's ``Spawn``, not when the node
    looked at its branches last. A branch that ends in between finds its parent still ``running``; its end is
    not lost: the node runs again. (An enforced SLA makes that window real on Python 3.11: ``asyncio.wait_for``
    runs the node as a task of its own, and its outcome is applied event-loop turns after it returned.) Here the
    window is held open until ``good`` has failed."""
    document = fan("all", g1={"type": "sequence", "next_node": "join", "steps": [
        {"step_id": "divide", "action": "calculate", "expression": "1 / 0", "output_variable": "never"}]})
    release = asyncio.Event()
    apply = Machine.apply

    async def applying(self: Machine, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                       outcome: Outcome) -> None:
        if isinstance(outcome, Spawn) and node.id == "fan" and current["data"].get("status") == {"bad": "failed"}:
            release.set()  # the node returned, waiting on good: good fails now, before its frame waits
            await asyncio.wait_for(ended["fan/good"].wait(), LIMIT_S)
        await apply(self, state, frame, node, current, outcome)

    monkeypatch.setattr(Machine, "apply", applying)

    async def fail(request: DispatchRequest) -> Any:
        raise StepError(ErrorObject(code="agent_error", message="broken", retryable=False))

    async def appending(event: EventData) -> None:
        if event.TYPE == "node_error" and getattr(event, "node_id", None) == "g1":
            await asyncio.wait_for(release.wait(), LIMIT_S)

    run = await asyncio.wait_for(run_doc(document, dispatcher=ScriptedDispatcher({"fail": [fail]}),
                                         appending=appending), LIMIT_S)
    assert release.is_set()  # the interleaving happened as orchestrated
    assert run.outcome is not None, left_running(run)
    assert run.outcome["status"] == "failed"
    assert run.outcome["error"]["code"] == "parallel_all_failed"
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [  # type: ignore[attr-defined]
        ("bad", "failed"), ("good", "failed")]


async def test_any_is_decided_when_the_winner_ends_while_a_sibling_completion_is_appended(
        ended: defaultdict[str, asyncio.Event]) -> None:
    """``any``: ``w`` reaches its join while ``parallel_branch_completed`` of ``bad`` is being appended, and
    ``slow`` meanwhile starts a long call. The node sees ``w``'s end before it decides to wait: ``w`` wins at once
    and ``slow``'s call is aborted — not left to run to its end first (the node would only run again once the
    super-step ends, and the super-step waits for that call)."""
    document = doc({
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "join", "branches": [
            {"branch_id": "w", "start_node": "g1"}, {"branch_id": "bad", "start_node": "b1"},
            {"branch_id": "slow", "start_node": "sa"}]},
        "g1": {"type": "sequence", "next_node": "g2", "steps": [
            {"step_id": "prepare", "action": "set_variable", "variable": "prepared", "value": True}]},
        "g2": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "ask", "action": "answer", "output_variable": "answer"}]},
        "b1": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "break", "action": "fail", "output_variable": "never"}]},
        "sa": {"type": "sequence", "next_node": "s0", "steps": [
            {"step_id": "sa", "action": "set_variable", "variable": "sa", "value": 1}]},
        "s0": {"type": "sequence", "agent": "API", "next_node": "s1", "steps": [
            {"step_id": "s0", "action": "prepare", "output_variable": "prep"}]},
        "s1": {"type": "sequence", "next_node": "s2", "steps": [
            {"step_id": "s1", "action": "set_variable", "variable": "s1", "value": 1}]},
        "s2": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "long", "action": "slow", "output_variable": "late"}]},
        "join": {"type": "terminate", "outputs": {"answer": "{{answer}}", "results": "{{parallel_results}}"}},
    }, start="fan")
    asked, prepared, long_started = asyncio.Event(), asyncio.Event(), asyncio.Event()
    long_call: list[str] = []

    async def answer(request: DispatchRequest) -> Any:  # w's last call: answers once bad has ended
        asked.set()
        await asyncio.wait_for(ended["fan/bad"].wait(), LIMIT_S)
        return "ok"

    async def prepare(request: DispatchRequest) -> Any:  # slow's first call: answers once bad has ended
        prepared.set()
        await asyncio.wait_for(ended["fan/bad"].wait(), LIMIT_S)
        return "p"

    async def fail(request: DispatchRequest) -> Any:  # bad fails once both those calls are in flight
        await asyncio.wait_for(asked.wait(), LIMIT_S)
        await asyncio.wait_for(prepared.wait(), LIMIT_S)
        raise StepError(ErrorObject(code="agent_error", message="broken", retryable=False))

    async def slow(request: DispatchRequest) -> Any:
        long_started.set()
        try:
            await asyncio.sleep(1)
        except asyncio.CancelledError:
            long_call.append("aborted")
            raise
        long_call.append("answered")
        return "late"

    async def appending(event: EventData) -> None:
        if is_branch_completed(event, "bad"):  # w joins and slow's long call starts during this append
            await asyncio.wait_for(ended["fan/w"].wait(), LIMIT_S)
            await asyncio.wait_for(long_started.wait(), LIMIT_S)

    run = await asyncio.wait_for(run_doc(document, dispatcher=ScriptedDispatcher(
        {"answer": [answer], "prepare": [prepare], "fail": [fail], "slow": [slow]}), appending=appending), LIMIT_S)
    assert run.outcome is not None, left_running(run)
    assert run.outcome["status"] == "completed", run.outcome
    assert run.outcome["outputs"]["results"]["winner"] == "w"
    assert long_call == ["aborted"]
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [  # type: ignore[attr-defined]
        ("bad", "failed"), ("w", "completed"), ("slow", "canceled")]


async def test_losers_are_all_canceled_before_their_cancellations_are_appended() -> None:
    """``any``: once ``quick`` won, every loser is canceled at once; a loser's call answering while another
    loser's ``parallel_branch_completed`` is being appended is aborted, not recorded."""
    document = doc({
        "fan": {"type": "parallel", "wait_strategy": "any", "next_node": "join", "branches": [
            {"branch_id": "quick", "start_node": "q"}, {"branch_id": "a", "start_node": "call_a"},
            {"branch_id": "b", "start_node": "call_b"}]},
        "q": {"type": "sequence", "next_node": "join", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1}]},
        "call_a": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "wait_a", "action": "slow_a", "output_variable": "a"}]},
        "call_b": {"type": "sequence", "agent": "API", "next_node": "join", "steps": [
            {"step_id": "wait_b", "action": "slow_b", "output_variable": "b"}]},
        "join": {"type": "terminate", "outputs": {"results": "{{parallel_results}}"}},
    }, start="fan")
    gate_b, settled_b = asyncio.Event(), asyncio.Event()
    outcome_b: list[str] = []

    async def slow_a(request: DispatchRequest) -> Any:
        await asyncio.sleep(LIMIT_S)
        return "a"

    async def slow_b(request: DispatchRequest) -> Any:
        try:
            await gate_b.wait()  # the run is bounded by LIMIT_S
        except asyncio.CancelledError:
            outcome_b.append("aborted")
            raise
        finally:
            settled_b.set()
        outcome_b.append("answered")
        return "b"

    async def appending(event: EventData) -> None:
        if is_branch_completed(event, "a", "canceled"):  # b's answer arrives during this append
            gate_b.set()
            await asyncio.wait_for(settled_b.wait(), LIMIT_S)

    run = await asyncio.wait_for(run_doc(document, dispatcher=ScriptedDispatcher(
        {"slow_a": [slow_a], "slow_b": [slow_b]}), appending=appending), LIMIT_S)
    assert outcome_b == ["aborted"]
    assert not [e for e in run.of("step_completed") if getattr(e, "step_id", None) in ("wait_a", "wait_b")]
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert run.outcome["outputs"]["results"]["winner"] == "quick"
    assert [(e.branch_id, e.status) for e in run.of("parallel_branch_completed")] == [  # type: ignore[attr-defined]
        ("quick", "completed"), ("a", "canceled"), ("b", "canceled")]
