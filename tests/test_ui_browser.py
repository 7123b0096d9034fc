"""The console in a real browser (Playwright driving Debian's chromium) against the real stack with auth on.

The journey: sign in → import the product-enrichment example (a broken copy first: its diagnostic shows with its
JSON path) → start a run from the generated form (an out-of-range input first: the API's per-field error shows
beside the field) → the run page's timeline grows live over SSE → its connection drops (a proxy cuts it and
refuses new ones) while the run is approved from the inbox in a second tab → when the network is back the
timeline resumes with what happened meanwhile, every event once, and the run shows completed with its outputs.
A viewer is offered no mutating action, an approver only the decision on a pending approval. axe-core (vendored
for the tests only, tests/assets/) finds no serious or critical violation on any page of this slice.

With ``LANGORCH_CONSOLE_SCREENSHOTS=<folder>`` (the docs use ``docs/assets/console``) each page's screenshot is
written there under a fixed name.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from playwright.async_api import Browser, Page, async_playwright, expect

from ckp_core.webhook_signing import signature_headers
from tests.helpers import Platform, platform_of, procedure_doc, wait_until
from tests.ports import free_port
from tests.scripted_agent import ScriptedAgent, serving

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "console-browser-admin-1"
SECRET_KEY = "console-browser-secret-key-of-at-least-32-bytes"
ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "product_enrichment_pipeline.ckp.json"
AXE = Path(__file__).resolve().parent / "assets" / "axe-core-4.14.1" / "axe.min.js"
LONG = 60_000  # ms: auto-waiting expectations on a slow, shared machine
SCREENSHOTS = os.environ.get("LANGORCH_CONSOLE_SCREENSHOTS")
expect.set_options(timeout=LONG)


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, triggers=True,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    executable = shutil.which("chromium")
    assert executable, "Debian's chromium is needed (apt-get install chromium; .ci/run installs it)"
    async with async_playwright() as pw:
        launched = await pw.chromium.launch(executable_path=executable)
        yield launched
        await launched.close()


async def admin_token(platform: Platform) -> str:
    """The bootstrap admin's bearer token (the admin is created in the background at start-up: retried)."""
    async def attempt() -> httpx.Response:
        return await platform.client.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})

    answer = await wait_until(attempt, lambda r: r.status_code == 200, timeout=60)
    return str(answer.json()["access_token"])


async def example_run(platform: Platform, bearer: dict[str, str], prefix: str) -> tuple[str, str]:
    """The product-enrichment example imported under a new procedure id, and a run of it started (it will wait for
    its approval): (procedure id, run id)."""
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = pid = f"{prefix}-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": document}, headers=bearer)
    assert r.status_code == 201, r.text
    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0",
                                                      "input_vars": {"product_id": 3}}, headers=bearer)
    assert r.status_code == 201, r.text
    return pid, str(r.json()["run_id"])


async def new_page(browser: Browser, base_url: str) -> Page:
    # bypass_csp: the page's policy allows only this origin's script files; axe-core is injected by the test
    context = await browser.new_context(base_url=base_url, bypass_csp=True)
    page = await context.new_page()
    page.set_default_timeout(LONG)
    return page


async def sign_in(page: Page, username: str, password: str, start: str = "/ui/") -> None:
    await page.goto(start)
    await expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    await page.get_by_label("Username").fill(username)
    await page.get_by_label("Password").fill(password)
    await page.get_by_role("button", name="Sign in").click()
    await expect(page.get_by_test_id("identity")).to_have_text(f"user:{username}")


async def no_serious_violations(page: Page, shot: str | None = None) -> None:
    """axe-core on the page as it is now: no serious or critical violation."""
    await page.add_script_tag(path=str(AXE))
    violations: list[dict[str, Any]] = await page.evaluate(
        """async () => (await axe.run(document, {resultTypes: ["violations"]})).violations
             .map(v => ({id: v.id, impact: v.impact, help: v.help, nodes: v.nodes.map(n => n.target.join(" "))}))""")
    serious = [v for v in violations if v["impact"] in ("serious", "critical")]
    assert not serious, f"{page.url}: {json.dumps(serious, indent=1)}"
    if SCREENSHOTS and shot:
        Path(SCREENSHOTS).mkdir(parents=True, exist_ok=True)
        await page.screenshot(path=str(Path(SCREENSHOTS) / f"{shot}.png"), full_page=True)


class DroppingProxy:
    """A TCP proxy in front of the gateway that can cut every connection through it and refuse new ones for a
    while: a network drop, as the browser sees one."""

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.held = False
        self.answer_502 = False  # while held: answer every request 502 Bad Gateway instead of closing at once
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc: object) -> None:
        self.drop_and_hold()
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.held:
            if self.answer_502:
                with contextlib.suppress(ConnectionError, OSError, asyncio.IncompleteReadError,
                                         asyncio.LimitOverrunError):
                    await reader.readuntil(b"\r\n\r\n")
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self.writers |= {writer, up_writer}

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            with contextlib.suppress(ConnectionError, OSError):
                while data := await source.read(65536):
                    sink.write(data)
                    await sink.drain()
            sink.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self.writers -= {writer, up_writer}

    def drop_and_hold(self, answer_502: bool = False) -> None:
        self.held, self.answer_502 = True, answer_502
        for writer in list(self.writers):
            writer.transport.abort()

    def resume(self) -> None:
        self.held = False


async def test_the_operator_journey(platform: Platform, browser: Browser, tmp_path: Path) -> None:
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = pid = f"journey-{uuid.uuid4().hex[:8]}"
    broken = json.loads(json.dumps(document))
    broken["workflow_graph"]["nodes"]["quality_check"]["type"] = "teleport"
    upload = tmp_path / "product_enrichment_pipeline.ckp.json"
    upload.write_text(json.dumps(document))
    await admin_token(platform)  # the admin exists

    proxy = DroppingProxy(int(platform.base_url.rsplit(":", 1)[1]))
    async with proxy as through_proxy:
        await journey(platform, await new_page(browser, through_proxy), proxy, pid, broken, upload)


async def journey(platform: Platform, page: Page, proxy: DroppingProxy, pid: str, broken: dict[str, Any],
                  upload: Path) -> None:
    await page.goto("/ui/login")
    await no_serious_violations(page, "login")
    await sign_in(page, "admin", ADMIN_PASSWORD, start="/ui/procedures")
    await expect(page).to_have_url(re.compile(r"/ui/procedures$"))

    # a broken copy: the compile diagnostic with its JSON path, nothing imported
    await page.get_by_label("Or paste the CKP JSON").fill(json.dumps(broken, indent=1))
    await page.get_by_role("button", name="Import").click()
    diagnostics = page.get_by_test_id("diagnostics")
    await expect(diagnostics).to_contain_text("/workflow_graph/nodes/quality_check")
    await no_serious_violations(page, "procedures-import-diagnostics")

    # the real document, uploaded as a file: its version page with the generated start form
    await page.get_by_label("Or paste the CKP JSON").fill("")
    await page.get_by_label("CKP file (JSON)").set_input_files(str(upload))
    await page.get_by_role("button", name="Import").click()
    await expect(page).to_have_url(re.compile(rf"/ui/procedures/{pid}/1\.0\.0$"))
    product = page.get_by_label(re.compile(r"^product_id"))
    await expect(product).to_be_visible()
    await expect(page.locator("#version-graph-title ~ g.node")).to_have_count(len(broken["workflow_graph"]["nodes"]))
    await no_serious_violations(page, "version")

    # an out-of-range input first: the API's message beside the field; then a valid one
    await product.fill("500")
    await page.get_by_role("button", name="Start run").click()
    await expect(page.locator("#err-input_vars-product_id")).to_contain_text("100")
    await expect(product).to_have_attribute("aria-invalid", "true")
    await expect(product).to_have_value("500")
    await no_serious_violations(page, "version-start-errors")
    await product.fill("7")
    await page.get_by_role("button", name="Start run").click()
    await expect(page).to_have_url(re.compile(r"/ui/runs/[0-9a-f-]{36}$"))
    run_id = page.url.rsplit("/", 1)[1]
    timeline = page.locator("#timeline")

    # the run pauses for approval: the page shows it without a reload (the SSE stream)
    await expect(timeline).to_contain_text("approval_requested")
    await expect(page.get_by_test_id("run-status")).to_have_text("waiting approval")
    await expect(page.locator("#live-state")).to_contain_text("Live")
    gate = page.locator('g[data-node="approval_gate"]')
    await expect(gate).to_have_attribute("data-status", "paused")
    await expect(page.locator('g[data-node="fetch_product"]')).to_have_attribute("data-status", "completed")
    await no_serious_violations(page, "run-waiting")

    # the run page's connection drops and stays down while the run is approved from the inbox (a second tab of
    # the same session, straight to the gateway); when the connection is back, the stream resumes after the last
    # event shown: what happened meanwhile arrives, nothing twice
    proxy.drop_and_hold()
    await expect(page.locator("#live-state")).to_contain_text("reconnecting")
    inbox = await page.context.new_page()
    await inbox.goto(f"{platform.base_url}/ui/approvals")
    card = inbox.locator("li.card", has=inbox.locator(f'a[href="/ui/runs/{run_id}"]'))
    await expect(card).to_be_visible()
    await no_serious_violations(inbox, "approvals")
    await card.get_by_label("Comment (optional)").fill("looks right")
    await card.get_by_role("button", name="Approve").click()
    await expect(inbox.get_by_text("Decision recorded.")).to_be_visible()
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}

    async def status() -> str:
        return str((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json()["status"])

    await wait_until(status, lambda s: s == "completed", timeout=60)
    await expect(timeline).not_to_contain_text("approval_decision_received")  # still cut off
    proxy.resume()

    # back on the run page, never reloaded: the rest of the run arrives, the header follows
    await expect(timeline).to_contain_text("approval_decision_received")
    await expect(timeline).to_contain_text("run_completed")
    await expect(page.get_by_test_id("run-status")).to_have_text("completed")
    await expect(page.get_by_test_id("run-outputs")).to_be_visible()
    await expect(gate).to_have_attribute("data-status", "completed")  # the graph follows the events too
    await expect(page.locator('g[data-node="publish_results"]')).to_have_attribute("data-status", "completed")
    await expect(page.locator("#live-state")).to_contain_text("ended")
    seqs = [int(s) for s in await timeline.locator("li").evaluate_all("items => items.map(i => i.dataset.seq)")]
    assert seqs == list(range(1, len(seqs) + 1)), seqs  # every event once, in order
    run = (await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json()
    assert run["status"] == "completed"
    assert run["output_vars"] is not None
    events = (await platform.client.get(f"/api/runs/{run_id}/events", params={"limit": 500}, headers=bearer)).json()
    assert len(seqs) == events["total"], (seqs, events["total"])  # the page showed them all
    await no_serious_violations(page, "run-completed")

    # the run's other views, each a link of its own
    for tab, expected in (("Checkpoints", "input"), ("Diagnostics", "run_completed"),
                          ("Child runs", "This run started no child runs."),
                          ("Artifacts", "This run has no artifacts.")):
        await page.get_by_role("navigation", name="Run views").get_by_role("link", name=tab).click()
        await expect(page.get_by_role("link", name=tab)).to_have_attribute("aria-current", "page")
        await expect(page.locator("main")).to_contain_text(expected)
        await no_serious_violations(page, f"run-{tab.lower().replace(' ', '-')}")

    # the lists and the dashboard link to it
    await page.goto(f"/ui/runs?procedure_id={pid}&status=completed")
    await expect(page.get_by_test_id("runs-table")).to_contain_text(run_id)
    await expect(page.get_by_test_id("page-range").first).to_contain_text("1–1 of 1")
    await no_serious_violations(page, "runs")
    await page.goto("/ui/")
    await expect(page.get_by_role("heading", name="Runs by status")).to_be_visible()
    await no_serious_violations(page, "dashboard")
    await page.goto(f"/ui/procedures/{pid}")
    await expect(page.get_by_role("link", name="1.0.0")).to_be_visible()
    await no_serious_violations(page, "procedure")
    await page.goto("/ui/settings")
    await expect(page.get_by_test_id("users")).to_contain_text("admin")
    await no_serious_violations(page, "settings")
    await page.goto("/ui/audit?category=auth")
    await expect(page.get_by_test_id("listing")).to_contain_text("login")
    await no_serious_violations(page, "audit")
    await page.context.close()


def asking_for_input(procedure_id: str) -> dict[str, Any]:
    """A document whose only node asks an approver for input data (``provide_input``)."""
    return {"procedure_id": procedure_id, "version": "1.0.0", "workflow_graph": {"start_node": "ask", "nodes": {
        "ask": {"type": "human_approval", "prompt": "Which SKU?", "decision_type": "provide_input",
                "input_schema": {"sku": {"type": "string", "required": True}}, "input_variable": "given",
                "on_approve": "done", "on_reject": "done"},
        "done": {"type": "terminate", "status": "success"}}}}


async def test_input_is_provided_on_the_approval_page(platform: Platform, browser: Browser) -> None:
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"ask-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": asking_for_input(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0"},
                                   headers=bearer)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]

    async def waiting() -> dict[str, Any]:
        return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

    run = await wait_until(waiting, lambda body: body.get("status") == "waiting_approval", timeout=60)
    approval_id = run["waiting_on"]["approval_id"]

    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/runs/{run_id}")
    await page.get_by_role("link", name="an approval", exact=True).click()
    await expect(page).to_have_url(re.compile(rf"/ui/approvals/{approval_id}$"))
    data = page.get_by_label("Input data (JSON)")
    await data.fill("{oops")
    await page.get_by_role("button", name="Approve").click()
    await expect(page.locator("#err-payload")).to_contain_text("Must be valid JSON")
    await expect(data).to_have_value("{oops")
    await data.fill("{}")
    await page.get_by_role("button", name="Approve").click()
    await expect(page.get_by_role("alert")).to_contain_text("sku")  # the API checks the node's input_schema
    await no_serious_violations(page, "approval-input-error")
    await data.fill('{"sku": "A-1"}')
    await page.get_by_label("Comment (optional)").fill("the usual one")
    await page.get_by_role("button", name="Approve").click()
    await expect(page.get_by_test_id("approval-decision")).to_contain_text("approved by user:admin")
    await expect(page.get_by_text('"sku": "A-1"')).to_be_visible()
    await no_serious_violations(page, "approval")
    await page.context.close()


async def test_the_inbox_is_live(platform: Platform, browser: Browser) -> None:
    """An approval requested while the inbox is open appears in it, and leaves it when decided elsewhere."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"live-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": asking_for_input(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start="/ui/approvals")
    await expect(page.get_by_role("heading", name="Approvals")).to_be_visible()
    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0"},
                                   headers=bearer)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    card = page.locator("li.card", has=page.locator(f'a[href="/ui/runs/{run_id}"]'))
    await expect(card).to_be_visible()  # no reload: the approvals stream said so
    approval_id = (await card.get_attribute("id") or "").removeprefix("approval-")
    r = await platform.client.post(f"/api/approvals/{approval_id}/decision",
                                   json={"decision": "approved", "payload": {"sku": "B-2"}}, headers=bearer)
    assert r.status_code == 200, r.text
    await expect(card).to_have_count(0)
    await no_serious_violations(page)
    await page.context.close()


async def test_two_versions_compared(platform: Platform, browser: Browser) -> None:
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    document = json.loads(EXAMPLE.read_text())
    document["procedure_id"] = pid = f"diff-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": document}, headers=bearer)
    assert r.status_code == 201, r.text
    document["version"] = "1.1.0"
    document["workflow_graph"]["nodes"]["approval_gate"]["prompt"] = "Publish product {{product_id}}?"
    r = await platform.client.post("/api/procedures", json={"ckp_json": document}, headers=bearer)
    assert r.status_code == 201, r.text

    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/procedures/{pid}")
    await page.get_by_role("link", name="Compare versions").click()
    await expect(page).to_have_url(re.compile(rf"/ui/procedures/{pid}/diff$"))
    await expect(page.get_by_label("From", exact=True)).to_have_value("1.0.0")
    await expect(page.get_by_label("To", exact=True)).to_have_value("1.1.0")
    await expect(page.get_by_test_id("diff-summary")).to_contain_text("approval_gate")
    changed = page.locator("tr.sbs-changed")
    await expect(changed).to_have_count(2)  # the version and the prompt, each paired with the line it replaces
    await expect(changed.filter(has_text='"version"')).to_contain_text("1.1.0")
    await expect(changed.filter(has_text="Publish product")).to_contain_text("Approve enrichment for product")
    await no_serious_violations(page, "diff")
    await page.get_by_label("From", exact=True).select_option("1.1.0")
    await page.get_by_role("button", name="Compare").click()
    await expect(page).to_have_url(re.compile(r"from=1\.1\.0&to=1\.1\.0$"))  # a link one can share
    await expect(page.get_by_test_id("diff-identical")).to_be_visible()
    await page.context.close()


async def test_a_webhook_trigger_created_and_fired(platform: Platform, browser: Browser,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """On a version's Trigger tab: a webhook registration (its missing secret named first), a manual fire from
    the inputs form, one signed delivery from outside; both fires are listed with their runs."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"hook-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": procedure_doc(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    r = await platform.client.patch(f"/api/procedures/{pid}/1.0.0/status", json={"status": "active"},
                                    headers=bearer)
    assert r.status_code == 200, r.text
    secret_name, key = f"{pid.replace('-', '_')}_key", uuid.uuid4().hex
    monkeypatch.setenv(f"LANGORCH_SECRET_{secret_name.upper()}", key)

    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/procedures/{pid}/1.0.0")
    await page.get_by_role("navigation", name="Version views").get_by_role("link", name="Trigger").click()
    await expect(page).to_have_url(re.compile(rf"/ui/procedures/{pid}/1\.0\.0/trigger$"))
    await expect(page.get_by_test_id("registration")).to_have_text("This version has no trigger registration.")
    await page.get_by_label("Type").select_option("webhook")
    await page.get_by_role("button", name="Create").click()
    await expect(page.locator("#err-webhook_secret")).to_be_visible()  # the API names the missing field
    await expect(page.get_by_label("Webhook secret name")).to_have_attribute("aria-invalid", "true")
    await no_serious_violations(page, "version-trigger-errors")
    await page.get_by_label("Webhook secret name").fill(secret_name)
    await page.get_by_role("button", name="Create").click()
    await expect(page.get_by_text("The registration is saved.")).to_be_visible()
    hook_url = f"{platform.base_url}/api/triggers/webhook/{pid}"
    await expect(page.get_by_test_id("webhook-url")).to_have_text(hook_url)
    await expect(page.get_by_test_id("sign-example")).to_contain_text(f"--url {hook_url}")

    await page.get_by_label(re.compile(r"^greeting")).fill("fired in the console")
    await page.get_by_role("button", name="Fire now").click()
    fired = page.get_by_test_id("fired")
    await expect(fired).to_contain_text("was created")
    manual_run = (await fired.get_by_role("link").text_content() or "").strip()

    body = b'{"greeting": "from a sender"}'
    async with httpx.AsyncClient() as sender:
        delivered = await sender.post(hook_url, content=body, headers={"Content-Type": "application/json",
                                                                       **signature_headers(key, body)})
    assert delivered.status_code == 202, delivered.text
    hook_run = delivered.json()["run_id"]
    await page.reload()
    fires = page.get_by_test_id("fires")
    await expect(fires.locator("tbody tr")).to_have_count(2)
    await expect(fires.locator("tbody tr").nth(0)).to_contain_text(hook_run)  # newest first
    await expect(fires.locator("tbody tr").nth(1)).to_contain_text(manual_run)
    await no_serious_violations(page, "version-trigger")
    await fires.get_by_role("link", name=hook_run).click()
    await expect(page.get_by_test_id("run-status")).to_have_text("completed")

    # the triggers list offers the row's actions: disable it there
    await page.goto(f"/ui/triggers?procedure_id={pid}")
    await no_serious_violations(page, "triggers-actions")
    await page.get_by_role("button", name=f"Disable {pid} 1.0.0").click()
    await expect(page.get_by_test_id("action-done")).to_contain_text("Disable")
    await expect(page.get_by_role("button", name=f"Enable {pid} 1.0.0")).to_be_visible()
    await page.goto("/ui/projects")
    await no_serious_violations(page)
    await page.context.close()


async def test_a_run_replayed_with_the_slider(platform: Platform, browser: Browser) -> None:
    """Moving the replay slider back shows an earlier node status and each earlier value of a variable two steps
    changed, without leaving the page."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"replay-{uuid.uuid4().hex[:8]}"
    document = procedure_doc(pid)
    document["workflow_graph"]["nodes"]["start"]["steps"] += [
        {"step_id": "one", "action": "set_variable", "variable": "count", "value": 1},
        {"step_id": "two", "action": "set_variable", "variable": "count", "value": 2}]
    r = await platform.client.post("/api/procedures", json={"ckp_json": document}, headers=bearer)
    assert r.status_code == 201, r.text
    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0",
                                                      "input_vars": {"greeting": "replayed"}}, headers=bearer)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]

    async def run() -> dict[str, Any]:
        return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

    await wait_until(run, lambda body: body.get("status") == "completed", timeout=60)
    events = (await platform.client.get(f"/api/runs/{run_id}/events", headers=bearer)).json()
    total = events["total"]
    wrote = {e["step_id"]: e["seq"] for e in events["items"] if e["event_type"] == "step_completed"}

    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/runs/{run_id}")
    await page.get_by_role("navigation", name="Run views").get_by_role("link", name="Replay").click()
    await expect(page).to_have_url(re.compile(rf"/ui/runs/{run_id}/replay$"))
    position = page.get_by_test_id("replay-position")
    await expect(position).to_contain_text(f"of {total}: run_completed")
    start = page.locator('#replay-graph-title ~ g.node[data-node="start"]')
    await expect(start).to_have_attribute("data-status", "completed")
    greeting = page.locator('tr[data-variable="greeting"]')
    await expect(greeting).to_contain_text('"replayed"')
    count = page.locator('tr[data-variable="count"]')

    async def counted(value: str, step: str) -> None:
        await expect(count.locator("td").nth(0)).to_have_text(value)
        await expect(count.locator("td").nth(1)).to_have_text(f"written by start · {step} (event #{wrote[step]})")

    await counted("2", "two")
    await no_serious_violations(page, "run-replay")

    slider = page.get_by_role("slider", name="After event")
    await slider.fill(str(wrote["one"]))  # in place (htmx): the value the first step wrote
    await expect(position).to_contain_text(f"#{wrote['one']} of {total}: step_completed at start · one")
    await counted("1", "one")
    await expect(start).to_have_attribute("data-status", "running")
    await slider.fill(str(wrote["two"]))
    await counted("2", "two")
    await slider.fill("1")  # back to the run's creation
    await expect(position).to_contain_text(f"#1 of {total}: run_created")
    await expect(start).to_have_attribute("data-status", "not_started")
    await expect(greeting).to_contain_text("input (event #1)")
    await expect(count).to_have_count(0)  # not written yet
    await expect(page).to_have_url(re.compile(rf"/ui/runs/{run_id}/replay\?at=1$"))  # a link one can share
    await slider.fill("0")
    await expect(position).to_contain_text(f"Before the first event (0 of {total})")
    await expect(page.get_by_text("No variable is known yet.")).to_be_visible()
    await no_serious_violations(page)
    await page.context.close()


def graph_shape(procedure_id: str) -> dict[str, Any]:
    """A condition, a loop with its body, an approval whose rejection goes back to the start (a cycle) and a
    terminate node: the shapes the graph draws."""
    return {"procedure_id": procedure_id, "version": "1.0.0",
            "variables_schema": {"mode": {"type": "string", "default": "all"}},
            "workflow_graph": {"start_node": "prepare", "nodes": {
                "prepare": {"type": "sequence", "description": "List the SKUs to visit", "next_node": "route",
                            "steps": [{"step_id": "list", "action": "set_variable", "variable": "skus",
                                       "value": ["A-1", "B-2", "C-3"]}]},
                "route": {"type": "logic", "description": "Skip or visit", "default_next_node": "each",
                          "rules": [{"condition": "{{mode}} == 'skip'", "next_node": "done"}]},
                "each": {"type": "loop", "description": "Visit every SKU", "iterator": "skus",
                         "iterator_variable": "sku", "index_variable": "position", "body_node": "visit",
                         "next_node": "gate"},
                "visit": {"type": "sequence", "description": "Visit one SKU",
                          "steps": [{"step_id": "note", "action": "log", "message": "visiting {{sku}}"}]},
                "gate": {"type": "human_approval", "description": "Ship them?", "prompt": "Ship them?",
                         "decision_type": "approve_reject", "on_approve": "done", "on_reject": "prepare"},
                "done": {"type": "terminate", "status": "success"}}}}


DRAWN = """container => {
  const svg = container.querySelector("svg");
  const number = (el, name) => Number(el.getAttribute(name));
  return {
    dagre: window.dagre ? window.dagre.version : null, layout: svg.dataset.layout, role: svg.getAttribute("role"),
    svgs: container.querySelectorAll("svg").length,
    nodes: Array.from(svg.querySelectorAll("g.node")).map(g => {
      const r = g.querySelector("rect");
      return {id: g.dataset.node, cls: g.getAttribute("class"), x: number(r, "x"), y: number(r, "y"),
              w: number(r, "width"), h: number(r, "height"), link: g.querySelector("a")?.getAttribute("href")};
    }),
    edges: Array.from(svg.querySelectorAll("path.edge")).map(p => ({
      id: p.dataset.edge, source: p.dataset.source, target: p.dataset.target, cls: p.getAttribute("class"),
      d: p.getAttribute("d")})),
    labels: Array.from(svg.querySelectorAll("text.edge-label")).map(t => t.dataset.edgeLabel),
  };
}"""


async def drawn_graph(page: Page, graph_id: str) -> dict[str, Any]:
    """The graph as the page drew it (after dagre's layout): nodes with their boxes, edges, edge labels."""
    container = page.locator(f'[data-graph="{graph_id}"]')
    await expect(container.locator('svg[data-layout="dagre"]')).to_have_count(1)
    drawn: dict[str, Any] = await container.evaluate(DRAWN)
    return drawn


def assert_laid_out(drawn: dict[str, Any], api_graph: dict[str, Any]) -> None:
    """Every node once, no two boxes overlapping, one path per edge of the API's graph, a label per labelled edge."""
    assert drawn["dagre"] == "3.1.4", drawn  # the vendored dagre laid it out
    assert drawn["layout"] == "dagre"
    assert drawn["svgs"] == 1  # the server's drawing was replaced
    boxes = drawn["nodes"]
    assert sorted(b["id"] for b in boxes) == sorted(n["id"] for n in api_graph["nodes"])
    for i, a in enumerate(boxes):
        for b in boxes[i + 1:]:
            apart = (a["x"] + a["w"] <= b["x"] or b["x"] + b["w"] <= a["x"] or a["y"] + a["h"] <= b["y"]
                     or b["y"] + b["h"] <= a["y"])
            assert apart, (a, b)
    assert sorted((e["id"], e["source"], e["target"]) for e in drawn["edges"]) == sorted(
        (e["id"], e["source"], e["target"]) for e in api_graph["edges"])
    assert all(e["d"].startswith("M") for e in drawn["edges"])
    named = {"default", "approve", "reject", "timeout", "fallback", "on_failure", "loop_body"}  # by their kind
    assert sorted(drawn["labels"]) == sorted(e["id"] for e in api_graph["edges"] if e["label"] or e["kind"] in named)


async def fill_of(page: Page, graph_id: str, node_id: str) -> str:
    rect = page.locator(f'[data-graph="{graph_id}"] g[data-node="{node_id}"] rect')
    return str(await rect.evaluate("r => getComputedStyle(r).fill"))


async def test_graphs_are_laid_out_by_dagre_and_follow_the_run(platform: Platform, browser: Browser) -> None:
    """The version's graph and the run's are laid out by the vendored dagre from the API's graph JSON; on the run
    page a node's status (and colour) changes in place as the run goes on, with keyboard focus kept on the node's
    link, which leads to the node's events; the replay draws the graph at any position and shows each loop
    iteration's item."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"graph-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": graph_shape(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    api_graph = (await platform.client.get(f"/api/procedures/{pid}/1.0.0/graph", headers=bearer)).json()
    assert {e["kind"] for e in api_graph["edges"]} >= {"condition", "default", "loop_body", "approve", "reject"}

    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/procedures/{pid}/1.0.0")
    drawn = await drawn_graph(page, "version-graph")
    assert_laid_out(drawn, api_graph)
    assert drawn["role"] == "img"
    assert not any(n["link"] for n in drawn["nodes"])
    kinds = {(e["source"], e["target"]): e["cls"] for e in drawn["edges"]}
    assert "edge-back" in kinds[("gate", "prepare")]
    assert "edge-back" not in kinds[("prepare", "route")]
    assert "edge-loop_body" in kinds[("each", "visit")]
    classes = {n["id"]: n["cls"] for n in drawn["nodes"]}
    assert "node-start" in classes["prepare"]
    assert "node-terminate" in classes["done"]
    await no_serious_violations(page)
    if SCREENSHOTS:
        await page.locator('[data-graph="version-graph"]').screenshot(path=str(Path(SCREENSHOTS) / "graph-version.png"))

    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0"},
                                   headers=bearer)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]

    async def run() -> dict[str, Any]:
        return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

    waiting = await wait_until(run, lambda body: body.get("status") == "waiting_approval", timeout=60)
    await page.goto(f"/ui/runs/{run_id}")
    gate = page.locator('[data-graph="run-graph"] g[data-node="gate"]')
    await expect(gate).to_have_attribute("data-status", "paused")
    assert_laid_out(await drawn_graph(page, "run-graph"), api_graph)
    paused_fill = await fill_of(page, "run-graph", "gate")
    await expect(page.locator('[data-graph="run-graph"] g[data-node="each"]')).to_have_attribute("data-status",
                                                                                               "completed")
    link = gate.locator("a")
    await expect(link).to_have_attribute("href", f"/ui/runs/{run_id}?node=gate#timeline-heading")
    await link.focus()
    await page.locator('[data-graph="run-graph"] svg').evaluate("svg => { svg.dataset.mark = 'first'; }")
    await no_serious_violations(page)

    r = await platform.client.post(f"/api/approvals/{waiting['waiting_on']['approval_id']}/decision",
                                   json={"decision": "approved"}, headers=bearer)
    assert r.status_code == 200, r.text
    await expect(gate).to_have_attribute("data-status", "completed")  # live, over the run's event stream
    await expect(page.locator('[data-graph="run-graph"] g[data-node="done"]')).to_have_attribute("data-status",
                                                                                               "completed")
    assert await fill_of(page, "run-graph", "gate") != paused_fill  # the colour follows the status
    # changed in place: the same drawing, the focus still on the gate's link
    await expect(page.locator('[data-graph="run-graph"] svg[data-mark="first"]')).to_have_count(1)
    assert await link.evaluate("a => document.activeElement === a")
    await no_serious_violations(page)
    if SCREENSHOTS:
        await page.locator('[data-graph="run-graph"]').screenshot(path=str(Path(SCREENSHOTS) / "graph-run.png"))
    await page.keyboard.press("Enter")  # the node's events
    await expect(page).to_have_url(re.compile(rf"/ui/runs/{run_id}\?node=gate#timeline-heading$"))
    await expect(page.locator("#timeline li").first).to_have_attribute("data-node", "gate")

    # the replay: the graph drawn again at each position, and each iteration's item
    events = (await platform.client.get(f"/api/runs/{run_id}/events", params={"limit": 500},
                                        headers=bearer)).json()["items"]
    iterations = [e["seq"] for e in events if e["event_type"] == "loop_iteration"]
    assert len(iterations) == 3
    await page.goto(f"/ui/runs/{run_id}/replay?at={iterations[1]}")
    sku = page.locator('tr[data-variable="sku"]')
    await expect(sku.locator("td").nth(0)).to_have_text('"B-2"')
    await expect(sku.locator("td").nth(1)).to_have_text(f"loop each, iteration 2 of 3 (event #{iterations[1]})")
    await expect(page.locator('tr[data-variable="position"] td').nth(0)).to_have_text("1")
    assert_laid_out(await drawn_graph(page, "replay-graph"), api_graph)
    each = page.locator('[data-graph="replay-graph"] g[data-node="each"]')
    await expect(each).to_have_attribute("data-status", "running")
    await page.get_by_role("slider", name="After event").fill(str(iterations[2]))  # in place (htmx)
    await expect(sku.locator("td").nth(0)).to_have_text('"C-3"')
    await expect(page.locator('[data-graph="replay-graph"] svg[data-layout="dagre"]')).to_have_count(1)
    await page.get_by_role("slider", name="After event").fill("1")
    await expect(each).to_have_attribute("data-status", "not_started")
    await expect(page.locator('[data-graph="replay-graph"] svg[data-layout="dagre"]')).to_have_count(1)
    await no_serious_violations(page)
    await page.context.close()


async def test_the_other_pages_of_the_console(platform: Platform, browser: Browser) -> None:
    """The pages no journey above passes through, each with content in it: the procedures list, a version's Explain
    tab, a run's rerun form, the history cleanup, agents (one registered), leases and projects (one created) — axe
    on each, and each one's screenshot (docs/operations/console-screenshots.md)."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid, run_id = await example_run(platform, bearer, "tour")
    r = await platform.client.post("/api/projects", json={"name": f"Catalogue {pid[5:]}",
                                                          "description": "Product data pipelines"}, headers=bearer)
    assert r.status_code == 201, r.text
    page = await new_page(browser, platform.base_url)
    await sign_in(page, "admin", ADMIN_PASSWORD)
    async with serving(ScriptedAgent({"enrich_product": lambda _: {"ok": True}})) as agent:
        r = await platform.client.post("/api/agents", json={"name": f"enricher-{pid[5:]}", "channel": "tour",
                                                            "base_url": agent.base_url,
                                                            "capabilities": list(agent.handlers)}, headers=bearer)
        assert r.status_code == 201, r.text
        for path, shown, shot in (
                ("/ui/procedures", pid, "procedures"),
                (f"/ui/procedures/{pid}/1.0.0/explain", "approval_gate", "version-explain"),
                (f"/ui/runs/{run_id}/rerun", "product_id", "run-rerun"),
                ("/ui/runs/cleanup", "Preview", "runs-cleanup"),
                ("/ui/agents", f"enricher-{pid[5:]}", "agents"),
                ("/ui/leases", "Leases", "leases"),
                ("/ui/projects", f"Catalogue {pid[5:]}", "projects")):
            await page.goto(path)
            await expect(page.get_by_role("heading", level=1)).to_be_visible()
            await expect(page.locator("main")).to_contain_text(shown)
            await no_serious_violations(page, shot)
    await page.context.close()


class GatewayProcess:
    """``langorch serve gateway`` in a process of its own on one fixed port, against the test's NATS and PostgreSQL
    and with the test platform's auth settings (a session cookie it signed stays valid across restarts): killed
    without a goodbye to any client (SIGKILL), then started again on the same port."""

    def __init__(self, nats_url: str, database_url: str) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**{k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")},
                    "LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
                    "LANGORCH_PORT": str(self.port), "LANGORCH_AUTH_ENABLED": "true",
                    "LANGORCH_AUTH_SECRET_KEY": SECRET_KEY, "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD": ADMIN_PASSWORD,
                    "LANGORCH_LOG_LEVEL": "WARNING"}
        self.proc: subprocess.Popen[bytes] | None = None

    async def start(self) -> None:
        self.proc = proc = subprocess.Popen([sys.executable, "-m", "langorch", "serve", "gateway"], cwd=ROOT,
                                            env=self.env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                            start_new_session=True)

        async def ready() -> int:
            assert proc.poll() is None, "the gateway process exited"
            try:
                async with httpx.AsyncClient(timeout=10) as client:
                    return (await client.get(f"{self.url}/api/ready")).status_code
            except httpx.TransportError:
                return 0

        await wait_until(ready, lambda status: status == 200, timeout=120)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=30)
        self.proc = None


def gated(procedure_id: str) -> dict[str, Any]:
    """A step, an approval gate, then three steps: what follows the gate happens only once it is decided."""
    return {"procedure_id": procedure_id, "version": "1.0.0", "workflow_graph": {"start_node": "before", "nodes": {
        "before": {"type": "sequence", "next_node": "gate",
                   "steps": [{"step_id": "hello", "action": "log", "message": "before the gate"}]},
        "gate": {"type": "human_approval", "prompt": "Go on?", "decision_type": "approve_reject",
                 "on_approve": "after", "on_reject": "after"},
        "after": {"type": "sequence", "next_node": "done",
                  "steps": [{"step_id": f"s{i}", "action": "log", "message": f"after {i}"} for i in range(3)]},
        "done": {"type": "terminate", "status": "success"}}}}


async def test_the_timeline_resumes_after_the_gateway_restarts(platform: Platform, browser: Browser,
                                                               module_nats_url: str, module_database_url: str) -> None:
    """The gateway process serving the run page is killed while the run waits; the run goes on meanwhile (decided
    through another gateway); when the process is back on the same port, the page — never reloaded — reconnects
    after the last event it showed and its timeline ends with every event exactly once, in order."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"restart-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": gated(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    gateway = GatewayProcess(module_nats_url, module_database_url)
    try:
        await gateway.start()
        page = await new_page(browser, gateway.url)
        await sign_in(page, "admin", ADMIN_PASSWORD)
        r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0"},
                                       headers=bearer)
        assert r.status_code == 201, r.text
        run_id = r.json()["run_id"]
        await page.goto(f"/ui/runs/{run_id}")
        timeline = page.locator("#timeline")
        await expect(timeline).to_contain_text("approval_requested")
        await expect(page.locator("#live-state")).to_contain_text("Live")

        gateway.kill()
        await expect(page.locator("#live-state")).to_contain_text("reconnecting")

        async def run() -> dict[str, Any]:
            return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

        waiting = await wait_until(run, lambda body: body.get("status") == "waiting_approval", timeout=60)
        r = await platform.client.post(f"/api/approvals/{waiting['waiting_on']['approval_id']}/decision",
                                       json={"decision": "approved"}, headers=bearer)
        assert r.status_code == 200, r.text
        await wait_until(run, lambda body: body.get("status") == "completed", timeout=60)
        await expect(timeline).not_to_contain_text("approval_decision_received")  # the page's server is down

        await gateway.start()
        await expect(timeline).to_contain_text("run_completed")  # the browser retries a refused connection every 3 s
        await expect(page.locator("#live-state")).to_contain_text("ended")
        await expect(page.get_by_test_id("run-status")).to_have_text("completed")
        seqs = [int(s) for s in await timeline.locator("li").evaluate_all("items => items.map(i => i.dataset.seq)")]
        events = (await platform.client.get(f"/api/runs/{run_id}/events", params={"limit": 500},
                                            headers=bearer)).json()
        assert seqs == list(range(1, events["total"] + 1)), seqs  # every event once, in order, none missing
        await page.context.close()
    finally:
        gateway.kill()


async def test_a_stream_refused_by_a_proxy_is_opened_again_promptly(platform: Platform, browser: Browser) -> None:
    """A proxy in front of the gateway answers 502 while its upstream is away: the browser gives the stream up (a
    network error, by contrast, it retries itself every 3 s). The console opens it again after 0.5, 1, 2, 4, then
    at most every 5 s (htmx's SSE extension would wait up to 64 s), and once the proxy passes requests again the
    timeline resumes after the last event shown: every event once, in order."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    pid = f"proxied-{uuid.uuid4().hex[:8]}"
    r = await platform.client.post("/api/procedures", json={"ckp_json": gated(pid)}, headers=bearer)
    assert r.status_code == 201, r.text
    r = await platform.client.post("/api/runs", json={"procedure_id": pid, "procedure_version": "1.0.0"},
                                   headers=bearer)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    proxy = DroppingProxy(int(platform.base_url.rsplit(":", 1)[1]))
    async with proxy as through_proxy:
        page = await new_page(browser, through_proxy)
        await sign_in(page, "admin", ADMIN_PASSWORD, start=f"/ui/runs/{run_id}")
        timeline = page.locator("#timeline")
        await expect(timeline).to_contain_text("approval_requested")
        await expect(page.locator("#live-state")).to_contain_text("Live")

        async def run() -> dict[str, Any]:
            return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

        waiting = await wait_until(run, lambda body: body.get("status") == "waiting_approval", timeout=60)
        proxy.drop_and_hold(answer_502=True)
        await expect(page.locator("#live-state")).to_contain_text("reconnecting in 0.5 s")
        r = await platform.client.post(f"/api/approvals/{waiting['waiting_on']['approval_id']}/decision",
                                       json={"decision": "approved"}, headers=bearer)
        assert r.status_code == 200, r.text  # the run goes on meanwhile
        await expect(page.locator("#live-state")).to_contain_text("reconnecting in 5 s")  # the wait's cap
        await expect(timeline).not_to_contain_text("approval_decision_received")  # still cut off
        proxy.resume()
        await expect(timeline).to_contain_text("run_completed")
        await expect(page.locator("#live-state")).to_contain_text("ended")
        seqs = [int(s) for s in await timeline.locator("li").evaluate_all("items => items.map(i => i.dataset.seq)")]
        events = (await platform.client.get(f"/api/runs/{run_id}/events", params={"limit": 500},
                                            headers=bearer)).json()
        assert seqs == list(range(1, events["total"] + 1)), seqs  # every event once, in order, none missing
        await page.context.close()


@pytest.mark.parametrize("role", ["viewer", "approver"])
async def test_actions_are_offered_by_role(platform: Platform, browser: Browser, role: str) -> None:
    """A viewer is offered no mutating action; an approver only the decision on a pending approval."""
    bearer = {"Authorization": f"Bearer {await admin_token(platform)}"}
    name, password = f"{role}{uuid.uuid4().hex[:8]}", f"{role}-password-" + uuid.uuid4().hex[:6]
    r = await platform.client.post("/api/users", json={"username": name, "email": f"{name}@example.com",
                                                       "password": password, "roles": [role]}, headers=bearer)
    assert r.status_code == 201, r.text
    pid, run_id = await example_run(platform, bearer, role)

    async def waiting() -> dict[str, Any]:
        return dict((await platform.client.get(f"/api/runs/{run_id}", headers=bearer)).json())

    await wait_until(waiting, lambda run: run.get("status") == "waiting_approval", timeout=60)

    page = await new_page(browser, platform.base_url)
    await sign_in(page, name, password)
    for path in ("/ui/", "/ui/runs", "/ui/procedures", f"/ui/procedures/{pid}/1.0.0",
                 f"/ui/procedures/{pid}/1.0.0/trigger", f"/ui/runs/{run_id}",
                 "/ui/approvals", "/ui/agents", "/ui/leases", "/ui/projects", "/ui/triggers",
                 "/ui/audit?category=auth", "/ui/settings"):
        await page.goto(path)
        await expect(page.get_by_role("heading", level=1)).to_be_visible()
        posts = await page.locator("form[method=post]").evaluate_all("forms => forms.map(f => f.action)")
        offered = [p.removeprefix(platform.base_url) for p in posts if not p.endswith("/ui/logout")]
        decisions = [p for p in offered if re.fullmatch(r"/ui/approvals/[0-9a-f-]+/decision", p)]
        assert offered == decisions, (path, offered)  # nothing but decisions, and those only for an approver
        for label in ("Import", "Start run", "Cancel run", "Retry run", "Delete run"):
            await expect(page.get_by_role("button", name=label, exact=True)).to_have_count(0)
        if path == "/ui/approvals":
            card = page.locator("li.card", has=page.locator(f'a[href="/ui/runs/{run_id}"]'))
            await expect(card).to_be_visible()
            await expect(card.get_by_role("button", name="Approve")).to_have_count(1 if role == "approver" else 0)
            await expect(card.get_by_role("button", name="Reject")).to_have_count(1 if role == "approver" else 0)
        else:
            assert not decisions, path
        await no_serious_violations(page)
    await page.context.close()
