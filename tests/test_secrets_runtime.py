"""Secrets are resolved at the moment of use and never stored (ckp.md §7.14–7.15, api.md §15.3): the value
appears nowhere in run events, checkpoints or outputs, searched byte-wise; agents get redeemable grants."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import httpx
import pytest

from langorch_infra.secrets import grant_key, make_grant
from langorch_infra.settings import GatewaySettings
from tests.helpers import Platform, platform_of

pytestmark = pytest.mark.integration

KEY_VALUE = "kq7-UNIQUE-encryption-key-4711"
PORTAL_VALUE = "portal-PASSWORD-unique-0815"

DOC = {
    "procedure_id": "secret_use", "version": "1",
    "global_config": {"secrets_config": {"provider": "env", "secret_references": {
        "enc": "ENC_KEY", "portal": {"key": "PORTAL_PW"}}}},
    "workflow_graph": {"start_node": "crypto", "nodes": {
        "crypto": {"type": "processing", "next_node": "login", "operations": [
            {"action": "encrypt", "value": "hello", "key": "{{secrets.enc}}", "output_variable": "cipher"},
            {"action": "decrypt", "value": "{{cipher}}", "key": "{{secrets.enc}}", "output_variable": "plain"},
            {"action": "hash", "value": "x", "key": "{{secrets.enc}}", "output_variable": "mac"},
            {"action": "log", "message": "decrypted {{plain}}"}]},
        "login": {"type": "sequence", "agent": "WEB", "next_node": "gate",
                  "error_handlers": [{"error_type": "no_executor", "action": "ignore"}],
                  "steps": [{"step_id": "type_pw", "action": "type", "value": "{{secrets.portal}}"}]},
        "gate": {"type": "human_approval", "on_approve": "done", "on_reject": "done"},
        "done": {"type": "terminate", "outputs": {"plain": "{{plain}}", "mac": "{{mac}}", "cipher": "{{cipher}}"}},
    }},
}


@pytest.fixture
async def platform(nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Platform]:
    monkeypatch.setenv("LANGORCH_SECRET_ENC_KEY", KEY_VALUE)
    monkeypatch.setenv("LANGORCH_SECRET_PORTAL_PW", PORTAL_VALUE)
    async with platform_of(nats_url, database_url) as p:
        yield p


async def status_of(c: httpx.AsyncClient, run_id: str, wanted: tuple[str, ...]) -> dict[str, Any]:
    for _ in range(300):
        body: dict[str, Any] = (await c.get(f"/api/runs/{run_id}")).json()
        if body["status"] in wanted:
            return body
        await asyncio.sleep(0.1)
    raise AssertionError(body)


async def stored_bytes(database_url: str) -> bytes:
    conn = await asyncpg.connect(database_url)
    try:
        chunks: list[bytes] = []
        for table in ("run_events", "runs", "checkpoints", "checkpoint_blobs", "checkpoint_writes"):
            for row in await conn.fetch(f"SELECT * FROM {table}"):  # fixed table names
                for value in row.values():
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
        return b"\n".join(chunks)
    finally:
        await conn.close()


async def test_secret_values_are_never_stored_and_grants_redeem(platform: Platform, database_url: str) -> None:
    c = platform.client
    assert (await c.post("/api/procedures", json={"ckp_json": DOC})).status_code == 201
    r = await c.post("/api/runs", json={"procedure_id": "secret_use", "procedure_version": "1"})
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    events: list[dict[str, Any]] = []
    for _ in range(300):  # the run suspends at the approval gate
        events = (await c.get(f"/api/runs/{run_id}/events", params={"limit": 500})).json()["items"]
        if any(e["event_type"] in ("approval_requested", "run_failed") for e in events):
            break
        await asyncio.sleep(0.1)
    assert [e for e in events if e["event_type"] == "run_failed"] == []
    [started] = [e for e in events if e["event_type"] == "step_started" and e["step_id"] == "type_pw"]
    assert started["payload"]["params"]["value"] == "***REDACTED***"
    [logged] = [e for e in events if e["event_type"] == "log"]
    assert logged["payload"]["message"] == "decrypted ***REDACTED***"

    # an agent holding a grant for the portal secret redeems it while the run is active
    key = grant_key(GatewaySettings().auth_secret_key.get_secret_value())
    grant = make_grant(key, run_id=run_id, secret_name="PORTAL_PW", node_id="login", step_id="type_pw")
    r = await c.get("/api/agent-credentials/PORTAL_PW", headers={"Authorization": f"Bearer {grant}"})
    assert r.status_code == 200
    assert r.json() == {"value": PORTAL_VALUE}
    assert r.headers["cache-control"] == "no-store"
    other = await c.get("/api/agent-credentials/ENC_KEY", headers={"Authorization": f"Bearer {grant}"})
    assert other.status_code == 403
    bad = await c.get("/api/agent-credentials/PORTAL_PW", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401

    approvals = [e for e in events if e["event_type"] == "approval_requested"]
    wait_id = approvals[0]["payload"]["approval_id"]
    from ckp_core.commands import ResumeRun
    from ckp_core.events import ANONYMOUS
    from langorch_infra.jetstream import publish_command

    await publish_command(platform.app.state.js, ResumeRun(actor=ANONYMOUS, run_id=run_id,
                                                           resume_reason="approval_decision",
                                                           resolution={"wait_id": wait_id, "decision": "approved"}))
    done = await status_of(c, run_id, ("completed", "failed"))
    assert done["status"] == "completed", done["error"]
    assert done["output_vars"]["plain"] == "***REDACTED***"
    assert done["output_vars"]["cipher"].startswith("v1.")
    after = await c.get("/api/agent-credentials/PORTAL_PW", headers={"Authorization": f"Bearer {grant}"})
    assert after.status_code == 403  # the run is no longer active

    everything = await stored_bytes(database_url)
    for secret in (KEY_VALUE, PORTAL_VALUE):
        assert secret.encode() not in everything
        assert secret.encode().hex().encode() not in everything
