"""``checkpoint_strategy`` (ckp.md §7.3, §7.12): which states are persisted, ``checkpoint_saved`` carrying the id of
the checkpoint really written, and a retry restarting the failing node under every strategy."""

from __future__ import annotations

from typing import Any

import pytest

from ckp_core.events import ErrorObject
from langorch_runtime.executor import retry_target
from runtime_harness import Run, ScriptedDispatcher, doc, run_doc

pytestmark = pytest.mark.unit


def chain(strategy: str, *, checkpoint_at: str = "b", fail_at: str | None = None) -> dict[str, Any]:
    """a → b → c → d → end: each node sets a variable (``fail_at`` calls an agent action instead)."""
    nodes: dict[str, Any] = {}
    names = ["a", "b", "c", "d"]
    for i, name in enumerate(names):
        step: dict[str, Any] = {"step_id": "s", "action": "set_variable", "variable": name, "value": i}
        if name == fail_at:
            step = {"step_id": "s", "action": "flaky", "output_variable": name}
        nodes[name] = {"type": "sequence", "next_node": names[i + 1] if i + 1 < len(names) else "end",
                       "steps": [step], "is_checkpoint": name == checkpoint_at, "agent": "API"}
    nodes["end"] = {"type": "terminate", "outputs": {"d": "{{d}}"}}
    return doc(nodes, global_config={"checkpoint_strategy": strategy})


async def history(run: Run) -> list[Any]:
    return [s async for s in run.graph.aget_state_history(run.config)]


def cursors(snapshots: list[Any]) -> list[str | None]:
    """The main frame's cursor in each persisted state that has one (newest first)."""
    out = []
    for s in snapshots:
        frames = s.values.get("frames") or {}
        main = next((f for f in frames.values() if f.get("kind") == "main"), None)
        if main is not None:
            out.append(main.get("cursor"))
    return out


async def test_every_node_persists_each_node_and_names_the_saved_checkpoint() -> None:
    run = await run_doc(chain("every_node"))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    snapshots = await history(run)
    assert {"b", "c", "d", "end"} <= set(cursors(snapshots))
    [saved] = run.of("checkpoint_saved")
    assert (saved.reason, saved.node_id) == ("is_checkpoint", "b")
    ids = {s.config["configurable"]["checkpoint_id"]: s for s in snapshots}
    assert saved.checkpoint_id in ids  # a real checkpoint: the state right after b completed
    state = ids[saved.checkpoint_id].values
    assert state["vars"]["b"] == 1
    assert "c" not in state["vars"]


async def test_critical_nodes_only_persists_after_is_checkpoint_nodes_and_at_the_end() -> None:
    run = await run_doc(chain("critical_nodes_only"))
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    snapshots = await history(run)
    seen = cursors(snapshots)
    assert "c" in seen  # after b (is_checkpoint)
    assert "b" not in seen
    assert "d" not in seen
    [saved] = run.of("checkpoint_saved")
    ids = {s.config["configurable"]["checkpoint_id"]: s.values for s in snapshots}
    assert saved.checkpoint_id in ids
    assert ids[saved.checkpoint_id]["vars"]["b"] == 1
    assert snapshots[0].values["outcome"]["status"] == "completed"  # the end is persisted


async def test_disabled_persists_only_the_end_and_forces_no_save() -> None:
    run = await run_doc(chain("disabled"))
    assert run.outcome is not None
    assert run.outcome["outputs"] == {"d": 3}
    snapshots = await history(run)
    assert not {"b", "c", "d"} & set(cursors(snapshots))
    assert run.of("checkpoint_saved") == []
    assert snapshots[0].values["outcome"]["status"] == "completed"
    every = await history(await run_doc(chain("every_node")))
    assert len(snapshots) < len(every) / 2


async def test_disabled_persists_before_a_pause() -> None:
    document = doc({
        "a": {"type": "sequence", "next_node": "ask", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1}]},
        "ask": {"type": "human_approval", "prompt": "ok?", "decision_type": "approve_reject",
                "on_approve": "end", "on_reject": "end"},
        "end": {"type": "terminate"}}, global_config={"checkpoint_strategy": "disabled"})
    run = await run_doc(document)
    assert run.outcome is None
    assert run.waits
    latest = (await history(run))[0]
    assert latest.next == ("suspend",)
    assert latest.values["vars"]["x"] == 1


@pytest.mark.parametrize("strategy", ["every_node", "critical_nodes_only", "disabled"])
async def test_set_checkpoint_saves_unless_disabled(strategy: str) -> None:
    document = doc({
        "a": {"type": "sequence", "next_node": "end", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "x", "value": 1},
            {"step_id": "cp", "action": "set_checkpoint"}]},
        "end": {"type": "terminate"}}, global_config={"checkpoint_strategy": strategy})
    run = await run_doc(document)
    saved = run.of("checkpoint_saved")
    if strategy == "disabled":
        assert saved == []
        return
    [event] = saved
    assert (event.reason, event.node_id) == ("set_checkpoint", "a")
    ids = {s.config["configurable"]["checkpoint_id"]: s.values for s in await history(run)}
    assert event.checkpoint_id in ids
    assert ids[event.checkpoint_id]["vars"]["x"] == 1


@pytest.mark.parametrize("strategy", ["every_node", "critical_nodes_only", "disabled"])
async def test_retry_restarts_the_failing_node_under_every_strategy(strategy: str) -> None:
    error = ErrorObject(code="agent_error", message="boom", retryable=True)
    agent = ScriptedDispatcher({"flaky": [error]})
    run = await run_doc(chain(strategy, checkpoint_at="a", fail_at="c"), dispatcher=agent)
    assert run.outcome is not None
    assert run.outcome["status"] == "failed"
    target = await retry_target(run.graph, run.config)
    assert target is not None
    main = next(f for f in target.values["frames"].values() if f.get("kind") == "main")
    assert (main["cursor"], main.get("node"), main["status"]) == ("c", None, "running")
    assert target.values["vars"] == {"a": 0, "b": 1}
    assert target.values["outcome"] is None
    agent.script["flaky"] = ["fixed"]
    final = await run.graph.ainvoke(None, {**target.config, "recursion_limit": 1000}, durability="sync")
    assert final["outcome"] == {"status": "completed", "outputs": {"d": 3}}
