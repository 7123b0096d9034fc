"""Behaviour under overload and during a NATS outage (issue 19, Deliver 5 and 6), on real NATS and PostgreSQL:

* while NATS is down, ``POST /api/runs`` is refused at once with 503 ``unavailable`` and ``Retry-After``, nothing
  of it reaches NATS later (no run appears after the client was told 503), and runs are accepted again once NATS
  is back;
* admission control: while more run commands wait for the runtime than ``admission_max_backlog``, creations are
  refused with 429 ``rate_limited`` and ``Retry-After``; every accepted run completes, and a refused one leaves no
  run behind;
* a runtime replica executes at most ``max_concurrent_runs`` runs at once: the excess waits in ``LO_CMD``, where
  another replica takes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckp_core.subjects import COMMAND_STREAM
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.creation import RUN_CONSUMER
from langorch_runtime.service import RuntimeService
from tests.helpers import Platform, imported, langorch_command, platform_of, problem, wait_status, wait_until
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration

QUICK = {"procedure_id": "ovl_quick", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
    "s": {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "x", "action": "set_variable", "variable": "x", "value": 1}]},
    "done": {"type": "terminate"}}}}
AGENT_DOC = {"procedure_id": "ovl_agent", "version": "1", "workflow_graph": {"start_node": "call", "nodes": {
    "call": {"type": "sequence", "agent": "OVL", "next_node": "done", "steps": [
        {"step_id": "work", "action": "work", "output_variable": "r"}]},
    "done": {"type": "terminate", "outputs": {"r": "{{r}}"}}}}}
SLOW = {"procedure_id": "ovl_slow", "version": "1", "workflow_graph": {"start_node": "w", "nodes": {
    "w": {"type": "sequence", "next_node": "done", "steps": [{"step_id": "pause", "action": "wait",
                                                              "duration_ms": 2500}]},
    "done": {"type": "terminate"}}}}
FAST_REFUSAL_BOUND_S = 3.0
"""The outage refusal must not wait for a NATS timeout (5 s and more before); measured well under a second."""


async def start(c: httpx.AsyncClient, doc: dict[str, Any], **headers: str) -> httpx.Response:
    return await c.post("/api/runs", json={"procedure_id": doc["procedure_id"], "procedure_version": doc["version"]},
                        headers=headers)


async def run_total(c: httpx.AsyncClient, procedure_id: str) -> int:
    r = await c.get("/api/runs", params={"procedure_id": procedure_id, "limit": 1})
    assert r.status_code == 200, r.text
    return int(r.json()["total"])


async def register(c: httpx.AsyncClient, agent: ScriptedAgent, concurrency: int) -> None:
    r = await c.post("/api/agents", json={"name": "ovl", "channel": "ovl", "base_url": agent.base_url,
                                          "capabilities": list(agent.handlers), "concurrency_limit": concurrency})
    assert r.status_code == 201, r.text


async def test_a_run_creation_during_a_nats_outage_is_refused_at_once_and_never_sent(
        tmp_path: Path, database_url: str) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        async with platform_of(server.url, database_url) as p:
            c = p.client
            await imported(c, QUICK)
            r = await start(c, QUICK)
            assert r.status_code == 201, r.text

            server.kill()  # no goodbye: the gateway learns it from its connection
            await wait_until(lambda: c.get("/api/ready"),
                             lambda r: r.status_code == 503 and r.json()["checks"]["nats"] == "disconnected")
            timings = []
            for key in (None, "ovl-outage-1"):  # with and without an Idempotency-Key
                started = time.monotonic()
                r = await start(c, QUICK, **({"Idempotency-Key": key} if key else {}))
                timings.append(time.monotonic() - started)
                body = problem(r, 503, "unavailable")
                assert body["retryable"] is True
                assert int(r.headers["Retry-After"]) >= 1
            # a command of another kind goes through the same path: a procedure's import
            started = time.monotonic()
            r = await c.post("/api/procedures", json={"ckp_json": {**QUICK, "procedure_id": "ovl_during"}})
            timings.append(time.monotonic() - started)
            problem(r, 503, "unavailable")
            assert max(timings) < FAST_REFUSAL_BOUND_S, timings

            server.start()  # same port and store
            await wait_until(lambda: c.get("/api/ready"), lambda r: r.status_code == 200, timeout=60)
            accepted = await wait_until(lambda: start(c, QUICK), lambda r: r.status_code in (201, 202), timeout=60)
            ids = [accepted.json().get("run_id")]
            r = await start(c, QUICK, **{"Idempotency-Key": "ovl-outage-1"})  # the key refused before: now new
            assert r.status_code in (201, 202), r.text
            ids.append(r.json().get("run_id"))
            # the two refused creations never reach NATS: only the three accepted runs exist, ever
            await wait_until(lambda: run_total(c, "ovl_quick"), lambda n: n == 3, timeout=60)
            await asyncio.sleep(2)  # a buffered command would have been sent on reconnection, long before this
            assert await run_total(c, "ovl_quick") == 3
            assert (await c.get("/api/procedures/ovl_during")).status_code == 404
    finally:
        server.stop()


async def test_creations_beyond_the_backlog_limit_are_refused_and_every_accepted_run_completes(
        nats_url: str, database_url: str) -> None:
    release = asyncio.Event()

    async def work(body: dict[str, Any]) -> str:
        await release.wait()
        return "done"

    agent = ScriptedAgent({"work": work})
    async with (serving(agent),
                platform_of(nats_url, database_url, runtime_settings={"max_concurrent_runs": 1},
                            gateway_settings={"admission_max_backlog": 2, "admission_cache_ms": 0,
                                              "admission_retry_after_s": 1}) as p):
        c = p.client
        await register(c, agent, 1)
        await imported(c, AGENT_DOC)
        accepted: list[str] = []
        refused: list[httpx.Response] = []
        for _ in range(8):  # one by one: the one slot is held by the first run, the others wait in LO_CMD
            r = await start(c, AGENT_DOC)
            if r.status_code == 429:
                refused.append(r)
            else:
                assert r.status_code == 201, r.text
                accepted.append(r.json()["run_id"])
        assert refused, "no creation was refused above the backlog limit"
        assert 3 <= len(accepted) <= 5, accepted  # the running one, the limit, and a start not counted yet
        for r in refused:
            body = problem(r, 429, "rate_limited")
            assert r.headers["Retry-After"] == "1"
            assert body["retryable"] is True
            assert body["limit"] == 2
            assert body["backlog"] >= 2
            assert body["retry_after_seconds"] == 1
        # with an Idempotency-Key: the 429 is not kept for the key, so the same key is tried again later
        problem(await start(c, AGENT_DOC, **{"Idempotency-Key": "ovl-backlog-1"}), 429, "rate_limited")
        assert await run_total(c, "ovl_agent") == len(accepted)  # a refused creation created nothing
        metrics = (await c.get("/metrics")).text
        counted = re.search(r"^langorch_admission_refusals_total (\S+)$", metrics, re.MULTILINE)
        assert counted is not None, metrics
        assert float(counted.group(1)) == len(refused) + 1
        backlog = re.search(r"^langorch_admission_backlog (\S+)$", metrics, re.MULTILINE)
        assert backlog is not None, metrics
        assert float(backlog.group(1)) >= 2

        release.set()
        for run_id in accepted:
            assert (await wait_status(c, run_id, timeout=90))["status"] == "completed"
        # the backlog is gone: accepted again, the key refused before included
        r = await wait_until(lambda: start(c, AGENT_DOC, **{"Idempotency-Key": "ovl-backlog-1"}),
                             lambda r: r.status_code != 429, timeout=30)
        assert r.status_code == 201, r.text
        assert "Idempotent-Replayed" not in r.headers
        assert (await wait_status(c, r.json()["run_id"], timeout=60))["status"] == "completed"


async def test_concurrent_clients_that_honour_retry_after_get_every_run_done(
        nats_url: str, database_url: str) -> None:
    """Small-scale overload: clients start runs of a slow agent faster than one slot drains them; some are told
    429 with Retry-After, wait as told and ask again, and every accepted run completes."""

    async def work(body: dict[str, Any]) -> str:
        await asyncio.sleep(0.3)
        return "done"

    agent = ScriptedAgent({"work": work})
    async with (serving(agent),
                platform_of(nats_url, database_url, runtime_settings={"max_concurrent_runs": 1},
                            gateway_settings={"admission_max_backlog": 3, "admission_cache_ms": 100,
                                              "admission_retry_after_s": 1}) as p):
        c = p.client
        await register(c, agent, 1)
        await imported(c, AGENT_DOC)
        accepted: list[str] = []
        refusals: list[httpx.Response] = []

        async def client() -> None:
            for _ in range(3):
                while True:
                    r = await start(c, AGENT_DOC)
                    if r.status_code != 429:
                        assert r.status_code == 201, r.text
                        accepted.append(r.json()["run_id"])
                        break
                    refusals.append(r)
                    await asyncio.sleep(int(r.headers["Retry-After"]))

        await asyncio.wait_for(asyncio.gather(*(client() for _ in range(6))), 240)
        assert refusals, "the clients outpaced one slot, yet none was refused"
        assert all(problem(r, 429, "rate_limited")["retryable"] for r in refusals)
        assert len(accepted) == len(set(accepted)) == 18
        for run_id in accepted:
            assert (await wait_status(c, run_id, timeout=120))["status"] == "completed"
        assert await run_total(c, "ovl_agent") == 18
        assert len(agent.executed) == len(set(agent.executed)) == 18  # each run's one call, once


async def command_consumer(p: Platform) -> Any:
    return await p.app.state.js.consumer_info(COMMAND_STREAM, RUN_CONSUMER)


@contextlib.asynccontextmanager
async def another_runtime(p: Platform, max_concurrent_runs: int) -> Any:
    replica = RuntimeService(RuntimeSettings(nats_url=p.nats_url, database_url=p.database_url, ack_wait_s=5,
                                             public_url=p.base_url, max_concurrent_runs=max_concurrent_runs))
    await replica.start()
    task = asyncio.create_task(replica.run())
    try:
        yield replica
    finally:
        task.cancel()
        await asyncio.wait({task})
        await replica.stop()


async def test_a_runtime_replica_executes_at_most_max_concurrent_runs_and_leaves_the_rest_in_the_stream(
        nats_url: str, database_url: str) -> None:
    release = asyncio.Event()
    in_flight = 0
    most = 0

    async def work(body: dict[str, Any]) -> str:
        nonlocal in_flight, most
        in_flight += 1
        most = max(most, in_flight)
        try:
            await release.wait()
        finally:
            in_flight -= 1
        return "done"

    agent = ScriptedAgent({"work": work})
    async with serving(agent), platform_of(nats_url, database_url, runtime_settings={"max_concurrent_runs": 2}) as p:
        c = p.client
        await register(c, agent, 10)
        await imported(c, AGENT_DOC)
        runs = []
        for _ in range(5):
            r = await start(c, AGENT_DOC)
            assert r.status_code == 201, r.text
            runs.append(r.json()["run_id"])
        await wait_until(lambda: in_flight, lambda n: n == 2, timeout=60)
        # the three others were not fetched: they wait in LO_CMD, not in the replica
        info = await wait_until(lambda: command_consumer(p), lambda i: i.num_pending == 3, timeout=30)
        assert info.num_ack_pending == 2
        await asyncio.sleep(1)  # the replica holds no more than its slots, however long they stay busy
        assert (in_flight, most) == (2, 2)
        async with another_runtime(p, 1):  # another replica takes the excess, within its own bound
            await wait_until(lambda: in_flight, lambda n: n == 3, timeout=60)
            info = await wait_until(lambda: command_consumer(p), lambda i: i.num_pending == 2, timeout=30)
            assert info.num_ack_pending == 3
            release.set()
            for run_id in runs:
                assert (await wait_status(c, run_id, timeout=90))["status"] == "completed"
        assert most == 3
        assert len(agent.executed) == len(set(agent.executed)) == 5


async def test_langorch_run_waits_as_retry_after_says_while_the_api_is_overloaded(
        nats_url: str, database_url: str, tmp_path: Path) -> None:
    async with platform_of(nats_url, database_url, runtime_settings={"max_concurrent_runs": 1},
                           gateway_settings={"admission_max_backlog": 1, "admission_cache_ms": 0,
                                             "admission_retry_after_s": 1}) as p:
        c = p.client
        await imported(c, SLOW)
        # slow runs on the one slot until the next creation is refused
        await wait_until(lambda: start(c, SLOW), lambda r: r.status_code == 429, timeout=60, every=0.2)
        path = tmp_path / "quick.json"
        path.write_text(json.dumps(QUICK))
        env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")} | {"COLUMNS": "400"}
        proc = await asyncio.to_thread(subprocess.run, langorch_command(
            "run", str(path), "--api", p.base_url, "--retry-for", "120"), capture_output=True, text=True, env=env,
            timeout=180, check=False)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "/api/runs: 429 rate_limited; trying again in 1 s (Retry-After)" in proc.stdout, proc.stdout
        created = re.search(r"run (\S+) created", proc.stdout)
        assert created is not None, proc.stdout
        assert (await wait_status(c, created.group(1), timeout=90))["status"] == "completed"
        assert await run_total(c, "ovl_quick") == 1  # tried again and again, created once
