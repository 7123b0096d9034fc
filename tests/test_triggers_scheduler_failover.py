"""Issue 16 acceptance, scheduled: two ``langorch serve triggers`` replicas, one scheduler. With both alive a
``* * * * *`` slot fires once; with the leader SIGKILLed two seconds before a slot, the other replica takes the
scheduler lock over and that slot still fires exactly once (real minutes: each test waits for one slot)."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError
from nats.js.kv import KeyValue

from ckp_core.subjects import LOCKS_BUCKET
from langorch_infra.jetstream import JetStreamEventStore, connect
from tests.helpers import Platform, langorch_command, platform_of, procedure_doc, wait_status, wait_until
from tests.ports import free_port

pytestmark = pytest.mark.integration

LOCK_TTL_S = 3  # a dead leader is replaced within about this time
SETUP_MARGIN_S = 20  # time the test needs before its slot: replicas up, leader known, registration live


@asynccontextmanager
async def replicas(nats_url: str, database_url: str, tmp_path: Path,
                   names: tuple[str, ...]) -> AsyncIterator[dict[str, subprocess.Popen[bytes]]]:
    """``langorch serve triggers`` subprocesses by instance id; those still running are stopped at the end."""
    procs: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for name in names:
            env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
                                "LANGORCH_INSTANCE_ID": name, "LANGORCH_METRICS_PORT": str(free_port()),
                                "LANGORCH_SCHEDULER_LOCK_TTL_S": str(LOCK_TTL_S)}
            with (tmp_path / f"{name}.log").open("wb") as out:
                procs[name] = subprocess.Popen(langorch_command("serve", "triggers"), env=env, stdout=out,
                                               stderr=subprocess.STDOUT)
        yield procs
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGINT)
        for name, proc in procs.items():
            try:
                await asyncio.to_thread(proc.wait, 60)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise AssertionError(f"{name} did not stop: {(tmp_path / f'{name}.log').read_text()}") from None


async def holder(locks: KeyValue) -> str | None:
    """The instance holding the scheduler lock (None: nobody)."""
    try:
        entry = await locks.get("leader.scheduler")
    except KeyNotFoundError:
        return None
    return entry.value.decode() if entry.value else None


async def until(at: datetime) -> None:
    """Wait for a wall-clock instant (the slot the test is about is a real minute)."""
    await wait_until(lambda: datetime.now(UTC) >= at, timeout=SETUP_MARGIN_S + 90, every=0.02)


def slot_after(margin_s: float) -> datetime:
    """The first minute boundary at least ``margin_s`` from now."""
    at = datetime.now(UTC) + timedelta(seconds=margin_s)
    return at.replace(second=0, microsecond=0) + timedelta(minutes=1)


async def scheduled_platform(p: Platform, procedure_id: str) -> None:
    """An active version with an every-minute registration (the replicas decide the commands)."""
    c = p.client
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc(procedure_id)})
    assert r.status_code == 201, r.text
    r = await c.patch(f"/api/procedures/{procedure_id}/1.0.0/status", json={"status": "active"})
    assert r.status_code == 200, r.text
    r = await c.post(f"/api/triggers/{procedure_id}/1.0.0", json={"trigger_type": "scheduled",
                                                                  "schedule": "* * * * *"})
    assert r.status_code == 201, r.text


async def fired_for(store: JetStreamEventStore, tid: str, slot: datetime) -> list[dict[str, Any]]:
    """The fire outcomes recorded for one slot."""
    wanted = slot.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    return [{"type": e.envelope.type, **e.envelope.data} for e in await store.read("trigger", tid)
            if e.envelope.type in ("trigger_fired", "trigger_fire_skipped")
            and e.envelope.data.get("source_detail", {}).get("slot") == wanted]


async def one_run_for(p: Platform, store: JetStreamEventStore, tid: str, slot: datetime) -> dict[str, Any]:
    """Exactly one fire for ``slot``, whose run completes, and no other run of the procedure for it."""
    outcomes = await wait_until(lambda: fired_for(store, tid, slot), timeout=60)
    run = await wait_status(p.client, outcomes[0]["run_id"], timeout=60)
    assert run["status"] == "completed", run
    outcomes = await fired_for(store, tid, slot)
    assert [o["type"] for o in outcomes] == ["trigger_fired"], outcomes
    procedure_id = tid.split("@")[0]
    runs = (await p.client.get("/api/runs", params={"procedure_id": procedure_id})).json()["items"]
    at_slot = [r for r in runs if r["run_id"] == outcomes[0]["run_id"]]
    assert len(at_slot) == 1
    return outcomes[0]


async def test_with_two_replicas_alive_a_slot_fires_once(nats_url: str, database_url: str, tmp_path: Path) -> None:
    async with (platform_of(nats_url, database_url, approvals=False, agents=False) as p,
                replicas(nats_url, database_url, tmp_path, ("sched-a", "sched-b")) as procs):
        nc = await connect(nats_url, "test-scheduler-replicas")
        try:
            js = nc.jetstream()
            locks = await js.key_value(LOCKS_BUCKET)
            leader = await wait_until(lambda: holder(locks), timeout=60)
            assert leader in procs
            slot = slot_after(SETUP_MARGIN_S)
            await scheduled_platform(p, "failover_both")
            await until(slot)
            fired = await one_run_for(p, JetStreamEventStore(js), "failover_both@1.0.0", slot)
            assert fired["trigger_type"] == "scheduled"
            assert await holder(locks) == leader  # one leader throughout, the other replica stood by
        finally:
            await nc.close()
    for name, proc in procs.items():
        assert proc.returncode == 0, (tmp_path / f"{name}.log").read_text()


async def test_a_leader_killed_just_before_a_slot_still_gives_exactly_one_fire(nats_url: str, database_url: str,
                                                                              tmp_path: Path) -> None:
    async with (platform_of(nats_url, database_url, approvals=False, agents=False) as p,
                replicas(nats_url, database_url, tmp_path, ("sched-c", "sched-d")) as procs):
        nc = await connect(nats_url, "test-scheduler-failover")
        try:
            js = nc.jetstream()
            locks = await js.key_value(LOCKS_BUCKET)
            leader = await wait_until(lambda: holder(locks), timeout=60)
            slot = slot_after(SETUP_MARGIN_S)
            await scheduled_platform(p, "failover_kill")
            await until(slot - timedelta(seconds=2))
            procs[leader].send_signal(signal.SIGKILL)
            await asyncio.to_thread(procs[leader].wait, 10)
            [survivor] = [name for name in procs if name != leader]
            await wait_until(lambda: holder(locks), lambda h: h == survivor, timeout=30)
            fired = await one_run_for(p, JetStreamEventStore(js), "failover_kill@1.0.0", slot)
            assert fired["source_detail"]["lag_ms"] < 120_000  # fired late by the takeover, not skipped
        finally:
            await nc.close()
    assert procs[survivor].returncode == 0, (tmp_path / f"{survivor}.log").read_text()
