"""The console's pages over HTTP (no browser): sign-in and redirects, role-dependent controls, CSRF, filters in the
URL, the start form's per-field errors and the import's diagnostics — on the real stack with auth on, plus one
gateway with auth off for the banner. The browser journey is tests/test_ui_browser.py."""

from __future__ import annotations

import contextlib
import json
import re
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from tests.helpers import Platform, platform_of, wait_run, wait_until

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "console-admin-password-1"
SECRET_KEY = "console-pages-secret-key-of-at-least-32-bytes"
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "product_enrichment_pipeline.ckp.json"


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


@contextlib.asynccontextmanager
async def signed_in(platform: Platform, username: str, password: str) -> AsyncIterator[httpx.AsyncClient]:
    """A browser-like client (cookies kept, redirects not followed) signed in through the console's form."""
    async with httpx.AsyncClient(base_url=platform.base_url, timeout=60) as client:

        async def attempt() -> int:
            r = await client.post("/ui/login", data={"username": username, "password": password,
                                                     "next": "/ui/runs"})
            return r.status_code

        assert await wait_until(attempt, lambda status: status == 303, timeout=60) == 303  # admin: bootstrapped
        yield client


async def user(platform: Platform, admin: httpx.AsyncClient, roles: list[str]) -> tuple[str, str]:
    """A new user with ``roles`` (created through the API with the admin's session)."""
    name = f"u{uuid.uuid4().hex[:10]}"
    password = "a-long-password-" + uuid.uuid4().hex[:8]
    r = await admin.post("/api/users", json={"username": name, "email": f"{name}@example.com", "password": password,
                                             "roles": roles},
                         headers={"X-CSRF-Token": admin.cookies["langorch_csrf"]})
    assert r.status_code == 201, r.text
    return name, password


def csrf_of(page: str) -> str:
    found = re.search(r'name="csrf_token" value="([^"]+)"', page)
    assert found, page[:2000]
    return found.group(1)


async def test_anonymous_visitors_are_sent_to_sign_in_and_back(platform: Platform) -> None:
    async with httpx.AsyncClient(base_url=platform.base_url) as c:
        r = await c.get("/")
        assert (r.status_code, r.headers["location"]) == (303, "/ui/")
        r = await c.get("/ui/runs", params={"status": "failed"})
        assert r.status_code == 303
        assert r.headers["location"] == "/ui/login?next=%2Fui%2Fruns%3Fstatus%3Dfailed"
        login = await c.get(r.headers["location"])
        assert login.status_code == 200
        assert 'name="next" value="/ui/runs?status=failed"' in login.text
        assert login.headers["content-security-policy"].startswith("default-src 'self'")
        r = await c.post("/ui/login", data={"username": "admin", "password": "wrong-password",
                                            "next": "https://elsewhere.example/"})
        assert r.status_code == 401
        assert "Wrong username or password." in r.text
        assert 'value="/ui/"' in r.text  # a next outside the console is never followed
        r = await c.post("/ui/login", data={"username": "admin", "password": ADMIN_PASSWORD},
                         headers={"Origin": "https://elsewhere.example"})
        assert r.status_code == 403  # another site's form cannot sign a visitor in
        assert "langorch_session" not in r.headers.get("set-cookie", "")
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        r = await c.post("/ui/login", data={"username": "admin", "password": ADMIN_PASSWORD, "next": "/ui/runs"})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/runs")
        assert {"langorch_session", "langorch_csrf"} <= set(c.cookies.keys())
        page = await c.get("/ui/runs")
        assert page.status_code == 200
        assert "user:admin" in page.text
        assert "Authentication is disabled" not in page.text
        r = await c.post("/ui/logout", data={"csrf_token": csrf_of(page.text)})
        assert (r.status_code, r.headers["location"]) == (303, "/ui/login")
        c.cookies.clear()
        assert (await c.get("/ui/runs")).status_code == 303


async def test_a_form_post_without_the_csrf_token_is_refused_by_the_api(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        r = await c.post("/ui/procedures", data={"ckp_text": EXAMPLE.read_text()})
        assert r.status_code == 403
        assert "csrf_failed" in r.text
        r = await c.post("/ui/procedures", data={"ckp_text": EXAMPLE.read_text(), "csrf_token": "forged"})
        assert r.status_code == 403


async def test_import_shows_diagnostics_with_their_paths_then_the_version(platform: Platform) -> None:
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = f"pages-{uuid.uuid4().hex[:8]}"
    broken = json.loads(json.dumps(document))
    broken["workflow_graph"]["nodes"]["fetch_product"]["type"] = "teleport"
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        csrf = csrf_of((await c.get("/ui/procedures")).text)
        r = await c.post("/ui/procedures", data={"ckp_text": json.dumps(broken), "csrf_token": csrf})
        assert r.status_code == 422
        assert "/workflow_graph/nodes/fetch_product" in r.text
        assert "compile_failed" in r.text
        r = await c.post("/ui/procedures", data={"ckp_text": "{not json", "csrf_token": csrf})
        assert r.status_code == 422
        assert "Not valid JSON" in r.text
        r = await c.post("/ui/procedures", files={"ckp_file": ("p.json", json.dumps(document).encode())},
                         data={"csrf_token": csrf, "ckp_text": ""})
        assert r.status_code == 303
        version_url = f"/ui/procedures/{document['procedure_id']}/1.0.0"
        assert r.headers["location"] == version_url
        page = await c.get(version_url)
        assert page.status_code == 200
        assert 'name="var.product_id"' in page.text
        r = await c.post(f"{version_url}/runs", data={"var.product_id": "500", "csrf_token": csrf})
        assert r.status_code == 422
        assert re.search(r'id="err-input_vars-product_id">\s*<li>[^<]+100', r.text), r.text
        assert 'value="500"' in r.text  # what was typed stays
        r = await c.post(f"{version_url}/runs", data={"var.product_id": "7", "var.final_payload": "{oops",
                                                      "csrf_token": csrf})
        assert r.status_code == 422
        assert "Must be valid JSON" in r.text
        r = await c.post(f"{version_url}/runs", data={"var.product_id": "7", "csrf_token": csrf})
        assert r.status_code == 303
        run_url = r.headers["location"]
        run_page = await c.get(run_url)
        assert run_page.status_code == 200
        assert f'sse-connect="/api/runs/{run_url.rsplit("/", 1)[1]}/stream' in run_page.text
        assert "Cancel run" in run_page.text  # an admin holds operator


async def test_the_run_list_keeps_its_filters_in_the_url(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        r = await c.get("/ui/runs", params=[("status", "failed"), ("status", "canceled"), ("limit", "25"),
                                            ("procedure_id", "nothing-here")])
        assert r.status_code == 200
        assert 'value="failed" checked' in r.text
        assert 'value="canceled" checked' in r.text
        assert 'value="nothing-here"' in r.text
        assert "No run matches these filters." in r.text
        r = await c.get("/ui/runs", params={"created_from": "yesterday"})
        assert r.status_code == 422
        assert "query.created_from" in r.text


async def test_a_viewer_sees_no_mutating_control(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        name, password = await user(platform, admin, ["viewer"])
    async with signed_in(platform, name, password) as c:
        for path in ("/ui/", "/ui/runs", "/ui/procedures", "/ui/approvals"):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text[:500])
            forms = re.findall(r'<form method="post" action="([^"]+)"', r.text)
            assert forms == ["/ui/logout"], (path, forms)  # signing out is the only post a viewer is offered
        r = await c.post("/ui/procedures", data={"ckp_text": EXAMPLE.read_text(),
                                                 "csrf_token": c.cookies["langorch_csrf"]})
        assert r.status_code == 403  # and the API refuses the post anyway
        assert "operator" in r.text


async def test_auth_disabled_shows_the_red_banner(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False) as p, \
            httpx.AsyncClient(base_url=p.base_url) as c:
        for path in ("/ui/", "/ui/runs", "/ui/procedures", "/ui/approvals"):
            r = await c.get(path)
            assert r.status_code == 200, path
            assert 'class="banner-danger" role="alert"' in r.text, path
            assert "Authentication is disabled" in r.text
        login = await c.get("/ui/login")
        assert "no sign-in is needed" in login.text


async def test_selected_runs_are_canceled_then_deleted_in_bulk(platform: Platform) -> None:
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = pid = f"bulk-{uuid.uuid4().hex[:8]}"
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        csrf = {"X-CSRF-Token": c.cookies["langorch_csrf"]}
        assert (await c.post("/api/procedures", json={"ckp_json": document}, headers=csrf)).status_code == 201
        run_ids = []
        for _ in range(2):  # each pauses at the approval gate
            r = await c.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0",
                                                "input_vars": {"product_id": 1}}, headers=csrf)
            assert r.status_code == 201, r.text
            run_ids.append(r.json()["run_id"])
        listing = f"/ui/runs?procedure_id={pid}"
        page = await c.get(listing)
        assert all(f'name="run_id" value="{run_id}"' in page.text for run_id in run_ids)
        async def bulk(action: str) -> str:
            r = await c.post(listing, data={"run_id": run_ids, "action": action,
                                              "csrf_token": csrf_of(page.text)})
            assert r.status_code == 200, r.text[:1000]
            found = re.search(r'data-testid="bulk-outcomes">\s*<p>([^<]+)</p>', r.text)
            assert found, r.text[:3000]
            return found.group(1)

        assert await bulk("delete") == "Deleted 0 of 2 selected runs."  # not ended yet: each refused, reported
        assert await bulk("cancel") == "Canceled 2 of 2 selected runs."
        for run_id in run_ids:  # a running run is canceling first (202), then canceled
            await wait_run(c, run_id, lambda run: run.get("status") == "canceled", timeout=60)
        assert await bulk("delete") == "Deleted 2 of 2 selected runs."
        assert "No run matches these filters." in (await c.get(listing)).text


async def test_the_read_only_lists_filter_from_the_url(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as c:
        for path in ("/ui/agents", "/ui/leases", "/ui/projects", "/ui/triggers", "/ui/audit"):
            r = await c.get(path)
            assert r.status_code == 200, (path, r.text[:500])
            assert 'data-testid="listing"' in r.text
        r = await c.get("/ui/audit", params={"category": "auth", "outcome": "accepted"})
        assert r.status_code == 200
        assert '<option value="accepted" selected>' in r.text
        assert "<td>login</td>" in r.text  # this client's own sign-in
        r = await c.get("/ui/audit", params={"since": "someday"})
        assert r.status_code == 422
        assert "query.since" in r.text
        r = await c.get("/ui/agents", params={"status": "nonsense"})
        assert r.status_code == 422


async def test_settings_show_secrets_to_all_and_configuration_to_admins(platform: Platform) -> None:
    async with signed_in(platform, "admin", ADMIN_PASSWORD) as admin:
        page = await admin.get("/ui/settings")
        assert page.status_code == 200
        assert 'data-testid="users"' in page.text
        assert 'data-testid="api-keys"' in page.text
        assert "auth_secret_key" in page.text  # listed, its value never
        assert SECRET_KEY not in page.text
        assert ADMIN_PASSWORD not in page.text
        name, password = await user(platform, admin, ["viewer"])
    async with signed_in(platform, name, password) as viewer:
        page = await viewer.get("/ui/settings")
        assert page.status_code == 200
        assert 'data-testid="secrets"' in page.text
        assert 'data-testid="users"' not in page.text
        assert "shown to administrators" in page.text
