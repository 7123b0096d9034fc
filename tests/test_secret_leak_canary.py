"""No secret value leaks (issue 15's acceptance, api.md §1.7): one run uses a unique canary value from each
provider — env, vault (local HTTPS Vault), aws (moto's server) and azure (local HTTPS Key Vault) — as the key of
internal operations (the value in memory), as parameters of an HTTP agent's step (credential grants the agent
redeems at the gateway) and as the argument of an MCP tool that echoes it in its result. Afterwards no canary
appears in any message of any stream of the NATS server (``LO_EVT``, ``LO_AUDIT``, ``LO_CMD``, every KV bucket and
object store), in any table of the test database (LangGraph's checkpoints included), in the captured logs of the
services, or in the API's answers."""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
from pathlib import Path
from typing import Any

import asyncpg
import boto3
import httpx
import jwt
import pytest
from nats.js.errors import NotFoundError

from langorch_infra.jetstream import connect
from tests.fake_azure_keyvault import FakeKeyVault
from tests.fake_tls import ServerCertificates, make_certificates
from tests.fake_vault import FakeVault
from tests.helpers import events_of, platform_of, register_agent, wait_status
from tests.mcp_server import running_mcp
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration

CANARIES = {
    "env": "canaryENV7f3a91c2e5",
    "vault": "canaryVAULT2b8d44e0a1",
    "aws": "canaryAWS9c1e07f3b6",
    "azure": "canaryAZURE5d2a68c9f4",
}


def document(azure_url: str) -> dict[str, Any]:
    """Four aliases, one per provider: env through the default providers, vault and azure through their
    metadata records, aws named by the procedure's own reference."""
    del azure_url
    aliases = {"env": "env_s", "vault": "vault_s", "aws": "aws_s", "azure": "azure_s"}
    hashes = [{"action": "hash", "value": "data", "key": "{{secrets." + a + "}}", "output_variable": f"h_{p}"}
              for p, a in aliases.items()]
    return {
        "procedure_id": "canary_run", "version": "1",
        "global_config": {"secrets_config": {"secret_references": {
            "env_s": "canary-env", "vault_s": "canary-vault", "azure_s": "canary-azure",
            "aws_s": {"key": "canary-aws", "provider": "aws"}}}},
        "workflow_graph": {"start_node": "crypto", "nodes": {
            "crypto": {"type": "processing", "next_node": "tool", "operations": [
                *hashes,
                {"action": "encrypt", "value": "hello", "key": "{{secrets.vault_s}}", "output_variable": "cipher"},
                {"action": "decrypt", "value": "{{cipher}}", "key": "{{secrets.vault_s}}",
                 "output_variable": "plain"},
                {"action": "log", "message": "hashed {{h_env}} {{h_vault}} {{h_aws}} {{h_azure}}, got {{plain}}"}]},
            "tool": {"type": "sequence", "agent": "TOOLS", "next_node": "login", "steps": [
                {"step_id": "price", "action": "lookup_price", "params": {"sku": "{{secrets.aws_s}}"},
                 "output_variable": "priced"}]},
            "login": {"type": "sequence", "agent": "PORTAL", "next_node": "done", "steps": [
                {"step_id": "sign_in", "action": "sign_in", "params": {
                    "env": "{{secrets.env_s}}", "vault": "{{secrets.vault_s}}", "aws": "{{secrets.aws_s}}",
                    "azure": "login with {{secrets.azure_s}} please"}}]},
            "done": {"type": "terminate", "outputs": {
                "h_env": "{{h_env}}", "h_vault": "{{h_vault}}", "h_aws": "{{h_aws}}", "h_azure": "{{h_azure}}",
                "plain": "{{plain}}", "login": "{{sign_in_result}}", "sku": "{{priced.sku}}"}},
        }},
    }


@pytest.fixture
def certs(tmp_path: Path) -> ServerCertificates:
    return make_certificates(tmp_path / "tls")


async def every_stream_message(nats_url: str) -> bytes:
    """The data and headers of every message of every stream of the server."""
    nc = await connect(nats_url, "canary-dump")
    chunks: list[bytes] = []
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            name = info.config.name
            assert name is not None
            for seq in range(max(info.state.first_seq, 1), info.state.last_seq + 1):
                try:
                    msg = await js.get_msg(name, seq)
                except NotFoundError:
                    continue
                chunks += [name.encode(), msg.data or b"", json.dumps(msg.headers or {}).encode()]
        assert b"LO_EVT" in chunks
        assert b"LO_AUDIT" in chunks
        assert any(c.startswith(b"KV_") for c in chunks)
    finally:
        await nc.close()
    return b"\n".join(chunks)


async def every_table_row(database_url: str) -> tuple[bytes, set[str]]:
    conn = await asyncpg.connect(database_url)
    try:
        tables = [(r["table_schema"], r["table_name"]) for r in await conn.fetch(
            """SELECT table_schema, table_name FROM information_schema.tables
               WHERE table_type = 'BASE TABLE' AND table_schema NOT IN ('pg_catalog', 'information_schema')""")]
        chunks: list[bytes] = []
        for schema, table in tables:
            for row in await conn.fetch(f'SELECT * FROM "{schema}"."{table}"'):  # names from the catalogue
                for value in row.values():
                    chunks.append(value if isinstance(value, bytes) else str(value).encode())
        return b"\n".join(chunks), {t for _, t in tables}
    finally:
        await conn.close()


async def test_canaries_from_every_provider_never_leak(nats_url: str, database_url: str, certs: ServerCertificates,
                                                       moto: str, monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="langorch_runtime")
    caplog.set_level(logging.DEBUG, logger="langorch_gateway")
    caplog.set_level(logging.DEBUG, logger="langorch_infra")
    monkeypatch.setenv("LANGORCH_SECRET_CANARY_ENV", CANARIES["env"])
    boto3.client("secretsmanager", endpoint_url=moto, region_name="eu-west-1").create_secret(
        Name="canary-aws", SecretString=CANARIES["aws"])
    with FakeVault(certs) as vault, FakeKeyVault(certs) as key_vault:
        token = vault.state.issue()
        vault.state.kv["secret/canary"] = {"value": CANARIES["vault"]}
        key_vault.state.secrets["canary-azure"] = CANARIES["azure"]
        monkeypatch.setenv("IDENTITY_ENDPOINT", key_vault.identity.url + "/msi/token")
        monkeypatch.setenv("IDENTITY_HEADER", key_vault.state.identity_header)
        providers = {"vault_addr": vault.url, "vault_token": token, "vault_ca_bundle": str(certs.ca_file),
                     "aws_endpoint_url": moto, "aws_region": "eu-west-1", "azure_credential": "managed_identity",
                     "azure_ca_bundle": str(certs.ca_file), "azure_verify_challenge_resource": False}
        redeemed: dict[str, str] = {}

        async with platform_of(nats_url, database_url, runtime_settings=providers,
                               gateway_settings=providers) as p:
            c = p.client

            async def sign_in(body: dict[str, Any]) -> dict[str, Any]:
                """The agent redeems each grant at the gateway, as a real agent would."""
                async with httpx.AsyncClient(base_url=p.base_url, timeout=30) as gateway:
                    for key, param in body["params"].items():
                        grant = param.split()[2] if key == "azure" else param
                        name = jwt.decode(grant, options={"verify_signature": False})["secret_name"]
                        r = await gateway.get(f"/api/agent-credentials/{name}",
                                              headers={"Authorization": f"Bearer {grant}"})
                        assert r.status_code == 200, r.text
                        assert r.headers["cache-control"] == "no-store"
                        redeemed[key] = r.json()["value"]
                return {"signed_in": True}

            r = await c.post("/api/secrets", json={"name": "canary-vault", "provider": "vault",
                                                   "provider_ref": "secret/canary#value"})
            assert r.status_code == 201, r.text
            r = await c.post("/api/secrets", json={"name": "canary-azure", "provider": "azure",
                                                   "provider_ref": f"{key_vault.url}/canary-azure"})
            assert r.status_code == 201, r.text
            for name in ("canary-vault", "canary-azure"):  # check resolves in the gateway, answers no value
                r = await c.post(f"/api/secrets/{name}/check")
                assert (r.status_code, r.json()["ok"]) == (200, True), r.text
            async with serving(ScriptedAgent({"sign_in": sign_in})) as agent, running_mcp() as tools:
                await register_agent(c, agent, "PORTAL")
                r = await c.post("/api/agents", json={"name": "tools", "channel": "TOOLS", "base_url": tools.url,
                                                      "protocol": "mcp", "capabilities": ["lookup_price"]})
                assert r.status_code == 201, r.text
                r = await c.post("/api/procedures", json={"ckp_json": document(key_vault.url)})
                assert r.status_code == 201, r.text
                r = await c.post("/api/runs", json={"procedure_id": "canary_run", "procedure_version": "1"})
                assert r.status_code == 201, r.text
                run = await wait_status(c, r.json()["run_id"], timeout=90)
            assert run["status"] == "completed", run
            out = run["output_vars"]
            for provider, canary in CANARIES.items():  # every value really was used
                assert out[f"h_{provider}"] == hmac.new(canary.encode(), b"data", hashlib.sha256).hexdigest()
            assert out["plain"] == "***REDACTED***"  # a decrypt output is sensitive (ckp.md §7.15)
            assert redeemed == CANARIES
            # the MCP tool got the value itself (redeemed in memory at dispatch) and echoed it in its result
            assert [call["arguments"] for call in tools.calls] == [{"sku": CANARIES["aws"]}]
            assert out["sku"] == "***REDACTED***"  # masked before it became a variable
            [params] = [a["params"] for a in agent.requests]
            assert not any(canary in json.dumps(params) for canary in CANARIES.values())  # grants, not values
            api_answers = json.dumps([await events_of(c, run["run_id"]),
                                      (await c.get("/api/audit", params={"limit": 500})).json(),
                                      (await c.get(f"/api/runs/{run['run_id']}")).json(),
                                      (await c.get("/api/secrets")).json()])

        streams = await every_stream_message(nats_url)
        rows, tables = await every_table_row(database_url)
        assert {"checkpoints", "checkpoint_blobs", "checkpoint_writes", "run_events", "secrets", "audit_log"} <= tables
        logs = "\n".join(f"{r.getMessage()} {r.exc_text or ''} {r.args!r}" for r in caplog.records)
        # the dumps hold what they should (so a canary would be found): records, runs, checkpoints, requests
        assert b"secret/canary#value" in streams
        assert b"canary_run" in rows
        assert hmac.new(CANARIES["aws"].encode(), b"data", hashlib.sha256).hexdigest().encode() in rows
        assert "/api/agent-credentials/canary-azure" in logs
        for provider, canary in CANARIES.items():
            assert canary.encode() not in streams, f"{provider} canary in a NATS stream"
            assert canary.encode() not in rows, f"{provider} canary in a PostgreSQL table"
            assert canary not in logs, f"{provider} canary in the logs"
            assert canary not in api_answers, f"{provider} canary in an API answer"
