"""api.md §1.6: Idempotency-Key on ⟳ endpoints — replay with Idempotent-Replayed, 409 while in flight, 422 for
a reused key with another body, invalid keys refused."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import pytest

from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import Platform, platform_of, procedure_doc, wait_until

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


async def test_project_create_is_replayed_not_repeated(platform: Platform) -> None:
    c = platform.client
    key = {"Idempotency-Key": "create-billing-1"}
    first = await c.post("/api/projects", json={"name": "Idem"}, headers=key)
    assert first.status_code == 201, first.text
    assert "Idempotent-Replayed" not in first.headers
    again = await c.post("/api/projects", json={"name": "Idem"}, headers=key)
    assert again.status_code == 201
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.json() == first.json()
    assert again.headers["Location"] == first.headers["Location"]
    assert (await c.get("/api/projects", params={"search": "idem"})).json()["total"] == 1

    reused = await c.post("/api/projects", json={"name": "Other"}, headers=key)
    assert reused.status_code == 422
    assert reused.json()["code"] == "idempotency_key_reused"
    assert list(reused.json()["errors"]) == ["header.Idempotency-Key"]
    # the key is scoped per key: another key makes another request (which conflicts on the name)
    conflict = await c.post("/api/projects", json={"name": "Idem"}, headers={"Idempotency-Key": "other"})
    assert conflict.status_code == 409
    replayed_conflict = await c.post("/api/projects", json={"name": "Idem"}, headers={"Idempotency-Key": "other"})
    assert (replayed_conflict.status_code, replayed_conflict.headers["Idempotent-Replayed"]) == (409, "true")
    assert replayed_conflict.json()["code"] == "project_exists"


async def test_import_and_run_creation_replay(platform: Platform) -> None:
    c = platform.client
    body = {"ckp_json": procedure_doc("idem_proc")}
    key = {"Idempotency-Key": "import idem_proc 1.0.0"}
    first = await c.post("/api/procedures", json=body, headers=key)
    assert first.status_code == 201, first.text
    again = await c.post("/api/procedures", json=body, headers=key)
    assert again.status_code == 201  # not 409 procedure_version_exists: the first answer is replayed
    assert again.headers["Idempotent-Replayed"] == "true"
    assert again.headers["X-LangOrch-Command-ID"] == first.headers["X-LangOrch-Command-ID"]
    assert again.json()["content_hash"] == first.json()["content_hash"]
    # key order and spacing do not matter: the body is compared canonically
    spaced = json.dumps({"ckp_json": dict(reversed(list(body["ckp_json"].items())))}, indent=2)
    reordered = await c.post("/api/procedures", content=spaced, headers=key | {"content-type": "application/json"})
    assert reordered.status_code == 201, reordered.text

    run_body = {"procedure_id": "idem_proc", "procedure_version": "1.0.0"}
    runs = [await c.post("/api/runs", json=run_body, headers={"Idempotency-Key": "run-1"}) for _ in range(2)]
    assert [r.status_code for r in runs] == [201, 201]
    assert runs[0].json()["run_id"] == runs[1].json()["run_id"]
    assert (await c.get("/api/runs", params={"procedure_id": "idem_proc"})).json()["total"] == 1


async def test_a_repeat_while_the_first_is_in_flight_is_409(platform: Platform) -> None:
    c = platform.client
    behaviour = AgentBehaviour(capabilities_delay_s=2)
    async with running_agent(behaviour) as agent:
        body = {"agent_id": "slowpoke", "name": "Slow", "channel": "idem", "base_url": agent.base_url}
        key = {"Idempotency-Key": "register-slowpoke"}
        first = asyncio.create_task(c.post("/api/agents", json=body, headers=key))
        await wait_until(lambda: behaviour.capabilities_hits, timeout=10)  # the first is probing the agent
        second = await c.post("/api/agents", json=body, headers=key)
        assert second.status_code == 409
        assert second.json()["code"] == "idempotency_key_in_progress"
        assert second.json()["retryable"] is True
        assert second.headers["Retry-After"] == "1"
        done = await first
        assert done.status_code == 201, done.text
        token = done.json()["agent_token"]
        replay = await c.post("/api/agents", json=body, headers=key)
        assert (replay.status_code, replay.json()["agent_token"]) == (201, token)


@pytest.mark.parametrize("bad", [b"", b"x" * 256, b"tab\there", "ünïcode".encode()])
async def test_invalid_keys_are_422(platform: Platform, bad: bytes) -> None:
    r = await platform.client.post("/api/projects", json={"name": f"bad key {len(bad)}"},
                                   headers=[(b"Idempotency-Key", bad)])
    assert r.status_code == 422, r.text
    assert list(r.json()["errors"]) == ["header.Idempotency-Key"]
