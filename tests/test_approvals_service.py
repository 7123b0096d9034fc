"""The approvals service's own guarantees (api.md §6.4, §5.2): timers survive a restart (rebuilt from the approval
events), only the elected replica fires them, a redelivered request opens one approval, a request for a run that
already ended is canceled at once. Real NATS and PostgreSQL; the approvals replicas are started by the tests."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from ckp_core.commands import RequestApproval
from ckp_core.events import Actor
from langorch_approvals.service import ApprovalsService
from langorch_gateway.projector import rebuild
from langorch_infra.jetstream import JetStreamEventStore, connect, publish_command
from langorch_infra.settings import ApprovalsSettings
from tests.helpers import (
    Platform,
    approval_when,
    decide,
    langorch_command,
    pending_approval,
    platform_of,
    start_run,
    wait_status,
)
from tests.test_approvals_end_to_end import procedure

pytestmark = pytest.mark.integration

# The replicas of these tests come and go: a request published while a stopped replica's pull request was still
# open on the server goes to that replica and is redelivered only after the ack wait (30 s). Waiting for an
# approval to open allows for that handover.
REPLICA_HANDOVER_S = 75

TIMED = procedure("svc_timed", {"timeout_ms": 1500, "timeout_action": "auto_reject", "on_approve": "approved_end",
                                "on_reject": "rejected_end"}, "approved_end", "rejected_end")
PLAIN = procedure("svc_plain", {"on_approve": "approved_end", "on_reject": "rejected_end"}, "approved_end",
                  "rejected_end")


@contextlib.asynccontextmanager
async def replica(p: Platform, name: str, **settings: Any) -> AsyncIterator[ApprovalsService]:
    service = ApprovalsService(ApprovalsSettings(nats_url=p.nats_url, database_url=p.database_url,
                                                 instance_id=name, **settings))
    await service.start()
    task = asyncio.create_task(service.run())
    try:
        yield service
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await service.stop()


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False) as p:
        for doc in (TIMED, PLAIN):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc})
            assert r.status_code == 201, r.text
        yield p


async def approval_events(p: Platform, approval_id: str) -> list[str]:
    nc = await connect(p.nats_url, "test-reader")
    try:
        return [e.envelope.type for e in await JetStreamEventStore(nc.jetstream()).read("approval", approval_id)]
    finally:
        await nc.close()


async def test_a_timer_fires_after_a_restart_from_the_stored_events(platform: Platform) -> None:
    c = platform.client
    async with replica(platform, "first") as first:
        run_id = await start_run(c, "svc_timed")
        approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
        assert approval["approval_id"] in first.pending
    # no replica runs while the approval expires
    await asyncio.sleep(1.8)
    assert (await c.get(f"/api/approvals/{approval['approval_id']}")).json()["status"] == "pending"
    async with replica(platform, "second"):
        run = await wait_status(c, run_id, ("completed", "failed", "canceled"))
    assert run["output_vars"]["route"] == "rejected_end"
    timed_out = await approval_when(c, approval["approval_id"], "timed_out")
    assert (timed_out["decision"], timed_out["decided_by"]) == ("rejected", "system:approvals")


async def test_only_the_leader_fires_a_timeout(platform: Platform) -> None:
    c = platform.client
    async with replica(platform, "a") as a, replica(platform, "b") as b:
        deadline = asyncio.get_running_loop().time() + 10
        while not (a.lock.is_leader or b.lock.is_leader):
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert [a.lock.is_leader, b.lock.is_leader].count(True) == 1
        run_id = await start_run(c, "svc_timed")
        approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
        for service in (a, b):  # both replicas know the pending approval ...
            deadline = asyncio.get_running_loop().time() + 10
            while approval["approval_id"] not in service.pending:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.05)
        follower = b if a.lock.is_leader else a
        await wait_status(c, run_id, ("completed",))
        # ... only the leader acted; a follower asked directly finds nothing left to fire
        assert await follower.fire_due(datetime.now(UTC)) == 0
    assert await approval_events(platform, approval["approval_id"]) == ["approval_requested", "approval_timed_out"]


async def test_a_redelivered_request_opens_one_approval(platform: Platform) -> None:
    c = platform.client
    async with replica(platform, "solo") as service:
        run_id = await start_run(c, "svc_plain")
        approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
        copy = RequestApproval(actor=Actor.system("runtime"), approval_id=approval["approval_id"], run_id=run_id,
                               procedure_id="svc_plain", procedure_version="1", node_id="review", prompt="again?")
        await publish_command(service.js, copy)  # a new command id: not dropped by JetStream's dedupe
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # the copy was handled (acknowledged)
            info = await service.commands.consumer_info()
            if not info.num_pending and not info.num_ack_pending:
                break
            assert asyncio.get_running_loop().time() < deadline
            await asyncio.sleep(0.05)
        assert await approval_events(platform, approval["approval_id"]) == ["approval_requested"]
        assert (await c.get(f"/api/approvals/{approval['approval_id']}")).json()["prompt"] == "Refund 120 to ACME?"
        r = await decide(c, approval["approval_id"], decision="approved")
        assert r.status_code == 200, r.text
        await wait_status(c, run_id, ("completed",))


async def test_a_request_for_an_ended_run_is_canceled_at_once(platform: Platform) -> None:
    c = platform.client
    async with replica(platform, "late") as service:
        run_id = await start_run(c, "svc_plain")
        approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
        assert (await decide(c, approval["approval_id"], decision="rejected")).status_code == 200
        await wait_status(c, run_id, ("completed",))
        late = RequestApproval(actor=Actor.system("runtime"), approval_id="0192f7c4-aaaa-7000-8000-000000000001",
                               run_id=run_id, procedure_id="svc_plain", procedure_version="1", node_id="review")
        await publish_command(service.js, late)
        canceled = await approval_when(c, late.approval_id, "canceled", timeout=10)
    assert canceled["run_status"] == "completed"
    assert await approval_events(platform, late.approval_id) == ["approval_requested", "approval_canceled"]


TWO = {"procedure_id": "svc_two", "version": "1", "workflow_graph": {"start_node": "fan", "nodes": {
    "fan": {"type": "parallel", "branches": [{"branch_id": "x", "start_node": "ax"},
                                             {"branch_id": "y", "start_node": "ay"}], "next_node": "z"},
    "ax": {"type": "human_approval", "prompt": "x?", "on_approve": "z", "on_reject": "z"},
    "ay": {"type": "human_approval", "prompt": "y?", "on_approve": "z", "on_reject": "z"},
    "z": {"type": "terminate", "outputs": {"x": "{{approval.ax.decision}}", "y": "{{approval.ay.decision}}"}}}}}
DUMPS = {"approvals": "SELECT * FROM approvals ORDER BY approval_id", "runs": "SELECT * FROM runs ORDER BY run_id"}


async def dump(database_url: str) -> dict[str, list[tuple[object, ...]]]:
    conn = await asyncpg.connect(database_url)
    try:
        return {table: [tuple(r.values()) for r in await conn.fetch(q)] for table, q in DUMPS.items()}
    finally:
        await conn.close()


async def test_two_approvals_in_branches_and_a_rebuild_gives_identical_rows(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        for doc in (TWO, TIMED, PLAIN):
            assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
        run_id = await start_run(c, "svc_two")
        deadline = asyncio.get_running_loop().time() + 30
        while True:  # both branches wait: the run is suspended on approvals
            page = (await c.get("/api/approvals", params={"run_id": run_id, "status": "pending"})).json()
            run = (await c.get(f"/api/runs/{run_id}")).json()
            if page["total"] == 2 and run["status"] == "waiting_approval":
                break
            assert asyncio.get_running_loop().time() < deadline, (page, run)
            await asyncio.sleep(0.05)
        assert run["waiting_on"]["kind"] == "approval"
        assert run["waiting_on"]["approval_id"] in {a["approval_id"] for a in page["items"]}
        by_node = {a["node_id"]: a["approval_id"] for a in page["items"]}
        assert (await decide(c, by_node["ax"], decision="approved")).status_code == 200
        assert (await decide(c, by_node["ay"], decision="rejected")).status_code == 200
        run = await wait_status(c, run_id, ("completed", "failed", "canceled"))
        assert run["output_vars"] == {"x": "approved", "y": "rejected"}
        # more states for the rebuild: a timed-out one, a canceled one, a pending one
        timed = await start_run(c, "svc_timed")
        canceled = await pending_approval(c, await start_run(c, "svc_plain"))
        assert (await c.post(f"/api/runs/{canceled['run_id']}/cancel", json={})).status_code == 200
        await pending_approval(c, await start_run(c, "svc_plain"))
        await wait_status(c, timed, ("completed",))
        await approval_when(c, canceled["approval_id"], "canceled")
        await p.app.state.projector.catch_up()
        js = p.app.state.js
        before = await dump(database_url)
        listed = (await c.get("/api/approvals")).json()["items"]
        assert len(before["approvals"]) == len(listed)
        assert sorted(a["status"] for a in listed) == [
            "approved", "canceled", "pending", "rejected", "timed_out"]
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        assert pool is not None
        await p.app.state.projector.stop()  # the rebuild replays into fresh tables; nothing else may write them
        try:
            await rebuild(pool, js)
        finally:
            await pool.close()
        assert await dump(database_url) == before


async def test_langorch_serve_approvals_runs_the_service(nats_url: str, database_url: str, tmp_path: Path) -> None:
    """``langorch serve approvals`` (what a Kubernetes pod runs) serves approvals for a platform without one."""
    env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url}
    log = tmp_path / "approvals.log"
    async with platform_of(nats_url, database_url, approvals=False) as p:
        c = p.client
        assert (await c.post("/api/procedures", json={"ckp_json": PLAIN})).status_code == 201
        with log.open("wb") as out:
            proc = subprocess.Popen(langorch_command("serve", "approvals"), env=env, stdout=out,
                                    stderr=subprocess.STDOUT)
        try:
            run_id = await start_run(c, "svc_plain")
            approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
            r = await decide(c, approval["approval_id"], decision="approved")
            assert r.status_code == 200, r.text
            run = await wait_status(c, run_id, ("completed",))
            assert run["output_vars"]["route"] == "approved_end"
        finally:
            proc.send_signal(signal.SIGINT)
            code = await asyncio.to_thread(proc.wait, 60)
    assert code == 0, log.read_text()


async def test_a_decision_while_the_service_is_down_is_pending_then_applied_once(nats_url: str,
                                                                                  database_url: str) -> None:
    async with platform_of(nats_url, database_url, approvals=False, gateway_settings={"command_timeout_s": 1}) as p:
        c = p.client
        assert (await c.post("/api/procedures", json={"ckp_json": PLAIN})).status_code == 201
        async with replica(p, "before"):
            run_id = await start_run(c, "svc_plain")
            approval = await pending_approval(c, run_id, REPLICA_HANDOVER_S)
        r = await decide(c, approval["approval_id"], decision="rejected", comment="while down")
        assert r.status_code == 202, r.text
        command_id = r.json()["command_id"]
        assert (r.json()["command_type"], r.headers["Location"]) == ("decide_approval", f"/api/commands/{command_id}")
        status = (await c.get(f"/api/commands/{command_id}")).json()
        assert (status["status"], status["resource"]) == ("pending", f"/api/approvals/{approval['approval_id']}")
        async with replica(p, "after"):
            run = await wait_status(c, run_id, ("completed", "failed", "canceled"))
        assert run["output_vars"]["route"] == "rejected_end"
        assert (await c.get(f"/api/commands/{command_id}")).json()["status"] == "accepted"
        decided = (await c.get(f"/api/approvals/{approval['approval_id']}")).json()
        assert (decided["status"], decided["comment"]) == ("rejected", "while down")
        assert await approval_events(p, approval["approval_id"]) == ["approval_requested", "approval_decided"]
