"""Approvals end to end (api.md §6, ckp.md §3.13): a run pauses at a human_approval node, the approvals service
opens the approval, a decision through the API (or the approval's timeout) resumes the run on the right route.

Everything is real: NATS JetStream, PostgreSQL, compiler, runtime, approvals service and the HTTP gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from tests.helpers import (
    Platform,
    approval_when,
    decide,
    pending_approval,
    platform_of,
    start_run,
    wait_run,
    wait_status,
)

pytestmark = pytest.mark.integration

TERMINAL = ("completed", "failed", "canceled")
OUTPUTS = {"route": None, "decision": "{{approval.review.decision}}", "status": "{{approval.review.status}}",
           "by": "{{approval.review.decided_by}}", "comment": "{{approval.review.comment}}"}


def ends(*names: str) -> dict[str, Any]:
    """Terminate nodes that report which route the run took and what the approval record holds."""
    return {name: {"type": "terminate", "outputs": OUTPUTS | {"route": name}} for name in names}


def procedure(pid: str, review: dict[str, Any], *end_nodes: str) -> dict[str, Any]:
    node = {"type": "human_approval", "prompt": "Refund {{amount}} to {{customer}}?",
            "context_data": {"amount": "{{amount}}", "customer": "{{customer}}"}} | review
    return {"procedure_id": pid, "version": "1",
            "variables_schema": {"amount": {"type": "number", "default": 120},
                                 "customer": {"type": "string", "default": "ACME"}},
            "workflow_graph": {"start_node": "review", "nodes": {"review": node, **ends(*end_nodes)}}}


APPROVE_REJECT = procedure("ar", {"on_approve": "approved_end", "on_reject": "rejected_end"},
                           "approved_end", "rejected_end")
SELECT = procedure("sel", {"decision_type": "select_option", "options": ["card", "cash", "wire"],
                           "option_routes": {"card": "card_end"}, "on_approve": "approved_end",
                           "on_reject": "rejected_end", "decision_variable": "choice"},
                   "card_end", "approved_end", "rejected_end")
SELECT["workflow_graph"]["nodes"]["approved_end"]["outputs"]["choice"] = "{{choice}}"
PROVIDE = procedure("inp", {"decision_type": "provide_input", "input_variable": "bank",
                            "input_schema": {"iban": {"type": "string", "required": True,
                                                      "validation": {"regex": "DE[0-9]{4}"}},
                                             "days": {"type": "integer", "validation": {"min": 1, "max": 30}}},
                            "on_approve": "approved_end", "on_reject": "rejected_end"},
                    "approved_end", "rejected_end")
PROVIDE["workflow_graph"]["nodes"]["approved_end"]["outputs"]["bank"] = "{{bank}}"


def timed(pid: str, action: str | None, on_timeout: bool) -> dict[str, Any]:
    review: dict[str, Any] = {"timeout_ms": 300, "on_approve": "approved_end", "on_reject": "rejected_end"}
    if action is not None:
        review["timeout_action"] = action
    ends_ = ["approved_end", "rejected_end"]
    if on_timeout:
        review["on_timeout"] = "timeout_end"
        ends_.append("timeout_end")
    return procedure(pid, review, *ends_)


TIMED = {"t_approve": timed("t_approve", "auto_approve", False), "t_reject": timed("t_reject", "auto_reject", False),
         "t_escalate": timed("t_escalate", "escalate", True), "t_none_routed": timed("t_none_routed", None, True),
         "t_none": timed("t_none", None, False)}

# a run whose other branch terminates (failed) while the approval is pending: the run ends, the approval is canceled
PARALLEL = {
    "procedure_id": "par", "version": "1",
    "workflow_graph": {"start_node": "fan", "nodes": {
        "fan": {"type": "parallel", "branches": [{"branch_id": "ask", "start_node": "review"},
                                                 {"branch_id": "work", "start_node": "slow"}],
                "next_node": "approved_end"},
        "review": {"type": "human_approval", "prompt": "Go?", "on_approve": "approved_end",
                   "on_reject": "rejected_end"},
        "slow": {"type": "processing", "operations": [{"action": "wait", "duration_ms": 1500}],
                 "next_node": "broken"},
        "broken": {"type": "terminate", "status": "failed", "outputs": {"route": "broken"}},
        **ends("approved_end", "rejected_end")}}}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        for doc in (APPROVE_REJECT, SELECT, PROVIDE, PARALLEL, *TIMED.values()):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc})
            assert r.status_code == 201, r.text
        yield p


start = start_run
run_until = wait_status


async def run_events(c: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    r = await c.get(f"/api/runs/{run_id}/events", params={"limit": 500})
    return r.json()["items"]  # type: ignore[no-any-return]


async def test_approve_resumes_the_run_on_on_approve(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "ar", {"amount": 75})
    approval = await pending_approval(c, run_id)
    assert approval["status"] == "pending"
    assert approval["prompt"] == "Refund 75 to ACME?"
    assert approval["context_data"] == {"amount": 75, "customer": "ACME"}
    assert (approval["decision_type"], approval["options"], approval["node_id"]) == ("approve_reject", [], "review")
    assert (approval["procedure_id"], approval["procedure_version"]) == ("ar", "1")
    assert approval["run_status"] == "waiting_approval"
    r = await decide(c, approval["approval_id"], decision="approved", comment="fine by me")
    assert r.status_code == 200, r.text
    decided = r.json()
    assert (decided["status"], decided["decision"], decided["decided_by"], decided["comment"]) == (
        "approved", "approved", "anonymous", "fine by me")
    assert decided["decided_at"] is not None
    assert r.headers["X-LangOrch-Command-ID"]
    assert int(r.headers["X-LangOrch-Position"]) > 0
    run = await run_until(c, run_id, TERMINAL)
    assert run["status"] == "completed", run
    assert run["waiting_on"] is None
    assert run["output_vars"] == {"route": "approved_end", "decision": "approved", "status": "approved",
                                  "by": "anonymous", "comment": "fine by me"}
    received = [e for e in await run_events(c, run_id) if e["event_type"] == "approval_decision_received"]
    assert [(e["payload"]["approval_id"], e["payload"]["routed_to"], e["payload"]["source"]) for e in received] == [
        (approval["approval_id"], "approved_end", "human")]
    after = (await c.get(f"/api/approvals/{approval['approval_id']}")).json()
    assert after["run_status"] == "completed"


async def test_reject_through_the_status_alias_takes_on_reject(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "ar")
    approval = await pending_approval(c, run_id)
    r = await decide(c, approval["approval_id"], status="reject", decided_by="anonymous")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["decision"]) == ("rejected", "rejected")
    run = await run_until(c, run_id, TERMINAL)
    assert run["output_vars"]["route"] == "rejected_end"
    assert run["output_vars"]["decision"] == "rejected"


async def test_second_decision_is_409_approval_not_pending(platform: Platform) -> None:
    c = platform.client
    approval = await pending_approval(c, await start(c, "ar"))
    first = await decide(c, approval["approval_id"], resolved_decision="approve")
    assert first.status_code == 200, first.text
    second = await decide(c, approval["approval_id"], decision="rejected")
    assert second.status_code == 409, second.text
    problem = second.json()
    assert second.headers["content-type"].startswith("application/problem+json")
    assert (problem["code"], problem["current_status"]) == ("approval_not_pending", "approved")
    assert (await c.get(f"/api/approvals/{approval['approval_id']}")).json()["decision"] == "approved"


async def test_racing_decisions_one_wins(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "ar")
    approval = await pending_approval(c, run_id)
    answers = await asyncio.gather(*(decide(c, approval["approval_id"], decision=d)
                                     for d in ("approved", "rejected", "approved", "rejected")))
    codes = sorted(a.status_code for a in answers)
    assert codes == [200, 409, 409, 409], [a.text for a in answers]
    [winner] = [a.json() for a in answers if a.status_code == 200]
    assert all(a.json()["code"] == "approval_not_pending" for a in answers if a.status_code == 409)
    run = await run_until(c, run_id, TERMINAL)
    assert run["output_vars"]["decision"] == winner["decision"]


async def test_decided_by_must_be_the_principal(platform: Platform) -> None:
    c = platform.client
    approval = await pending_approval(c, await start(c, "ar"))
    r = await decide(c, approval["approval_id"], decision="approved", decided_by="user:mallory")
    assert r.status_code == 422, r.text
    assert r.json()["code"] == "decided_by_mismatch"
    assert "decided_by" in r.json()["errors"]
    still = (await c.get(f"/api/approvals/{approval['approval_id']}")).json()
    assert still["status"] == "pending"


async def test_select_option_routes_by_option_else_on_approve(platform: Platform) -> None:
    c = platform.client
    routed_run = await start(c, "sel")
    routed = await pending_approval(c, routed_run)
    assert routed["options"] == ["card", "cash", "wire"]
    bad = await decide(c, routed["approval_id"], decision="bitcoin")
    assert bad.status_code == 422, bad.text
    assert (bad.json()["code"], bad.json()["allowed"]) == ("invalid_decision", ["card", "cash", "wire"])
    approve = await decide(c, routed["approval_id"], decision="approved")
    assert approve.status_code == 422
    assert approve.json()["code"] == "invalid_decision"
    r = await decide(c, routed["approval_id"], decision="card")
    assert r.status_code == 200, r.text
    assert (r.json()["status"], r.json()["decision"]) == ("decided", "card")
    run = await run_until(c, routed_run, TERMINAL)
    assert (run["output_vars"]["route"], run["output_vars"]["status"]) == ("card_end", "decided")

    unrouted_run = await start(c, "sel")
    unrouted = await pending_approval(c, unrouted_run)
    r = await decide(c, unrouted["approval_id"], decision="cash")
    assert r.status_code == 200, r.text
    run = await run_until(c, unrouted_run, TERMINAL)
    assert run["output_vars"]["route"] == "approved_end"
    assert run["output_vars"]["choice"] == "cash"


async def test_provide_input_validates_and_stores_the_payload(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "inp")
    approval = await pending_approval(c, run_id)
    assert approval["decision_type"] == "provide_input"
    assert set(approval["input_schema"]) == {"iban", "days"}
    r = await decide(c, approval["approval_id"], decision="approved", payload={"iban": "FR1234", "days": 90})
    assert r.status_code == 422, r.text
    problem = r.json()
    assert problem["code"] == "validation_failed"
    assert set(problem["errors"]) == {"payload.iban", "payload.days"}
    missing = await decide(c, approval["approval_id"], decision="approved", payload={})
    assert missing.status_code == 422
    assert missing.json()["errors"] == {"payload.iban": ["This field is required"]}
    assert (await c.get(f"/api/approvals/{approval['approval_id']}")).json()["status"] == "pending"
    r = await decide(c, approval["approval_id"], decision="approved", payload={"iban": "DE1234", "days": "7"})
    assert r.status_code == 200, r.text
    assert r.json()["decision_payload"] == {"iban": "DE1234", "days": 7}
    run = await run_until(c, run_id, TERMINAL)
    assert run["status"] == "completed", run
    assert run["output_vars"]["route"] == "approved_end"
    assert run["output_vars"]["bank"] == {"iban": "DE1234", "days": 7}


@pytest.mark.parametrize(("pid", "action", "status", "decision", "route"), [
    ("t_approve", "auto_approve", "timed_out", "approved", "approved_end"),
    ("t_reject", "auto_reject", "timed_out", "rejected", "rejected_end"),
    ("t_escalate", "escalate", "escalated", "timeout", "timeout_end"),
    ("t_none_routed", None, "timed_out", "timeout", "timeout_end"),
    ("t_none", None, "timed_out", "timeout", "rejected_end"),
])
async def test_timeout_resolves_per_timeout_action(platform: Platform, pid: str, action: str | None, status: str,
                                                   decision: str, route: str) -> None:
    c = platform.client
    run_id = await start(c, pid)
    run = await run_until(c, run_id, ("waiting_approval", *TERMINAL))
    approval_id = run["waiting_on"]["approval_id"] if run["waiting_on"] else None
    run = await run_until(c, run_id, TERMINAL)
    assert run["status"] == "completed", run
    assert (run["output_vars"]["route"], run["output_vars"]["decision"], run["output_vars"]["status"],
            run["output_vars"]["by"]) == (route, decision, status, "system:approvals")
    [received] = [e for e in await run_events(c, run_id) if e["event_type"] == "approval_decision_received"]
    approval_id = approval_id or received["payload"]["approval_id"]
    assert (received["payload"]["source"], received["payload"]["approval_id"]) == ("timeout", approval_id)
    resumed = [e for e in await run_events(c, run_id) if e["event_type"] == "execution_resumed"]
    assert [e["payload"]["resume_reason"] for e in resumed] == ["approval_timeout"]
    approval = await approval_when(c, approval_id, status)
    assert (approval["decision"], approval["decided_by"], approval["timeout_action"]) == (
        decision, "system:approvals", action)
    assert approval["expires_at"] is not None
    assert approval["decided_at"] >= approval["expires_at"]
    late = await decide(c, approval_id, decision="approved")
    assert late.status_code == 409, late.text
    assert (late.json()["code"], late.json()["current_status"]) == ("approval_expired", status)


async def test_approval_is_canceled_when_its_run_is_canceled(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "ar")
    approval = await pending_approval(c, run_id)
    r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "no longer needed"})
    assert r.status_code == 200, r.text
    canceled = await approval_when(c, approval["approval_id"], "canceled")
    assert canceled["run_status"] == "canceled"
    assert canceled["decision"] is None
    r = await decide(c, approval["approval_id"], decision="approved")
    assert r.status_code == 409
    assert (r.json()["code"], r.json()["current_status"]) == ("approval_not_pending", "canceled")


async def test_approval_is_canceled_when_another_branch_ends_the_run(platform: Platform) -> None:
    c = platform.client
    run_id = await start(c, "par")
    deadline = asyncio.get_running_loop().time() + 30
    while True:  # the approval opens while the other branch still works (the run stays running)
        page = (await c.get("/api/approvals", params={"run_id": run_id})).json()
        if page["items"]:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    [approval] = page["items"]
    run = await run_until(c, run_id, TERMINAL)
    assert run["status"] == "failed", run
    assert run["output_vars"] == {"route": "broken"}
    canceled = await approval_when(c, approval["approval_id"], "canceled")
    assert canceled["run_status"] == "failed"


async def read_updates(c: httpx.AsyncClient, until: Any, *, headers: dict[str, str] | None = None,
                       params: dict[str, Any] | None = None, ready: asyncio.Event | None = None
                       ) -> list[tuple[str, dict[str, Any]]]:
    """approval_update messages as (id, data), up to the first one ``until(data)`` accepts."""
    out: list[tuple[str, dict[str, Any]]] = []
    async with aconnect_sse(c, "GET", "/api/approvals/stream", headers=headers or {}, params=params or {},
                            timeout=httpx.Timeout(60, read=60)) as source:
        assert source.response.status_code == 200
        if ready is not None:
            ready.set()
        async for sse in source.aiter_sse():
            if sse.event == "approval_update":
                data = json.loads(sse.data)
                out.append((sse.id, data))
                if until(data):
                    return out
    return out


async def test_stream_delivers_updates_and_resumes_after_last_event_id(platform: Platform) -> None:
    c = platform.client
    ready = asyncio.Event()
    target: dict[str, str] = {}

    def decided(data: dict[str, Any]) -> bool:
        return data["approval_id"] == target.get("id") and data["event_type"] == "approval_decided"

    reader = asyncio.create_task(read_updates(c, decided, ready=ready, params={"status": "pending,approved"}))
    try:
        await asyncio.wait_for(ready.wait(), 10)
        await asyncio.sleep(0.3)  # the ordered consumer of the live tail is in place
        run_id = await start(c, "ar")
        approval = await pending_approval(c, run_id)
        target["id"] = approval["approval_id"]
        r = await decide(c, approval["approval_id"], decision="approved")
        assert r.status_code == 200, r.text
        updates = await asyncio.wait_for(reader, 30)
    finally:
        if not reader.done():
            reader.cancel()
            with contextlib.suppress(BaseException):
                await reader
    assert all(d["status"] in ("pending", "approved") for _, d in updates)
    mine = [(i, d) for i, d in updates if d["approval_id"] == approval["approval_id"]]
    assert [d["event_type"] for _, d in mine] == ["approval_requested", "approval_decided"]
    (first_id, requested), (second_id, decided_update) = mine
    assert int(first_id) < int(second_id)
    assert (requested["status"], requested["prompt"]) == ("pending", "Refund 120 to ACME?")
    detail = (await c.get(f"/api/approvals/{approval['approval_id']}")).json()
    assert {k: v for k, v in decided_update.items() if k not in ("event_type", "run_status")} == \
        {k: v for k, v in detail.items() if k != "run_status"}
    # a reconnect with Last-Event-ID resumes exactly after it: the decision comes first, nothing repeated
    resumed = await read_updates(c, decided, headers={"Last-Event-ID": first_id})
    assert all(int(i) > int(first_id) for i, _ in resumed)
    assert resumed[-1][0] == second_id
    assert [d["event_type"] for _, d in resumed if d["approval_id"] == approval["approval_id"]] == [
        "approval_decided"]
    # ?after= has the same meaning
    [(after_id, after)] = await read_updates(c, lambda d: True, params={"after": str(int(first_id) - 1)})
    assert (after_id, after["event_type"], after["approval_id"]) == (first_id, "approval_requested",
                                                                     approval["approval_id"])


CHILD = procedure("child_review", {"on_approve": "approved_end", "on_reject": "rejected_end"},
                  "approved_end", "rejected_end")
PARENT = {"procedure_id": "parent_of_review", "version": "1", "workflow_graph": {"start_node": "call", "nodes": {
    "call": {"type": "subflow", "procedure_id": "child_review", "version": "1", "input_mapping": {"amount": "9"},
             "output_mapping": {"child_route": "route"}, "next_node": "end"},
    "end": {"type": "terminate", "outputs": {"child_route": "{{child_route}}"}}}}}


async def test_an_approval_in_a_child_run_pauses_the_parent(platform: Platform) -> None:
    c = platform.client
    for doc in (CHILD, PARENT):
        r = await c.post("/api/procedures", json={"ckp_json": doc})
        assert r.status_code == 201, r.text
    parent_id = await start(c, "parent_of_review")
    parent = await run_until(c, parent_id, ("paused", *TERMINAL))
    assert parent["status"] == "paused", parent
    assert parent["waiting_on"]["kind"] == "child_run"
    child_id = parent["waiting_on"]["run_id"]
    approval = await pending_approval(c, child_id)
    assert approval["procedure_id"] == "child_review"
    r = await decide(c, approval["approval_id"], decision="approved")
    assert r.status_code == 200, r.text
    parent = await run_until(c, parent_id, TERMINAL)
    assert parent["status"] == "completed", parent
    assert parent["waiting_on"] is None
    assert parent["output_vars"] == {"child_route": "approved_end"}


LOOPED = {
    "procedure_id": "looped_review", "version": "1",
    "variables_schema": {"items": {"type": "array", "default": ["a", "b", "c"]}},
    "workflow_graph": {"start_node": "each", "nodes": {
        "each": {"type": "loop", "iterator": "items", "iterator_variable": "item", "body_node": "review",
                 "collect_variable": "decisions",
                 "collect_expression": "{{item}}:{{approval.review.decision}}", "next_node": "done"},
        "review": {"type": "human_approval", "prompt": "Keep {{item}}?", "context_data": {"item": "{{item}}"},
                   "on_approve": "noted", "on_reject": "noted"},
        "noted": {"type": "sequence", "steps": [
            {"step_id": "say", "action": "log", "message": "{{item}} {{approval.review.status}}"}]},
        "done": {"type": "terminate", "outputs": {"decisions": "{{decisions}}"}}}},
}


async def test_an_approval_in_a_loop_body_asks_again_on_every_iteration(platform: Platform) -> None:
    """ckp.md §3.7 / §3.13: every visit opens a new approval (earlier decisions are never reused), the iteration
    frame survives the pause, and ``approval.<node>`` holds the latest visit's record."""
    c = platform.client
    r = await c.post("/api/procedures", json={"ckp_json": LOOPED})
    assert r.status_code == 201, r.text
    run_id = await start(c, "looped_review")
    seen: list[str] = []
    for decision in ("approved", "rejected", "approved"):
        approval = await pending_approval(c, run_id)
        assert approval["approval_id"] not in seen
        assert approval["context_data"] == {"item": "abc"[len(seen)]}
        seen.append(approval["approval_id"])
        r = await decide(c, approval["approval_id"], decision=decision)
        assert r.status_code == 200, r.text
        if len(seen) < 3:  # wait until the run waits on the next iteration's approval (between two approvals it
            # reads running or queued, with waiting_on null)
            await wait_run(c, run_id, lambda run: run.get("status") in TERMINAL or (
                run.get("status") == "waiting_approval"
                and (run.get("waiting_on") or {}).get("approval_id") not in (None, *seen)))
    run = await run_until(c, run_id, TERMINAL)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"]["decisions"] == ["a:approved", "b:rejected", "c:approved"]
    logs = [e["payload"]["message"] for e in await run_events(c, run_id) if e["event_type"] == "log"]
    assert logs == ["a approved", "b rejected", "c approved"]
