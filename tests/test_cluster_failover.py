"""Issue 19 acceptance: LangOrch on a local cluster (:class:`langorch.cluster.LocalCluster`: 3 NATS nodes with every
stream at R3, PostgreSQL, 3 runtime, 2 gateway, 2 approvals replicas, a compiler and a triggers replica, each a
``langorch serve`` process) runs procedures that call a real HTTP agent, under load, through

* nothing (every runtime replica handles some runs),
* the SIGKILL of the NATS node leading ``LO_EVT`` and ``LO_CMD``, down for 20 s,
* the SIGKILL of a runtime replica,
* a rolling restart of every process (SIGTERM, start, ready; one at a time),
* the SIGKILL of the approvals replica holding the approval timer with timeouts pending.

After each, every run completes; each run's events are contiguous without duplicates; the agent executed each step
once, under one idempotency key (it records every call); after the NATS outage the projections equal a rebuild from
the stream. The clients spread their requests over both gateways and go to the other one when one does not answer
(as behind a load balancer). Bounds are generous: the machine may be slow and busy.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError

from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, LOCKS_BUCKET
from langorch.cluster import ClusterLayout, LocalCluster
from langorch_gateway.projector import ensure_schema, rebuild
from langorch_infra.jetstream import JetStreamEventStore, connect
from tests.cluster import local_cluster  # noqa: F401 - the fixture
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_projection_kill_restart import dump

pytestmark = pytest.mark.integration

CLUSTER_LAYOUT = ClusterLayout(nodes=3, runtimes=3, gateways=2, approvals=2, compilers=1, triggers=1)
RUNS = 200  # the first scenario's runs
LOAD = 60  # the runs of each failure scenario
CLIENTS = 8
IN_FLIGHT = 3  # the rolling restart's load: runs always in flight
OUTAGE_S = 20
DONE_S = 240  # every run of a scenario terminal within this, once its load is started
AGENT_STEPS = {("work", "a"), ("work", "b")}

AGENTS_DOC = {
    "procedure_id": "cluster_agents", "version": "1",
    "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [
            {"step_id": "a", "action": "touch", "output_variable": "x"},
            {"step_id": "b", "action": "touch", "output_variable": "y"}]},
        "done": {"type": "terminate", "outputs": {"x": "{{x}}", "y": "{{y}}"}}}},
}
TIMEOUT_MS = 12_000
APPROVAL_DOC = {
    "procedure_id": "cluster_approval", "version": "1",
    "workflow_graph": {"start_node": "review", "nodes": {
        "review": {"type": "human_approval", "prompt": "Go?", "timeout_ms": TIMEOUT_MS,
                   "timeout_action": "auto_reject", "on_approve": "yes", "on_reject": "no"},
        "yes": {"type": "terminate", "outputs": {"route": "approved"}},
        "no": {"type": "terminate", "outputs": {"route": "rejected"}}}},
}


# -- the clients: both gateways, the other one when one does not answer ---------------------------------------------

class Gateways:
    """HTTP clients of every gateway replica; a request goes to the next one round-robin, and to another one (again
    and again, until ``deadline_s``) when one refuses the connection or answers 502/503."""

    def __init__(self, cluster: LocalCluster) -> None:
        self.clients = [httpx.AsyncClient(base_url=g.url, timeout=30) for g in cluster.gateways]
        self._next = itertools.cycle(range(len(self.clients)))

    async def request(self, method: str, path: str, *, deadline_s: float = 120, **kwargs: Any) -> httpx.Response:
        deadline = time.monotonic() + deadline_s
        while True:
            client = self.clients[next(self._next)]
            try:
                r = await client.request(method, path, **kwargs)
                if r.status_code not in (502, 503):
                    return r
                what = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:  # that replica is restarting: ask another one
                what = repr(exc)
            assert time.monotonic() < deadline, f"{method} {path}: no gateway answered ({what})"
            await asyncio.sleep(0.2)

    async def close(self) -> None:
        for client in self.clients:
            await client.aclose()


@pytest.fixture(scope="module")
async def gateways(local_cluster: LocalCluster) -> AsyncIterator[Gateways]:  # noqa: F811
    gw = Gateways(local_cluster)
    try:
        yield gw
    finally:
        await gw.close()


@pytest.fixture(scope="module")
async def agent(gateways: Gateways) -> AsyncIterator[ScriptedAgent]:
    """The agent every run calls, registered once, with the two procedures imported."""
    async def touch(body: dict[str, Any]) -> Any:
        await asyncio.sleep(0.05)
        return {"step": body.get("step_id")}

    a = ScriptedAgent({"touch": touch})
    async with serving(a):
        await accepted(gateways, await gateways.request("POST", "/api/agents", json={
            "name": "cluster-agent", "channel": "api", "base_url": a.base_url, "capabilities": ["touch"],
            "concurrency_limit": 64}))
        for doc in (AGENTS_DOC, APPROVAL_DOC):
            await accepted(gateways, await gateways.request("POST", "/api/procedures", json={"ckp_json": doc}))
        yield a


async def accepted(gw: Gateways, r: httpx.Response) -> None:
    """A command answered 201, or 202 and then accepted (its record polled: a cluster just started may take longer
    than the gateway's wait to compile a procedure)."""
    assert r.status_code in (201, 202), r.text
    if r.status_code == 202:
        location = r.headers["Location"]
        record = await wait_for_async(lambda: settled(gw, location), 120, f"the outcome of {location}")
        assert record["status"] == "accepted", record


async def settled(gw: Gateways, location: str) -> dict[str, Any] | None:
    record: dict[str, Any] = (await gw.request("GET", location)).json()
    return None if record.get("status") == "pending" else record


@pytest.fixture(scope="module")
async def nc(local_cluster: LocalCluster) -> AsyncIterator[Any]:  # noqa: F811
    client = await connect(local_cluster.nats_url, "lo-test-failover")
    try:
        yield client
    finally:
        await client.close()


@pytest.fixture(scope="module")
def js(nc: Any) -> Any:
    return nc.jetstream()


# -- load and its checks ----------------------------------------------------------------------------------------------

async def create_run(gw: Gateways, procedure_id: str) -> str:
    """``POST /api/runs`` with an Idempotency-Key, sent again with the same key until it is answered (a gateway
    restarting, NATS failing over); the run's id, from the 201 or from the 202's command record."""
    key = {"Idempotency-Key": f"cl-{uuid.uuid4().hex}"}
    body = {"procedure_id": procedure_id, "procedure_version": "1"}
    deadline = time.monotonic() + 120
    while True:
        r = await gw.request("POST", "/api/runs", json=body, headers=key)
        if r.status_code == 201:
            return str(r.json()["run_id"])
        if r.status_code == 202:
            location = r.headers["Location"]
            record = await gw.request("GET", location)
            resource = record.json().get("resource") if record.status_code == 200 else None
            if resource:
                return str(resource).rsplit("/", 1)[1]
        else:
            assert r.status_code == 409, r.text  # the first request with this key is still in flight
        assert time.monotonic() < deadline, f"no run created: {r.status_code} {r.text}"
        await asyncio.sleep(0.5)


async def start_load(gw: Gateways, n: int, procedure_id: str = "cluster_agents",
                     started: list[str] | None = None) -> list[str]:
    """``n`` runs created by ``CLIENTS`` concurrent clients, as fast as they are answered (each id appended to
    ``started`` as soon as it is known)."""
    ids: list[str] = [] if started is None else started
    todo = iter(range(n))

    async def client() -> None:
        for _ in todo:
            ids.append(await create_run(gw, procedure_id))

    await asyncio.gather(*(client() for _ in range(CLIENTS)))
    return ids


async def all_terminal(gw: Gateways, run_ids: list[str], timeout: float = DONE_S) -> dict[str, dict[str, Any]]:
    """Poll until every run is terminal; the runs' bodies."""
    deadline = time.monotonic() + timeout
    bodies: dict[str, dict[str, Any]] = {}
    pending = list(dict.fromkeys(run_ids))  # in creation order: the earlier runs tend to end first
    while pending:
        # read the runs in order until one is not terminal yet, then wait: one read per run plus one per second,
        # not every pending run every second (which made the cluster's gateways busier than its runtimes)
        while pending:
            r = await gw.request("GET", f"/api/runs/{pending[0]}")
            if r.status_code != 200 or r.json()["status"] not in ("completed", "failed", "canceled"):
                break
            bodies[pending.pop(0)] = r.json()
        if pending:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(pending)} runs not terminal after {timeout} s: "
                                     f"{[await stuck(gw, run_id) for run_id in sorted(pending)[:3]]}")
            await asyncio.sleep(1)
    return bodies


async def stuck(gw: Gateways, run_id: str) -> dict[str, Any]:
    """What a run that does not end shows: its status, execution diagnostics and last events."""
    body = (await gw.request("GET", f"/api/runs/{run_id}")).json()
    events = (await gw.request("GET", f"/api/runs/{run_id}/events", params={"limit": 500})).json().get("items", [])
    return {"run_id": run_id, "status": body.get("status"), "execution": body.get("execution"),
            "events": [(e["seq"], e["event_type"], e.get("occurred_at")) for e in events][-6:]}


async def all_completed(gw: Gateways, run_ids: list[str], timeout: float = DONE_S) -> None:
    bodies = await all_terminal(gw, run_ids, timeout)
    statuses = Counter(b["status"] for b in bodies.values())
    failed = [b for b in bodies.values() if b["status"] != "completed"]
    assert statuses == {"completed": len(run_ids)}, (statuses, failed[:3])


async def events_of(js: Any, run_ids: list[str]) -> dict[str, list[Any]]:
    """Each run's events from ``LO_EVT``, checked contiguous (seq 1..n) with each event id once."""
    store = JetStreamEventStore(js)
    out = {}
    for run_id in run_ids:
        events = [e.envelope for e in await store.read("run", run_id)]
        assert [e.seq for e in events] == list(range(1, len(events) + 1)), (run_id, [e.seq for e in events])
        assert len({e.event_id for e in events}) == len(events), run_id
        assert [e.type for e in events].count("run_completed") == 1, run_id
        out[run_id] = events
    return out


def check_exactly_once(agent: ScriptedAgent, run_ids: list[str]) -> None:
    """The agent executed each step of each run once, under one idempotency key (the first attempt's)."""
    assert len(agent.executed) == len(set(agent.executed)), "a key was executed twice"
    by_step: dict[tuple[str, str, str], set[str]] = defaultdict(set)
    for key in agent.executed:
        _, run_id, node, step, _frame, _attempt = key.split(":")
        by_step[(run_id, node, step)].add(key)
    for run_id in run_ids:
        steps = {(node, step) for (r, node, step) in by_step if r == run_id}
        assert steps == AGENT_STEPS, (run_id, steps)
        for node, step in AGENT_STEPS:
            keys = by_step[(run_id, node, step)]
            assert len(keys) == 1, f"step {node}/{step} of {run_id} ran under {sorted(keys)}"
            assert next(iter(keys)).endswith(":1"), keys


def handlers(events: dict[str, list[Any]]) -> Counter[str]:
    """How many runs each runtime replica started executing (``execution_started.runtime_instance``)."""
    return Counter(next(e.data["runtime_instance"] for e in evs if e.type == "execution_started")
                   for evs in events.values())


# -- the scenarios (in this order; they share the cluster) -------------------------------------------------------------

@pytest.mark.timeout(900)
async def test_runtime_replicas_share_the_runs(local_cluster: LocalCluster, gateways: Gateways,  # noqa: F811
                                               agent: ScriptedAgent, js: Any) -> None:
    began = time.monotonic()
    run_ids = await start_load(gateways, RUNS)
    await all_completed(gateways, run_ids)
    elapsed = time.monotonic() - began
    events = await events_of(js, run_ids)
    check_exactly_once(agent, run_ids)
    shares = handlers(events)
    assert set(shares) == {p.name for p in local_cluster.runtimes}, shares
    print(f"\n{RUNS} runs in {elapsed:.1f} s over 3 runtime replicas: {dict(shares)}")


@pytest.mark.timeout(900)
async def test_the_loss_of_the_nats_node_leading_the_streams(local_cluster: LocalCluster,  # noqa: F811
                                                             gateways: Gateways, agent: ScriptedAgent, nc: Any,
                                                             js: Any, pg_server_url: str) -> None:
    victim = await same_leader(local_cluster, nc, EVENT_STREAM, COMMAND_STREAM)
    started: list[str] = []
    load = asyncio.create_task(start_load(gateways, LOAD, started=started))
    await wait_for(lambda: len(started) >= LOAD // 3, 120, "a third of the runs created")
    local_cluster.kill_node(victim)
    down_at = time.monotonic()
    # the other two elect new leaders; the load goes on meanwhile
    for stream in (EVENT_STREAM, COMMAND_STREAM):
        await asyncio.to_thread(local_cluster.stream_leader, stream, 60, other_than=victim)
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    await asyncio.to_thread(local_cluster.restart_node, victim)
    run_ids = await load
    await all_completed(gateways, run_ids)
    await events_of(js, run_ids)
    check_exactly_once(agent, run_ids)
    await projections_equal_a_rebuild(local_cluster, js, pg_server_url)


@pytest.mark.timeout(900)
async def test_the_loss_of_a_runtime_replica(local_cluster: LocalCluster, gateways: Gateways,  # noqa: F811
                                             agent: ScriptedAgent, js: Any) -> None:
    victim = local_cluster.process("runtime-1")
    started: list[str] = []
    load = asyncio.create_task(start_load(gateways, LOAD, started=started))
    await wait_for(lambda: len(started) >= LOAD // 2, 120, "half the runs created")
    victim.kill()
    killed_at = time.time()
    run_ids = await load
    await all_completed(gateways, run_ids, timeout=120 + LOAD)
    done_after = time.time() - killed_at
    events = await events_of(js, run_ids)
    check_exactly_once(agent, run_ids)
    taken_over = [min(e.occurred_at.timestamp() for e in evs if e.type == "execution_recovered") - killed_at
                  for evs in events.values() if any(e.type == "execution_recovered" for e in evs)]
    for evs in events.values():
        recovered = [e for e in evs if e.type == "execution_recovered"]
        assert all(e.data["runtime_instance"] != victim.name for e in recovered)
    print(f"\nruntime-1 SIGKILLed: {len(taken_over)} runs taken over, the last {max(taken_over, default=0):.1f} s "
          f"after the kill; every run done {done_after:.1f} s after it")
    await asyncio.to_thread(local_cluster.restart, victim.name)


@pytest.mark.timeout(1200)
async def test_a_rolling_restart_of_every_service(local_cluster: LocalCluster, gateways: Gateways,  # noqa: F811
                                                  agent: ScriptedAgent, js: Any) -> None:
    started: list[str] = []
    restarted: list[str] = []

    took: dict[str, float] = {}

    async def roll() -> None:
        for p in local_cluster.all_processes():
            took[p.name] = await asyncio.to_thread(local_cluster.restart, p.name, timeout=180)
            restarted.append(p.name)

    rolling = asyncio.create_task(roll())
    load = asyncio.create_task(keep_loading(gateways, rolling, started))
    await rolling
    run_ids = await load
    assert restarted == [p.name for p in local_cluster.all_processes()]
    print(f"\nrolling restart under load, {len(run_ids)} runs; seconds per restart (stop, start, ready): "
          f"{ {name: round(s, 1) for name, s in took.items()} }")
    await all_completed(gateways, run_ids)
    await events_of(js, run_ids)
    check_exactly_once(agent, run_ids)


@pytest.mark.timeout(600)
async def test_the_loss_of_the_approval_timer_leader(local_cluster: LocalCluster, gateways: Gateways,  # noqa: F811
                                                     agent: ScriptedAgent, js: Any) -> None:
    kv = await js.key_value(LOCKS_BUCKET)
    holder = await wait_for_async(lambda: lock_holder(kv, "approval_timer"), 60, "an approval timer leader")
    run_ids = [await create_run(gateways, "cluster_approval") for _ in range(5)]
    approvals = {}
    for run_id in run_ids:
        run = await wait_for_async(lambda run_id=run_id: waiting(gateways, run_id), 60, f"{run_id} waiting")
        approvals[run["waiting_on"]["approval_id"]] = run_id
    local_cluster.process(holder).kill()
    bodies = await all_terminal(gateways, run_ids, timeout=TIMEOUT_MS / 1000 + 120)
    assert {b["status"] for b in bodies.values()} == {"completed"}, bodies
    new_holder = await lock_holder(kv, "approval_timer")
    assert new_holder
    assert new_holder != holder
    store = JetStreamEventStore(js)
    ttl = 15.0  # ApprovalsSettings.leader_lock_ttl_s: a dead leader is replaced within it
    for approval_id, run_id in approvals.items():
        events = [e.envelope for e in await store.read("approval", approval_id)]
        timed_out = [e for e in events if e.type == "approval_timed_out"]
        assert len(timed_out) == 1, [e.type for e in events]
        requested = next(e for e in events if e.type == "approval_requested")
        late = (timed_out[0].occurred_at - requested.occurred_at).total_seconds() - TIMEOUT_MS / 1000
        assert -1 < late < ttl + 30, (approval_id, late)
        r = await gateways.request("GET", f"/api/runs/{run_id}")
        assert r.json()["output_vars"]["route"] == "rejected"
    print(f"\napproval timer leader {holder} SIGKILLed; {new_holder} fired the {len(approvals)} timeouts")
    await asyncio.to_thread(local_cluster.restart, holder)


# -- helpers of the scenarios --------------------------------------------------------------------------------------

async def keep_loading(gw: Gateways, until: asyncio.Task[None], started: list[str]) -> list[str]:
    """``IN_FLIGHT`` clients, each creating a run and following it to its end, again and again while ``until``
    runs: every restart happens with that many runs in flight, and the work stays proportional to the roll's
    length instead of saturating the machine (which slowed each restart down tenfold)."""
    async def client() -> None:
        while not until.done():
            run_id = await create_run(gw, AGENTS_DOC["procedure_id"])
            started.append(run_id)
            await all_terminal(gw, [run_id])

    await asyncio.gather(*(client() for _ in range(IN_FLIGHT)))
    return started


async def wait_for(condition: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.1)


async def wait_for_async(read: Any, timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while not (value := await read()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.2)
    return value


async def waiting(gw: Gateways, run_id: str) -> dict[str, Any] | None:
    body = (await gw.request("GET", f"/api/runs/{run_id}")).json()
    return body if body.get("status") == "waiting_approval" and body.get("waiting_on") else None


async def lock_holder(kv: Any, name: str) -> str | None:
    try:
        entry = await kv.get(f"leader.{name}")
    except (KeyNotFoundError, nats.errors.Error, TimeoutError):
        return None
    return entry.value.decode() if entry.value else None


async def same_leader(cluster: LocalCluster, nc: Any, *streams: str) -> int:
    """The node leading every one of ``streams``: leaders are asked to step down until one node leads all."""
    for _ in range(30):
        leaders = [await asyncio.to_thread(cluster.stream_leader, s) for s in streams]
        if len(set(leaders)) == 1:
            return leaders[0]
        for stream, leader in zip(streams[1:], leaders[1:], strict=True):
            if leader != leaders[0]:
                await nc.request(f"$JS.API.STREAM.LEADER.STEPDOWN.{stream}", b"", timeout=10)
        await asyncio.sleep(1)
    raise AssertionError(f"no single leader of {streams}")


async def projections_equal_a_rebuild(cluster: LocalCluster, js: Any, pg_server_url: str) -> None:
    """The gateways' projections, once nothing moves any more, equal a rebuild from the stream into a database of
    its own."""
    assert cluster.database_url is not None
    name = f"lo_rebuild_{uuid.uuid4().hex[:12]}"
    admin = await asyncpg.connect(pg_server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    live = await asyncpg.create_pool(cluster.database_url, min_size=1, max_size=2)
    fresh = await asyncpg.create_pool(pg_server_url.rsplit("/", 1)[0] + f"/{name}", min_size=1, max_size=2)
    try:
        await ensure_schema(fresh)
        for _ in range(20):
            before = await dump(live)
            await rebuild(fresh, js)
            rebuilt = await dump(fresh)
            if rebuilt == before == await dump(live):
                return
            await asyncio.sleep(2)
        assert before == rebuilt
    finally:
        await live.close()
        await fresh.close()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
