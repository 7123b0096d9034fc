"""The console's admin settings and run views in a real browser (Playwright driving Debian's chromium), against the
real stack with auth on: an admin creates a user in the users form; that user signs in in a fresh context,
creates an API key (its secret shown once), uses it against the API, revokes it after the confirmation page and
the API refuses it (401). A run's timeline filtered to approvals stays filtered while the run's live events
arrive; its LLM usage and a checkpoint's state are shown. axe-core finds no serious or critical violation on any
of these pages. Shared helpers (sign-in, axe, screenshots) are tests/test_ui_browser.py's.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, expect

from tests import test_ui_browser
from tests.helpers import Platform, platform_of, start_document, wait_status, wait_until
from tests.llm_server import LlmServerState, RunningLlmServer, running_llm_server
from tests.test_ui_browser import admin_token, new_page, no_serious_violations, sign_in

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "console-browser-admin-1"  # admin_token of tests/test_ui_browser.py signs in with it
SECRET_KEY = "console-admin-browser-secret-key-of-32-bytes-or-more"
browser = test_ui_browser.browser  # the module's chromium (a fixture)


@pytest.fixture(scope="module")
async def llm() -> AsyncIterator[RunningLlmServer]:
    state = LlmServerState()
    state.model("m-small").answer = '{"vendor": "ACME"}'
    async with running_llm_server(state) as server:
        yield server


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str, llm: RunningLlmServer) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, agents=False, runtime_settings={
            "llm_base_url": llm.base_url(), "llm_models": {"m-small": {"prompt_usd_per_1k": 1.0,
                                                                       "completion_usd_per_1k": 2.0}}},
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


async def test_a_user_and_their_api_key_made_in_the_forms(platform: Platform, browser: Browser) -> None:
    await admin_token(platform)  # the bootstrap admin exists
    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start="/ui/settings")
    await page.get_by_role("link", name="Manage users").click()
    await expect(page).to_have_url(re.compile(r"/ui/settings/users$"))
    await no_serious_violations(page, "settings-users")

    name = f"kim{uuid.uuid4().hex[:6]}"
    password = "kims-initial-password-1"
    form = page.get_by_test_id("new-user")
    await form.get_by_text("Create a user").click()
    await form.get_by_label("Username", exact=True).fill(name)
    await form.get_by_label("Display name (optional)").fill("Kim Admin")
    await form.get_by_label("Email").fill("not-an-email")
    await form.get_by_label("admin").check()
    await form.get_by_label("Initial password").fill(password)
    await form.get_by_role("button", name="Create user").click()
    form = page.get_by_test_id("new-user")  # the page again, with the API's message beside the field
    await expect(page.locator("#err-email")).to_be_visible()
    await expect(form.get_by_label("Email")).to_have_attribute("aria-invalid", "true")
    await expect(form.get_by_label("Username", exact=True)).to_have_value(name)
    await no_serious_violations(page, "settings-users-errors")
    await form.get_by_label("Email").fill(f"{name}@example.com")
    await form.get_by_label("Initial password").fill(password)
    await form.get_by_role("button", name="Create user").click()
    await expect(page.get_by_test_id("action-done")).to_contain_text(f"created user {name}")
    await expect(page.locator(f'tr[data-user="{name}"]')).to_contain_text("Kim Admin")
    await page.context.close()

    # the new user, in a fresh browser context: signs in, creates an API key, sees it once
    page = await new_page(browser, platform.base_url)
    await sign_in(page, name, password, start="/ui/settings/api-keys")
    await expect(page.get_by_role("heading", name="Settings: API keys")).to_be_visible()
    await no_serious_violations(page, "settings-api-keys")
    key_name = f"deploy-{uuid.uuid4().hex[:6]}"
    await page.get_by_text("Create an API key").click()
    await page.get_by_label("Name").fill(key_name)
    key_form = page.get_by_test_id("new-key")
    await key_form.get_by_label("viewer").uncheck()  # checked at first
    await key_form.get_by_label("operator").check()
    await page.get_by_role("button", name="Create API key").click()
    secret = page.locator("#new-key-value")
    await expect(secret).to_have_value(re.compile(r"^lo_"))
    await expect(page.get_by_test_id("new-key-secret")).to_contain_text("not shown again")
    await no_serious_violations(page, "settings-api-key-created")
    key = await secret.input_value()

    me = await platform.client.get("/api/auth/me", headers={"X-API-Key": key})
    assert me.status_code == 200, me.text
    assert me.json()["roles"] == ["operator"]
    key_id = me.json()["identity"].removeprefix("api_key:")

    await page.get_by_role("link", name="Back to the API keys").click()
    row = page.get_by_test_id("api-keys").locator("tr", has=page.get_by_text(key_id))
    await expect(row).to_contain_text(key_name)
    await expect(page.locator("main")).not_to_contain_text(key)  # never shown again
    await row.get_by_role("link", name=re.compile("Revoke")).click()
    await expect(page).to_have_url(re.compile(rf"/ui/settings/api-keys/{key_id}/revoke$"))
    await no_serious_violations(page, "settings-api-key-revoke")
    await page.get_by_role("button", name="Revoke the key").click()
    await expect(page.get_by_test_id("action-done")).to_contain_text(f"revoked API key {key_id}")

    async def status() -> int:
        return (await platform.client.get("/api/auth/me", headers={"X-API-Key": key})).status_code

    assert await wait_until(status, lambda code: code == 401, timeout=60) == 401
    await page.context.close()


def gated(procedure_id: str) -> dict[str, Any]:
    """An approval, then one LLM call."""
    return {"procedure_id": procedure_id, "version": "1", "workflow_graph": {"start_node": "gate", "nodes": {
        "gate": {"type": "human_approval", "prompt": "Go on?", "on_approve": "ask", "on_reject": "done"},
        "ask": {"type": "llm_action", "model": "m-small", "prompt": "Who?", "json_mode": True,
                "outputs": {"vendor": "$.vendor"}, "next_node": "done"},
        "done": {"type": "terminate", "status": "success"}}}}


async def test_a_filtered_timeline_stays_filtered_live_then_usage_and_a_checkpoint(platform: Platform,
                                                                                   browser: Browser) -> None:
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    async with httpx.AsyncClient(base_url=platform.base_url, headers=bearer, timeout=60) as api:
        run_id = await start_document(api, gated(f"gated-{uuid.uuid4().hex[:8]}"))
        waiting = await wait_status(api, run_id, ("waiting_approval",), timeout=60)
        await filtered_live(platform, browser, api, run_id, waiting["waiting_on"]["approval_id"])


async def filtered_live(platform: Platform, browser: Browser, api: httpx.AsyncClient, run_id: str,
                        approval_id: str) -> None:
    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/runs/{run_id}")
    filters = page.get_by_test_id("timeline-filters")
    await filters.get_by_label("approvals").check()
    await filters.get_by_role("button", name="Filter timeline").click()
    await expect(page).to_have_url(re.compile(rf"/ui/runs/{run_id}\?group=approvals&node=$"))
    timeline = page.locator("#timeline")
    await expect(timeline.locator("li")).to_have_count(1)  # approval_requested only
    await expect(timeline).to_contain_text("approval_requested")
    await expect(page.locator("#live-state")).to_contain_text("Live")
    await no_serious_violations(page, "run-timeline-filtered")

    # the decision, the LLM call and the end arrive live: only the approval's events stay on the page
    r = await api.post(f"/api/approvals/{approval_id}/decision", json={"decision": "approved"})
    assert r.status_code == 200, r.text
    await expect(timeline).to_contain_text("approval_decision_received")
    await expect(page.get_by_test_id("run-status")).to_have_text("completed")
    events = (await api.get(f"/api/runs/{run_id}/events", params={"limit": 500})).json()
    await expect(timeline).to_have_attribute("data-last-seq", str(events["total"]))  # every event has arrived
    shown = await timeline.locator("li").evaluate_all("items => items.map(i => i.dataset.type)")
    assert shown == ["approval_requested", "approval_decision_received"], shown
    await page.get_by_role("link", name="Show every event").click()
    await expect(timeline.locator("li")).to_have_count(events["total"])

    nav = page.get_by_role("navigation", name="Run views")
    await nav.get_by_role("link", name="LLM usage").click()
    await expect(page.get_by_test_id("usage-steps")).to_contain_text("m-small")
    await expect(page.get_by_test_id("usage-calls").locator("tbody tr")).to_have_count(1)
    await no_serious_violations(page, "run-llm-usage")
    await nav.get_by_role("link", name="Checkpoints").click()
    await page.get_by_test_id("checkpoints").get_by_role("link").first.click()
    await expect(page.get_by_role("heading", name="Variables")).to_be_visible()
    await expect(page.get_by_test_id("checkpoint-vars")).to_contain_text("vendor")
    await expect(page.get_by_test_id("checkpoint-frames")).to_be_visible()
    await no_serious_violations(page, "run-checkpoint")
    await page.context.close()
