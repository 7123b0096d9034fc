"""The secret metadata API (api.md §11) on the real stack: records created, read, listed, patched and deleted
through gateway-owned ``secret_*`` events; a ``value`` is refused (422 ``secret_value_not_accepted``) and never
stored; ``referenced_by`` comes from the procedures that name the secret; a referenced secret is deleted only
with ``force=true``; ``check`` resolves through the record's provider and reports only success; every write is
audited; and the runtime follows a record's provider."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from langorch_infra.jetstream import JetStreamEventStore, connect
from langorch_infra.secrets import grant_key, make_grant
from langorch_infra.settings import GatewaySettings
from tests.helpers import Platform, events_of, platform_of, problem, wait_status

pytestmark = pytest.mark.integration

OUT_FIELDS = {"name", "provider", "provider_ref", "description", "tags", "referenced_by", "last_check",
              "created_by", "created_at", "updated_at"}
VALUE = "never-STORED-value-9931"


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


def doc(procedure_id: str, references: dict[str, Any], uses: list[str]) -> dict[str, Any]:
    ops = [{"action": "hash", "value": "x", "key": "{{secrets." + u + "}}", "output_variable": f"h{i}"}
           for i, u in enumerate(uses)]
    return {"procedure_id": procedure_id, "version": "1",
            "global_config": {"secrets_config": {"secret_references": references}},
            "workflow_graph": {"start_node": "p", "nodes": {
                "p": {"type": "processing", "next_node": "done", "operations": ops},
                "done": {"type": "terminate"}}}}


async def audit_records(c: httpx.AsyncClient, count: int, **params: Any) -> list[dict[str, Any]]:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        body = (await c.get("/api/audit", params={**params, "limit": 500})).json()
        if body["total"] >= count:
            items: list[dict[str, Any]] = body["items"]
            return items
        assert asyncio.get_running_loop().time() < deadline, (params, body)
        await asyncio.sleep(0.1)


async def test_create_read_list_patch_delete(platform: Platform) -> None:
    c = platform.client
    r = await c.post("/api/secrets", json={"name": "crm-token", "provider": "vault",
                                           "provider_ref": "secret/crm#token", "description": "CRM API",
                                           "tags": ["crm", "prod"]})
    assert r.status_code == 201, r.text
    assert r.headers["Location"] == "/api/secrets/crm-token"
    out = r.json()
    assert set(out) == OUT_FIELDS
    assert (out["provider"], out["provider_ref"], out["tags"], out["referenced_by"], out["last_check"],
            out["created_by"]) == ("vault", "secret/crm#token", ["crm", "prod"], [], None, "anonymous")
    assert (await c.get("/api/secrets/crm-token")).json() == out
    problem(await c.post("/api/secrets", json={"name": "crm-token", "provider": "env"}), 409, "secret_exists")
    # the accepted alias provider_hint (§1.8)
    r = await c.post("/api/secrets", json={"name": "erp-key", "provider_hint": "aws", "tags": ["erp"]})
    assert r.status_code == 201, r.text
    assert r.json()["provider"] == "aws"

    page = (await c.get("/api/secrets", params={"tag": "crm"})).json()
    assert [s["name"] for s in page["items"]] == ["crm-token"]
    assert page["total"] == 1
    assert [s["name"] for s in (await c.get("/api/secrets", params={"provider": "aws"})).json()["items"]] == \
        ["erp-key"]
    assert [s["name"] for s in (await c.get("/api/secrets", params={"search": "CRM api"})).json()["items"]] == \
        ["crm-token"]
    problem(await c.get("/api/secrets", params={"provider": "keepass"}), 422, "validation_failed")

    r = await c.patch("/api/secrets/crm-token", json={"provider": "env", "provider_ref": "CRM_TOKEN",
                                                       "tags": []})
    assert r.status_code == 200, r.text
    assert (r.json()["provider"], r.json()["provider_ref"], r.json()["tags"], r.json()["description"]) == (
        "env", "CRM_TOKEN", [], "CRM API")
    r = await c.put("/api/secrets/crm-token", json={"description": None})  # the PUT alias
    assert r.status_code == 200, r.text
    assert r.json()["description"] is None
    problem(await c.patch("/api/secrets/nothing", json={"description": "x"}), 404, "not_found")
    body = problem(await c.patch("/api/secrets/crm-token", json={"provider": None}), 422, "validation_failed")
    assert "provider" in body["errors"]

    assert (await c.delete("/api/secrets/crm-token")).status_code == 204
    problem(await c.get("/api/secrets/crm-token"), 404, "not_found")
    problem(await c.delete("/api/secrets/crm-token"), 404, "not_found")
    r = await c.post("/api/secrets", json={"name": "crm-token", "provider": "env"})  # the name is free again
    assert r.status_code == 201, r.text
    assert r.json()["last_check"] is None

    # the refusals above are audited too: wait for the five accepted ones, not for any five records
    audited = await audit_records(c, 5, category="secret_mgmt", resource_id="crm-token", outcome="accepted")
    assert sorted(a["action"] for a in audited if a["outcome"] == "accepted") == [
        "create", "create", "delete", "update", "update"]
    assert {a["actor"] for a in audited} == {"anonymous"}


async def test_values_and_bad_input_are_refused_precisely(platform: Platform) -> None:
    c = platform.client
    for body in ({"name": "v1", "provider": "env", "value": VALUE}, {"value": VALUE},
                 {"name": "v1", "provider": "nope", "value": VALUE}):
        answer = problem(await c.post("/api/secrets", json=body), 422, "secret_value_not_accepted")
        assert list(answer["errors"]) == ["value"]
        assert VALUE not in str(answer)
    await c.post("/api/secrets", json={"name": "v2", "provider": "env"})
    problem(await c.patch("/api/secrets/v2", json={"value": VALUE}), 422, "secret_value_not_accepted")
    problem(await c.put("/api/secrets/v2", json={"value": VALUE}), 422, "secret_value_not_accepted")
    problem(await c.get("/api/secrets/v1"), 404, "not_found")

    body = problem(await c.post("/api/secrets", json={"name": "bad name!", "provider": "env"}), 422,
                   "validation_failed")
    assert list(body["errors"]) == ["name"]
    body = problem(await c.post("/api/secrets", json={"name": "v3"}), 422, "validation_failed")
    assert list(body["errors"]) == ["provider"]
    body = problem(await c.post("/api/secrets", json={"name": "v3", "provider": "vault",
                                                      "provider_ref": "no-mount"}), 422, "validation_failed")
    assert list(body["errors"]) == ["provider_ref"]
    body = problem(await c.post("/api/secrets", json={"name": "v3", "provider": "azure"}), 422,
                   "validation_failed")
    assert list(body["errors"]) == ["provider_ref"]
    problem(await c.post("/api/secrets", json={"name": "v3", "provider": "env", "colour": "red"}), 422,
            "unknown_field")

    # the value reached nothing: not the event store, not the audit log
    nc = await connect(platform.nats_url, "secret-api-test")
    try:
        events = await JetStreamEventStore(nc.jetstream()).read("secret", "v1")
        assert events == []
    finally:
        await nc.close()
    refusals = await audit_records(c, 2, category="secret_mgmt", resource_id="v2", outcome="rejected")
    assert [(a["action"], a["meta"]["code"]) for a in refusals] == [("update", "secret_value_not_accepted")] * 2
    created = await audit_records(c, 2, category="secret_mgmt", resource_id="v1", outcome="rejected")
    assert [(a["action"], a["meta"]["code"]) for a in created] == [("create", "secret_value_not_accepted")] * 2
    everything = (await c.get("/api/audit", params={"limit": 500, "category": "secret_mgmt"})).text
    assert VALUE not in everything
    assert "secret_value_not_accepted" in everything


async def test_referenced_by_and_delete_in_use(platform: Platform) -> None:
    c = platform.client
    for name in ("ref-declared", "ref-undeclared", "ref-object"):
        assert (await c.post("/api/secrets", json={"name": name, "provider": "env"})).status_code == 201
    d = doc("uses_secrets", {"enc": "ref-declared", "obj": {"key": "ref-object", "field": "k"}},
            ["enc", "obj", "ref-undeclared"])
    r = await c.post("/api/procedures", json={"ckp_json": d})
    assert r.status_code == 201, r.text

    async def refs(name: str) -> list[dict[str, Any]]:
        found: list[dict[str, Any]] = (await c.get(f"/api/secrets/{name}")).json()["referenced_by"]
        return found

    assert await refs("ref-declared") == [{"procedure_id": "uses_secrets", "version": "1", "alias": "enc"}]
    assert await refs("ref-object") == [{"procedure_id": "uses_secrets", "version": "1", "alias": "obj"}]
    assert await refs("ref-undeclared") == [{"procedure_id": "uses_secrets", "version": "1",
                                             "alias": "ref-undeclared"}]
    listed = {s["name"]: s["referenced_by"] for s in (await c.get("/api/secrets", params={"search": "ref-"})
                                                      ).json()["items"]}
    assert listed["ref-declared"] == await refs("ref-declared")

    body = problem(await c.delete("/api/secrets/ref-declared"), 409, "secret_in_use")
    assert body["referenced_by"] == [{"procedure_id": "uses_secrets", "version": "1", "alias": "enc"}]
    assert (await c.get("/api/secrets/ref-declared")).status_code == 200
    assert (await c.delete("/api/secrets/ref-declared", params={"force": "true"})).status_code == 204
    problem(await c.get("/api/secrets/ref-declared"), 404, "not_found")
    [refused] = await audit_records(c, 1, category="secret_mgmt", resource_id="ref-declared", outcome="rejected")
    assert refused["action"] == "delete"


async def test_check_reports_success_or_the_providers_reason(platform: Platform,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    monkeypatch.setenv("CHECKED_VARIABLE", VALUE)
    await c.post("/api/secrets", json={"name": "checked", "provider": "env", "provider_ref": "CHECKED_VARIABLE"})
    r = await c.post("/api/secrets/checked/check")
    assert r.status_code == 200, r.text
    out = r.json()
    assert (set(out), out["ok"], out["provider"], out["error"]) == (
        {"name", "ok", "provider", "checked_at", "error"}, True, "env", None)
    assert VALUE not in r.text
    record = (await c.get("/api/secrets/checked")).json()
    assert record["last_check"] == {"ok": True, "checked_at": out["checked_at"], "error": None}

    monkeypatch.delenv("CHECKED_VARIABLE")
    r = await c.post("/api/secrets/checked/check")
    assert (r.status_code, r.json()["ok"]) == (200, False)
    assert r.json()["error"] == ("secret_not_found: neither LANGORCH_SECRET_CHECKED nor CHECKED_VARIABLE is set")
    assert (await c.get("/api/secrets/checked")).json()["last_check"]["ok"] is False
    problem(await c.post("/api/secrets/nothing/check"), 404, "not_found")
    audited = await audit_records(c, 2, category="secret_mgmt", action="check", resource_id="checked")
    assert VALUE not in str(audited)


async def test_runtime_resolves_through_the_record_and_fails_with_secret_unavailable(
        nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A procedure naming a secret without a provider follows its record; when the record's provider cannot be
    reached the step fails with ``secret_unavailable`` (retryable), carrying the provider's reason."""
    monkeypatch.setenv("RECORD_TARGET", "value-from-the-record")
    async with platform_of(nats_url, database_url) as p:
        c = p.client
        await c.post("/api/secrets", json={"name": "signing", "provider": "env", "provider_ref": "RECORD_TARGET"})
        d = doc("record_use", {"sig": "signing"}, ["sig"])
        d["workflow_graph"]["nodes"]["done"] = {"type": "terminate", "outputs": {"h": "{{h0}}"}}
        assert (await c.post("/api/procedures", json={"ckp_json": d})).status_code == 201
        r = await c.post("/api/runs", json={"procedure_id": "record_use", "procedure_version": "1"})
        run = await wait_status(c, r.json()["run_id"])
        assert run["status"] == "completed", run
        assert run["output_vars"]["h"] == hmac.new(b"value-from-the-record", b"x", hashlib.sha256).hexdigest()

        # the record now points at a Vault that is not there
        r = await c.patch("/api/secrets/signing", json={"provider": "vault", "provider_ref": "secret/sig#key"})
        assert r.status_code == 200, r.text
        p.runtime_service.resolver.forget("signing")  # the runtime's record TTL, cut short
        r = await c.post("/api/runs", json={"procedure_id": "record_use", "procedure_version": "1"})
        run = await wait_status(c, r.json()["run_id"])
        assert run["status"] == "failed", run
        assert run["error"]["code"] == "secret_unavailable", run["error"]
        errors = [e["payload"]["error"] for e in await events_of(c, run["run_id"])
                  if isinstance(e["payload"].get("error"), dict)]
        assert errors
        assert all(e["code"] == "secret_unavailable" and e["retryable"] for e in errors), errors
        assert errors[0]["details"]["provider"] == "vault"
        assert "no Vault address" in run["error"]["message"]


async def test_a_grant_redeems_only_a_secret_its_runs_procedure_names(platform: Platform,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    monkeypatch.setenv("LANGORCH_SECRET_GRANTED_ONE", "granted-value")
    monkeypatch.setenv("LANGORCH_SECRET_NOT_NAMED", "other-value")
    d = doc("grant_scope", {"g": "granted_one"}, ["g"])
    assert (await c.post("/api/procedures", json={"ckp_json": d})).status_code == 201
    r = await c.post("/api/runs", json={"procedure_id": "grant_scope", "procedure_version": "1"})
    assert r.status_code == 201, r.text  # no runtime in this module: the run stays active
    run_id = r.json()["run_id"]
    key = grant_key(GatewaySettings().auth_secret_key.get_secret_value())

    async def redeem(name: str) -> httpx.Response:
        grant = make_grant(key, run_id=run_id, secret_name=name, node_id="p", step_id="s", agent_id="a1")
        return await c.get(f"/api/agent-credentials/{name}", headers={"Authorization": f"Bearer {grant}"})

    r = await redeem("granted_one")
    assert (r.status_code, r.json()) == (200, {"value": "granted-value"})
    body = problem(await redeem("not_named"), 403, "forbidden")
    assert "does not name this secret" in body["detail"]
    assert "other-value" not in body["detail"]
