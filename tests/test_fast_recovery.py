"""Issue 19, fast recovery: the runs of a SIGKILLed runtime replica resume on the live one within seconds (its
ownership is taken over as soon as NATS says it is gone, not after a 30 s ack wait), and a NATS restart neither
re-dispatches an agent call in flight in a live process nor leaves the projections and live streams standing
still after NATS is back.

The measured numbers are printed (``-s``); the bounds asserted are generous (a loaded machine must not fail them):
the targets are 5 s for a takeover and 2 s for the projections."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from httpx_sse import aconnect_sse

from langorch_infra.embedded import EmbeddedNats
from langorch_infra.presence import read_presence
from tests.helpers import (
    TERMINAL,
    decide,
    events_of,
    free_port,
    langorch_command,
    pending_approval,
    platform_of,
    register_agent,
    start_document,
    wait_status,
)
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_chaos import run_events

pytestmark = pytest.mark.integration

DEADLINE_S = 120.0
TAKEOVER_BOUND_S = 8.0  # target 5 s; measured 1.2 to 1.5 s (the owner found gone from NATS, its commands sent back)
RESUME_BOUND_S = 10.0  # target 2 s
LEASE_TTL_S = 60.0  # LANGORCH_LEASE_TTL_S's default

STEPS = {
    "procedure_id": "takeover", "version": "1",
    "variables_schema": {"n": {"type": "integer", "default": 0}},
    "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [
            {"step_id": f"s{i}", "action": "work", "params": {"n": "{{n}}", "i": i}} for i in range(4)]},
        "done": {"type": "terminate", "outputs": {}}}},
}


GATED = {"procedure_id": "gated", "version": "1", "workflow_graph": {"start_node": "ask", "nodes": {
    "ask": {"type": "human_approval", "prompt": "go?", "on_approve": "done", "on_reject": "done"},
    "done": {"type": "terminate", "outputs": {}}}}}


async def until(condition: Any, what: str, timeout: float = DEADLINE_S) -> None:
    deadline = time.monotonic() + timeout
    while not await condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def start_runtime(nats_url: str, database_url: str, log: Path, runs: int) -> subprocess.Popen[bytes]:
    """A runtime replica with the default ack wait and lease TTL, executing ``runs`` runs at once."""
    env = os.environ | {"LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
                        "LANGORCH_METRICS_PORT": "0", "LANGORCH_MAX_CONCURRENT_RUNS": str(runs)}
    with log.open("ab") as out:
        return subprocess.Popen(langorch_command("serve", "runtime"), env=env, stdout=out, stderr=subprocess.STDOUT)


def check_once(agent: ScriptedAgent, events_by_run: dict[str, list[Any]]) -> None:
    """Each key executed by the agent once, no step under two keys, each run's events contiguous."""
    assert len(agent.executed) == len(set(agent.executed)), Counter(agent.executed).most_common(3)
    keys: dict[tuple[str, str], set[str]] = {}
    for run_id, events in events_by_run.items():
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), run_id
        for e in events:
            if e.type == "step_started":
                keys.setdefault((run_id, e.data["step_id"]), set()).add(e.data["idempotency_key"])
    assert all(len(k) == 1 for k in keys.values()), keys


@dataclass
class Takeover:
    lost: list[str]  # the runs the killed replica was executing
    resumed_after: list[float]  # for each, seconds from the kill to its execution_recovered
    ended_after: float  # seconds from the kill until every run had ended


async def sigkill_one_of_two(nats_url: str, database_url: str, tmp_path: Path, *, agent_slots: int,
                             runs_per_replica: int, runs: int) -> Takeover:
    """Two runtime processes execute ``runs`` runs of 4 one-second agent steps; the first is SIGKILLed while both
    execute runs. Every run completes, each agent key executed once, each run's events contiguous."""
    async def work(body: dict[str, Any]) -> Any:
        await asyncio.sleep(1.0)
        return {"i": body["params"]["i"]}

    agent = ScriptedAgent({"work": work})
    procs: list[subprocess.Popen[bytes]] = []
    async with platform_of(nats_url, database_url, runtime=False) as p, serving(agent):
        c = p.client
        try:
            r = await c.post("/api/agents", json={"name": "one", "channel": "api", "base_url": agent.base_url,
                                                  "capabilities": ["work"], "concurrency_limit": agent_slots})
            assert r.status_code == 201, r.text
            procs = [start_runtime(nats_url, database_url, tmp_path / f"runtime-{i}.log", runs_per_replica)
                     for i in range(2)]

            async def both_up() -> bool:  # both pull (one command per free slot): both get some
                return sum(r["service"] == "runtime" for r in await read_presence(p.app.state.js)) == 2

            await until(both_up, "both runtime replicas to start")
            run_ids = [await start_document(c, STEPS, {"n": i}) for i in range(runs)]

            async def executing() -> dict[str, str]:
                """run id → the runtime instance that started it (and has not finished it)."""
                out: dict[str, str] = {}
                for run_id in run_ids:
                    events = await run_events(nats_url, run_id)
                    started = [e.data["runtime_instance"] for e in events if e.type == "execution_started"]
                    if started and not any(e.type in ("run_completed", "run_failed") for e in events):
                        out[run_id] = started[0]
                return out

            async def both_busy() -> bool:
                owners = set((await executing()).values())
                return all(any(o.endswith(f"-{proc.pid}") for o in owners) for proc in procs)

            await until(both_busy, "both replicas to execute runs")
            victim = procs[0]
            victim.send_signal(signal.SIGKILL)
            killed_at = time.time()
            victim.wait(10)
            lost = [r for r, owner in (await executing()).items() if owner.endswith(f"-{victim.pid}")]
            assert lost, "the killed replica held no run"

            for run_id in run_ids:
                run = await wait_status(c, run_id, TERMINAL, timeout=DEADLINE_S)
                assert run["status"] == "completed", run
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.terminate()
                    proc.wait(20)
        events_by_run = {run_id: await run_events(nats_url, run_id) for run_id in run_ids}
    resumed_after = []
    for run_id in lost:
        recovered = [e for e in events_by_run[run_id] if e.type == "execution_recovered"]
        assert recovered, f"run {run_id} was not recovered"
        assert not recovered[0].data["runtime_instance"].endswith(f"-{victim.pid}")
        resumed_after.append(recovered[0].occurred_at.timestamp() - killed_at)
    ended = max(e.occurred_at.timestamp() for events in events_by_run.values() for e in events) - killed_at
    check_once(agent, events_by_run)
    print(f"\ntakeover ({agent_slots} agent slots, {runs_per_replica} runs per replica): {len(lost)} runs of the "
          f"killed replica resumed after {', '.join(f'{s:.2f}' for s in sorted(resumed_after))} s; every run ended "
          f"{ended:.2f} s after the kill")
    return Takeover(lost, resumed_after, ended)


async def test_runs_of_a_sigkilled_runtime_resume_on_the_live_one_within_seconds(
        nats_url: str, database_url: str, tmp_path: Path) -> None:
    """Slots for every run: what is measured is the takeover itself (the owner found gone from NATS by the live
    replica's watch, its keys released and its commands sent back without waiting for their ack wait)."""
    takeover = await sigkill_one_of_two(nats_url, database_url, tmp_path, agent_slots=16, runs_per_replica=8, runs=6)
    assert max(takeover.resumed_after) <= TAKEOVER_BOUND_S, takeover


async def test_agent_slots_of_a_sigkilled_runtime_are_taken_over(nats_url: str, database_url: str,
                                                                 tmp_path: Path) -> None:
    """The agent has 2 slots and each replica runs 3 runs at once: the live replica's runs wait for slots that the
    dead one's calls held (their leases live 60 s), while the dead one's runs wait for the live one's run slots.
    The dead replica's leases are taken over once it is found gone from NATS, so every run ends well before the
    leases would have expired."""
    takeover = await sigkill_one_of_two(nats_url, database_url, tmp_path, agent_slots=2, runs_per_replica=3, runs=6)
    assert takeover.ended_after < LEASE_TTL_S, takeover


async def test_a_nats_restart_during_an_agent_call(database_url: str, tmp_path: Path) -> None:
    """NATS SIGKILLed while an agent call is in flight, the call answered a second later, NATS back 6 s after that:
    the step's record and events are written once NATS is back, so the agent sees that call once (it was sent
    again with the same key when those writes failed), and the projection and the run's live stream move again as
    soon as NATS is back."""
    server = EmbeddedNats(tmp_path / "nats").start()
    in_flight = asyncio.Event()
    answer = asyncio.Event()

    async def slow(body: dict[str, Any]) -> Any:
        if body["params"]["i"] == 1:
            in_flight.set()
            await answer.wait()
        return {"i": body["params"]["i"]}

    agent = ScriptedAgent({"work": slow})
    doc = {**STEPS, "procedure_id": "blip"}
    try:
        async with platform_of(server.url, database_url) as p, serving(agent):
            c = p.client
            await register_agent(c, agent, "api")
            run_id = await start_document(c, doc)
            received: list[tuple[float, str]] = []

            async def stream() -> None:
                async with httpx.AsyncClient(base_url=str(c.base_url), timeout=httpx.Timeout(60, read=60)) as own, \
                        aconnect_sse(own, "GET", f"/api/runs/{run_id}/stream") as source:
                    async for sse in source.aiter_sse():
                        if sse.event == "run_event":
                            received.append((time.monotonic(), json.loads(sse.data)["event_type"]))
                        elif sse.event == "end":
                            return

            reader = asyncio.create_task(stream())
            await asyncio.wait_for(in_flight.wait(), 60)
            server.kill()
            await asyncio.sleep(1)
            answer.set()  # the call ends while NATS is away: its record and events wait for NATS
            await asyncio.sleep(6)  # longer than a JetStream request's 5 s timeout
            position = p.app.state.projector.position
            server.start()
            back_at = time.monotonic()
            while p.app.state.projector.position <= position:
                assert time.monotonic() - back_at < DEADLINE_S, "the projection never moved again"
                await asyncio.sleep(0.02)
            moved_after = time.monotonic() - back_at
            run = await wait_status(c, run_id, TERMINAL, timeout=DEADLINE_S)
            types = [e["event_type"] for e in await events_of(c, run_id)]
            await asyncio.wait_for(reader, DEADLINE_S)
            # the consumers outlived the restart: a run started now is created, executed and projected, and an
            # approval is opened, decided and resumes its run (approvals service, runtime resume)
            after = await wait_status(c, await start_document(c, doc), TERMINAL, timeout=DEADLINE_S)
            gated = await start_document(c, GATED)
            approval = await pending_approval(c, gated, timeout=DEADLINE_S)
            assert (await decide(c, approval["approval_id"], decision="approve")).status_code == 200
            approved = await wait_status(c, gated, TERMINAL, timeout=DEADLINE_S)
    finally:
        server.stop()
    streamed_after = min(t for t, _ in received if t > back_at) - back_at
    print(f"\nNATS back -> projection moving after {moved_after:.2f} s, live stream after {streamed_after:.2f} s")
    assert run["status"] == "completed", run
    assert after["status"] == "completed", after
    assert approved["status"] == "completed", approved
    calls = [r for r in agent.requests if r["params"]["i"] == 1 and r["run_id"] == run_id]
    assert len(calls) == 1, calls  # the call in flight was not sent again
    assert "execution_recovered" not in types, types  # nor was the attempt abandoned (which may send it again)
    assert len(agent.requests) == 8
    assert moved_after <= RESUME_BOUND_S
    assert streamed_after <= RESUME_BOUND_S


async def test_a_service_started_while_nats_is_down_waits_for_it_and_says_why(tmp_path: Path) -> None:
    """A compiler replica started before its NATS server: alive (/health), not ready and why (/ready), and ready
    once the server starts, without being restarted."""
    server = EmbeddedNats(tmp_path / "nats")
    port = free_port()
    env = os.environ | {"LANGORCH_NATS_URL": server.url, "LANGORCH_METRICS_PORT": str(port)}
    log = tmp_path / "compiler.log"
    with log.open("ab") as out:
        proc = subprocess.Popen(langorch_command("serve", "compiler"), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as ops:
            async def answers(path: str, status: int) -> Any:
                deadline = time.monotonic() + DEADLINE_S
                while True:
                    assert proc.poll() is None, log.read_text()
                    try:
                        r = await ops.get(path)
                        if r.status_code == status:
                            return r.json()
                    except httpx.TransportError:
                        pass
                    assert time.monotonic() < deadline, f"{path} never answered {status}\n{log.read_text()}"
                    await asyncio.sleep(0.2)

            assert (await answers("/health", 200))["status"] == "ok"
            body = await answers("/ready", 503)
            assert body["checks"]["nats"] == "disconnected", body
            await asyncio.sleep(2)  # still waiting, not exited
            assert proc.poll() is None, log.read_text()
            server.start()
            try:
                body = await answers("/ready", 200)
                assert body["checks"]["nats"] == "ok", body
            finally:
                server.stop()
    finally:
        proc.terminate()
        proc.wait(30)


SIMPLE = {"procedure_id": "plain", "version": "1", "workflow_graph": {"start_node": "s", "nodes": {
    "s": {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "x", "action": "set_variable", "variable": "x", "value": 1}]},
    "done": {"type": "terminate", "outputs": {"x": "{{x}}"}}}}}


async def test_a_projection_whose_consumer_is_lost_subscribes_again(nats_url: str, database_url: str) -> None:
    """The projector's consumer deleted on the server (as a node's loss takes it, with no reconnection here): the
    projector, idle behind the stream head, subscribes again within seconds (nats-py alone notices after two
    missed 5 s heartbeats, 10 to 20 s)."""
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        await wait_status(c, await start_document(c, SIMPLE), TERMINAL)
        js = p.app.state.js
        for info in await js.consumers_info("LO_EVT"):
            if not info.config.durable_name:  # the ordered consumers: the projector's among them
                await js.delete_consumer("LO_EVT", info.name)
        lost_at = time.monotonic()
        r = await c.post("/api/runs", json={"procedure_id": "plain", "procedure_version": "1"})
        assert r.status_code in (201, 202), r.text
        run = await wait_status(c, r.json()["run_id"], TERMINAL, timeout=DEADLINE_S)
        projected_after = time.monotonic() - lost_at
    print(f"\nconsumer lost -> run projected as {run['status']} after {projected_after:.2f} s")
    assert run["status"] == "completed"
    assert projected_after <= 8.0  # generous beside the ~2 s idle check, short of nats-py's 10 s at the least


async def test_ready_says_a_projection_behind_and_not_moving_is_not_ready(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        await wait_status(c, await start_document(c, SIMPLE), TERMINAL)
        assert (await c.get("/api/ready")).status_code == 200
        projector = p.app.state.projector
        await projector.stop()  # stands still while the run below appends
        r = await c.post("/api/runs", json={"procedure_id": "plain", "procedure_version": "1"})
        assert r.status_code in (201, 202), r.text
        body = (await c.get("/api/ready")).json()
        assert body["checks"]["projections"] == "ok", body  # behind, but within the lag and not known as stalled
        projector.stalled_since = time.monotonic()  # what the projector notes when it finds its consumer lost
        r = await c.get("/api/ready")
        assert r.status_code == 503, r.text
        assert r.json()["checks"]["projections"].startswith("core behind and not moving"), r.json()
        projector.start()
        await projector.catch_up()
        assert (await c.get("/api/ready")).status_code == 200
