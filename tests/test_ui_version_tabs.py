"""A version's tabs in the console over HTTP (no browser), on the real stack with auth and the triggers service.

Trigger: register a webhook (per-field errors first), disable and enable it, fire it from the inputs form, receive
one signed delivery, and see both fires with their runs; a stale form is refused (412); a viewer sees the
registration and no action. Overview: status changes, promote and rollback with the API's refusals (the
transitions allowed, an invalid rollback target) and the deployment history. The browser journey is in
tests/test_ui_browser.py."""

from __future__ import annotations

import json
import re
import secrets
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest

from ckp_core.webhook_signing import signature_headers
from tests.helpers import Platform, platform_of, procedure_doc, wait_status, wait_until
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_ui_pages import ADMIN_PASSWORD, EXAMPLE, SECRET_KEY, csrf_of, signed_in, user

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, triggers=True,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


async def active_version(c: httpx.AsyncClient) -> str:
    """A new procedure (one string input, ``greeting``) with version 1.0.0 active; its id."""
    procedure_id = f"tab_{uuid.uuid4().hex[:10]}"
    headers = {"X-CSRF-Token": c.cookies["langorch_csrf"]}
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc(procedure_id)}, headers=headers)
    assert r.status_code == 201, r.text
    r = await c.patch(f"/api/procedures/{procedure_id}/1.0.0/status", json={"status": "active"}, headers=headers)
    assert r.status_code == 200, r.text
    return procedure_id


async def viewer_of(platform: Platform) -> tuple[str, str]:
    """A new viewer's username and password."""
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        return await user(platform, admin, ["viewer"])


async def test_register_fire_and_receive_a_webhook_from_the_trigger_tab(platform: Platform,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        procedure_id = await active_version(c)
        tab = f"/ui/procedures/{procedure_id}/1.0.0/trigger"
        page = await c.get(tab)
        assert page.status_code == 200
        assert "This version has no trigger registration." in page.text
        assert 'aria-current="page">Trigger</a>' in page.text
        csrf = csrf_of(page.text)
        form = {"csrf_token": csrf, "trigger_type": "webhook", "enabled": "on", "max_concurrent_runs": "many"}
        r = await c.post(tab, data=form)  # read by the console: not a number
        assert r.status_code == 422
        assert 'id="err-max_concurrent_runs"' in r.text
        assert "Must be a whole number" in r.text
        r = await c.post(tab, data=form | {"max_concurrent_runs": "", "input_vars": "[1]"})
        assert r.status_code == 422
        assert "Must be a JSON object" in r.text
        r = await c.post(tab, data=form | {"max_concurrent_runs": ""})  # the API: a webhook needs its secret
        assert r.status_code == 422
        assert re.search(r'id="err-webhook_secret">\s*<li>', r.text), r.text
        assert 'value="webhook" selected' in r.text  # the form keeps what was typed

        secret_name, key = f"{procedure_id}_key", secrets.token_hex(16)
        monkeypatch.setenv(f"LANGORCH_SECRET_{secret_name.upper()}", key)
        r = await c.post(tab, data=form | {"max_concurrent_runs": "", "webhook_secret": secret_name,
                                           "input_vars": '{"greeting": "static"}'})
        assert (r.status_code, r.headers["location"]) == (303, f"{tab}?saved=1")
        page = await c.get(r.headers["location"])
        assert "The registration is saved." in page.text
        hook_url = f"{platform.base_url}/api/triggers/webhook/{procedure_id}"
        assert f'<code data-testid="webhook-url">{hook_url}</code>' in page.text
        assert f"langorch webhook sign body.json --secret-env HOOK_KEY --url {hook_url}" in page.text
        assert key not in page.text  # the secret's name is shown, never its value

        r = await c.post(f"{tab}/disable", data={"csrf_token": csrf})
        assert (r.status_code, r.headers["location"]) == (303, f"{tab}?done=disable")
        assert 'data-testid="trigger-state">disabled' in (await c.get(tab)).text
        r = await c.post(f"{tab}/enable", data={"csrf_token": csrf})
        assert r.status_code == 303
        page = await c.get(tab)
        assert 'data-testid="trigger-state">enabled' in page.text

        r = await c.post(f"{tab}/fire", data={"csrf_token": csrf, "var.greeting": "fired from the console"})
        assert r.status_code == 303, r.text
        manual_run = r.headers["location"].split("fired=")[1]
        assert (await c.get(f"/api/runs/{manual_run}")).json()["input_vars"]["greeting"] == "fired from the console"

        body = b'{"greeting": "signed delivery"}'
        delivered = await c.post(hook_url, content=body,
                                 headers={"Content-Type": "application/json", **signature_headers(key, body)})
        assert delivered.status_code == 202, delivered.text
        hook_run = delivered.json()["run_id"]

        async def fires_page() -> str:
            return (await c.get(tab)).text

        page = await wait_until(fires_page, lambda text: hook_run in text and manual_run in text, timeout=60)
        rows = re.findall(r"<tr><td>[^<]*</td><td>(\w+)</td><td>([^<]*)</td>", page)
        assert [kind for kind, _ in rows] == ["webhook", "manual"], rows  # newest first
        assert rows[1][1] == "user:admin"

        stale = form | {"max_concurrent_runs": "", "webhook_secret": secret_name, "revision": "1"}
        r = await c.post(tab, data=stale)  # read at revision 1; enable and disable moved it on
        assert r.status_code == 412
        assert "precondition_failed" in r.text

        r = await c.post(f"{tab}/delete", data={"csrf_token": csrf})
        assert r.status_code == 303
        assert "This version has no trigger registration." in (await c.get(tab)).text


async def test_a_viewer_sees_the_registration_and_no_action(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        procedure_id = await active_version(admin)
        tab = f"/ui/procedures/{procedure_id}/1.0.0/trigger"
        r = await admin.post(tab, data={"csrf_token": csrf_of((await admin.get(tab)).text),
                                        "trigger_type": "file_watch", "event_source": "/tmp/watched.csv"})
        assert r.status_code == 303, r.text
        name, password = await user(platform, admin, ["viewer"])
    async with signed_in(platform, name, password) as viewer:
        page = await viewer.get(tab)
        assert page.status_code == 200
        assert 'data-testid="trigger-state">disabled' in page.text  # the box was left unticked
        assert "<code>/tmp/watched.csv</code>" in page.text
        assert 'method="post"' not in page.text.split("<main", 1)[1]  # no action at all (sign-out is outside main)
        r = await viewer.post(f"{tab}/fire", data={"csrf_token": viewer.cookies["langorch_csrf"]})
        assert r.status_code == 403


async def test_lifecycle_actions_show_the_apis_refusals_and_the_deployment_history(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        procedure_id = await active_version(c)  # 1.0.0 active in dev
        headers = {"X-CSRF-Token": c.cookies["langorch_csrf"]}
        r = await c.post("/api/procedures", headers=headers,
                         json={"ckp_json": procedure_doc(procedure_id, "1.1.0", name="second")})
        assert r.status_code == 201, r.text
        second = f"/ui/procedures/{procedure_id}/1.1.0"
        page = await c.get(second)
        assert "No promotion or rollback yet." in page.text
        csrf = csrf_of(page.text)

        r = await c.post(f"{second}/lifecycle/status", data={"csrf_token": csrf, "status": "archived"})
        assert r.status_code == 303  # draft → archived is allowed
        r = await c.post(f"{second}/lifecycle/status", data={"csrf_token": csrf, "status": "draft"})
        assert r.status_code == 409
        assert "invalid_status_transition" in r.text
        assert "From <strong>archived</strong> a version may become" in r.text

        r = await c.post("/api/procedures", headers=headers,
                         json={"ckp_json": procedure_doc(procedure_id, "1.2.0", name="third")})
        assert r.status_code == 201, r.text
        third = f"/ui/procedures/{procedure_id}/1.2.0"
        r = await c.post(f"{third}/lifecycle/promote", data={"csrf_token": csrf, "target_channel": "dev",
                                                              "reason": "ship it"})
        assert (r.status_code, r.headers["location"]) == (303, f"{third}?done=promote")
        page = await c.get(r.headers["location"])
        assert "The version is promoted." in page.text
        rows = re.findall(r"<tr><td>[^<]*</td><td>(\w+)</td><td>(\w+)</td><td>([\d.]+)</td><td>([^<]*)</td>",
                          page.text)
        assert rows == [("promote", "dev", "1.2.0", "1.0.0")], rows
        assert '<option value="1.0.0">1.0.0 (deprecated)</option>' in page.text  # the rollback picker

        r = await c.post(f"{third}/lifecycle/rollback", data={"csrf_token": csrf, "target_channel": "dev",
                                                               "rollback_to_version": "1.1.0"})
        assert r.status_code == 409  # an archived version is no rollback target
        assert "invalid_rollback" in r.text
        r = await c.post(f"{third}/lifecycle/rollback", data={"csrf_token": csrf, "target_channel": "dev"})
        assert r.status_code == 303
        detail = (await c.get(f"/api/procedures/{procedure_id}/1.0.0")).json()
        assert detail["status"] == "active"
        name, password = await user(platform, c, ["viewer"])
    async with signed_in(platform, name, password) as viewer:
        page = await viewer.get(f"/ui/procedures/{procedure_id}/1.0.0")
        assert "<td>rollback</td>" in page.text
        assert "/lifecycle/" not in page.text  # no lifecycle action for a viewer


async def test_explain_with_inputs_in_the_url_and_a_draft_edited_with_diagnostics(platform: Platform) -> None:
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = procedure_id = f"tab_{uuid.uuid4().hex[:10]}"
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        r = await c.post("/api/procedures", json={"ckp_json": document},
                         headers={"X-CSRF-Token": c.cookies["langorch_csrf"]})
        assert r.status_code == 201, r.text
        base = f"/ui/procedures/{procedure_id}/1.0.0"
        page = await c.get(f"{base}/explain")
        assert page.status_code == 200
        assert '<dd data-testid="missing-inputs">product_id</dd>' in page.text
        page = await c.get(f"{base}/explain", params={"var.product_id": "7"})  # a link one can share
        trace = re.findall(r"<li><code>(\w+)</code>", page.text.split('data-testid="route-trace"')[1])
        assert trace[:2] == ["fetch_product", "quality_check"], trace
        assert '<dd data-testid="missing-inputs">—</dd>' in page.text
        page = await c.get(f"{base}/explain", params={"var.product_id": "500"})
        assert 'id="err-input_vars-product_id"' in page.text  # the analysis checks the inputs too

        page = await c.get(base)
        assert 'name="ckp_text"' in page.text  # a draft's source is editable
        csrf = csrf_of(page.text)
        broken = json.loads(json.dumps(document))
        broken["workflow_graph"]["nodes"]["fetch_product"]["type"] = "teleport"
        r = await c.post(f"{base}/source", data={"csrf_token": csrf, "revision": "1", "ckp_text": json.dumps(broken)})
        assert r.status_code == 422
        assert "/workflow_graph/nodes/fetch_product" in r.text.split('data-testid="source-diagnostics"')[1]
        assert "teleport" in r.text  # the edited text is kept
        r = await c.post(f"{base}/source", data={"csrf_token": csrf, "ckp_text": "[1]"})
        assert r.status_code == 422
        assert "Must be a JSON object" in r.text
        edited = json.loads(json.dumps(document))
        edited["description"] = "edited in the console"
        r = await c.post(f"{base}/source", data={"csrf_token": csrf, "revision": "1", "ckp_text": json.dumps(edited)})
        assert (r.status_code, r.headers["location"]) == (303, f"{base}?done=source")
        assert (await c.get(f"/api/procedures/{procedure_id}/1.0.0")).json()["description"] == "edited in the console"
        r = await c.post(f"{base}/source", data={"csrf_token": csrf, "revision": "1", "ckp_text": json.dumps(edited)})
        assert r.status_code == 412  # read at revision 1, replaced since
        r = await c.patch(f"/api/procedures/{procedure_id}/1.0.0/status", json={"status": "active"},
                          headers={"X-CSRF-Token": csrf})
        assert r.status_code == 200, r.text
        page = await c.get(base)
        assert 'name="ckp_text"' not in page.text
        assert "only a draft can be edited" in page.text


async def test_rerun_with_edited_inputs_and_the_admins_history_cleanup(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        procedure_id = await active_version(c)
        headers = {"X-CSRF-Token": c.cookies["langorch_csrf"]}
        r = await c.post("/api/runs", json={"procedure_id": procedure_id, "input_vars": {"greeting": "first"}},
                         headers=headers)
        assert r.status_code == 201, r.text
        original = r.json()["run_id"]
        await wait_status(c, original, timeout=60)
        assert f'href="/ui/runs/{original}/rerun"' in (await c.get(f"/ui/runs/{original}")).text
        form = await c.get(f"/ui/runs/{original}/rerun")
        assert 'name="var.greeting" value="first"' in form.text  # starts from the original's inputs
        r = await c.post(f"/ui/runs/{original}/rerun", data={"csrf_token": csrf_of(form.text),
                                                             "var.greeting": "second"})
        assert r.status_code == 303, r.text
        rerun = r.headers["location"].rsplit("/", 1)[1]
        run = (await c.get(f"/api/runs/{rerun}")).json()
        assert (run["rerun_of"], run["input_vars"]["greeting"]) == (original, "second")
        await wait_status(c, rerun, timeout=60)

        assert 'href="/ui/runs/cleanup"' in (await c.get("/ui/runs")).text
        page = await c.get("/ui/runs/cleanup")
        csrf = csrf_of(page.text)
        r = await c.post("/ui/runs/cleanup", data={"csrf_token": csrf, "before": "yesterday",
                                                   "statuses": "completed", "action": "preview"})
        assert r.status_code == 422
        assert re.search(r'id="err-before">\s*<li>', r.text), r.text
        tomorrow = "2999-01-01"
        r = await c.post("/ui/runs/cleanup", data={"csrf_token": csrf, "before": tomorrow, "statuses": "completed",
                                                   "procedure_id": procedure_id, "action": "preview"})
        assert r.status_code == 200
        assert "<strong>2</strong> runs match" in r.text
        assert (await c.get(f"/api/runs/{original}")).status_code == 200  # a preview deletes nothing
        r = await c.post("/ui/runs/cleanup", data={"csrf_token": csrf, "before": tomorrow, "statuses": "completed",
                                                   "procedure_id": procedure_id, "action": "delete"})
        assert r.status_code == 200
        assert "Deleting 2 of 2 matching runs" in r.text

        async def gone() -> list[int]:
            return [(await c.get(f"/api/runs/{run_id}")).status_code for run_id in (original, rerun)]

        assert await wait_until(gone, lambda codes: codes == [404, 404], timeout=60) == [404, 404]
        operator, password = await user(platform, c, ["operator"])
    async with signed_in(platform, operator, password) as op:
        assert 'href="/ui/runs/cleanup"' not in (await op.get("/ui/runs")).text
        assert (await op.get("/ui/runs/cleanup")).status_code == 403


async def test_list_row_actions_by_role(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        headers = {"X-CSRF-Token": c.cookies["langorch_csrf"]}
        procedure_id = await active_version(c)
        r = await c.post(f"/api/triggers/{procedure_id}/1.0.0", headers=headers,
                         json={"trigger_type": "file_watch", "event_source": "/tmp/row-actions.csv"})
        assert r.status_code == 201, r.text
        unique = uuid.uuid4().hex[:8]
        r = await c.post("/api/projects", json={"name": f"rows {unique}"}, headers=headers)
        assert r.status_code == 201, r.text
        project_id = r.json()["project_id"]

        triggers = f"/ui/triggers?procedure_id={procedure_id}"
        page = await c.get(triggers)
        csrf = csrf_of(page.text)
        assert f'aria-label="Disable {procedure_id} 1.0.0"' in page.text
        assert f'aria-label="Enable {procedure_id} 1.0.0"' not in page.text  # only what the row's state allows
        row = {"csrf_token": csrf, "procedure_id": procedure_id, "version": "1.0.0"}
        r = await c.post("/ui/triggers/actions", data=row | {"action": "disable"})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/triggers?done=Disable")
        kept = {"action": "enable", "back": f"procedure_id={procedure_id}&done=Disable"}
        r = await c.post("/ui/triggers/actions", data=row | kept)
        assert r.headers["location"] == f"/ui/triggers?procedure_id={procedure_id}&done=Enable"  # filters kept
        r = await c.post("/ui/triggers/actions", data=row | {"action": "disable"})
        assert r.status_code == 303
        assert f'aria-label="Enable {procedure_id} 1.0.0"' in (await c.get(triggers)).text
        r = await c.post("/ui/triggers/actions", data=row | {"action": "fire"})
        assert r.status_code == 303
        run_id = r.headers["location"].split("&run=")[1]
        assert (await c.get(f"/api/runs/{run_id}")).json()["trigger_type"] == "manual"
        r = await c.post("/ui/triggers/actions", data=row | {"action": "delete"})
        assert r.status_code == 303
        assert (await c.get(f"/api/triggers/{procedure_id}/1.0.0")).status_code == 404
        r = await c.post("/ui/triggers/actions", data=row | {"action": "delete"})
        assert r.status_code == 404  # the API's refusal, on the list
        assert 'data-testid="action-problem"' in r.text

        r = await c.post("/ui/triggers/actions", data={"csrf_token": csrf, "page_action": "sync"})
        assert r.status_code == 200
        assert "&#34;registered&#34;:" in r.text.split('data-testid="page-outcome"')[1]  # the API's answer, shown

        r = await c.post("/ui/projects/actions", data={"csrf_token": csrf, "action": "rename",
                                                       "project_id": project_id, "field": f"renamed {unique}"})
        assert r.status_code == 303
        assert (await c.get(f"/api/projects/{project_id}")).json()["name"] == f"renamed {unique}"
        r = await c.post("/ui/projects/actions", data={"csrf_token": csrf, "action": "rename",
                                                       "project_id": project_id, "field": ""})
        assert r.status_code == 422  # the API: a name is needed
        operator, operator_password = await user(platform, c, ["operator"])
        viewer, viewer_password = await user(platform, c, ["viewer"])
    async with signed_in(platform, operator, operator_password) as op:
        page = (await op.get(f"/ui/projects?search={unique}")).text
        assert f'aria-label="Rename {project_id}"' in page
        assert f'aria-label="Delete {project_id}"' not in page  # deleting a project is the admin's
        r = await op.post("/ui/projects/actions", data={"csrf_token": csrf_of(page), "action": "delete",
                                                        "project_id": project_id})
        assert r.status_code == 403  # and the API says so
    async with signed_in(platform, viewer, viewer_password) as v:
        for path in (triggers, "/ui/projects", "/ui/agents", "/ui/leases"):
            text = (await v.get(path)).text
            assert "/actions" not in text, path
            assert "<th scope=\"col\">Actions</th>" not in text, path
            assert "Sync from procedures" not in text, path


async def test_agent_row_actions(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        channel = f"rows_{uuid.uuid4().hex[:8]}"
        r = await c.post("/api/agents", headers={"X-CSRF-Token": c.cookies["langorch_csrf"]},
                         json={"name": "row actions", "channel": channel, "base_url": "http://127.0.0.1:9",
                               "capabilities": ["noop"]})
        assert r.status_code == 201, r.text
        agent_id = r.json()["agent_id"]
        listing = f"/ui/agents?channel={channel}"
        page = await c.get(listing)
        assert f'aria-label="Drain {agent_id}"' in page.text
        row = {"csrf_token": csrf_of(page.text), "agent_id": agent_id, "back": f"channel={channel}"}
        r = await c.post("/ui/agents/actions", data=row | {"action": "drain"})
        assert (r.status_code, r.headers["location"]) == (303, f"{listing}&done=Drain")
        page = await c.get(r.headers["location"])
        assert f'aria-label="Back online {agent_id}"' in page.text
        assert f'aria-label="Drain {agent_id}"' not in page.text
        r = await c.post("/ui/agents/actions", data=row | {"action": "token"})
        assert r.status_code == 200
        token = re.search(r'data-testid="revealed">.*?<pre tabindex="0">([^<]+)</pre>', r.text, re.DOTALL)
        assert token, r.text
        assert "no-store" in r.headers["cache-control"]  # the new token is shown once, never cached
        check = await c.post("/api/agents/heartbeat", json={"agent_id": agent_id},
                             headers={"Authorization": f"Bearer {token.group(1)}"})
        assert check.status_code != 401, check.text  # the token shown is the agent's
        r = await c.post("/ui/agents/actions", data=row | {"action": "remove"})
        assert r.status_code == 303
        assert (await c.get(f"/api/agents/{agent_id}")).status_code == 404


async def test_create_a_project_and_delete_a_version(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        page = await c.get("/ui/projects")
        assert "<summary>Create project</summary>" in page.text
        csrf = csrf_of(page.text)
        r = await c.post("/ui/projects/actions", data={"csrf_token": csrf, "action": "create", "name": ""})
        assert r.status_code == 422
        assert re.search(r'id="err-name">\s*<li>', r.text), r.text  # the API names the missing field
        name = f"made {uuid.uuid4().hex[:8]}"
        r = await c.post("/ui/projects/actions", data={"csrf_token": csrf, "action": "create", "name": name})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/projects?done=Create+project")
        assert (await c.get("/api/projects", params={"search": name})).json()["total"] == 1

        procedure_id = await active_version(c)
        r = await c.post("/api/procedures", headers={"X-CSRF-Token": csrf},
                         json={"ckp_json": procedure_doc(procedure_id, "2.0.0")})
        assert r.status_code == 201, r.text
        r = await c.post(f"/ui/procedures/{procedure_id}/1.0.0/lifecycle/delete", data={"csrf_token": csrf})
        assert r.status_code == 409  # the active version stays
        assert "procedure_version_active" in r.text
        r = await c.post(f"/ui/procedures/{procedure_id}/2.0.0/lifecycle/delete", data={"csrf_token": csrf})
        assert (r.status_code, r.headers["location"]) == (303, f"/ui/procedures/{procedure_id}?deleted=2.0.0")
        assert "Version 2.0.0 is deleted." in (await c.get(r.headers["location"])).text
    async with signed_in(platform, *await viewer_of(platform)) as v:
        text = (await v.get("/ui/projects")).text
        assert "Create project" not in text


async def test_register_an_agent_probed_from_its_url(platform: Platform) -> None:
    channel = f"probed_{uuid.uuid4().hex[:8]}"
    async with (serving(ScriptedAgent({"greet": lambda _: {"ok": True}})) as agent,
                signed_in(platform, "admin", ADMIN_PASSWORD) as c):
        page = await c.get("/ui/agents")
        assert "<summary>Register agent</summary>" in page.text
        form = {"csrf_token": csrf_of(page.text), "action": "create", "name": "probed", "channel": channel}
        r = await c.post("/ui/agents/actions", data=form)
        assert r.status_code == 422
        assert re.search(r'id="err-base_url">\s*<li>', r.text), r.text
        r = await c.post("/ui/agents/actions", data=form | {"base_url": agent.base_url})
        assert r.status_code == 200, r.text
        found = re.search(r'data-testid="revealed">.*?<pre tabindex="0">([^<]*)</pre>', r.text, re.DOTALL)
        assert found, r.text
        assert len(found.group(1)) >= 20, found.group(0)
        listed = (await c.get("/api/agents", params={"channel": channel})).json()["items"]
        assert [[c["name"] for c in a["capabilities"]] for a in listed] == [["greet"]], listed  # probed from its URL
