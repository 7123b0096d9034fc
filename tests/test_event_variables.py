"""The values a run writes, carried by its events: ``step_completed.variables`` (what the step wrote) and
``node_completed.variables`` (what the node changed besides its steps: operations, transforms, approvals, merges),
masked like every payload and bounded variable by variable — and the console's run replay, which rebuilds every
intermediate value from them (``/ui/runs/{id}/replay?at=<n>``)."""

from __future__ import annotations

import html
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ckp_core.redaction import FIELD_LIMIT, bound_payload
from tests.helpers import Platform, events_of, platform_of, start_document, wait_status

BIG = "x" * (70 * 1024)


def counting(pid: str) -> dict[str, Any]:
    """``count`` goes 1, 2 (two steps of one node), then 3 (an operation of a processing node); ``pin`` is
    sensitive; ``blob`` is too large for an event, written beside ``label``."""
    return {"procedure_id": pid, "version": "1.0.0",
            "variables_schema": {"pin": {"type": "string", "sensitive": True}},
            "workflow_graph": {"start_node": "steps", "nodes": {
                "steps": {"type": "sequence", "agent": "MasterAgent", "next_node": "ops", "steps": [
                    {"step_id": "one", "action": "set_variable", "variable": "count", "value": 1},
                    {"step_id": "two", "action": "set_variable", "variable": "count", "value": 2},
                    {"step_id": "secret", "action": "set_variable", "variable": "pin", "value": "4321-9876"}]},
                "ops": {"type": "processing", "next_node": "done", "operations": [
                    {"action": "set_variable", "variable": "count", "value": 3},
                    {"action": "set_variable", "variable": "blob", "value": BIG},
                    {"action": "set_variable", "variable": "label", "value": "small"}]},
                "done": {"type": "terminate", "outputs": {"count": "{{count}}"}}}}}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False) as p:
        yield p


@pytest.mark.unit
def test_a_variables_map_is_bounded_variable_by_variable() -> None:
    bounded = bound_payload({"node_id": "n", "variables": {"blob": BIG, "label": "small"}})
    assert bounded["node_id"] == "n"
    assert bounded["variables"]["label"] == "small"  # one large variable does not hide the others
    stub = bounded["variables"]["blob"]
    assert stub == {"_truncated": True, "bytes": len(BIG) + 2, "sha256": stub["sha256"]}
    many = bound_payload({"variables": {f"v{i}": "y" * (FIELD_LIMIT // 3) for i in range(4)}})
    assert sum(1 for v in many["variables"].values() if isinstance(v, dict)) == 2  # the largest first, until it fits
    assert bound_payload({"params": BIG})["params"]["_truncated"] is True  # other fields as before


@pytest.mark.integration
async def test_steps_and_nodes_carry_the_values_they_wrote(platform: Platform) -> None:
    c = platform.client
    run_id = await start_document(c, counting(f"vars-{uuid.uuid4().hex[:8]}"))
    run = await wait_status(c, run_id, timeout=60)
    assert run["status"] == "completed", run
    events = await events_of(c, run_id)
    steps = {e["step_id"]: e["payload"]["variables"] for e in events if e["event_type"] == "step_completed"}
    assert steps == {"one": {"count": 1}, "two": {"count": 2}, "secret": {"pin": "***REDACTED***"}}
    nodes = {e["node_id"]: e["payload"]["variables"] for e in events if e["event_type"] == "node_completed"}
    assert nodes["steps"] == {}  # its steps carried their writes
    assert nodes["ops"]["count"] == 3
    assert nodes["ops"]["label"] == "small"
    assert nodes["ops"]["blob"]["_truncated"] is True
    assert nodes["done"] == {}
    assert "4321-9876" not in str(events)  # nor the step_started of the step that wrote it: its params are masked
    started = next(e for e in events if e["event_type"] == "step_started" and e["step_id"] == "secret")
    assert started["payload"]["params"] == {"value": "***REDACTED***"}, started

    def replayed(at: int) -> str:
        """The replay page's value cell of ``count`` after event ``at``."""
        return page_at[at].split('data-variable="count"', 1)[1].split("</tr>", 1)[0]

    seq_of = {(e["event_type"], e["step_id"] or e["node_id"]): e["seq"] for e in events}
    page_at: dict[int, str] = {}
    for key in (("step_completed", "one"), ("step_completed", "two"), ("node_completed", "ops")):
        r = await c.get(f"/ui/runs/{run_id}/replay", params={"at": seq_of[key]})
        assert r.status_code == 200, r.text
        page_at[seq_of[key]] = html.unescape(r.text)
    assert "<code>1</code>" in replayed(seq_of[("step_completed", "one")])
    assert "written by steps · one" in replayed(seq_of[("step_completed", "one")])
    assert "<code>2</code>" in replayed(seq_of[("step_completed", "two")])
    after_ops = page_at[seq_of[("node_completed", "ops")]]
    assert "<code>3</code>" in replayed(seq_of[("node_completed", "ops")])
    assert "too large for an event" in after_ops.split('data-variable="blob"', 1)[1].split("</tr>", 1)[0]
    assert "***REDACTED***" in after_ops.split('data-variable="pin"', 1)[1].split("</tr>", 1)[0]
    assert "4321-9876" not in after_ops
