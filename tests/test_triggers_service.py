"""The triggers service on real NATS and PostgreSQL: a redelivered fire creates no second run, a fire whose run
creation was already submitted (a crash before its outcome was recorded) records that run, the projections
rebuild to the same rows, and a replica serves /health, /ready and /metrics."""

from __future__ import annotations

import asyncio
import os
import subprocess

import asyncpg
import httpx
import pytest

from ckp_core.commands import CreateRun, FireTrigger
from ckp_core.events import Actor
from ckp_core.ids import new_id
from ckp_core.triggers import trigger_id
from langorch_infra.jetstream import JetStreamEventStore, connect, publish_command
from langorch_infra.settings import TriggersSettings
from langorch_triggers.service import host
from tests.helpers import eventually, langorch_command, platform_of, procedure_doc, wait_status
from tests.ports import free_port

pytestmark = pytest.mark.integration

DOC = procedure_doc("trig_svc", "1.0.0")
OPERATOR = Actor(kind="user", id="ops")
TID = trigger_id("trig_svc", "1.0.0")


async def test_a_redelivered_fire_and_a_resubmitted_creation_start_one_run_each(nats_url: str,
                                                                                database_url: str) -> None:
    async with platform_of(nats_url, database_url, approvals=False, agents=False, triggers=True) as p:
        c = p.client
        assert (await c.post("/api/procedures", json={"ckp_json": DOC})).status_code == 201
        r = await c.post("/api/triggers/trig_svc/1.0.0", json={"trigger_type": "webhook", "webhook_secret": "k"})
        assert r.status_code == 201, r.text
        nc = await connect(nats_url, "test-trigger-fires")
        try:
            js = nc.jetstream()
            store = JetStreamEventStore(js)
            # the same fire delivered twice (a redelivery after a crash before the ack)
            fire = FireTrigger(actor=OPERATOR, procedure_id="trig_svc", version="1.0.0", run_id=new_id(),
                               triggered_by="user:ops", input_vars={"greeting": "twice"})
            await publish_command(js, fire, msg_id="delivery-1")
            await publish_command(js, fire, msg_id="delivery-2")
            # a fire whose run creation was submitted before the service stopped, outcome not recorded
            crashed = FireTrigger(actor=OPERATOR, procedure_id="trig_svc", version="1.0.0", run_id=new_id(),
                                  triggered_by="user:ops")
            await publish_command(js, CreateRun(command_id=crashed.command_id, actor=OPERATOR,
                                                run_id=crashed.run_id, procedure_id="trig_svc",
                                                procedure_version="1.0.0", trigger_type="manual",
                                                triggered_by="user:ops", root_run_id=crashed.run_id),
                                  msg_id=f"create:{crashed.command_id}")
            await publish_command(js, crashed, msg_id=crashed.msg_id)

            async def fired() -> list[str] | None:
                types = [e.envelope.type for e in await store.read("trigger", TID)]
                return types if types.count("trigger_fired") >= 2 else None

            types = await eventually(fired, timeout=60, what="both fires recorded")
            for run_id in (fire.run_id, crashed.run_id):
                done = await wait_status(c, run_id, timeout=60)
                assert done["status"] == "completed", done
                created = [e.envelope.type for e in await store.read("run", run_id)].count("run_created")
                assert created == 1, run_id
            types = [e.envelope.type for e in await store.read("trigger", TID)]
            assert types == ["trigger_registered", "trigger_fired", "trigger_fired"], types
        finally:
            await nc.close()
        registry = p.triggers_service.metrics.registry
        assert registry.get_sample_value("langorch_trigger_fired_total", {"trigger_type": "manual"}) == 2
        assert registry.get_sample_value("langorch_trigger_lag_seconds_count", {"trigger_type": "manual"}) == 2
        fires = (await c.get("/api/triggers/trig_svc/1.0.0/fires")).json()
        assert sorted(f["run_id"] for f in fires["items"]) == sorted([fire.run_id, crashed.run_id])
        await p.app.state.projector.catch_up()

    queries = {"triggers": "SELECT * FROM triggers ORDER BY trigger_id",
               "trigger_fires": "SELECT * FROM trigger_fires ORDER BY fire_id"}

    async def dump() -> dict[str, list[tuple[object, ...]]]:
        conn = await asyncpg.connect(database_url)
        try:
            return {t: [tuple(r.values()) for r in await conn.fetch(q)] for t, q in queries.items()}
        finally:
            await conn.close()

    before = await dump()
    assert len(before["triggers"]) == 1
    assert len(before["trigger_fires"]) == 2
    env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url}
    proc = await asyncio.to_thread(subprocess.run, langorch_command("projections", "rebuild"), env=env,
                                   capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert await dump() == before


async def test_a_replica_serves_health_ready_and_metrics(nats_url: str, database_url: str) -> None:
    port = free_port()
    replica = host(TriggersSettings(nats_url=nats_url, database_url=database_url, metrics_port=port))
    task = asyncio.create_task(replica.serve())
    try:
        await asyncio.wait_for(replica.started.wait(), 60)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=10) as c:
            health = await c.get("/health")
            assert health.status_code == 200
            assert health.json()["service"] == "triggers"
            ready = await c.get("/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["checks"]["nats"] == "ok"
            exposition = (await c.get("/metrics")).text
            for name in ("langorch_trigger_fired_total", "langorch_trigger_rejected_total",
                         "langorch_trigger_lag_seconds"):
                assert f"# HELP {name} " in exposition, name
    finally:
        task.cancel()
        await asyncio.wait({task}, timeout=30)
