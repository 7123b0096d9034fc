"""The console's settings for administrators (users, API keys) and the run views beside the timeline (timeline
filters, LLM usage, a checkpoint's state) over HTTP, on the real stack with auth on and a real OpenAI-compatible
server the test starts. The browser test of the user and API-key forms is tests/test_ui_admin_browser.py."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Platform, platform_of, wait_status, wait_until
from tests.llm_server import LlmServerState, RunningLlmServer, running_llm_server
from tests.test_ui_pages import csrf_of, signed_in, user

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "console-admin-views-password-1"
SECRET_KEY = "console-admin-views-secret-key-of-32-bytes-or-more"
SENSITIVE = "tok-never-shown-4242"


@pytest.fixture(scope="module")
async def llm() -> AsyncIterator[RunningLlmServer]:
    state = LlmServerState()
    state.model("m-small").answer = json.dumps({"vendor": "ACME", "amount": 42})
    state.model("m-unpriced").answer = json.dumps({"summary": "ACME owes 42"})
    async with running_llm_server(state) as server:
        yield server


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str, llm: RunningLlmServer) -> AsyncIterator[Platform]:
    models = {"m-small": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0}, "m-unpriced": {}}
    async with platform_of(module_nats_url, module_database_url, agents=False,
                           runtime_settings={"llm_base_url": llm.base_url(), "llm_models": models,
                                             "llm_default_model": "m-small"},
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


def posts(page: str) -> list[str]:
    return re.findall(r'<form method="post" action="([^"]+)"', page)


async def test_users_are_created_changed_and_deactivated_from_settings(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        page = await admin.get("/ui/settings/users")
        assert page.status_code == 200, page.text[:1000]
        assert 'data-testid="users"' in page.text
        assert "/ui/settings/users" in posts(page.text)
        csrf = csrf_of(page.text)
        # the bootstrap admin is the only admin: neither demoted nor deactivated (the API's last-admin rule)
        me = (await admin.get("/api/users/admin")).json()
        for data in ({"action": "roles", "roles": ["viewer"]}, {"action": "deactivate"}):
            r = await admin.post(f"/ui/settings/users/{me['user_id']}", data={**data, "csrf_token": csrf})
            assert r.status_code == 409, r.text[:1000]
            assert "last_admin" in r.text
            assert "last active admin" in r.text
        assert (await admin.get("/api/users/admin")).json()["roles"] == ["admin"]

        # per-field errors from the API's problem, what was typed kept (never the password)
        r = await admin.post("/ui/settings/users", data={
            "username": "not a name!", "email": "nope", "password": "short", "full_name": "Kept Name",
            "roles": ["operator"], "csrf_token": csrf})
        assert r.status_code == 422, r.text[:1000]
        for field in ("username", "email", "password"):
            assert re.search(rf'id="err-{field}">\s*<li>', r.text), field
            assert re.search(rf'id="new-{field}"[^>]*aria-invalid="true"', r.text, re.S), field
        assert 'value="Kept Name"' in r.text
        assert 'value="short"' not in r.text
        assert re.search(r'value="operator" checked', r.text)

        name = f"ops{uuid.uuid4().hex[:8]}"
        password = "a-long-initial-password-1"
        r = await admin.post("/ui/settings/users", data={
            "username": name, "email": f"{name}@example.com", "password": password, "full_name": "Opal Operator",
            "roles": ["operator"], "csrf_token": csrf})
        assert r.status_code == 303, r.text[:1000]
        listing = await admin.get(r.headers["location"])
        assert f"Done: created user {name}." in listing.text
        assert "Opal Operator" in listing.text
        r = await admin.post("/ui/settings/users", data={
            "username": name, "email": f"{name}@example.com", "password": password, "roles": ["viewer"],
            "csrf_token": csrf})
        assert r.status_code == 409
        assert re.search(r'id="err-username">\s*<li>', r.text)

        created = (await admin.get(f"/api/users/{name}")).json()
        assert (created["full_name"], created["roles"]) == ("Opal Operator", ["operator"])
        r = await admin.post(f"/ui/settings/users/{created['user_id']}",
                             data={"action": "roles", "roles": ["operator", "approver"], "csrf_token": csrf})
        assert r.status_code == 303
        assert (await admin.get(f"/api/users/{name}")).json()["roles"] == ["approver", "operator"]

    # an operator sees no user or key administration and is refused if they post anyway
    async with signed_in(platform, name, password) as operator:
        settings = await operator.get("/ui/settings")
        assert settings.status_code == 200
        assert posts(settings.text) == ["/ui/logout"]
        assert "/ui/settings/users" not in settings.text
        for path in ("/ui/settings/users", "/ui/settings/api-keys"):
            r = await operator.get(path)
            assert r.status_code == 403
            assert "this action needs the role &#39;admin&#39;" in r.text
        r = await operator.post("/ui/settings/users", data={
            "username": "sneaky", "email": "s@example.com", "password": "x" * 16, "roles": ["admin"],
            "csrf_token": operator.cookies["langorch_csrf"]})
        assert r.status_code == 403

    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        csrf = admin.cookies["langorch_csrf"]
        r = await admin.post(f"/ui/settings/users/{created['user_id']}",
                             data={"action": "deactivate", "csrf_token": csrf})
        assert r.status_code == 303
        assert (await admin.get(f"/api/users/{name}")).json()["is_active"] is False
        refused = await platform.client.post("/api/auth/login", json={"username": name, "password": password})
        assert refused.status_code == 401
        page = await admin.get("/ui/settings/users", params={"search": name})
        assert f'aria-label="Reactivate {name}"' in page.text
        r = await admin.post(f"/ui/settings/users/{created['user_id']}",
                             data={"action": "reactivate", "csrf_token": csrf})
        assert r.status_code == 303
        again = await platform.client.post("/api/auth/login", json={"username": name, "password": password})
        assert again.status_code == 200


async def test_an_api_key_is_shown_once_and_revoked_after_a_confirmation(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        page = await admin.get("/ui/settings/api-keys")
        assert page.status_code == 200
        assert 'data-testid="api-keys"' in page.text
        csrf = csrf_of(page.text)
        r = await admin.post("/ui/settings/api-keys", data={"name": "", "roles": ["operator"], "csrf_token": csrf})
        assert r.status_code == 422
        assert re.search(r'id="err-name">\s*<li>', r.text)
        r = await admin.post("/ui/settings/api-keys", data={"name": "old", "expires_at": "2001-02-03",
                                                            "roles": ["operator"], "csrf_token": csrf})
        assert r.status_code == 422
        assert re.search(r'id="err-expires_at">\s*<li>Must be in the future', r.text)
        assert 'value="2001-02-03"' in r.text

        name = f"ci-{uuid.uuid4().hex[:6]}"
        r = await admin.post("/ui/settings/api-keys", data={"name": name, "description": "for CI",
                                                            "expires_at": "2099-12-31", "roles": ["operator"],
                                                            "csrf_token": csrf})
        assert r.status_code == 200, r.text[:1000]
        assert r.headers["cache-control"] == "no-store"
        found = re.search(r'id="new-key-value"[^>]*value="(lo_[^"]+)"', r.text)
        assert found, r.text[:2000]
        key = found.group(1)
        assert "it is not shown again" in r.text
        me = await platform.client.get("/api/auth/me", headers={"X-API-Key": key})
        assert me.status_code == 200
        assert me.json()["roles"] == ["operator"]
        key_id = me.json()["identity"].removeprefix("api_key:")

        listing = await admin.get("/ui/settings/api-keys")
        assert key_id in listing.text
        assert key not in listing.text  # shown once: never again
        assert "2099-12-31 00:00:00 UTC" in listing.text
        confirm = await admin.get(f"/ui/settings/api-keys/{key_id}/revoke")
        assert confirm.status_code == 200
        assert name in confirm.text
        assert posts(confirm.text) == ["/ui/logout", f"/ui/settings/api-keys/{key_id}/revoke"]
        assert (await admin.get("/ui/settings/api-keys/nosuchkey/revoke")).status_code == 404
        r = await admin.post(f"/ui/settings/api-keys/{key_id}/revoke", data={"csrf_token": csrf})
        assert r.status_code == 303
        assert f"revoked API key {key_id}" in (await admin.get(r.headers["location"])).text

        async def refused() -> int:
            return (await platform.client.get("/api/auth/me", headers={"X-API-Key": key})).status_code

        assert await wait_until(refused, lambda status: status == 401, timeout=60) == 401
        revoked = await admin.get("/ui/settings/api-keys", params={"revoked": "true"})
        assert key_id in revoked.text
        assert f"/ui/settings/api-keys/{key_id}/revoke" not in revoked.text  # nothing more to revoke


LLM_DOC: dict[str, Any] = {
    "version": "1",
    "variables_schema": {"invoice": {"type": "string", "default": "ACME 42 EUR"}, "api_token": {"type": "string"}},
    "workflow_graph": {"start_node": "ask", "nodes": {
        "ask": {"type": "llm_action", "model": "m-small", "prompt": "Extract vendor and amount: {{invoice}}",
                "json_mode": True, "outputs": {"vendor": "json_extract: vendor", "amount": "$.amount"},
                "next_node": "summarise"},
        "summarise": {"type": "llm_action", "model": "m-unpriced", "prompt": "Summarise {{vendor}} {{amount}}",
                      "json_mode": True, "outputs": {"summary": "$.summary"}, "next_node": "done"},
        "done": {"type": "terminate", "outputs": {"vendor": "{{vendor}}", "summary": "{{summary}}"}}}},
}


async def test_llm_usage_checkpoint_state_and_timeline_filters(platform: Platform) -> None:
    pid = f"llm-views-{uuid.uuid4().hex[:8]}"
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        headers = {"X-CSRF-Token": admin.cookies["langorch_csrf"]}
        r = await admin.post("/api/procedures", json={"ckp_json": LLM_DOC | {"procedure_id": pid}}, headers=headers)
        assert r.status_code == 201, r.text
        r = await admin.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1",
                                                "input_vars": {"api_token": SENSITIVE}}, headers=headers)
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        run = await wait_status(admin, run_id, timeout=120)
        assert run["status"] == "completed", run
        name, password = await user(platform, admin, ["viewer"])

        # LLM usage: per step and per call, the run's totals; an unpriced model's cost is unknown, not zero
        usage = await admin.get(f"/ui/runs/{run_id}/usage")
        assert usage.status_code == 200, usage.text[:1000]
        calls = usage.text.split('data-testid="usage-calls"', 1)[1].split("</table>", 1)[0]
        assert calls.count("<tr>") == 3  # the head, then two calls
        assert "m-small" in calls
        assert "m-unpriced" in calls
        assert "<td>0.0250</td>" in calls
        assert "<td>unknown</td>" in calls
        steps = usage.text.split('data-testid="usage-steps"', 1)[1].split("</table>", 1)[0]
        assert re.search(r"<td>ask[^<]*</td><td>1</td><td>m-small</td>\s*<td>11</td><td>7</td>\s*<td>0\.0250</td>",
                         steps), steps
        assert re.search(r"<td>summarise[^<]*</td><td>1</td><td>m-unpriced</td>.*?<td>unknown</td>", steps, re.S)
        totals = usage.text.split('data-testid="usage-totals"', 1)[1].split("</dl>", 1)[0]
        assert re.search(r"Tokens in</dt><dd>22<", totals)
        assert re.search(r"Tokens out</dt><dd>14<", totals)
        assert "$0.0250" in totals

        # the checkpoints tab links each checkpoint's state for operators; the state shows masked values
        tab = await admin.get(f"/ui/runs/{run_id}/checkpoints")
        links = re.findall(rf'href="(/ui/runs/{run_id}/checkpoints/[^"?]+)', tab.text)
        assert links, tab.text[:2000]
        state = await admin.get(links[0])  # the newest
        assert state.status_code == 200, state.text[:1000]
        variables = state.text.split('data-testid="checkpoint-vars"', 1)[1].split("</table>", 1)[0]
        assert "<code>vendor</code>" in variables
        assert "ACME" in variables
        assert "<code>api_token</code>" in variables
        assert "***REDACTED***" in variables
        assert SENSITIVE not in state.text
        assert 'data-testid="checkpoint-frames"' in state.text
        async def viewed() -> list[dict[str, Any]]:  # the audit record is projected, not read back at once
            audit = await admin.get("/api/audit", params={"action": "checkpoint_viewed", "limit": 200})
            return list(audit.json().get("items") or [])

        await wait_until(viewed, lambda items: any(a.get("resource_id") == run_id for a in items))

        # timeline filters: in the URL, applied to the history by the API, carried for the live events
        everything = await admin.get(f"/ui/runs/{run_id}")
        assert 'data-type="node_started"' in everything.text
        assert 'data-type="run_created"' in everything.text
        assert 'data-filter-types=""' in everything.text
        lifecycle = await admin.get(f"/ui/runs/{run_id}", params={"group": "lifecycle"})
        types = set(re.findall(r'<li data-seq="\d+" data-type="([a-z_]+)"', lifecycle.text))
        assert "run_created" in types
        assert "run_completed" in types
        assert not types & {"step_started", "node_started", "llm_usage"}
        assert 'value="lifecycle" checked' in lifecycle.text
        last = max(int(s) for s in re.findall(r'<li data-seq="(\d+)"', everything.text))
        assert f'data-last-seq="{last}"' in lifecycle.text  # the live stream continues after the whole run
        at_node = await admin.get(f"/ui/runs/{run_id}", params=[("group", "steps"), ("node", "summarise")])
        nodes = set(re.findall(r'<li data-seq="\d+" data-type="[a-z_]+" data-node="([^"]*)"', at_node.text))
        assert nodes == {"summarise"}
        assert '<option value="summarise" selected>' in at_node.text
        assert "data-filter-node=\"summarise\"" in at_node.text
        assert "llm_usage" in at_node.text.split('data-filter-types="', 1)[1].split('"', 1)[0]
        errors = await admin.get(f"/ui/runs/{run_id}", params={"group": "errors"})
        assert "<li data-seq=" not in errors.text  # a run without errors

    async with signed_in(platform, name, password) as viewer:
        tab = await viewer.get(f"/ui/runs/{run_id}/checkpoints")
        assert tab.status_code == 200
        assert f'href="/ui/runs/{run_id}/checkpoints/' not in tab.text  # the state is for operators
        r = await viewer.get(links[0])
        assert r.status_code == 403
        assert (await viewer.get(f"/ui/runs/{run_id}/usage")).status_code == 200
