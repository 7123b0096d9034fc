"""``multi_agent_invoice.ckp.json`` RUN end to end on the real platform (examples/README.md), not only compiled.

Every channel of the document is a real HTTP agent (``ScriptedAgent``): EMAIL (search, download, compose, send),
WEB (the vendor portal), DESKTOP (SAP FB60) and DATABASE (the audit insert); its ``llm_action`` calls the real
OpenAI-compatible server of ``tests/llm_server.py`` (model ``gpt-4``, as the document asks); its
``human_approval`` is answered through the approvals API. The email attachment is a real XLSX workbook that the
document's ``parse_excel_data`` reads (ckp.md §4.3).

Scenarios: the happy path (loop with collect, verification with a ``warn`` check, LLM enrichment, ERP, database,
emails, summary transform, terminate outputs); the "no invoices" route; more than ten invoices → manager approval
rejected, and the manager's timeout escalated to an executive who rejects; transient failures healed by the
document's own handlers (EMAIL retry policy, DESKTOP retry with recovery steps, the LLM ``retry``); an inbox with
no invoice mail failing the ``fail_workflow`` validation into ``global_config.on_failure`` and the failure
terminate; an inactive vendor, and an ERP window that never appears (the handler's retries used up), each failing
only their loop iteration (``continue_on_error``); the runtime SIGKILLed in the middle of the ERP entry and a new
one resuming from the last checkpoint without executing any call twice.

The document's many ``wait_after_ms`` make one invoice take about 20 s of the run's own pauses: the runtimes here
sleep a twentieth of each pause (``LANGORCH_TIME_SCALE``); events still carry the document's delays, and timeouts,
approval timeouts and the rate limit keep real time.
"""

from __future__ import annotations

import asyncio
import base64
import copy
import io
import json
import re
import subprocess
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import openpyxl
import pytest

from tests.helpers import Platform, events_of, example, imported, platform_of, register_agent, start_run, wait_status
from tests.llm_server import DEFAULT_USAGE, LlmServerState, RunningLlmServer, running_llm_server
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving
from tests.test_chaos import instance, kill, logs, run_events, runtimes, start_runtime, wait_terminal

pytestmark = pytest.mark.integration

DOC = example("multi_agent_invoice.ckp.json")
PID, VERSION = DOC["procedure_id"], DOC["version"]
DATE = "2026-11-27"
RUN_TIMEOUT_S = 150  # one invoice is ~20 s of the document's own wait_after_ms at real time
TIME_SCALE = 0.05  # the runtime sleeps 1 s of them

INVOICES = [
    {"invoice_number": "INV-1001", "vendor": "Acme Supplies", "amount": 1250.5,
     "requester_email": "buyer.one@company.com"},
    {"invoice_number": "INV-1002", "vendor": "Globex", "amount": 980, "requester_email": "buyer.two@company.com"},
]
METADATA = {
    "INV-1001": {"vendor_code": "V-ACME", "vendor_name": "Acme Supplies Ltd", "invoice_date": "2026-11-20",
                 "due_date": "2026-12-20", "line_items": [{"sku": "P-1", "qty": 5}], "tax_amount": 199.66},
    "INV-1002": {"vendor_code": "V-GLOBEX", "vendor_name": "Globex Corporation", "invoice_date": "2026-11-21",
                 "due_date": "2026-12-21", "line_items": [{"sku": "G-9", "qty": 1}], "tax_amount": 156.47},
}
CONFIDENCE = {"INV-1001": 96, "INV-1002": 88}
# the document names Azure Key Vault (secrets_config.provider azure_keyvault); the operator's metadata records of
# the two names point at the env provider instead, and a record wins over the procedure (docs/operations/secrets.md)
PORTAL_SECRET = {"username": "ap-robot", "password": "Portal-PW-unique-4711"}
DB_SECRET = "Server=erp-db;Database=ap;Password=DB-PW-unique-0815"
GRANT = re.compile(r"^[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}$")


def workbook(rows: list[dict[str, Any]]) -> str:
    """An XLSX attachment (base64) with a header row and one row per invoice."""
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    columns = ["invoice_number", "vendor", "amount", "requester_email"]
    sheet.append(columns)
    for row in rows:
        sheet.append([row[c] for c in columns])
    out = io.BytesIO()
    book.save(out)
    return base64.b64encode(out.getvalue()).decode()


@dataclass
class Channels:
    """The four agents and what they have been asked; ``portal`` is what the vendor portal shows per invoice."""

    invoices: list[dict[str, Any]]
    emails_found: bool = True
    portal: dict[str, dict[str, Any]] = field(default_factory=dict)
    failures: Counter[str] = field(default_factory=Counter)  # action → failures still to answer
    failure_codes: dict[str, str] = field(default_factory=dict)
    clipboard: Iterator[int] = field(default_factory=lambda: iter(range(5100000001, 5100000100)))
    gateway: str = ""  # where agents redeem credential grants (api.md §15.3)
    redeemed: list[Any] = field(default_factory=list)
    email: ScriptedAgent = field(init=False)
    web: ScriptedAgent = field(init=False)
    desktop: ScriptedAgent = field(init=False)
    database: ScriptedAgent = field(init=False)

    def __post_init__(self) -> None:
        self.email = ScriptedAgent({
            "search_email": self.search_email, "download_attachment": self.download_attachment,
            "compose_email": lambda b: {"draft_id": f"draft-{len(self.email.requests)}", **b["params"]},
            "send_email": lambda b: {"message_id": f"<sent-{len(self.email.requests)}@company.com>",
                                     "accepted": True}})
        self.web = ScriptedAgent({
            "navigate": lambda b: {"url": b["params"]["url"], "title": "Vendor Portal"},
            "type": self.web_type, "click": lambda b: {"clicked": b["params"]["target"]},
            "wait_for_element": lambda b: {"found": b["params"]["target"]},
            "extract_table_data": self.extract_table_data,
            "take_screenshot": lambda b: {"screenshot": f"https://vendor.portal.com/shots/{b['step_id']}-"
                                                        f"{len(self.web.requests)}.png"}})
        self.desktop = ScriptedAgent({
            **{a: self.desktop_ok for a in ("launch_app", "wait_for_window", "activate_window", "type",
                                            "press_key", "wait_for_dialog", "press_keys")},
            "copy_to_clipboard": lambda b: str(next(self.clipboard)),
            "screenshot": lambda b: {"screenshot": f"file:///C:/Temp/erp-{len(self.desktop.requests)}.png"}})
        self.database = ScriptedAgent({"execute_query": self.execute_query})

    async def redeem(self, grant: str) -> Any:
        """What an agent does with a credential grant: exchange it at the gateway for the value, now."""
        claims = json.loads(base64.urlsafe_b64decode(grant.split(".")[1] + "=="))
        async with httpx.AsyncClient(base_url=self.gateway) as client:
            r = await client.get(f"/api/agent-credentials/{claims['secret_name']}",
                                 headers={"Authorization": f"Bearer {grant}"})
        assert r.status_code == 200, r.text
        self.redeemed.append(r.json()["value"])
        return r.json()["value"]

    async def web_type(self, body: dict[str, Any]) -> dict[str, Any]:
        value = body["params"]["value"]
        if isinstance(value, str) and GRANT.match(value):
            await self.redeem(value)
        return {"typed": True}

    async def execute_query(self, body: dict[str, Any]) -> dict[str, Any]:
        await self.redeem(body["params"]["connection_string"])
        return {"rows_affected": 1}

    def fail_first(self, action: str, code: str, times: int = 1) -> None:
        self.failures[action] = times
        self.failure_codes[action] = code

    def maybe_fail(self, action: str) -> None:
        if self.failures[action] > 0:
            self.failures[action] -= 1
            raise AgentFailure(f"{action} failed", code=self.failure_codes[action], retryable=False)

    def search_email(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        self.maybe_fail("search_email")
        if not self.emails_found:
            return []
        return [{"message_id": "<inv-batch@vendors.example>", "subject": "Invoice batch",
                 "attachments": ["invoices.xlsx"]}]

    def download_attachment(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        if not body["params"]["target"]:
            return []
        return [{"file_name": "invoices.xlsx", "content_base64": workbook(self.invoices)}]

    def extract_table_data(self, body: dict[str, Any]) -> dict[str, Any]:
        # the portal row of the invoice typed into #invoice-search just before (the agent's browser state)
        typed = [r["params"]["value"] for r in self.web.requests
                 if r["action"] == "type" and r["params"].get("target") == "#invoice-search"][-1]
        return self.portal[typed]

    def desktop_ok(self, body: dict[str, Any]) -> dict[str, Any]:
        self.maybe_fail(body["action"])
        return {"ok": True}

    def all(self) -> list[tuple[str, ScriptedAgent]]:
        return [("email", self.email), ("web", self.web), ("desktop", self.desktop), ("database", self.database)]


def active_portal(invoices: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {i["invoice_number"]: {"invoice_number": i["invoice_number"], "vendor_status": "Active",
                                  "amount": i["amount"]} for i in invoices}


def completion(invoice_number: str) -> tuple[int, Any, dict[str, str]]:
    """A scripted chat completion whose content is the JSON the document's ``json_extract`` outputs read."""
    text = json.dumps({"metadata": METADATA[invoice_number], "confidence": CONFIDENCE[invoice_number]})
    return 200, {"id": f"chatcmpl-{invoice_number}", "object": "chat.completion", "model": "gpt-4",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}], "usage": DEFAULT_USAGE}, {}


@pytest.fixture
async def llm() -> AsyncIterator[RunningLlmServer]:
    async with running_llm_server(LlmServerState()) as server:
        yield server


MODELS = {"gpt-4": {"prompt_usd_per_1k": 0.03, "completion_usd_per_1k": 0.06}}


@pytest.fixture
def secrets_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_SECRET_VENDOR_PORTAL_CREDS", json.dumps(PORTAL_SECRET))
    monkeypatch.setenv("LANGORCH_SECRET_DB_CONNECTION", DB_SECRET)


@pytest.fixture
async def platform(nats_url: str, database_url: str, llm: RunningLlmServer,
                   secrets_env: None) -> AsyncIterator[Platform]:
    # the runtime's LLM endpoint is the test server; the document asks for model gpt-4
    async with platform_of(nats_url, database_url, runtime_settings={
            "llm_base_url": llm.base_url(), "llm_models": MODELS, "llm_default_model": "gpt-4",
            "time_scale": TIME_SCALE}) as p:
        await env_records(p.client)
        yield p


async def env_records(c: httpx.AsyncClient) -> None:
    """The metadata records that send the document's two secret names to the env provider."""
    for name in ("vendor-portal-creds", "db_connection"):
        r = await c.post("/api/secrets", json={"name": name, "provider": "env"})
        assert r.status_code == 201, r.text


@asynccontextmanager
async def agents_of(c: httpx.AsyncClient, channels: Channels) -> AsyncIterator[Channels]:
    channels.gateway = str(c.base_url)
    async with AsyncExitStack() as stack:
        for channel, agent in channels.all():
            await stack.enter_async_context(serving(agent))
            await register_agent(c, agent, channel, name=f"{channel}-agent")
        yield channels


async def run_doc(c: httpx.AsyncClient, doc: dict[str, Any] = DOC, inputs: dict[str, Any] | None = None) -> str:
    await imported(c, doc)
    given = {"execution_date": DATE} if inputs is None else inputs
    return await start_run(c, doc["procedure_id"], given, version=doc["version"])


def of_type(events: list[dict[str, Any]], event_type: str) -> list[dict[str, Any]]:
    """Payloads of one event type, with the position fields the API lifts out of them (api.md §5.7) put back."""
    lifted = ("node_id", "step_id", "frame", "attempt")
    return [{**e["payload"], **{k: e[k] for k in lifted if e.get(k) is not None}}
            for e in events if e["event_type"] == event_type]


def started_nodes(events: list[dict[str, Any]]) -> list[str]:
    return [p["node_id"] for p in of_type(events, "node_started")]


def actions(agent: ScriptedAgent) -> list[str]:
    return [r["action"] for r in agent.requests]


def executed_once_each(agent: ScriptedAgent) -> None:
    """Every request the agent got carried a fresh Idempotency-Key and was executed exactly once."""
    keys = [r["idempotency_key"] for r in agent.requests]
    assert len(keys) == len(set(keys)), Counter(keys).most_common(3)
    assert agent.executed == keys


async def test_happy_path_processes_every_invoice_once(platform: Platform, llm: RunningLlmServer) -> None:
    c = platform.client
    channels = Channels(INVOICES, portal=active_portal(INVOICES))
    channels.portal["INV-1002"]["amount"] = 975  # the portal disagrees: the amounts_match check only warns
    llm.state.model("gpt-4").script = [completion("INV-1001"), completion("INV-1002")]
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    # summary_stats = aggregate "count, sum(amount), avg(confidence_score)" over the collected items (the invoices,
    # no collect_expression): keys count / sum_amount / avg_confidence_score (ckp.md §3.14); telemetry is no
    # built-in, so execution_duration_ms renders null (the compiler warns undeclared_variable)
    assert run["output_vars"] == {"total_processed": 2, "total_amount": 2230.5, "execution_duration_ms": None}

    # every channel action: once per expected item, each with its own key
    per_invoice_web = ["navigate", "type", "type", "click", "wait_for_element", "type", "click",
                       "extract_table_data", "take_screenshot"]
    assert actions(channels.web) == per_invoice_web * 2
    per_invoice_erp = ["launch_app", "wait_for_window", "activate_window", "type", "press_key", "wait_for_dialog",
                       "type", "press_key", "type", "type", "press_keys", "copy_to_clipboard", "screenshot"]
    assert actions(channels.desktop) == per_invoice_erp * 2
    assert actions(channels.database) == ["execute_query"] * 2
    assert actions(channels.email) == ["search_email", "download_attachment", "compose_email", "send_email",
                                       "compose_email", "send_email", "compose_email", "send_email"]
    for _, agent in channels.all():
        executed_once_each(agent)
    loop_keys = [r["idempotency_key"] for r in channels.desktop.requests if r["step_id"] == "copy_doc_number"]
    assert loop_keys == [f"lo1:{run_id}:process_in_erp:copy_doc_number:loop_invoices[{i}]:1" for i in (0, 1)]
    assert [r["idempotency_key"] for r in channels.email.requests[:1]] == [
        f"lo1:{run_id}:fetch_emails:search_invoices:-:1"]

    # rendered parameters: the loop item, the LLM's metadata, the ERP id, the secrets as grants (never values)
    search = channels.email.requests[0]["params"]
    assert search == {"target": "ap@company.com", "value": {"subject": "Invoice", "unread": True,
                                                            "has_attachments": True, "from_date": DATE}}
    # the document writes "C:\\Temp\\Invoices\\{{execution_date}}" meaning a folder per date, but `\{{` is a
    # literal `{{` (ckp.md §5.1): the spec wins, the backslash escapes the placeholder and nothing is rendered
    download = channels.email.requests[1]["params"]
    assert download["file_path"] == "C:\\Temp\\Invoices{{execution_date}}"
    assert download["target"] == channels.email.results[channels.email.executed[0]]["result"]
    typed = [r["params"]["value"] for r in channels.web.requests if r["action"] == "type"]
    assert [t for t in typed if t.startswith("INV-")] == ["INV-1001", "INV-1002"]
    credentials = [t for t in typed if not t.startswith("INV-")]
    assert len(credentials) == 4
    assert all(GRANT.match(t) for t in credentials), credentials
    erp_typed = [r["params"]["value"] for r in channels.desktop.requests if r["action"] == "type"]
    assert erp_typed == ["FB60", "V-ACME", "2026-11-20", 1250.5, "FB60", "V-GLOBEX", "2026-11-21", 980]
    inserts = [r["params"] for r in channels.database.requests]
    assert [p["parameters"] for p in inserts] == [
        {"invoice_number": "INV-1001", "vendor": "Acme Supplies Ltd", "amount": 1250.5, "erp_id": "5100000001",
         "date": DATE, "status": "completed"},
        {"invoice_number": "INV-1002", "vendor": "Globex Corporation", "amount": 980, "erp_id": "5100000002",
         "date": DATE, "status": "completed"}]
    assert all(GRANT.match(p["connection_string"]) for p in inserts)
    # the agents redeemed every grant for the secret (fields of the JSON secret for the portal login)
    assert channels.redeemed == [PORTAL_SECRET["username"], PORTAL_SECRET["password"], DB_SECRET] * 2
    drafts = [r["params"] for r in channels.email.requests if r["action"] == "compose_email"]
    assert drafts[0]["recipients"] == ["ap.team@company.com", "buyer.one@company.com"]
    assert drafts[0]["subject"] == "Invoice INV-1001 Processed Successfully"
    assert drafts[0]["body"] == ("Invoice INV-1001 from Acme Supplies Ltd has been processed.\n\nAmount: $1250.5\n"
            "ERP Transaction ID: 5100000001\nProcessed Date: 2026-11-27\n\nPortal Validation: Passed\n"
            "Confidence Score: 96%")
    assert "ERP Transaction ID: 5100000002" in drafts[1]["body"]
    assert "Confidence Score: 88%" in drafts[1]["body"]
    sent = [r["params"]["value"] for r in channels.email.requests if r["action"] == "send_email"]
    assert sent[0]["draft_id"]
    assert sent[0]["subject"] == drafts[0]["subject"]
    assert drafts[2]["subject"] == f"Daily Invoice Processing Summary - {DATE}"
    # summary_stats.avg_confidence is not a key of the aggregate (avg_confidence_score is): renders "" (§5.1)
    assert ("Total Processed: 2\nTotal Amount: $2230.5\nAverage Confidence: %\nFailed: 0\n") in drafts[2]["body"]

    # the LLM: one call per invoice, the item in the prompt, the portal screenshot attached, distinct keys
    calls = llm.state.calls("gpt-4")
    assert len(calls) == 2
    for call, invoice in zip(calls, INVOICES, strict=True):
        body = call["body"]
        assert (body["temperature"], body["max_tokens"]) == (0.1, 1000)
        parts = body["messages"][-1]["content"]
        assert invoice["invoice_number"] in parts[0]["text"]
        assert parts[1]["type"] == "image_url"
        assert parts[1]["image_url"]["url"].startswith("https://vendor.portal.com/shots/screenshot_validation-")
    assert len({call["headers"]["idempotency-key"] for call in calls}) == 2

    events = await events_of(c, run_id)
    nodes = started_nodes(events)
    body = ["validate_in_portal", "check_validation_result", "enrich_with_llm", "process_in_erp",
            "update_database", "send_confirmation_email"]
    assert nodes == ["init_workflow", "fetch_emails", "parse_invoice_data", "validate_invoice_count",
                     "loop_invoices", *body, *body, "generate_summary_report", "send_summary_email",
                     "workflow_complete"]
    [loop_started] = of_type(events, "loop_started")
    assert (loop_started["total"], loop_started["iterations"]) == (2, 2)
    [loop_done] = of_type(events, "loop_completed")
    assert (loop_done["iterations"], loop_done["succeeded"], loop_done["failed"]) == (2, 2, 0)
    [warning] = of_type(events, "verification_warning")
    assert (warning["check_id"], warning["message"]) == (
        "amounts_match", "Invoice amount mismatch between email and portal")
    assert warning["frame"] == "loop_invoices[1]"
    assert [u["model"] for u in of_type(events, "llm_usage")] == ["gpt-4", "gpt-4"]
    saved = [(p["node_id"], p["reason"]) for p in of_type(events, "checkpoint_saved")]
    assert saved == [("init_workflow", "is_checkpoint"), ("process_in_erp", "is_checkpoint"),
                     ("process_in_erp", "is_checkpoint"), ("loop_invoices", "is_checkpoint")]
    # log events carry their position, also from processing operations and terminate cleanup actions (§8)
    logs = [(p["node_id"], p.get("frame"), p["message"]) for p in of_type(events, "log")]
    assert logs == [("init_workflow", "-", f"Starting invoice processing workflow for {DATE}"),
                    ("parse_invoice_data", "-", "Parsed 2 invoices"),
                    ("workflow_complete", "-", f"Invoice processing workflow completed for {DATE}")]
    [audit] = of_type(events, "audit_log")
    assert audit["entry"] == {"workflow_id": PID, "execution_date": DATE, "status": "success"}
    shots = [p for p in of_type(events, "artifact_created") if p["node_id"] == "validate_in_portal"]
    assert len(shots) == 2
    assert of_type(events, "run_completed")[0]["outputs"] == run["output_vars"]
    # telemetry.custom_metrics {"metric_type": "email_fetch"}: a non-numeric value counts 1 (§7.8)
    registry = platform.runtime_service.metrics.registry
    assert registry.get_sample_value("langorch_custom_metric_total", {"name": "metric_type"}) == 1
    assert of_type(events, "step_failed") == []
    assert of_type(events, "node_error") == []
    assert [p["reason"] for p in of_type(events, "screenshot_requested")] == ["orchestrator_step"]
    warnings = [(p["variable"], p["reason"], p["location"]["node_id"], p["location"]["field"])
                for p in of_type(events, "template_warning")]
    assert warnings == [("summary_stats", "missing_key", "send_summary_email", "/steps/0/body"),
                        ("telemetry", "undefined", "workflow_complete", "/outputs/execution_duration_ms")]
    # secret values never reach the run's events
    everything = json.dumps(events)
    assert PORTAL_SECRET["password"] not in everything
    assert not [g for g in credentials if g in everything]  # nor the grants handed to the agents (§7.15)
    assert DB_SECRET not in everything


async def test_a_mail_without_invoices_takes_the_no_invoices_route(platform: Platform,
                                                                   llm: RunningLlmServer) -> None:
    c = platform.client
    channels = Channels([])  # one invoice mail whose workbook has only its header row
    async with agents_of(c, channels):
        run_id = await run_doc(c, inputs={})  # both inputs from their defaults
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    # execution_date's default "{{today}}" is rendered once at run creation (ckp.md §2.1): the UTC date then
    today = run["input_vars"]["execution_date"]
    assert today == run["created_at"][:10]
    assert run["input_vars"]["email_inbox"] == "ap@company.com"
    assert run["output_vars"] == {"total_processed": None, "total_amount": None, "execution_duration_ms": None}
    events = await events_of(c, run_id)
    assert started_nodes(events) == ["init_workflow", "fetch_emails", "parse_invoice_data",
                                     "validate_invoice_count", "no_invoices_node", "workflow_complete"]
    [notice] = of_type(events, "notification_requested")
    assert notice["channel"] == "email"
    assert (notice["node_id"], notice["frame"]) == ("no_invoices_node", "-")
    assert notice["recipients"] == ["ap.team@company.com"]
    assert notice["subject"] == "No Invoices to Process"
    assert notice["message"] == f"No new invoices found for processing on {today}"
    assert actions(channels.email) == ["search_email", "download_attachment"]
    assert channels.web.requests == channels.desktop.requests == channels.database.requests == []
    assert llm.state.requests == []
    assert [p["message"] for p in of_type(events, "log")][1:3] == [
        "Parsed 0 invoices", f"No invoices to process for {today}"]


def batch(n: int) -> list[dict[str, Any]]:
    return [{"invoice_number": f"INV-2{i:03d}", "vendor": "Initech", "amount": 100 + i,
             "requester_email": "buyer@company.com"} for i in range(n)]


async def pending_approval(c: httpx.AsyncClient, run_id: str, node_id: str) -> dict[str, Any]:
    """The run's open approval at ``node_id`` once the approvals service has opened it."""
    async def opened() -> dict[str, Any] | None:
        page = (await c.get("/api/approvals", params={"run_id": run_id, "status": "pending"})).json()
        items = [a for a in page["items"] if a["node_id"] == node_id]
        return items[0] if items else None

    for _ in range(600):
        found = await opened()
        if found is not None:
            return found
        run = (await c.get(f"/api/runs/{run_id}")).json()
        assert run["status"] not in ("completed", "failed", "canceled"), run
        await _sleep()
    raise AssertionError(f"no pending approval at {node_id}")


async def _sleep() -> None:
    await asyncio.sleep(0.05)


async def test_more_than_ten_invoices_need_a_manager_who_rejects(platform: Platform,
                                                                  llm: RunningLlmServer) -> None:
    c = platform.client
    invoices = batch(12)
    channels = Channels(invoices)
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        approval = await pending_approval(c, run_id, "request_human_approval")
        assert approval["prompt"] == "Found 12 invoices to process. Proceed with batch?"
        assert approval["context_data"] == {"invoice_count": 12, "total_amount": sum(i["amount"] for i in invoices),
                                            "execution_date": DATE}
        assert (approval["approval_level"], approval["escalation_contact"]) == (
            "manager", "finance.manager@company.com")
        assert approval["timeout_action"] == "escalate"
        r = await c.post(f"/api/approvals/{approval['approval_id']}/decision",
                         json={"decision": "rejected", "comment": "too many at once"})
        assert r.status_code == 200, r.text
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"total_processed": None, "total_amount": None, "execution_duration_ms": None}
    events = await events_of(c, run_id)
    assert started_nodes(events)[3:] == ["validate_invoice_count", "request_human_approval", "notify_rejection",
                                         "workflow_complete"]
    [decision] = of_type(events, "approval_decision_received")
    assert decision["decision"] == "rejected"
    assert actions(channels.email) == ["search_email", "download_attachment", "send_email"]
    notice = channels.email.requests[-1]["params"]
    assert notice["recipients"] == ["ap.team@company.com"]
    assert notice["subject"] == "Invoice Batch Processing Rejected"
    assert notice["body"] == f"Manager rejected batch processing for 12 invoices on {DATE}. Manual review required."
    assert channels.web.requests == channels.desktop.requests == []
    assert llm.state.requests == []


async def test_a_manager_timeout_escalates_to_an_executive_who_rejects(platform: Platform,
                                                                        llm: RunningLlmServer) -> None:
    # the document's manager timeout is one hour; this copy waits 1 s for it, nothing else changes
    doc = copy.deepcopy(DOC)
    doc["version"] = "1.2.0-short-timeout"
    doc["workflow_graph"]["nodes"]["request_human_approval"]["timeout_ms"] = 1000
    c = platform.client
    invoices = batch(11)
    channels = Channels(invoices)
    async with agents_of(c, channels):
        run_id = await run_doc(c, doc)
        manager = await pending_approval(c, run_id, "request_human_approval")
        executive = await pending_approval(c, run_id, "escalate_to_executive")
        expired = (await c.get(f"/api/approvals/{manager['approval_id']}")).json()
        assert expired["status"] == "escalated", expired
        total = sum(i["amount"] for i in invoices)
        assert executive["prompt"] == f"Manager timeout - Executive approval needed for 11 invoices totaling ${total}"
        assert executive["approval_level"] == "executive"
        r = await c.post(f"/api/approvals/{executive['approval_id']}/decision", json={"decision": "rejected"})
        assert r.status_code == 200, r.text
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    events = await events_of(c, run_id)
    assert started_nodes(events)[3:] == ["validate_invoice_count", "request_human_approval",
                                         "escalate_to_executive", "notify_rejection", "workflow_complete"]
    decisions = of_type(events, "approval_decision_received")
    assert [(d["node_id"], d["status"], d["decision"]) for d in decisions] == [
        ("request_human_approval", "escalated", "timeout"), ("escalate_to_executive", "rejected", "rejected")]
    assert channels.email.requests[-1]["params"]["body"].startswith("Manager rejected batch processing for 11 ")
    assert channels.web.requests == []


async def test_transient_failures_heal_through_the_documents_handlers(platform: Platform,
                                                                     llm: RunningLlmServer) -> None:
    """fetch_emails' EmailConnectionException retry (exponential policy), process_in_erp's WindowNotFoundException
    retry with its recovery step (Alt+F4) and the llm_action's own retry each absorb one failure."""
    c = platform.client
    one = INVOICES[:1]
    channels = Channels(one, portal=active_portal(one))
    channels.fail_first("search_email", "EmailConnectionException")
    channels.fail_first("wait_for_window", "WindowNotFoundException")
    llm.state.model("gpt-4").script = [(503, None, {}), completion("INV-1001")]
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"total_processed": 1, "total_amount": 1250.5, "execution_duration_ms": None}
    for _, agent in channels.all():
        executed_once_each(agent)
    searches = [r["idempotency_key"] for r in channels.email.requests if r["action"] == "search_email"]
    assert searches == [f"lo1:{run_id}:fetch_emails:search_invoices:-:{a}" for a in (1, 2)]
    erp = actions(channels.desktop)
    # the failing attempt, the failure screenshot (screenshot_on_fail), the recovery step, the retried attempt
    assert erp[:5] == ["launch_app", "wait_for_window", "screenshot", "press_keys", "wait_for_window"]
    recovery = channels.desktop.requests[3]
    assert recovery["step_id"] == "wait_sap_window/recovery/close_all_sap"
    assert recovery["params"] == {"keys": ["Alt", "F4"]}
    assert channels.desktop.requests[2]["step_id"] == "wait_sap_window~screenshot"
    waits = [r["idempotency_key"] for r in channels.desktop.requests if r["action"] == "wait_for_window"]
    assert waits == [f"lo1:{run_id}:process_in_erp:wait_sap_window:loop_invoices[0]:{a}" for a in (1, 2)]
    assert len(llm.state.calls("gpt-4")) == 2
    events = await events_of(c, run_id)
    retrying = {p["step_id"]: p for p in of_type(events, "step_retrying")}
    assert sorted(retrying) == ["llm", "search_invoices", "wait_sap_window"]
    search = retrying["search_invoices"]
    # exponential_backoff from 5000 ms with full jitter: the first delay is 5000·(1 − u), u in [0, 1) (§4.8)
    assert (search["source"], search["next_attempt"], search["error"]["error_code"]) == (
        "error_handler", 2, "EmailConnectionException")
    assert 0 < search["delay_ms"] <= 5000
    window = retrying["wait_sap_window"]
    assert (window["source"], window["delay_ms"], window["frame"]) == ("error_handler", 1000, "loop_invoices[0]")
    llm_retry = retrying["llm"]
    assert (llm_retry["source"], llm_retry["delay_ms"], llm_retry["error"]["code"]) == ("retry_policy", 1000,
                                                                                        "llm_error")
    # screenshot_on_fail: EMAIL offers no screenshot action, so the failure is only announced
    [shot] = [p for p in of_type(events, "screenshot_requested") if p["reason"] != "orchestrator_step"]
    assert (shot["node_id"], shot["step_id"], shot["error"]["error_code"]) == (
        "fetch_emails", "search_invoices", "EmailConnectionException")
    assert of_type(events, "recovery_started") == []
    assert of_type(events, "loop_iteration_failed") == []
    assert Counter(started_nodes(events))["enrich_with_llm"] == 1


async def test_no_invoice_mail_fails_into_the_error_notification_path(platform: Platform,
                                                                      llm: RunningLlmServer) -> None:
    c = platform.client
    channels = Channels([], emails_found=False)
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "failed"
    # a recovery path ending at a failed terminate fails the run with the original error (ckp.md §10.3 (c))
    assert (run["error"]["code"], run["error"]["node_id"]) == ("validation_failed", "fetch_emails"), run["error"]
    assert run["output_vars"]["failed_node"] == "fetch_emails"
    details = run["output_vars"]["error_details"]
    assert (details["code"], details["message"]) == ("validation_failed", "No invoice emails found for processing")
    events = await events_of(c, run_id)
    assert started_nodes(events) == ["init_workflow", "fetch_emails", "error_notification_node", "workflow_failed"]
    [recovery] = of_type(events, "recovery_started")
    assert recovery["on_failure_node"] == "error_notification_node"
    assert recovery["error"]["code"] == "validation_failed"
    [failed] = of_type(events, "run_failed")
    assert failed["recovered_via"] == "error_notification_node"
    assert actions(channels.email) == ["search_email", "download_attachment", "send_email"]
    notice = channels.email.requests[-1]["params"]
    assert notice["subject"] == f"Invoice Processing Workflow Failed - {DATE}"
    assert "Error Details: No invoice emails found for processing\nFailed Node: fetch_emails" in notice["body"]
    [*_, last_log] = of_type(events, "log")
    assert (last_log["node_id"], last_log.get("frame"), last_log["level"], last_log["message"]) == (
        "workflow_failed", "recovery", "ERROR", "Invoice processing workflow failed: No invoice emails found for "
        "processing")
    assert of_type(events, "run_retry_requested") == []  # resume_on_failure retries only retryable errors
    assert [(p["node_id"], p.get("frame"), p["reason"]) for p in of_type(events, "screenshot_requested")] == [
        ("init_workflow", "-", "orchestrator_step"), ("workflow_failed", "recovery", "orchestrator_step")]
    [failure] = of_type(events, "validation_failed")
    assert (failure["validation_id"], failure["on_failure"]) == ("check_emails_found", "fail_workflow")
    assert channels.web.requests == []
    assert llm.state.requests == []


async def test_an_inactive_vendor_fails_its_iteration_and_the_loop_goes_on(platform: Platform,
                                                                          llm: RunningLlmServer) -> None:
    c = platform.client
    channels = Channels(INVOICES, portal=active_portal(INVOICES))
    channels.portal["INV-1001"]["vendor_status"] = "Blocked"
    llm.state.model("gpt-4").script = [completion("INV-1002")]
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    # verification fail_workflow bypasses node handlers (§3.3) and ends the iteration; continue_on_error keeps the
    # loop going and nothing is collected for the failed invoice (§3.7)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"total_processed": 1, "total_amount": 980, "execution_duration_ms": None}
    events = await events_of(c, run_id)
    [failed] = of_type(events, "loop_iteration_failed")
    assert failed["error"]["code"] == "verification_failed"
    assert failed["error"]["details"]["check_id"] == "vendor_exists"
    [loop_done] = of_type(events, "loop_completed")
    assert (loop_done["succeeded"], loop_done["failed"]) == (1, 1)
    assert [r["params"]["parameters"]["invoice_number"] for r in channels.database.requests] == ["INV-1002"]
    assert len(llm.state.calls("gpt-4")) == 1
    assert of_type(events, "recovery_started") == []


async def test_an_erp_window_that_never_appears_fails_the_iteration_after_the_handlers_retries(
        platform: Platform, llm: RunningLlmServer) -> None:
    """WindowNotFoundException every time: the handler's 2 retries (each after its recovery step) are used up, the
    step fails, process_in_erp fails, and the iteration fails; continue_on_error keeps the run going (§4.10, §3.7)."""
    c = platform.client
    one = INVOICES[:1]
    channels = Channels(one, portal=active_portal(one))
    channels.fail_first("wait_for_window", "WindowNotFoundException", times=99)
    llm.state.model("gpt-4").script = [completion("INV-1001")]
    async with agents_of(c, channels):
        run_id = await run_doc(c)
        run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"total_processed": 0, "total_amount": 0, "execution_duration_ms": None}
    waits = [r["idempotency_key"] for r in channels.desktop.requests if r["action"] == "wait_for_window"]
    assert waits == [f"lo1:{run_id}:process_in_erp:wait_sap_window:loop_invoices[0]:{a}" for a in (1, 2, 3)]
    for _, agent in channels.all():
        executed_once_each(agent)
    erp = actions(channels.desktop)
    assert erp[0] == "launch_app"
    assert "activate_window" not in erp  # nothing after the failed step ran
    assert erp.count("screenshot") == 3  # screenshot_on_fail after every failing attempt
    recovery = [r for r in channels.desktop.requests if r["action"] == "press_keys"]
    # the handler matches all three failures: its recovery step runs before its action each time, also before the
    # exhausted retry gives up (§4.10 "each time the handler applies")
    assert len(recovery) == 3
    assert {r["step_id"] for r in recovery} == {"wait_sap_window/recovery/close_all_sap"}
    assert channels.database.requests == []
    events = await events_of(c, run_id)
    [failed_step] = of_type(events, "step_failed")
    assert (failed_step["step_id"], failed_step["error"]["error_code"]) == ("wait_sap_window",
                                                                           "WindowNotFoundException")
    [iteration] = of_type(events, "loop_iteration_failed")
    assert (iteration["iteration"], iteration["error"]["error_code"]) == (0, "WindowNotFoundException")
    assert [p["next_attempt"] for p in of_type(events, "step_retrying")] == [2, 3]
    assert of_type(events, "recovery_started") == []
    assert [r["action"] for r in channels.email.requests][-2:] == ["compose_email", "send_email"]  # the summary


async def test_a_runtime_killed_inside_the_erp_entry_resumes_without_repeating_a_call(
        nats_url: str, database_url: str, llm: RunningLlmServer, secrets_env: None, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """critical_nodes_only: the last save before process_in_erp is init_workflow's is_checkpoint. The runtime is
    SIGKILLed in the pause after press_enter; a fresh runtime resumes there, replays every completed call from the
    step store (EMAIL, WEB, the LLM completion, the first DESKTOP steps) and executes only the rest (§7.3, §7.4)."""
    monkeypatch.setenv("LANGORCH_LLM_BASE_URL", llm.base_url())
    monkeypatch.setenv("LANGORCH_LLM_MODELS", json.dumps(MODELS))
    monkeypatch.setenv("LANGORCH_LLM_DEFAULT_MODEL", "gpt-4")
    monkeypatch.setenv("LANGORCH_TIME_SCALE", str(TIME_SCALE))
    # the killed runtime's DESKTOP lease outlives it until its TTL (§7.5): 5 s instead of 60 s keeps the wait short
    monkeypatch.setenv("LANGORCH_LEASE_TTL_S", "5")
    one = INVOICES[:1]
    channels = Channels(one, portal=active_portal(one))
    llm.state.model("gpt-4").script = [completion("INV-1001")]
    procs: list[subprocess.Popen[bytes]] = []

    def killer(key: str, envelope: dict[str, Any]) -> None:
        if ":press_enter:" in key and len(procs) == 1:
            kill(procs[0])

    channels.desktop.on_answered = killer
    async with platform_of(nats_url, database_url, runtime=False) as p, \
            runtimes(nats_url, database_url, tmp_path) as started:
        c = p.client
        await env_records(c)
        async with agents_of(c, channels):
            procs.append(start_runtime(nats_url, database_url, tmp_path / "runtime-a.log"))
            started.extend(procs)
            run_id = await run_doc(c)
            for _ in range(1200):
                if procs[0].poll() is not None:
                    break
                await _sleep()
            assert procs[0].poll() is not None, logs(tmp_path)
            started.append(start_runtime(nats_url, database_url, tmp_path / "runtime-b.log"))
            run = await wait_terminal(c, run_id, RUN_TIMEOUT_S, tmp_path)
    assert run["status"] == "completed", (run["error"], logs(tmp_path))
    assert run["output_vars"] == {"total_processed": 1, "total_amount": 1250.5, "execution_duration_ms": None}
    events = await run_events(nats_url, run_id)
    types = [e.type for e in events]
    assert "execution_recovered" in types
    assert types.count("run_completed") == 1
    # every agent executed each step instance once, on attempt 1; nothing was executed twice across the crash
    for _, agent in channels.all():
        assert len(agent.executed) == len(set(agent.executed)), agent.executed
        assert {instance(k)[3] for k in agent.executed} == {"1"}
    erp = [instance(k)[1] for k in channels.desktop.executed]
    assert erp == ["launch_sap", "wait_sap_window", "activate_sap", "open_transaction", "press_enter",
                   "wait_invoice_screen", "enter_vendor", "tab_to_date", "enter_invoice_date", "enter_amount",
                   "save_transaction", "copy_doc_number", "screenshot_erp"]
    assert len(channels.web.executed) == 9
    assert [r["action"] for r in channels.email.requests[:2]] == ["search_email", "download_attachment"]
    assert len(llm.state.calls("gpt-4")) == 1  # the completion recorded before the kill is replayed
    completions = Counter((e.data["node_id"], e.data["step_id"], e.data["frame"])
                          for e in events if e.type == "step_completed")
    assert max(completions.values()) == 1, completions
    replayed = {(e.data["node_id"], e.data["step_id"]) for e in events if e.type == "step_replayed"}
    after = types.index("execution_recovered")
    assert {("fetch_emails", "search_invoices"), ("enrich_with_llm", "llm"), ("process_in_erp", "launch_sap"),
            ("process_in_erp", "open_transaction")} <= replayed
    assert not any(e.type == "step_started" and e.data["step_id"] == "launch_sap" for e in events[after:])
    # the kill landed while press_enter's answer was being recorded: after the restart it was either replayed from
    # the step store or sent again with the same key and answered from the agent's record
    enter = f"lo1:{run_id}:process_in_erp:press_enter:loop_invoices[0]:1"
    resent = [r["idempotency_key"] for r in channels.desktop.requests].count(enter) == 2
    assert (("process_in_erp", "press_enter") in replayed) != resent
