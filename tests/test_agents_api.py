"""api.md §7: agents and pools through the gateway, the agent aggregate owned by the runtime's agent service,
against real test agents served over HTTP."""

from __future__ import annotations

import hashlib
import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest

from ckp_core.subjects import PRESENCE_BUCKET, agent_presence_key
from tests.agent_server import AgentBehaviour, RunningAgent, running_agent
from tests.helpers import Platform, platform_of, problem

pytestmark = pytest.mark.integration

AGENT_FIELDS = {
    "agent_id", "name", "channel", "protocol", "base_url", "status", "concurrency_limit", "resource_key", "pool_id",
    "capabilities", "labels", "auth", "circuit_state", "consecutive_failures", "circuit_open_at",
    "last_heartbeat_at", "last_probe_at", "cpu_percent", "memory_percent", "active_leases", "agent_version",
    "registered_by", "created_at", "updated_at"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False,
                           gateway_settings={"agent_probe_timeout_s": 3.0,
                                             "public_url": "https://lo.example"}) as p:
        yield p


@pytest.fixture(scope="module")
async def agent() -> AsyncIterator[RunningAgent]:
    async with running_agent() as a:
        yield a


async def register(c: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    r = await c.post("/api/agents", json=body)
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def test_register_probes_capabilities_and_returns_the_token_once(platform: Platform,
                                                                       agent: RunningAgent) -> None:
    c = platform.client
    r = await c.post("/api/agents", json={"name": "Web One", "channel": "Web", "base_url": agent.base_url})
    assert r.status_code == 201, r.text
    body = r.json()
    assert set(body) == AGENT_FIELDS | {"agent_token"}
    assert r.headers["Location"] == "/api/agents/web_web_one"
    assert (body["agent_id"], body["channel"], body["pool_id"], body["resource_key"]) == (
        "web_web_one", "web", "web_default", "web_web_one")
    assert (body["status"], body["protocol"], body["concurrency_limit"], body["circuit_state"]) == (
        "online", "http", 1, "closed")
    assert body["auth"] == {"type": "none", "secret_ref": None}
    assert body["capabilities"] == [
        {"name": "extract_text", "type": "tool", "description": None, "estimated_duration_s": None,
         "is_batch": False, "input_schema": None, "output_schema": None},
        {"name": "fill_form", "type": "workflow", "description": "Fills a form", "estimated_duration_s": 12.5,
         "is_batch": False, "input_schema": {"type": "object"}, "output_schema": None}]
    token = body.pop("agent_token")
    assert token.startswith("lo_agt_")
    detail = (await c.get("/api/agents/web_web_one")).json()
    assert "agent_token" not in detail
    assert detail["capabilities"] == body["capabilities"]
    # only the SHA-256 of the token is ever written, in the event and in the projection
    nc = await nats.connect(platform.nats_url)
    try:
        msg = await nc.jetstream().get_last_msg("LO_EVT", "lo.evt.agent.web_web_one.>")
    finally:
        await nc.close()
    assert token.encode() not in msg.data
    assert json.loads(msg.data)["data"]["token_sha256"] == hashlib.sha256(token.encode()).hexdigest()

    again = problem(await c.post("/api/agents", json={"name": "Web One", "channel": "web",
                                                      "base_url": agent.base_url, "capabilities": ["x"]}),
                    409, "agent_exists")
    assert "web_web_one" in again["detail"]


async def test_register_refusals(platform: Platform, agent: RunningAgent) -> None:
    c = platform.client
    base = {"name": "bad", "channel": "bad", "capabilities": ["a"]}
    for url in ("ftp://127.0.0.1/x", "http://169.254.169.254/latest", "http://metadata.google.internal/",
                "http://[fe80::1]/", "http://no-such-host.invalid/"):
        body = problem(await c.post("/api/agents", json=base | {"base_url": url}), 422, "url_not_allowed")
        assert list(body["errors"]) == ["base_url"], url
    body = problem(await c.post("/api/agents", json={"channel": "x", "base_url": agent.base_url, "colour": 1}),
                   422, "validation_failed")
    assert body["errors"] == {"name": ["This field is required"], "colour": ["Unknown field"]}
    body = problem(await c.post("/api/agents", json=base | {"base_url": agent.base_url,
                                                            "capabilities": ["ok", {"type": "tool"}, "*",
                                                                                {"name": "n", "kind": 1}]}),
                   422, "validation_failed")
    assert set(body["errors"]) == {"capabilities.1.name", "capabilities.2.name", "capabilities.3.kind"}
    body = problem(await c.post("/api/agents", json=base | {"base_url": agent.base_url, "concurrency_limit": 0}),
                   422, "validation_failed")
    assert list(body["errors"]) == ["concurrency_limit"]
    body = problem(await c.post("/api/agents", json=base | {"base_url": agent.base_url,
                                                            "auth": {"type": "bearer"}}), 422, "validation_failed")
    assert body["errors"] == {"auth.secret_ref": ["This field is required"]}

    await register(c, name="slot a", channel="shared", base_url=agent.base_url, resource_key="gpu",
                   concurrency_limit=2, capabilities=["a"])
    body = problem(await c.post("/api/agents", json={"name": "slot b", "channel": "shared",
                                                     "base_url": agent.base_url, "resource_key": "gpu",
                                                     "concurrency_limit": 3, "capabilities": ["a"]}),
                   409, "resource_limit_conflict")
    assert body["conflicting_agent"] == "shared_slot_a"
    same = await register(c, name="slot b", channel="shared", base_url=agent.base_url, resource_key="gpu",
                          concurrency_limit=2, capabilities=["a"])
    assert same["resource_key"] == "gpu"


async def test_allowlist_narrows_agent_urls(module_nats_url: str, module_database_url: str,
                                            agent: RunningAgent) -> None:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           gateway_settings={"agent_url_allowlist": ["10.0.0.0/8", "agents.internal"]}) as p:
        r = await p.client.get("/api/agents/probe-capabilities", params={"base_url": agent.base_url})
        body = problem(r, 422, "url_not_allowed")
        assert list(body["errors"]) == ["query.base_url"]
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           gateway_settings={"agent_url_allowlist": ["127.0.0.0/8"]}) as p:
        r = await p.client.get("/api/agents/probe-capabilities", params={"base_url": agent.base_url})
        assert r.status_code == 200, r.text


async def test_probe_capabilities_http_and_mcp_and_upstream_failures(platform: Platform,
                                                                     agent: RunningAgent) -> None:
    c = platform.client
    r = await c.get("/api/agents/probe-capabilities", params={"base_url": agent.base_url})
    assert r.status_code == 200, r.text
    assert r.json()["agent_info"] == {"agent_id": "web-1", "channel": "web", "description": "test agent"}
    assert [x["name"] for x in r.json()["capabilities"]] == ["extract_text", "fill_form"]

    r = await c.get("/api/agents/probe-capabilities", params={"base_url": agent.mcp_url, "protocol": "mcp"})
    assert r.status_code == 200, r.text
    tools = r.json()["capabilities"]
    assert [t["name"] for t in tools] == ["search_docs", "summarise"]  # both pages of tools/list
    assert tools[0]["input_schema"]["required"] == ["q"]
    assert r.json()["agent_info"]["server_info"]["name"] == "docs-mcp"

    async with running_agent(AgentBehaviour(capabilities_status=500)) as broken:
        problem(await c.get("/api/agents/probe-capabilities", params={"base_url": broken.base_url}), 502,
                "upstream_error")
        problem(await c.post("/api/agents", json={"name": "b", "channel": "b", "base_url": broken.base_url}), 502,
                "upstream_error")
    async with running_agent(AgentBehaviour(redirect=True)) as redirecting:
        body = problem(await c.get("/api/agents/probe-capabilities", params={"base_url": redirecting.base_url}),
                       502, "upstream_error")
        assert "redirect" in body["detail"]
    async with running_agent(AgentBehaviour(capabilities_delay_s=5)) as slow:
        problem(await c.get("/api/agents/probe-capabilities", params={"base_url": slow.base_url}), 504,
                "upstream_timeout")
    async with running_agent() as gone:
        url = gone.base_url
    problem(await c.get("/api/agents/probe-capabilities", params={"base_url": url}), 502, "upstream_error")
    body = problem(await c.get("/api/agents/probe-capabilities"), 422, "validation_failed")
    assert list(body["errors"]) == ["query.base_url"]


async def test_patch_with_operator_and_agent_token(platform: Platform, agent: RunningAgent) -> None:
    c = platform.client
    created = await register(c, agent_id="patchy", name="Patchy", channel="ops", base_url=agent.base_url,
                             capabilities=["a"], labels={"zone": "eu"})
    token = created["agent_token"]
    r = await c.patch("/api/agents/patchy", json={"name": "Patchy 2", "labels": {"zone": "us"},
                                                  "concurrency_limit": 4, "pool_id": "ops_big"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["name"], body["labels"], body["concurrency_limit"], body["pool_id"]) == (
        "Patchy 2", {"zone": "us"}, 4, "ops_big")
    r = await c.put("/api/agents/patchy", json={"status": "draining"})  # PUT alias
    assert r.json()["status"] == "draining"

    own = {"Authorization": f"Bearer {token}"}
    r = await c.patch("/api/agents/patchy", json={"status": "online", "capabilities": ["a", "b"]}, headers=own)
    assert r.status_code == 200, r.text
    assert (r.json()["status"], [x["name"] for x in r.json()["capabilities"]]) == ("online", ["a", "b"])
    problem(await c.patch("/api/agents/patchy", json={"name": "mine"}, headers=own), 403, "forbidden")
    other = await register(c, agent_id="other", name="Other", channel="ops", base_url=agent.base_url,
                           capabilities=["a"])
    problem(await c.patch("/api/agents/other", json={"status": "offline"}, headers=own), 403, "forbidden")
    bad = problem(await c.patch("/api/agents/patchy", json={"status": "offline"},
                                headers={"Authorization": "Bearer lo_agt_forged"}), 401, "invalid_token")
    assert bad["status"] == 401
    assert other["agent_id"] == "other"

    problem(await c.patch("/api/agents/patchy", json={"status": "sleeping"}), 422, "validation_failed")
    problem(await c.patch("/api/agents/patchy", json={"name": None}), 422, "validation_failed")
    problem(await c.patch("/api/agents/patchy", json={"base_url": "http://169.254.169.254"}), 422, "url_not_allowed")
    problem(await c.patch("/api/agents/nobody", json={"name": "x"}), 404, "not_found")

    r = await c.post("/api/agents/patchy/token")
    assert r.status_code == 200, r.text
    assert r.json()["agent_id"] == "patchy"
    new_token = r.json()["agent_token"]
    assert new_token != token
    problem(await c.patch("/api/agents/patchy", json={"status": "offline"}, headers=own), 401, "invalid_token")
    r = await c.patch("/api/agents/patchy", json={"status": "offline"},
                      headers={"Authorization": f"Bearer {new_token}"})
    assert r.json()["status"] == "offline"
    problem(await c.post("/api/agents/nobody/token"), 404, "not_found")


async def test_heartbeat_writes_presence_and_status_changes(platform: Platform, agent: RunningAgent) -> None:
    c = platform.client
    created = await register(c, agent_id="beat", name="Beat", channel="hb", base_url=agent.base_url,
                             capabilities=["a"])
    own = {"Authorization": f"Bearer {created['agent_token']}"}
    r = await c.post("/api/agents/heartbeat", json={"agent_id": "beat", "cpu_percent": 12.5, "memory_percent": 40,
                                                    "active_tasks": 2, "agent_version": "1.4.2"}, headers=own)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "ok", "agent_id": "beat", "heartbeat_interval_seconds": 15.0}
    detail = (await c.get("/api/agents/beat")).json()
    assert (detail["cpu_percent"], detail["memory_percent"], detail["agent_version"]) == (12.5, 40, "1.4.2")
    assert detail["last_heartbeat_at"].endswith("Z")
    nc = await nats.connect(platform.nats_url)
    try:
        kv = await nc.jetstream().key_value(PRESENCE_BUCKET)
        entry = await kv.get(agent_presence_key("beat"))
        assert json.loads(entry.value or b"{}")["active_tasks"] == 2
        head = (await nc.jetstream().stream_info("LO_EVT")).state.last_seq
        # same status again: presence only, nothing appended
        assert (await c.post("/api/agents/heartbeat", json={"agent_id": "beat"}, headers=own)).status_code == 200
        assert (await nc.jetstream().stream_info("LO_EVT")).state.last_seq == head
        r = await c.post("/api/agents/heartbeat", json={"agent_id": "beat", "status": "draining"}, headers=own)
        assert r.status_code == 200
        last = await nc.jetstream().get_last_msg("LO_EVT", "lo.evt.agent.beat.>")
        assert last.subject == "lo.evt.agent.beat.agent_status_changed"
    finally:
        await nc.close()
    assert (await c.get("/api/agents/beat")).json()["status"] == "draining"
    problem(await c.post("/api/agents/heartbeat", json={"agent_id": "nobody"}), 404, "not_found")
    problem(await c.post("/api/agents/heartbeat", json={"agent_id": "web_web_one"}, headers=own), 403, "forbidden")
    body = problem(await c.post("/api/agents/heartbeat", json={"agent_id": "beat", "cpu_percent": 101}), 422,
                   "validation_failed")
    assert list(body["errors"]) == ["cpu_percent"]


async def test_sync_capabilities_and_delete(platform: Platform) -> None:
    c = platform.client
    behaviour = AgentBehaviour(capabilities=["one"])
    async with running_agent(behaviour) as a:
        created = await register(c, agent_id="syncer", name="Syncer", channel="sync", base_url=a.base_url)
        assert [x["name"] for x in created["capabilities"]] == ["one"]
        behaviour.capabilities = ["one", "two"]
        r = await c.post("/api/agents/syncer/sync-capabilities")
        assert r.status_code == 200, r.text
        assert [x["name"] for x in r.json()["capabilities"]] == ["one", "two"]
        behaviour.capabilities_status = 500
        problem(await c.post("/api/agents/syncer/sync-capabilities"), 502, "upstream_error")
    problem(await c.post("/api/agents/nobody/sync-capabilities"), 404, "not_found")
    r = await c.delete("/api/agents/syncer")
    assert r.status_code == 204
    problem(await c.get("/api/agents/syncer"), 404, "not_found")
    problem(await c.delete("/api/agents/syncer"), 404, "not_found")


async def test_list_filters_pools_and_bootstrap(platform: Platform, agent: RunningAgent) -> None:
    c = platform.client
    for i, (channel, pool, limit, caps) in enumerate([
            ("list", None, 2, ["scan", "read"]), ("list", "list_gpu", 4, ["read"]), ("list", "list_gpu", 1, ["x"])]):
        await register(c, agent_id=f"l{i}", name=f"L{i}", channel=channel, base_url=agent.base_url,
                       concurrency_limit=limit, pool_id=pool, capabilities=caps)
    assert (await c.patch("/api/agents/l2", json={"status": "draining"})).status_code == 200
    page = (await c.get("/api/agents", params={"channel": "LIST"})).json()
    assert [a["agent_id"] for a in page["items"]] == ["l0", "l1", "l2"]
    assert page["total"] == 3
    assert [a["agent_id"] for a in (await c.get("/api/agents", params={"capability": "read"})).json()["items"]] == [
        "l0", "l1"]
    assert [a["agent_id"] for a in (await c.get("/api/agents", params={"pool_id": "list_gpu", "order": "desc"}))
            .json()["items"]] == ["l2", "l1"]
    assert [a["agent_id"] for a in (await c.get("/api/agents", params={"channel": "list", "status": "draining"}))
            .json()["items"]] == ["l2"]
    by_update = (await c.get("/api/agents", params={"channel": "list", "sort": "updated_at", "order": "desc",
                                                    "limit": 1})).json()
    assert ([a["agent_id"] for a in by_update["items"]], by_update["total"]) == (["l2"], 3)
    for params in ({"status": "asleep"}, {"protocol": "grpc"}, {"sort": "name"}, {"limit": 501}):
        body = problem(await c.get("/api/agents", params=params), 422, "validation_failed")
        assert list(body["errors"]) == [f"query.{next(iter(params))}"]

    pools = (await c.get("/api/agents/pools", params={"channel": "list"})).json()
    assert pools["total"] == 2
    gpu = next(p for p in pools["items"] if p["pool_id"] == "list_gpu")
    assert gpu == {"pool_id": "list_gpu", "channel": "list", "agent_count": 2,
                   "status_breakdown": {"online": 1, "offline": 0, "draining": 1}, "concurrency_limit_total": 5,
                   "active_leases": 0, "available_capacity": 4, "waiting_steps": 0, "circuit_open_count": 0}
    assert next(p for p in pools["items"] if p["pool_id"] == "list_default")["concurrency_limit_total"] == 2

    boot = (await c.get("/api/agents/bootstrap/Scanner")).json()
    assert boot == {"channel": "scanner", "default_pool": "scanner_default", "recommended_concurrency": 1,
                    "heartbeat_interval_seconds": 15.0, "register_url": "https://lo.example/api/agents",
                    "heartbeat_url": "https://lo.example/api/agents/heartbeat"}
    problem(await c.get("/api/agents/bootstrap/bad channel!"), 422, "validation_failed")
