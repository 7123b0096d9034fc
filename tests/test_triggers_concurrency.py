"""``max_concurrent_runs`` over the real stack (api.md §10.3): runs of any origin hold the procedure's slots, a manual
fire at the limit is refused with 429 ``max_concurrent_runs`` (``Retry-After``, ``active_runs``, ``limit``) and a
``throttled`` fires row, the run's end frees its slot, and two concurrent fires never both take the last one."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest
from nats.js.api import DeliverPolicy

from ckp_core.ids import new_id
from langorch_infra.settings import TriggersSettings
from langorch_triggers.service import TriggersService
from langorch_triggers.slots import slots_key
from tests.helpers import (
    Platform,
    pending_approval,
    platform_of,
    problem,
    procedure_doc,
    start_run,
    wait_status,
    wait_until,
)
from tests.test_approvals_end_to_end import procedure

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False, triggers=True) as p:
        yield p


async def waiting_procedure(p: Platform, limit: int, dedupe_window_seconds: int = 0) -> str:
    """A procedure whose runs wait for an approval, with a webhook trigger limited to ``limit`` runs."""
    pid = f"conc_{new_id().replace('-', '')[-12:]}"
    doc = procedure(pid, {"on_approve": "approved_end", "on_reject": "rejected_end"}, "approved_end",
                    "rejected_end")
    assert (await p.client.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
    r = await p.client.post(f"/api/triggers/{pid}/1", json={"trigger_type": "webhook", "webhook_secret": "k",
                                                           "max_concurrent_runs": limit,
                                                           "dedupe_window_seconds": dedupe_window_seconds})
    assert r.status_code == 201, r.text
    assert r.json()["max_concurrent_runs"] == limit
    return pid


async def held(p: Platform, pid: str) -> set[str]:
    return set(await p.triggers_service.slots.held(pid))


def slots_gauge(p: Platform, pid: str) -> float | None:
    return p.triggers_service.metrics.registry.get_sample_value(  # type: ignore[no-any-return]
        "langorch_trigger_slots_held", {"procedure_id": pid})


def rejected(p: Platform) -> float:
    return p.triggers_service.metrics.registry.get_sample_value(  # type: ignore[no-any-return]
        "langorch_trigger_rejected_total", {"trigger_type": "manual", "reason": "max_concurrent_runs"}) or 0.0


async def test_a_run_started_through_the_api_holds_the_slot_until_it_ends(platform: Platform) -> None:
    """With a dedupe window too: the refused fire gives its dedupe record back, so the same inputs fired once the
    slot is free start a run instead of answering 409."""
    c = platform.client
    pid = await waiting_procedure(platform, 1, dedupe_window_seconds=600)
    run_id = await start_run(c, pid)
    await pending_approval(c, run_id)
    await wait_until(lambda: held(platform, pid), lambda runs: runs == {run_id})
    await wait_until(lambda: slots_gauge(platform, pid), lambda value: value == 1)
    before = rejected(platform)

    refused = await c.post(f"/api/triggers/{pid}/1/fire", json={"input_vars": {"amount": 7}})
    body = problem(refused, 429, "max_concurrent_runs")
    assert (body["active_runs"], body["limit"]) == (1, 1), body
    assert refused.headers["Retry-After"] == "5"
    fires = (await c.get(f"/api/triggers/{pid}/1/fires", params={"outcome": "throttled"})).json()
    assert fires["total"] == 1, fires
    assert (fires["items"][0]["reason"], fires["items"][0]["run_id"]) == ("max_concurrent_runs", None)
    assert rejected(platform) == before + 1
    assert await held(platform, pid) == {run_id}  # the refused fire took nothing

    assert (await c.post(f"/api/runs/{run_id}/cancel", json={})).status_code in (200, 202)
    await wait_status(c, run_id, ("canceled",))
    await wait_until(lambda: held(platform, pid), lambda runs: not runs)
    await wait_until(lambda: slots_gauge(platform, pid), lambda value: value == 0)
    started = await c.post(f"/api/triggers/{pid}/1/fire", json={"input_vars": {"amount": 7}})
    assert started.status_code == 202, started.text
    fired = started.json()["run_id"]
    assert await held(platform, pid) == {fired}
    await pending_approval(c, fired)
    assert (await c.get(f"/api/triggers/{pid}/1/fires")).json()["total"] == 2


async def test_two_concurrent_fires_at_limit_one_start_exactly_one_run(platform: Platform) -> None:
    c = platform.client
    pid = await waiting_procedure(platform, 1)
    answers = await asyncio.gather(*(c.post(f"/api/triggers/{pid}/1/fire", json={}) for _ in range(2)))
    assert sorted(r.status_code for r in answers) == [202, 429], [r.text for r in answers]
    [started] = [r.json()["run_id"] for r in answers if r.status_code == 202]
    [refused] = [problem(r, 429, "max_concurrent_runs") for r in answers if r.status_code == 429]
    assert (refused["active_runs"], refused["limit"]) == (1, 1)
    fires = (await c.get(f"/api/triggers/{pid}/1/fires")).json()
    assert sorted(f["outcome"] for f in fires["items"]) == ["started", "throttled"], fires
    await pending_approval(c, started)
    assert await held(platform, pid) == {started}
    runs = (await c.get("/api/runs", params={"procedure_id": pid})).json()
    assert [r["run_id"] for r in runs["items"]] == [started]


async def test_a_retried_run_takes_its_slot_again(platform: Platform) -> None:
    c = platform.client
    pid = await waiting_procedure(platform, 1)
    run_id = await start_run(c, pid)
    await wait_until(lambda: held(platform, pid), lambda runs: runs == {run_id})
    assert (await c.post(f"/api/runs/{run_id}/cancel", json={})).status_code in (200, 202)
    await wait_until(lambda: held(platform, pid), lambda runs: not runs)

    retried = await c.post(f"/api/runs/{run_id}/retry", json={})
    assert retried.status_code in (200, 202), retried.text
    await wait_until(lambda: held(platform, pid), lambda runs: runs == {run_id})
    problem(await c.post(f"/api/triggers/{pid}/1/fire", json={}), 429, "max_concurrent_runs")


async def test_a_new_keeper_counts_the_runs_created_before_its_first_start(nats_url: str, database_url: str) -> None:
    """The triggers_run_slots consumer starts from the beginning of LO_EVT: runs started while no triggers replica
    ran hold their slots once one starts, and runs that already ended hold none."""
    async with platform_of(nats_url, database_url, agents=False) as p:
        c = p.client
        waiting = procedure("conc_before", {"on_approve": "approved_end", "on_reject": "rejected_end"},
                            "approved_end", "rejected_end")
        done = procedure_doc("conc_done", "1")
        for doc in (waiting, done):
            assert (await c.post("/api/procedures", json={"ckp_json": doc})).status_code == 201
        active = await start_run(c, "conc_before")
        await pending_approval(c, active)
        await wait_status(c, await start_run(c, "conc_done"), ("completed",))

        service = TriggersService(TriggersSettings(nats_url=nats_url, database_url=database_url))
        await service.start()
        task = asyncio.create_task(service.run())
        try:
            await wait_until(lambda: service.slots.held("conc_before"), lambda runs: set(runs) == {active})
            await wait_until(lambda: service.run_slots_subscription.pull, lambda pull: pull is not None)
            info = await service.js.consumer_info("LO_EVT", "triggers_run_slots")
            assert (info.config.deliver_policy, info.config.max_ack_pending) == (DeliverPolicy.ALL, 1)
            await wait_until(lambda: service.js.consumer_info("LO_EVT", "triggers_run_slots"),
                             lambda info: info.num_pending == 0 and info.num_ack_pending == 0)
            entry = await service.locks.get(slots_key("conc_done"))  # taken by run_created, freed by run_completed
            assert json.loads(entry.value or b"") == {}
        finally:
            task.cancel()
            await asyncio.wait({task})
            await service.stop()
