"""The runtime's read queries over the NATS services API (``ckp_core.queries``), against a real NATS and
PostgreSQL: checkpoints through the official saver, step records, leases and agents' live figures from KV; one
replica of the queue group answers each request; a bad request is refused, not left to time out; and with no
runtime the gateway answers 503 ``unavailable`` instead of reading the runtime's storage."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any, TypedDict

import nats
import pytest
from langgraph.graph import END, START, StateGraph
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.micro.request import ERROR_CODE_HEADER, Request

from ckp_core.events import format_time
from ckp_core.ids import new_id
from ckp_core.queries import (
    AgentsLive,
    AgentsLiveReply,
    Leases,
    LeasesReply,
    Query,
    QueryError,
    RunCheckpoint,
    RunCheckpointReply,
    RunCheckpoints,
    RunCheckpointsReply,
    RunDiagnostics,
    RunDiagnosticsReply,
)
from ckp_core.subjects import (
    LEASES_BUCKET,
    PRESENCE_BUCKET,
    QUERY_LEASES,
    STEPS_BUCKET,
    agent_presence_key,
    agent_probe_key,
    lease_key,
)
from langorch_gateway import runtime_queries
from langorch_gateway.runtime_queries import ask_runtime
from langorch_infra.jetstream import ensure_topology
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.queries import RuntimeQueries
from langorch_runtime.service import open_checkpointer
from langorch_runtime.steps import StepRecord, StepStore, now_iso
from tests.helpers import platform_of

pytestmark = pytest.mark.integration


@contextlib.asynccontextmanager
async def replica(nats_url: str, database_url: str, name: str) -> AsyncIterator[RuntimeQueries]:
    queries = RuntimeQueries(RuntimeSettings(nats_url=nats_url, database_url=database_url, instance_id=name))
    await queries.start()
    try:
        yield queries
    finally:
        await queries.stop()


@contextlib.asynccontextmanager
async def client(nats_url: str) -> AsyncIterator[NATS]:
    nc = await nats.connect(nats_url)
    try:
        yield nc
    finally:
        await nc.close()


async def ask(nc: NATS, query: Query) -> Msg:
    return await nc.request(query.SUBJECT, query.model_dump_json().encode(), timeout=10)


class State(TypedDict):
    text: str
    api_token: str


def grow(state: State) -> dict[str, Any]:
    return {"text": state["text"] * 40}


async def write_thread(database_url: str, run_id: str) -> None:
    """A real LangGraph thread in the checkpoint tables, as the runtime writes them."""
    pool, saver = await open_checkpointer(database_url)
    try:
        graph = StateGraph(State)
        graph.add_node("grow", grow)
        graph.add_edge(START, "grow")
        graph.add_edge("grow", END)
        await graph.compile(checkpointer=saver).ainvoke({"text": "abcdefghij", "api_token": "tok-123456"},
                                                        {"configurable": {"thread_id": run_id}})
    finally:
        await pool.close()


def lease_value(run_id: str, agent_id: str, slot: int, *, minutes_ago: int, ttl_s: int) -> dict[str, Any]:
    now = datetime.now(UTC)
    return {"lease_id": new_id(), "resource_key": "gpu", "slot": slot, "agent_id": agent_id, "pool_id": "p",
            "run_id": run_id, "node_id": "n", "step_id": "s", "holder": "runtime-x",
            "acquired_at": format_time(now - timedelta(minutes=minutes_ago)), "renewed_at": format_time(now),
            "expires_at": format_time(now + timedelta(seconds=ttl_s))}


async def test_checkpoints_steps_leases_and_liveness_are_answered(nats_url: str, database_url: str) -> None:
    run_id = new_id()
    await write_thread(database_url, run_id)
    async with replica(nats_url, database_url, "q-1"), client(nats_url) as nc:
        js = nc.jetstream()
        await ensure_topology(js)
        leases_kv = await js.key_value(LEASES_BUCKET)
        old = lease_value(run_id, "a1", 0, minutes_ago=5, ttl_s=60)
        expired = lease_value(run_id, "a1", 1, minutes_ago=9, ttl_s=-5)
        other = lease_value(new_id(), "a2", 2, minutes_ago=1, ttl_s=60)
        for value in (old, expired, other):
            await leases_kv.create(lease_key("gpu", value["slot"]), json.dumps(value).encode())
        await leases_kv.put("not.a.lease", b"garbage")
        steps = StepStore(await js.key_value(STEPS_BUCKET), run_id)
        await steps.put("grow:s1:", StepRecord(status="completed", attempt=1, idempotency_key="k1", node_id="grow",
                                              step_id="s1", frame="", result={"ok": True}, updated_at=now_iso()))
        await steps.put("loop:s2:[3]", StepRecord(status="started", attempt=2, idempotency_key="k2", node_id="loop",
                                                 step_id="s2", frame="loop[3]", updated_at=now_iso()))
        presence = await js.key_value(PRESENCE_BUCKET)
        await presence.put(agent_presence_key("a1"), json.dumps({
            "agent_id": "a1", "status": "online", "cpu_percent": 12.5, "memory_percent": 40.0, "active_tasks": 1,
            "agent_version": "1.2", "last_heartbeat_at": "2026-01-01T00:00:00.000Z"}).encode())
        await presence.put(agent_probe_key("a1"), json.dumps({
            "agent_id": "a1", "ok": False, "error": "timeout", "consecutive_failures": 4,
            "last_probe_at": "2026-01-01T00:00:01.000Z", "last_success_at": None, "prober": "q-1"}).encode())

        # checkpoints: newest first, a parent chain, the page asked for, the writes of each step
        listed = RunCheckpointsReply.model_validate_json((await ask(nc, RunCheckpoints(run_id=run_id))).data)
        assert listed.total == len(listed.items) >= 2
        assert listed.items[-1].parent_checkpoint_id is None
        assert all(a.parent_checkpoint_id == b.checkpoint_id for a, b in zip(listed.items, listed.items[1:],
                                                                             strict=False))
        assert "grow" in listed.items[0].node_ids
        assert "text" in listed.items[0].writes
        assert {i.thread_id for i in listed.items} == {run_id}
        page = RunCheckpointsReply.model_validate_json(
            (await ask(nc, RunCheckpoints(run_id=run_id, offset=1, limit=1))).data)
        assert (page.total, [i.checkpoint_id for i in page.items]) == (listed.total, [listed.items[1].checkpoint_id])
        elsewhere = RunCheckpointsReply.model_validate_json(
            (await ask(nc, RunCheckpoints(run_id=run_id, checkpoint_ns="nope"))).data)
        assert (elsewhere.total, elsewhere.items) == (0, [])

        newest = listed.items[0].checkpoint_id
        detail = RunCheckpointReply.model_validate_json(
            (await ask(nc, RunCheckpoint(run_id=run_id, checkpoint_id=newest, max_value_bytes=64))).data).checkpoint
        assert detail is not None
        assert detail.channel_values["api_token"] == "***REDACTED***"
        assert detail.channel_values["text"]["_truncated"] is True  # 400 characters > 64 bytes
        assert detail.truncated_paths == ["channel_values.text"]
        assert detail.parent_checkpoint_id == listed.items[1].checkpoint_id
        missing = RunCheckpointReply.model_validate_json(
            (await ask(nc, RunCheckpoint(run_id=run_id, checkpoint_id=new_id()))).data)
        assert missing.checkpoint is None

        # leases: live ones only, ascending acquired_at, filtered by every given field
        every = LeasesReply.model_validate_json((await ask(nc, Leases())).data).leases
        assert [x.lease_id for x in every] == [expired["lease_id"], old["lease_id"], other["lease_id"]]
        assert [x.is_active for x in every] == [False, True, True]
        assert every[1].lease_out() == old | {"is_active": True}
        assert (every[1].key, every[1].revision > 0) == (lease_key("gpu", 0), True)
        mine = LeasesReply.model_validate_json((await ask(nc, Leases(run_id=run_id, agent_id="a1"))).data).leases
        assert {x.lease_id for x in mine} == {old["lease_id"], expired["lease_id"]}
        one = LeasesReply.model_validate_json((await ask(nc, Leases(lease_id=other["lease_id"]))).data).leases
        assert [x.lease_id for x in one] == [other["lease_id"]]

        # diagnostics: the run's step records (oldest update first), its active leases, its checkpoints
        diag = RunDiagnosticsReply.model_validate_json((await ask(nc, RunDiagnostics(run_id=run_id))).data)
        assert [(e.idempotency_key, e.iteration, e.has_cached_result) for e in diag.idempotency_entries] == [
            ("k1", None, True), ("k2", 3, False)]
        assert [x.lease_id for x in diag.active_leases] == [old["lease_id"]]
        assert (diag.checkpoint_count, diag.last_checkpoint_id) == (listed.total, newest)

        # agents: heartbeat, last probe and active leases of each agent asked, in order
        live = AgentsLiveReply.model_validate_json((await ask(nc, AgentsLive(agent_ids=["a2", "a1", "a3"]))).data)
        assert [(a.agent_id, a.active_leases) for a in live.agents] == [("a2", 1), ("a1", 1), ("a3", 0)]
        a1 = live.agents[1]
        assert a1.heartbeat is not None
        assert (a1.heartbeat.cpu_percent, a1.heartbeat.agent_version) == (12.5, "1.2")
        assert a1.probe is not None
        assert (a1.probe.ok, a1.probe.consecutive_failures) == (False, 4)
        assert (live.agents[2].heartbeat, live.agents[2].probe) == (None, None)

        # a malformed request is refused at once, with a code and a reason
        refused = await nc.request(QUERY_LEASES, b'{"lease_id": 5}', timeout=10)
        assert (refused.headers or {}).get(ERROR_CODE_HEADER) == "400"
        assert QueryError.model_validate_json(refused.data).code == "bad_query"


class Big(TypedDict):
    a: str
    b: str


def fill(state: Big) -> dict[str, Any]:
    return {"a": "x" * 700_000, "b": "y" * 700_000}


async def test_a_reply_larger_than_one_nats_message_comes_whole(nats_url: str, database_url: str) -> None:
    run_id = new_id()
    pool, saver = await open_checkpointer(database_url)
    try:
        graph = StateGraph(Big)
        graph.add_node("fill", fill)
        graph.add_edge(START, "fill")
        graph.add_edge("fill", END)
        await graph.compile(checkpointer=saver).ainvoke({"a": "", "b": ""}, {"configurable": {"thread_id": run_id}})
    finally:
        await pool.close()
    async with replica(nats_url, database_url, "q-big"), client(nats_url) as nc:
        newest = (await ask_runtime(nc, RunCheckpoints(run_id=run_id, limit=1), RunCheckpointsReply)).items[0]
        detail = (await ask_runtime(nc, RunCheckpoint(run_id=run_id, checkpoint_id=newest.checkpoint_id,
                                                      max_value_bytes=1_048_576), RunCheckpointReply)).checkpoint
        assert nc.max_payload < 1_400_000  # two values of 700 kB do not fit one message
        assert detail is not None
        assert (detail.channel_values["a"], detail.channel_values["b"]) == ("x" * 700_000, "y" * 700_000)
        assert detail.truncated_paths == []


async def test_one_replica_of_the_queue_group_answers(nats_url: str, database_url: str) -> None:
    async with replica(nats_url, database_url, "q-a") as a, replica(nats_url, database_url, "q-b") as b, \
            client(nats_url) as nc:
        replies: list[Msg] = []

        async def collect(msg: Msg) -> None:
            replies.append(msg)

        inbox = nc.new_inbox()
        sub = await nc.subscribe(inbox, cb=collect)
        for _ in range(20):
            await nc.publish(QUERY_LEASES, Leases().model_dump_json().encode(), reply=inbox)
        await nc.flush()
        await asyncio.sleep(1.0)
        await sub.unsubscribe()
        assert len(replies) == 20  # one answer per request, not one per replica
        # both replicas subscribe in one queue group and NATS hands each request to one of them
        handled = [sum(e.num_requests for e in x.service.stats().endpoints) for x in (a, b) if x.service is not None]
        assert sum(handled) == 20


async def test_without_a_runtime_the_gateway_answers_503_not_500(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           queries=False) as p:
        c = p.client
        for path in ("/api/leases", f"/api/leases/{new_id()}"):
            r = await c.get(path)
            assert r.status_code == 503, (path, r.text)
            assert r.headers["content-type"].startswith("application/problem+json")
            assert r.headers["Retry-After"] == "1"
            body = r.json()
            assert (body["code"], body["retryable"], body["service"], body["query"]) == (
                "unavailable", True, "runtime", QUERY_LEASES)
            assert "runtime" in body["detail"]
        # what needs nothing of the runtime still answers
        assert (await c.get("/api/agents")).json()["total"] == 0


async def test_a_silent_or_failing_runtime_is_503_naming_it(nats_url: str, database_url: str,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_queries, "QUERY_TIMEOUT_S", 0.5)
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           queries=False) as p, client(nats_url) as nc:
        silent = await nc.subscribe(QUERY_LEASES)  # takes the request, never answers
        await nc.flush()
        r = await p.client.get("/api/leases")
        assert r.status_code == 503, r.text
        assert r.json()["code"] == "unavailable"
        assert "did not answer within 0.5 s" in r.json()["detail"]
        await silent.unsubscribe()

        async def failing(msg: Msg) -> None:  # answers as the runtime does when its read fails
            await Request(msg).respond_error("500", "OSError", data=QueryError(
                code="query_failed", detail="OSError answering lo.qry.lease.list").model_dump_json().encode())

        await nc.subscribe(QUERY_LEASES, cb=failing)
        await nc.flush()
        r = await p.client.get("/api/leases")
        assert r.status_code == 503, r.text
        assert (r.json()["code"], r.json()["service"]) == ("unavailable", "runtime")
        assert "could not answer: OSError answering lo.qry.lease.list" in r.json()["detail"]
