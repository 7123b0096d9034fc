"""LangOrch on a 3-node JetStream cluster (issue 19's first slice): with ``LANGORCH_NATS_REPLICAS=3`` every stream,
KV bucket and the artifact store is at R3 (reconciled from R1), the services reach the cluster through a seed list,
and SIGKILL of the node that leads ``LO_EVT`` for ~10 s loses no run: runs started before and during the outage
complete, each run's event sequence is contiguous without duplicates, and ``/api/ready`` is 200 again after the
node is back."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import nats
import pytest
from nats.js import JetStreamContext

from ckp_core.subjects import EVENT_STREAM
from langorch_infra.embedded import EmbeddedNatsCluster
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_topology
from tests.cluster import nats_cluster  # noqa: F401 - the fixture
from tests.helpers import Platform, platform_of, procedure_doc, wait_status, wait_until
from tests.test_nats_topology import ALL_STREAMS

pytestmark = pytest.mark.integration

OUTAGE_S = 10


async def replicas_of(js: JetStreamContext) -> dict[str, int]:
    return {name: (await js.stream_info(name)).config.num_replicas or 1 for name in ALL_STREAMS}


async def leader_of(js: JetStreamContext, stream: str) -> str:
    """The server leading ``stream`` once one is elected."""
    async def read() -> str:
        try:
            cluster = (await js.stream_info(stream)).cluster
        except (nats.errors.Error, TimeoutError):  # no leader yet: the request times out or finds no responder
            return ""
        return (cluster.leader if cluster is not None else None) or ""
    return await wait_until(read, timeout=30, every=0.2)


async def fully_replicated(js: JetStreamContext) -> None:
    """Wait until every stream has a leader and its other replicas are current: the outage below is the loss of one
    node of a healthy R3 cluster, not of a replica that is still copying a stream just raised from R1."""
    async def lagging() -> list[str]:
        behind = []
        for name in ALL_STREAMS:
            try:
                cluster = (await js.stream_info(name)).cluster
            except (nats.errors.Error, TimeoutError):
                behind.append(name)
                continue
            peers = (cluster.replicas or []) if cluster is not None else []
            if cluster is None or not cluster.leader or len(peers) != 2 or not all(p.current for p in peers):
                behind.append(name)
        return behind
    await wait_until(lagging, lambda behind: not behind, timeout=60, every=0.2)


async def start(c: httpx.AsyncClient, procedure_id: str) -> str:
    """Start a run, also while NATS fails over: the gateway may answer 202 (its read-your-writes wait ran out; the
    command's record names the run) or 503 with ``Retry-After`` (asked again)."""
    async def post() -> httpx.Response:
        return await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
    r = await wait_until(post, lambda r: r.status_code != 503, timeout=60, every=0.5)
    if r.status_code == 202:
        r = await c.get(r.headers["Location"])
        assert r.status_code == 200, r.text
        return str(r.json()["resource"]).rsplit("/", 1)[1]
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


async def assert_contiguous(js: JetStreamContext, run_id: str) -> None:
    """The run's events on ``LO_EVT``: per-aggregate sequence 1..n, each event id once."""
    events = await JetStreamEventStore(js).read("run", run_id)
    seqs = [stored.envelope.seq for stored in events]
    assert seqs == list(range(1, len(seqs) + 1)), (run_id, seqs)
    ids = [stored.envelope.event_id for stored in events]
    assert len(set(ids)) == len(ids), (run_id, ids)


async def test_r3_topology_and_runs_survive_the_loss_of_the_event_stream_leader(
        nats_cluster: EmbeddedNatsCluster,  # noqa: F811 - the imported fixture
        database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    nc = await connect(nats_cluster.url, "lo-test-cluster")
    js = nc.jetstream()
    try:
        await ensure_topology(js, replicas=1)  # as an earlier single-replica install left it
        assert set((await replicas_of(js)).values()) == {1}
        monkeypatch.setenv("LANGORCH_NATS_REPLICAS", "3")
        async with platform_of(nats_cluster.url, database_url) as p:
            assert await replicas_of(js) == dict.fromkeys(ALL_STREAMS, 3)
            await run_through_outage(p, js, nats_cluster)
    finally:
        await nc.close()


async def run_through_outage(p: Platform, js: JetStreamContext, cluster: EmbeddedNatsCluster) -> None:
    c = p.client
    doc = procedure_doc(f"cl_{uuid.uuid4().hex[:8]}", "1")
    r = await c.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 201, r.text

    warm = [await start(c, doc["procedure_id"]) for _ in range(3)]
    for run_id in warm:
        assert (await wait_status(c, run_id, timeout=60))["status"] == "completed"

    await fully_replicated(js)
    before = [await start(c, doc["procedure_id"]) for _ in range(3)]
    victim = cluster.index_of(await leader_of(js, EVENT_STREAM))
    cluster.kill(victim)
    down_at = time.monotonic()
    new_leader = await leader_of(js, EVENT_STREAM)
    assert new_leader != cluster.server_name(victim)
    during: list[str] = []
    for _ in range(3):
        during.append(await start(c, doc["procedure_id"]))
    # the outage lasts OUTAGE_S whatever the runs do meanwhile: its length is the subject, not a wait for them
    await asyncio.sleep(max(0.0, OUTAGE_S - (time.monotonic() - down_at)))
    for run_id in before + during:
        assert (await wait_status(c, run_id, timeout=60))["status"] == "completed", run_id
    cluster.restart(victim)
    await wait_until(lambda: c.get("/api/ready"), lambda r: r.status_code == 200, timeout=60, every=0.2)
    for run_id in warm + before + during:
        await assert_contiguous(js, run_id)


async def test_fewer_replicas_are_reconciled_too(nats_cluster: EmbeddedNatsCluster) -> None:  # noqa: F811
    nc = await connect(nats_cluster.url, "lo-test-cluster-down")
    js = nc.jetstream()
    try:
        await ensure_topology(js, replicas=3)
        await ensure_topology(js, replicas=1)
        assert await replicas_of(js) == dict.fromkeys(ALL_STREAMS, 1)
    finally:
        await nc.close()
