"""Golden event streams: every runnable example of ``examples/`` and the engine's approval, loop, parallel, subflow,
failure and cancel paths, run end to end on the real platform (gateway, compiler, runtime, agent and approvals
services in this process, real NATS JetStream and PostgreSQL, real HTTP agents and a real OpenAI-compatible LLM
server started by the test), and their full event streams compared with ``tests/golden/events/<scenario>.json``.

They pin the behaviour a refactor must keep: which events a run emits, in which order, with which payloads and
envelope fields. A mismatch fails with a unified diff of the canonical JSON. To record the files again on purpose
(after a deliberate behaviour change, never to make a refactor pass)::

    LANGORCH_UPDATE_GOLDEN=1 python3 -m uv run pytest tests/test_golden_event_streams.py

**What is recorded.** For each run of a scenario (the run started through ``POST /api/runs``, and its child runs):
every event of the run aggregate, read twice — straight from ``LO_EVT`` (the raw JSON envelope and its subject)
and from the projection (``GET /api/runs/{id}/events``) — joined by event id; the run as ``GET /api/runs/{id}``
shows it at the end; and for each approval the run requested, the events of its ``approval`` aggregate.

**Canonical form.**

* Envelope: every field of the raw JSON envelope is kept (``type``, ``aggregate``, ``aggregate_id``, ``seq``,
  ``actor``, ``causation_id``, ``correlation_id``, ``schema_version``, ``occurred_at``, ``data`` and any field a
  later version adds) except ``event_id``, which is the event's identity and becomes its position (below); the
  NATS subject is kept as ``subject``. ``Nats-Msg-Id`` must equal the event id, and the projection's
  ``stream_seq`` the message's stream position (asserted, not stored: both are machine-dependent numbers).
* Projection: ``projection`` holds only the fields of the API item that differ from what the envelope implies —
  ``event_type`` = type, ``run_id`` = aggregate id, ``seq``, ``created_at`` = ``occurred_at``, ``actor`` rendered
  ``kind:id`` (or ``kind``), ``node_id``/``step_id``/``attempt`` lifted out of ``data`` and ``payload`` = the rest
  of ``data``. No ``projection`` key means the API served exactly that; a projector change shows up as a new key.
* Ids: every UUID, wherever it occurs (also inside idempotency keys, URLs and subjects), becomes a stable name:
  ``<run>`` for the run started by the test, ``<child-N>`` for its child runs (in order of ``subflow_started``),
  ``<approval-N>`` for approvals (in order of ``approval_requested``), ``<event RUN#N>`` for an event id (N = the
  event's position in the canonical list of that run, so a ``causation_id`` naming an event stays readable), and
  ``<FIELD-N>`` for any other id, named after the field it first occurs in (``<causation_id-1>``,
  ``<wait_id-1>``…). Equal ids keep equal names, so the causation and correlation structure is part of the golden.
* Times and durations: RFC 3339 timestamps and HTTP dates (the ``date`` header of a response a step wrote into a
  variable, which ``step_completed`` carries) become ``<time>``; the values of ``duration_ms``, ``latency_ms``,
  ``elapsed_ms``, ``waited_ms`` and ``duration_seconds`` become ``<duration>`` (wall-clock measurements). The
  configured delays (``delay_ms`` of ``step_retrying``, ``timeout_ms``…) are kept: no scenario uses jitter.
* Machine-dependent values: ``runtime_instance`` becomes ``<runtime-instance>`` (host name), the base URLs of the
  servers the test starts become ``<gateway>``, ``<posts-api>``, ``<http-agent>``, ``<agent:NAME>``, ``<llm>``
  and their ``host:port`` alone ``<llm-host>`` etc. (the ports are free ports), and a callback token in a URL
  becomes ``<token>``.
* Order: a run's events are in ``seq`` order (``seq`` must be gapless from 1), except inside a **parallel block**:
  the events from a ``parallel_started`` to the matching ``parallel_completed`` of the same node and frame (or, when
  the node fails or the run ends inside it, to the last event of one of its branches). Branches are concurrent
  asyncio tasks doing real I/O, so how their events interleave is not deterministic; what the engine does
  guarantee is kept: the order of the events *within* each branch frame (its nested frames included), that
  ``parallel_branch_completed`` of a branch follows that branch's own events, and that the block sits after the
  events before ``parallel_started`` and before the events after it. So the block is written as
  ``parallel_started``, then each branch's events (branch frame ``<path><node>/<branch_id>`` and its sub-frames) in
  their own order followed by its ``parallel_branch_completed``, branches in declaration order, then the block's
  remaining events in their order (run-level events without a frame, ``parallel_merge_conflict``), then
  ``parallel_completed``. Inside a block ``seq`` is written as ``"~"`` (its value depends on the interleaving);
  the block's seqs are still checked to be the contiguous range between its neighbours. Nested blocks are
  canonicalised recursively inside their branch.

The run row at the end (``final``) is normalised the same way; its ``last_node_id`` / ``last_step_id`` become
``<interleaving>`` when the last ``node_started`` / ``step_started`` they follow lies inside a parallel block.

**Determinism by construction.** Scenarios avoid what depends on timing rather than behaviour:

* agents on the test's own ``golden`` channel have room for every concurrent call (``concurrency_limit`` 16), so
  no ``pool_saturated``; retry delays are configured without jitter;
* ``wait_strategy: any`` and ``branch_failure: fail`` are decided by a branch that answers only once the other
  branch's agent call has arrived, so the loser is always inside that call when it is canceled;
* under ``wait_strategy: all`` the second branch's agent answers only once the parallel node has recorded the
  first branch's end (``parallel_branch_completed``). Without that, the run can hang: at the commit these files
  were recorded from, a branch that finishes at its join while the parallel node is appending another branch's
  ``parallel_branch_completed`` is never recorded, and the run stays ``running`` forever (a lost wake-up in
  ``Machine.parallel``: it checks the branches' status before an ``await`` and then returns ``Spawn``, putting the
  node back to ``waiting`` after the finishing branch saw it ``running``). A branch that fails while its sibling
  runs its last node shows it every time;
* a cancel is sent only once the agent has received the step, approvals are decided only once the run waits for
  them; the approval timeout is 1 s and fires from the approvals service's timer (what it causes does not depend
  on when within the tick it fires);
* the invoice example runs with one invoice and its ``wait_after_ms`` pauses removed (they only sleep, and would
  make the run take ~20 s).

No envelope or payload of these runs carries a trace id, so none needs normalising.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import difflib
import io
import json
import os
import re
import zipfile
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import nats
import openpyxl
import pytest
from fastapi import FastAPI
from fastapi.responses import JSONResponse
from nats.js.api import ConsumerConfig, DeliverPolicy

from examples.agents.http_agent import create_app as http_agent_app
from tests.helpers import Platform, example, imported, platform_of, serve_app, start_run, wait_status, wait_until
from tests.llm_server import DEFAULT_USAGE, LlmServerState, RunningLlmServer, running_llm_server
from tests.scripted_agent import ACCEPTED, AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration

GOLDEN = Path(__file__).resolve().parent / "golden" / "events"
UPDATE = os.environ.get("LANGORCH_UPDATE_GOLDEN") == "1"
RUN_TIMEOUT_S = 60


# -- the servers the scenarios talk to -------------------------------------------------------------------------


def posts_api() -> FastAPI:
    """The JSON API of ``simple_http_test``: post 42 does not exist."""
    app = FastAPI()

    @app.get("/posts/{post_id}")
    async def post(post_id: int) -> JSONResponse:
        if post_id == 42:
            return JSONResponse({"error": "no such post"}, status_code=404)
        return JSONResponse({"userId": 1, "id": post_id, "title": f"Post {post_id}", "body": "..."})

    return app


def run_of(body: dict[str, Any]) -> str:
    """The run id inside a step's idempotency key ``lo1:<run>:<node>:<step>:<frame>:<attempt>``."""
    return str(body["idempotency_key"].split(":")[1])


def attempt_of(body: dict[str, Any]) -> int:
    return int(body["idempotency_key"].rsplit(":", 1)[1])


@dataclass
class Gate:
    """Per-run rendezvous of the ``golden`` agent: ``block`` marks its arrival and waits for ``released``."""

    arrived: dict[tuple[str, str], asyncio.Event] = field(default_factory=dict)
    released: asyncio.Event = field(default_factory=asyncio.Event)
    gateway: str = ""

    async def branch_recorded(self, run_id: str, branch_id: str) -> None:
        """Until the run's parallel node has recorded the end of ``branch_id`` (``parallel_branch_completed``)."""
        async with httpx.AsyncClient(base_url=self.gateway) as client:
            async def read() -> list[Any]:
                r = await client.get(f"/api/runs/{run_id}/events",
                                     params={"event_type": "parallel_branch_completed"})
                return [e["payload"]["branch_id"] for e in r.json()["items"]]

            await wait_until(read, lambda ended: branch_id in ended, timeout=30, every=0.02)

    def arrival(self, run_id: str, name: str) -> asyncio.Event:
        return self.arrived.setdefault((run_id, name), asyncio.Event())


def golden_agent(gate: Gate) -> ScriptedAgent:
    """The agent of the ``golden`` channel, driven by each step's parameters."""

    async def echo(body: dict[str, Any]) -> Any:
        after = body["params"].get("after_branch")
        if after:  # answer only once the parallel node has recorded that branch's end
            await gate.branch_recorded(run_of(body), after)
        return {"echo": body["params"]}

    def flaky(body: dict[str, Any]) -> Any:
        if attempt_of(body) <= int(body["params"]["fail_until"]):
            raise AgentFailure(f"flaky failure on attempt {attempt_of(body)}", code="flaky_error", retryable=True)
        return {"ok": True, "attempt": attempt_of(body)}

    def check(body: dict[str, Any]) -> Any:
        n = body["params"]["n"]
        if n == body["params"]["bad"]:
            raise AgentFailure(f"item {n} is invalid", code="invalid_item")
        return {"value": n * 10}

    async def boom(body: dict[str, Any]) -> Any:
        after = body["params"].get("after")
        if after:  # fail only once the named call of this run has arrived
            await asyncio.wait_for(gate.arrival(run_of(body), after).wait(), 30)
        if body["params"].get("after_branch"):  # fail only once the parallel node has recorded that branch's end
            await gate.branch_recorded(run_of(body), body["params"]["after_branch"])
        raise AgentFailure(body["params"].get("message", "boom"), code=body["params"].get("code", "boom"))

    async def answer_after(body: dict[str, Any]) -> Any:
        await asyncio.wait_for(gate.arrival(run_of(body), body["params"]["after"]).wait(), 30)
        return {"answered": True}

    async def block(body: dict[str, Any]) -> Any:
        gate.arrival(run_of(body), body["params"]["name"]).set()
        await asyncio.wait_for(gate.released.wait(), 60)
        return {"released": True}

    return ScriptedAgent({"echo": echo, "flaky": flaky, "check": check, "boom": boom, "answer_after": answer_after,
                          "block": block})


TITLES = {"https://example.com": "Example Domain", "https://example.org/other": "Another title"}


def workbook_b64(rows: list[dict[str, Any]]) -> str:
    book = openpyxl.Workbook()
    sheet = book.active
    assert sheet is not None
    columns = ["invoice_number", "vendor", "amount", "requester_email"]
    sheet.append(columns)
    for row in rows:
        sheet.append([row[c] for c in columns])
    raw, out = io.BytesIO(), io.BytesIO()
    book.save(raw)
    # the same bytes in every session (step_completed carries the file a step wrote): an XLSX holds the time it was
    # saved, in its properties and in each member's ZIP header
    with zipfile.ZipFile(raw) as saved, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as fixed:
        for name in saved.namelist():
            data = saved.read(name)
            if name == "docProps/core.xml":
                data = re.sub(rb"(<dcterms:(?:created|modified)[^>]*>)[^<]*", rb"\g<1>2026-11-20T00:00:00Z", data)
            fixed.writestr(zipfile.ZipInfo(name, date_time=(2026, 11, 20, 0, 0, 0)), data,
                           compress_type=zipfile.ZIP_DEFLATED)
    return base64.b64encode(out.getvalue()).decode()


INVOICE = {"invoice_number": "INV-1001", "vendor": "Acme Supplies", "amount": 1250.5,
           "requester_email": "buyer.one@company.com"}
INVOICE_METADATA = {"vendor_code": "V-ACME", "vendor_name": "Acme Supplies Ltd", "invoice_date": "2026-11-20",
                    "due_date": "2026-12-20", "line_items": [{"sku": "P-1", "qty": 5}], "tax_amount": 199.66}
INVOICE_DATE = "2026-11-27"
PORTAL_SECRET = {"username": "ap-robot", "password": "Portal-PW-golden-4711"}
DB_SECRET = "Server=erp-db;Database=ap;Password=DB-PW-golden-0815"
MODELS = {"gpt-4": {"prompt_usd_per_1k": 0.03, "completion_usd_per_1k": 0.06}}


def position(body: dict[str, Any]) -> str:
    """``<step>@<frame>`` of a request: a value that depends only on where the step runs."""
    parts = body["idempotency_key"].split(":")
    return f"{parts[3]}@{parts[4]}"


@dataclass
class Agents:
    gate: Gate
    golden: ScriptedAgent
    web: ScriptedAgent
    hybrid: ScriptedAgent
    email: ScriptedAgent
    desktop: ScriptedAgent
    database: ScriptedAgent


def make_agents() -> Agents:
    gate = Gate()
    workbook = workbook_b64([INVOICE])  # built once: an XLSX holds its creation time

    def navigate(body: dict[str, Any]) -> Any:
        return {"url": body["params"]["url"], "title": "Vendor Portal"}

    def extract_text(body: dict[str, Any]) -> Any:
        # the title of the page this run navigated to last
        run = run_of(body)
        url = [r["params"]["url"] for r in web.requests if r["action"] == "navigate" and run_of(r) == run][-1]
        return TITLES[url]

    def extract_table_data(body: dict[str, Any]) -> Any:
        # the vendor portal disagrees on the amount: the invoice's amounts_match check only warns
        return {"invoice_number": INVOICE["invoice_number"], "vendor_status": "Active", "amount": 1250}

    web = ScriptedAgent({
        "navigate": navigate, "wait_for_element": lambda b: {"found": b["params"].get("target")},
        "extract_text": extract_text, "screenshot": lambda b: {"uri": "file:///tmp/page.png"},
        "type": lambda b: {"typed": True}, "click": lambda b: {"clicked": b["params"]["target"]},
        "extract_table_data": extract_table_data,
        "take_screenshot": lambda b: {"screenshot": f"https://vendor.portal.com/shots/{position(b)}.png"}})

    def login(body: dict[str, Any]) -> Any:
        return ACCEPTED if body["dispatch_mode"] == "async" else {"logged_in": True, "mode": "sync"}

    hybrid = ScriptedAgent({"browser.navigate": lambda b: {"url": b["params"]["url"]},
                            "run_full_salesforce_login": login})
    email = ScriptedAgent({
        "search_email": lambda b: [{"message_id": "<inv-batch@vendors.example>", "subject": "Invoice batch",
                                    "attachments": ["invoices.xlsx"]}],
        "download_attachment": lambda b: [{"file_name": "invoices.xlsx", "content_base64": workbook}],
        "compose_email": lambda b: {"draft_id": f"draft-{position(b)}", **b["params"]},
        "send_email": lambda b: {"message_id": f"<sent-{position(b)}@company.com>", "accepted": True}})
    desktop_ok = {a: (lambda b: {"ok": True}) for a in ("launch_app", "wait_for_window", "activate_window", "type",
                                                        "press_key", "wait_for_dialog", "press_keys")}
    desktop = ScriptedAgent({**desktop_ok, "copy_to_clipboard": lambda b: "5100000001",
                             "screenshot": lambda b: {"screenshot": f"file:///C:/Temp/erp-{position(b)}.png"}})
    database = ScriptedAgent({"execute_query": lambda b: {"rows_affected": 1}})
    return Agents(gate, golden_agent(gate), web, hybrid, email, desktop, database)


def completion(text: str) -> tuple[int, Any, dict[str, str]]:
    return 200, {"id": "chatcmpl-golden", "object": "chat.completion", "model": "gpt-4",
                 "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                              "finish_reason": "stop"}], "usage": DEFAULT_USAGE}, {}


@dataclass
class World:
    platform: Platform
    agents: Agents
    llm: RunningLlmServer
    urls: dict[str, str]  # base URL → its name in the goldens

    @property
    def client(self) -> httpx.AsyncClient:
        return self.platform.client


async def register(c: httpx.AsyncClient, name: str, channel: str, base_url: str,
                   capabilities: list[Any] | None = None) -> None:
    body: dict[str, Any] = {"name": name, "channel": channel, "base_url": base_url, "concurrency_limit": 16}
    if capabilities is not None:
        body["capabilities"] = capabilities
    r = await c.post("/api/agents", json=body)
    assert r.status_code == 201, r.text


@pytest.fixture(scope="module")
async def world(module_nats_url: str, module_database_url: str) -> AsyncIterator[World]:
    """One platform for the module, with every agent, the posts API and the LLM server registered once."""
    secrets = {"LANGORCH_SECRET_VENDOR_PORTAL_CREDS": json.dumps(PORTAL_SECRET),
               "LANGORCH_SECRET_DB_CONNECTION": DB_SECRET}
    saved = {k: os.environ.get(k) for k in secrets}
    os.environ.update(secrets)
    agents = make_agents()
    try:
        async with contextlib.AsyncExitStack() as stack:
            llm = await stack.enter_async_context(running_llm_server(LlmServerState()))
            platform = await stack.enter_async_context(platform_of(
                module_nats_url, module_database_url, runtime_settings={
                    "llm_base_url": llm.base_url(), "llm_models": MODELS, "llm_default_model": "gpt-4",
                    "callback_timeout_s": 60}))
            c = platform.client
            for name in ("vendor-portal-creds", "db_connection"):  # the invoice document names Azure Key Vault;
                # these records send its two secrets to the env provider (a record wins over the document)
                r = await c.post("/api/secrets", json={"name": name, "provider": "env"})
                assert r.status_code == 201, r.text
            agents.gate.gateway = platform.base_url
            posts = await stack.enter_async_context(serve_app(posts_api()))
            http_agent = await stack.enter_async_context(serve_app(http_agent_app()))
            await register(c, "http", "api", http_agent)
            urls = {platform.base_url: "<gateway>", posts: "<posts-api>", http_agent: "<http-agent>",
                    llm.root: "<llm>"}
            for name, agent in (("golden", agents.golden), ("web", agents.web), ("email", agents.email),
                                ("desktop", agents.desktop), ("database", agents.database)):
                await stack.enter_async_context(serving(agent))
                await register(c, f"{name}-agent", name, agent.base_url, list(agent.handlers))
                urls[agent.base_url] = f"<agent:{name}>"
            await stack.enter_async_context(serving(agents.hybrid))
            await register(c, "hybrid", "hybrid", agents.hybrid.base_url, [
                "browser.navigate", {"name": "run_full_salesforce_login", "type": "workflow"}])
            urls[agents.hybrid.base_url] = "<agent:hybrid>"
            try:
                yield World(platform, agents, llm, urls)
            finally:
                agents.gate.released.set()  # calls still blocked (canceled runs) end before their servers stop
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


# -- reading a run's events --------------------------------------------------------------------------------------


async def stream_messages(nats_url: str, aggregate: str, aggregate_id: str) -> list[dict[str, Any]]:
    """Every ``LO_EVT`` message of one aggregate, raw: ``{"subject", "position", "headers", "envelope"}``."""
    subject = f"lo.evt.{aggregate}.{aggregate_id}.>"  # ids here are UUIDs: one subject token as they are
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        try:
            last = await js.get_last_msg("LO_EVT", subject)
        except nats.js.errors.NotFoundError:
            return []
        out: list[dict[str, Any]] = []
        sub = await js.subscribe(subject, ordered_consumer=True, stream="LO_EVT",
                                 config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL))
        try:
            while not out or out[-1]["position"] < last.seq:
                msg = await sub.next_msg(timeout=10)
                out.append({"subject": msg.subject, "position": msg.metadata.sequence.stream,
                            "headers": dict(msg.headers or {}), "envelope": json.loads(msg.data)})
        finally:
            await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def projected_events(c: httpx.AsyncClient, run_id: str, min_position: int) -> list[dict[str, Any]]:
    """Every item of ``GET /api/runs/{id}/events``, once the projection has reached ``min_position``."""
    items: list[dict[str, Any]] = []
    while True:
        r = await c.get(f"/api/runs/{run_id}/events", params={"limit": 500, "offset": len(items)},
                        headers={"X-LangOrch-Min-Position": str(min_position)})
        assert r.status_code == 200, r.text
        page = r.json()
        items.extend(page["items"])
        if len(items) >= page["total"] or not page["items"]:
            return items


LIFTED = ("node_id", "step_id", "attempt")


def implied_projection(envelope: dict[str, Any]) -> dict[str, Any]:
    """The API item the envelope implies (see the module docstring)."""
    actor = envelope.get("actor") or {}
    data = envelope.get("data") or {}
    return {"event_type": envelope["type"], "run_id": envelope["aggregate_id"], "seq": envelope["seq"],
            "created_at": envelope["occurred_at"],
            "actor": actor.get("kind") if actor.get("id") is None else f"{actor['kind']}:{actor['id']}",
            **{k: data.get(k) for k in LIFTED},
            "payload": {k: v for k, v in data.items() if k not in LIFTED}}


def same_time(a: Any, b: Any) -> bool:
    """Two RFC 3339 renderings of one instant (the projection may print fewer fraction digits)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return datetime.fromisoformat(a.replace("Z", "+00:00")) == datetime.fromisoformat(b.replace("Z", "+00:00"))
    except ValueError:
        return False


async def recorded_run(w: World, run_id: str) -> list[dict[str, Any]]:
    """The run's events in ``seq`` order: the raw envelope, its subject and the projection's differences."""
    messages = await stream_messages(w.platform.nats_url, "run", run_id)
    assert messages, f"no events for run {run_id}"
    seqs = [m["envelope"]["seq"] for m in messages]
    assert seqs == list(range(1, len(seqs) + 1)), f"seq not gapless: {seqs}"
    items = await projected_events(w.client, run_id, messages[-1]["position"])
    by_id = {i["event_id"]: i for i in items}
    assert len(by_id) == len(items) == len(messages), (len(items), len(messages))
    out = []
    for m in messages:
        env = m["envelope"]
        assert m["headers"].get("Nats-Msg-Id") == env["event_id"], m["headers"]
        item = dict(by_id.pop(env["event_id"]))
        assert item.pop("stream_seq") == m["position"]
        item.pop("event_id")
        implied = implied_projection(env)
        diff = {k: v for k, v in item.items() if k not in implied or implied[k] != v}
        if "created_at" in diff and same_time(diff["created_at"], implied["created_at"]):
            del diff["created_at"]
        diff.update({f"-{k}": None for k in implied if k not in item})  # a field the API no longer serves
        rec = {"subject": m["subject"], **env}
        if diff:
            rec["projection"] = diff
        out.append(rec)
    return out


# -- the canonical form ------------------------------------------------------------------------------------------


def frame_of(rec: dict[str, Any]) -> str | None:
    frame = (rec.get("data") or {}).get("frame")
    return frame if isinstance(frame, str) else None


def branch_prefix(parallel_frame: str, node_id: str, branch_id: str) -> str:
    """The frame path of a branch: ``<parent path>/<node>[#visit]/<branch_id>`` (ckp.md frame strings)."""
    m = re.fullmatch(r"(.*?)(#\d+)?", parallel_frame)
    assert m is not None
    base = "" if m[1] == "-" else m[1]
    segment = f"{node_id}{m[2] or ''}/{branch_id}"
    return f"{base}/{segment}" if base else segment


def in_frame(frame: str | None, prefix: str) -> bool:
    return frame is not None and (frame == prefix or (frame.startswith(prefix) and frame[len(prefix)] in "/#["))


def canonical(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Regroup every parallel block (module docstring); everything else keeps its order."""
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(events):
        rec = events[i]
        if rec["type"] != "parallel_started":
            out.append(rec)
            i += 1
            continue
        block, i = parallel_block(events, i)
        out.extend(block)
    return out


def parallel_block(events: list[dict[str, Any]], start: int) -> tuple[list[dict[str, Any]], int]:
    head = events[start]
    node, frame = head["data"]["node_id"], frame_of(head) or "-"
    branches = list(head["data"]["branches"])
    prefixes = {b: branch_prefix(frame, node, b) for b in branches}

    def own(rec: dict[str, Any]) -> bool:  # an event of the parallel node itself
        return rec["data"].get("node_id") == node and frame_of(rec) == frame

    def branch(rec: dict[str, Any]) -> str | None:
        if own(rec) and rec["type"] == "parallel_branch_completed":
            return str(rec["data"]["branch_id"])
        return next((b for b, p in prefixes.items() if in_frame(frame_of(rec), p)), None)

    end, last = None, start
    for j in range(start + 1, len(events)):
        rec = events[j]
        if own(rec) and rec["type"] == "parallel_completed":
            end = j
            break
        if branch(rec) is not None or (own(rec) and rec["type"] == "parallel_merge_conflict"):
            last = j
    stop = end if end is not None else last + 1
    inner = events[start + 1:stop]
    groups: dict[str, list[dict[str, Any]]] = {b: [] for b in branches}
    rest: list[dict[str, Any]] = []
    for rec in inner:
        b = branch(rec)
        (groups[b] if b is not None else rest).append(rec)
    block = [head]
    for b in branches:
        done = [r for r in groups[b] if own(r)]
        block.extend(canonical([r for r in groups[b] if not own(r)]) + done)
    block.extend(rest)
    seqs = sorted(r["seq"] for r in inner)
    assert seqs == list(range(head["seq"] + 1, head["seq"] + 1 + len(inner))), seqs
    for rec in block[1:]:
        rec["seq"] = "~"
    if end is not None:
        block.append(events[end])
    return block, stop + (1 if end is not None else 0)


UUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
TIME = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(?:\.\d+)?(?:Z|[+-]\d{2}:\d{2})?")
HTTP_DATE = re.compile(r"(?:Mon|Tue|Wed|Thu|Fri|Sat|Sun), \d{2} [A-Z][a-z]{2} \d{4} \d{2}:\d{2}:\d{2} GMT")
TOKEN_PARAM = re.compile(r"([?&]token=)[^&\"\s]+")
TIMED = {"duration_ms", "latency_ms", "elapsed_ms", "waited_ms", "duration_seconds"}
MACHINE = {"runtime_instance": "<runtime-instance>"}


class Names:
    """Stable names for ids (module docstring), in the order they are met."""

    def __init__(self, urls: dict[str, str]) -> None:
        self.ids: dict[str, str] = {}
        self.counts: Counter[str] = Counter()
        hosts = {url.split("://", 1)[1]: f"{label[:-1]}-host>" for url, label in urls.items()}  # provider_host
        self.urls = sorted([*urls.items(), *hosts.items()], key=lambda kv: -len(kv[0]))

    def name(self, raw: str, label: str) -> None:
        self.ids.setdefault(raw, label)

    def uuid(self, raw: str, kind: str) -> str:
        if raw not in self.ids:
            self.counts[kind] += 1
            self.ids[raw] = f"<{kind}-{self.counts[kind]}>"
        return self.ids[raw]

    def text(self, s: str, key: str) -> str:
        for url, label in self.urls:
            s = s.replace(url, label)
        s = TOKEN_PARAM.sub(r"\1<token>", s)
        s = UUID.sub(lambda m: self.uuid(m[0], key), s)
        return HTTP_DATE.sub("<time>", TIME.sub("<time>", s))

    def __call__(self, value: Any, key: str = "id") -> Any:
        if isinstance(value, dict):
            return {k: self.field(k, value[k]) for k in sorted(value)}
        if isinstance(value, list):
            return [self(v, key) for v in value]
        if isinstance(value, str):
            return self.text(value, key)
        return value

    def field(self, key: str, value: Any) -> Any:
        if key in TIMED and isinstance(value, int | float) and not isinstance(value, bool):
            return "<duration>"
        if key in MACHINE and isinstance(value, str):
            return MACHINE[key]
        return self(value, key)


@dataclass
class Recording:
    """What a scenario ran: its run (named ``run`` in the golden; child runs and approvals are found from it)."""

    run_id: str


async def golden_of(w: World, rec: Recording) -> dict[str, Any]:
    """The canonical, normalised form of everything a scenario's runs recorded."""
    names = Names(w.urls)
    names.name(rec.run_id, "<run>")
    runs: dict[str, list[dict[str, Any]]] = {}
    pending = [(rec.run_id, "run")]
    approvals: list[str] = []
    while pending:
        run_id, label = pending.pop(0)
        events = canonical(await recorded_run(w, run_id))
        runs[label] = events
        for i, e in enumerate(events, 1):
            names.name(e["event_id"], f"<event {label}#{i}>")
            if e["type"] == "subflow_started":
                child = e["data"]["child_run_id"]
                if child not in names.ids:
                    n = sum(1 for v in names.ids.values() if v.startswith("<child-")) + 1
                    names.name(child, f"<child-{n}>")
                    pending.append((child, f"child-{n}"))
            if e["type"] == "approval_requested" and e["data"]["approval_id"] not in approvals:
                approvals.append(e["data"]["approval_id"])
                names.name(e["data"]["approval_id"], f"<approval-{len(approvals)}>")
    approval_messages: dict[str, list[dict[str, Any]]] = {}
    for approval_id in approvals:  # named before anything is normalised: run events may be caused by them
        label = names.ids[approval_id][1:-1]
        approval_messages[label] = await stream_messages(w.platform.nats_url, "approval", approval_id)
        for i, m in enumerate(approval_messages[label], 1):
            names.name(m["envelope"]["event_id"], f"<event {label}#{i}>")
    out: dict[str, Any] = {"runs": {}, "approvals": {}}
    for label, events in runs.items():
        run_id = next(k for k, v in names.ids.items() if v == f"<{label}>")
        final = interleaving_free((await w.client.get(f"/api/runs/{run_id}")).json(), events)
        out["runs"][label] = {"events": [names({k: v for k, v in e.items() if k != "event_id"}) for e in events],
                              "final": names(final)}
    for label, messages in approval_messages.items():
        out["approvals"][label] = [
            names({"subject": m["subject"], **{k: v for k, v in m["envelope"].items() if k != "event_id"}})
            for m in messages]
    return out


def interleaving_free(final: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The run row's ``last_node_id`` / ``last_step_id`` follow the last ``node_started`` / ``step_started`` in
    stream order: when that event is inside a parallel block, which branch came last is not deterministic."""
    final = dict(final)
    for column, event_type, key in (("last_node_id", "node_started", "node_id"),
                                    ("last_step_id", "step_started", "step_id")):
        last = [e for e in events if e["type"] == event_type][-1:]
        if last and last[0]["seq"] == "~":
            block = {e["data"].get(key) for e in events if e["type"] == event_type and e["seq"] == "~"}
            assert final.get(column) in block, (column, final.get(column), block)
            final[column] = "<interleaving>"
    return final


def compare(name: str, got: dict[str, Any]) -> None:
    path = GOLDEN / f"{name}.json"
    text = json.dumps(got, indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    if UPDATE:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        return
    assert path.exists(), f"{path} is missing: record it with LANGORCH_UPDATE_GOLDEN=1"
    want = path.read_text()
    if json.loads(want) == got:
        return
    want_text = json.dumps(json.loads(want), indent=1, sort_keys=True, ensure_ascii=False) + "\n"
    diff = "".join(difflib.unified_diff(want_text.splitlines(keepends=True), text.splitlines(keepends=True),
                                        f"golden/{path.name}", "this run", n=4))
    pytest.fail(f"the event stream of scenario {name!r} differs from {path} (- golden, + now). If the change is a "
                f"deliberate behaviour change, record it again with LANGORCH_UPDATE_GOLDEN=1.\n{diff}",
                pytrace=False)


# -- scenarios ---------------------------------------------------------------------------------------------------

Scenario = Callable[[World], Awaitable[Recording]]
SCENARIOS: dict[str, Scenario] = {}


def scenario(fn: Scenario) -> Scenario:
    SCENARIOS[fn.__name__] = fn
    return fn


async def run_to_end(w: World, doc: dict[str, Any], inputs: dict[str, Any] | None = None,
                     wanted: tuple[str, ...] = ("completed", "failed", "canceled")) -> Recording:
    await imported(w.client, doc)
    run_id = await start_run(w.client, doc["procedure_id"], inputs, version=doc["version"])
    run = await wait_status(w.client, run_id, wanted, timeout=RUN_TIMEOUT_S)
    assert run["status"] in wanted
    return Recording(run_id)


async def open_approval(w: World, run_id: str) -> str:
    """The id of the approval the run waits on, once the approvals service has opened it."""
    run = await wait_status(w.client, run_id, ("waiting_approval",), timeout=RUN_TIMEOUT_S)
    approval_id = str(run["waiting_on"]["approval_id"])
    await wait_until(lambda: w.client.get(f"/api/approvals/{approval_id}"),
                     lambda r: r.status_code == 200 and r.json().get("status") == "pending")
    return approval_id


async def decide(w: World, doc: dict[str, Any], inputs: dict[str, Any], decision: str | None) -> Recording:
    """Run until the approval, decide it (``None``: let it time out), run to the end."""
    await imported(w.client, doc)
    run_id = await start_run(w.client, doc["procedure_id"], inputs, version=doc["version"])
    approval_id = await open_approval(w, run_id)
    if decision is not None:
        r = await w.client.post(f"/api/approvals/{approval_id}/decision", json={"decision": decision})
        assert r.status_code == 200, r.text
    await wait_status(w.client, run_id, timeout=RUN_TIMEOUT_S)
    await settled_approval(w, approval_id)
    return Recording(run_id)


async def settled_approval(w: World, approval_id: str) -> None:
    await wait_until(lambda: w.client.get(f"/api/approvals/{approval_id}"),
                     lambda r: r.json().get("status") not in (None, "pending"), timeout=RUN_TIMEOUT_S)


# examples/

@scenario
async def example_minimal_greeting(w: World) -> Recording:
    return await run_to_end(w, example("minimal_greeting.ckp.json"))


@scenario
async def example_internal_variables(w: World) -> Recording:
    return await run_to_end(w, example("internal_variables.ckp.json"))


@scenario
async def example_simple_http_found(w: World) -> Recording:
    posts = next(u for u, n in w.urls.items() if n == "<posts-api>")
    return await run_to_end(w, example("simple_http_test.ckp.json"), {"post_id": 7, "api_base_url": posts})


@scenario
async def example_simple_http_missing_post_terminates_failed(w: World) -> Recording:
    posts = next(u for u, n in w.urls.items() if n == "<posts-api>")
    return await run_to_end(w, example("simple_http_test.ckp.json"), {"post_id": 42, "api_base_url": posts})


PRODUCT = example("product_enrichment_pipeline.ckp.json")


@scenario
async def example_product_enrichment_premium_approved(w: World) -> Recording:
    """Parallel ``all`` of two internal branches, a checkpoint, then an approval that is approved."""
    return await decide(w, PRODUCT, {"product_id": 7, "enrichment_mode": "premium"}, "approved")


@scenario
async def example_product_enrichment_standard_rejected(w: World) -> Recording:
    return await decide(w, PRODUCT, {"product_id": 3}, "rejected")


@scenario
async def example_product_enrichment_approval_timeout(w: World) -> Recording:
    """The example with its approval's 300 s timeout shortened to 1 s; nobody decides."""
    doc = copy.deepcopy(PRODUCT)
    doc["procedure_id"] = "product-enrichment-demo-timeout"
    doc["workflow_graph"]["nodes"]["approval_gate"]["timeout_ms"] = 1000
    return await decide(w, doc, {"product_id": 5}, None)


@scenario
async def example_web_title_check_passes(w: World) -> Recording:
    return await run_to_end(w, example("web_title_check.ckp.json"))


@scenario
async def example_web_title_check_verification_fails(w: World) -> Recording:
    return await run_to_end(w, example("web_title_check.ckp.json"), {"target_url": "https://example.org/other"})


@scenario
async def example_hybrid_dispatch_async_callback(w: World) -> Recording:
    """Tool step, async workflow step (the run pauses until the agent calls back), sync workflow step."""
    c = w.client
    doc = example("hybrid_dispatch.ckp.json")
    await imported(c, doc)
    run_id = await start_run(c, doc["procedure_id"], version=doc["version"])
    paused = await wait_status(c, run_id, ("paused", "failed", "completed"), timeout=RUN_TIMEOUT_S)
    assert paused["status"] == "paused", paused
    [delegated] = [r for r in w.agents.hybrid.requests if run_of(r) == run_id and r["dispatch_mode"] == "async"]
    async with httpx.AsyncClient() as outside:  # the agent calls back with the URL it was given
        r = await outside.post(delegated["params"]["callback_url"],
                               json={"status": "success", "output": {"session": "S-1"}})
    assert r.status_code == 202, r.text
    await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    return Recording(run_id)


@scenario
async def example_multi_agent_invoice_one_invoice(w: World) -> Recording:
    """Email, web portal, LLM, desktop ERP, database and emails for one invoice (loop, checkpoints, secrets as
    grants, a ``warn`` verification); ``wait_after_ms`` removed (they only sleep)."""
    doc = copy.deepcopy(example("multi_agent_invoice.ckp.json"))
    for node in doc["workflow_graph"]["nodes"].values():
        for step in node.get("steps") or []:
            step.pop("wait_after_ms", None)
    text = json.dumps({"metadata": INVOICE_METADATA, "confidence": 96})
    w.llm.state.model("gpt-4").script = [completion(text)]
    return await run_to_end(w, doc, {"execution_date": INVOICE_DATE})


# the engine's paths, on small documents

def doc_of(procedure_id: str, nodes: dict[str, Any], start: str, **extra: Any) -> dict[str, Any]:
    return {"procedure_id": procedure_id, "version": "1", **extra,
            "workflow_graph": {"start_node": start, "nodes": nodes}}


def approval_doc(procedure_id: str, **approval: Any) -> dict[str, Any]:
    return doc_of(procedure_id, {
        "review": {"type": "human_approval", "description": "Review", "prompt": "Ship order {{order}}?",
                   "context_data": {"order": "{{order}}"}, "decision_variable": "verdict",
                   "on_approve": "ship", "on_reject": "stop", **approval},
        "ship": {"type": "terminate", "outputs": {"shipped": True, "verdict": "{{verdict}}",
                                                  "by": "{{approval.review.decided_by}}"}},
        "stop": {"type": "terminate", "status": "failed", "outputs": {"verdict": "{{verdict}}"}}}, "review",
        variables_schema={"order": {"type": "string", "default": "A-1"}})


@scenario
async def approval_approved(w: World) -> Recording:
    return await decide(w, approval_doc("golden_approval"), {}, "approved")


@scenario
async def approval_rejected(w: World) -> Recording:
    return await decide(w, approval_doc("golden_approval"), {"order": "B-2"}, "rejected")


@scenario
async def approval_timeout_auto_reject(w: World) -> Recording:
    return await decide(w, approval_doc("golden_approval_timeout", timeout_ms=1000, timeout_action="auto_reject"),
                        {}, None)


@scenario
async def loop_collect_with_failing_iteration(w: World) -> Recording:
    doc = doc_of("golden_loop", {
        "each": {"type": "loop", "iterator": "items", "iterator_variable": "n", "index_variable": "i",
                 "body_node": "work", "collect_variable": "results", "collect_expression": "{{r.value}}",
                 "errors_variable": "failures", "continue_on_error": True, "next_node": "done"},
        "work": {"type": "sequence", "agent": "GOLDEN", "steps": [
            {"step_id": "note", "action": "log", "message": "item {{i}}: {{n}}"},
            {"step_id": "check", "action": "check", "n": "{{n}}", "bad": 2, "output_variable": "r"}]},
        "done": {"type": "terminate", "outputs": {"results": "{{results}}", "failures": "{{failures}}"}}},
        "each", variables_schema={"items": {"type": "array", "default": [1, 2, 3]}})
    return await run_to_end(w, doc)


def two_branches(procedure_id: str, a: dict[str, Any], b: dict[str, Any], **parallel: Any) -> dict[str, Any]:
    return doc_of(procedure_id, {
        "fan_out": {"type": "parallel", "branches": [{"branch_id": "a", "start_node": "a_work"},
                                                      {"branch_id": "b", "start_node": "b_work"}],
                    "next_node": "join", **parallel},
        "a_work": {"type": "sequence", "agent": "GOLDEN", "next_node": "a_more", "steps": [a]},
        "a_more": {"type": "processing", "next_node": "join", "operations": [
            {"action": "set_variable", "variable": "a_done", "value": True},
            {"action": "set_variable", "variable": "shared", "value": "from a"}]},
        "b_work": {"type": "sequence", "agent": "GOLDEN", "next_node": "join", "steps": [
            b, {"step_id": "mark", "action": "set_variable", "variable": "shared", "value": "from b"}]},
        "join": {"type": "terminate", "outputs": {"results": "{{parallel_results}}", "a_done": "{{a_done}}",
                                                  "shared": "{{shared}}"}}}, "fan_out")


@scenario
async def parallel_all_with_a_failed_branch(w: World) -> Recording:
    """``all`` + ``branch_failure: continue``: a completes, then b fails; only a's changes are merged and the
    run continues with ``parallel_results`` naming b's error. b fails only once the parallel node has recorded
    a's end (the lost wake-up of the module docstring)."""
    doc = two_branches("golden_parallel_all",
                       {"step_id": "call", "action": "echo", "value": "a", "output_variable": "a_out"},
                       {"step_id": "call", "action": "boom", "code": "b_broke", "message": "b cannot",
                        "after_branch": "a"},
                       wait_strategy="all", branch_failure="continue")
    return await run_to_end(w, doc)


@scenario
async def parallel_all_merge_conflict(w: World) -> Recording:
    """``all``, both branches complete and both write ``shared``: ``parallel_merge_conflict``, b (declared
    later) wins. b answers only once a's end is recorded."""
    doc = two_branches("golden_parallel_merge",
                       {"step_id": "call", "action": "echo", "value": "a", "output_variable": "a_out"},
                       {"step_id": "call", "action": "echo", "value": "b", "output_variable": "b_out",
                        "after_branch": "a"},
                       wait_strategy="all")
    return await run_to_end(w, doc)


@scenario
async def parallel_any_first_wins(w: World) -> Recording:
    """``any``: a answers once b's call has arrived, so a wins and b is canceled inside its call."""
    doc = two_branches("golden_parallel_any",
                       {"step_id": "call", "action": "answer_after", "after": "b"},
                       {"step_id": "call", "action": "block", "name": "b"},
                       wait_strategy="any")
    return await run_to_end(w, doc)


@scenario
async def parallel_branch_failure_fails_the_node(w: World) -> Recording:
    """``branch_failure: fail``: a fails once b's call has arrived; b is canceled and the node fails."""
    doc = two_branches("golden_parallel_fail",
                       {"step_id": "call", "action": "boom", "after": "b", "code": "a_broke", "message": "a cannot"},
                       {"step_id": "call", "action": "block", "name": "b"},
                       wait_strategy="all", branch_failure="fail")
    return await run_to_end(w, doc)


CHILD = doc_of("golden_child", {
    "calc": {"type": "processing", "next_node": "check", "operations": [
        {"action": "calculate", "expression": "n * 2", "output_variable": "double"}]},
    "check": {"type": "logic", "rules": [{"condition": "n < 0", "next_node": "bad"}], "default_next_node": "done"},
    "bad": {"type": "terminate", "status": "failed", "outputs": {"why": "negative"}},
    "done": {"type": "terminate", "outputs": {"double": "{{double}}"}}}, "calc",
    variables_schema={"n": {"type": "number", "required": True}})
PARENT = doc_of("golden_parent", {
    "call": {"type": "subflow", "procedure_id": "golden_child", "version": "1", "input_mapping": {"n": "{{x}}"},
             "output_mapping": {"result": "double"}, "next_node": "end"},
    "end": {"type": "terminate", "outputs": {"result": "{{result}}"}}}, "call",
    variables_schema={"x": {"type": "number"}})


@scenario
async def subflow_child_completes(w: World) -> Recording:
    await imported(w.client, CHILD)
    return await run_to_end(w, PARENT, {"x": 21})


@scenario
async def subflow_child_fails(w: World) -> Recording:
    await imported(w.client, CHILD)
    return await run_to_end(w, PARENT, {"x": -1})


@scenario
async def failure_retries_then_handler_fallback(w: World) -> Recording:
    """A step fails (retryable) on every attempt: its own retry policy (2 retries, fixed 20 ms), then the node's
    ``escalate`` handler (with a recovery step and ``notify_on_error``) routes to a fallback that ends failed."""
    doc = doc_of("golden_retries", {
        "charge": {"type": "sequence", "agent": "GOLDEN", "next_node": "done",
                   "steps": [{"step_id": "capture", "action": "flaky", "fail_until": 9, "output_variable": "paid",
                              "retry_config": {"max_retries": 2, "strategy": "fixed", "retry_delay_ms": 20}}],
                   "error_handlers": [{"error_type": "flaky_error", "action": "escalate",
                                       "fallback_node": "compensate", "notify_on_error": True,
                                       "recovery_steps": [{"step_id": "undo", "action": "log",
                                                           "message": "undoing after {{error.code}}"}]}]},
        "compensate": {"type": "processing", "next_node": "failed", "operations": [
            {"action": "log", "level": "WARNING", "message": "compensating: {{error.message}}"}]},
        "done": {"type": "terminate", "outputs": {"paid": "{{paid}}"}},
        "failed": {"type": "terminate", "status": "failed", "outputs": {"reason": "{{error.code}}"}}}, "charge")
    return await run_to_end(w, doc)


@scenario
async def failure_retry_succeeds(w: World) -> Recording:
    """A step fails twice (retryable) and succeeds on its third attempt (exponential policy, 10 ms base)."""
    doc = doc_of("golden_retry_ok", {
        "charge": {"type": "sequence", "agent": "GOLDEN", "next_node": "done",
                   "steps": [{"step_id": "capture", "action": "flaky", "fail_until": 2, "output_variable": "paid",
                              "retry_config": {"max_retries": 3, "retry_delay_ms": 10}}]},
        "done": {"type": "terminate", "outputs": {"paid": "{{paid}}"}}}, "charge")
    return await run_to_end(w, doc)


@scenario
async def failure_recovery_path_completes(w: World) -> Recording:
    """An unhandled step error on the main path starts ``global_config.on_failure``; the recovery path ends on a
    success terminate, so the run completes ``recovered_via`` it."""
    doc = doc_of("golden_recovery", {
        "work": {"type": "sequence", "agent": "GOLDEN", "next_node": "done", "steps": [
            {"step_id": "first", "action": "echo", "value": 1, "output_variable": "first"},
            {"step_id": "second", "action": "boom", "code": "hard_failure", "message": "cannot continue"}]},
        "done": {"type": "terminate", "outputs": {"ok": True}},
        "recover": {"type": "sequence", "next_node": "recovered", "steps": [
            {"step_id": "note", "action": "log", "level": "ERROR", "message": "recovering from {{error.code}}"}]},
        "recovered": {"type": "terminate", "outputs": {"recovered_from": "{{error.code}}",
                                                       "first": "{{first}}"}}}, "work",
        global_config={"on_failure": "recover"})
    return await run_to_end(w, doc)


@scenario
async def failure_terminate_failed(w: World) -> Recording:
    doc = doc_of("golden_terminate_failed", {
        "prepare": {"type": "processing", "next_node": "stop", "operations": [
            {"action": "set_variable", "variable": "n", "value": 3}],
            "is_checkpoint": True},
        "stop": {"type": "terminate", "status": "failed", "outputs": {"n": "{{n}}"},
                 "cleanup_actions": [{"action": "log", "message": "cleanup"}],
                 "error_actions": [{"action": "log", "level": "ERROR", "message": "stopped with {{n}}"}],
                 "final_audit_log": {"result": "failed", "n": "{{n}}"}}}, "prepare")
    return await run_to_end(w, doc)


@scenario
async def cancel_while_a_step_runs(w: World) -> Recording:
    """The run is canceled while its agent call is in flight (once the agent has received it)."""
    c = w.client
    doc = doc_of("golden_cancel_running", {
        "work": {"type": "sequence", "agent": "GOLDEN", "next_node": "done", "steps": [
            {"step_id": "hold", "action": "block", "name": "hold"}]},
        "done": {"type": "terminate"}}, "work")
    await imported(c, doc)
    run_id = await start_run(c, doc["procedure_id"], version="1")
    await asyncio.wait_for(w.agents.gate.arrival(run_id, "hold").wait(), RUN_TIMEOUT_S)
    r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "no longer needed"})
    assert r.status_code in (200, 202), r.text
    run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "canceled", run
    return Recording(run_id)


@scenario
async def cancel_while_waiting_for_approval(w: World) -> Recording:
    c = w.client
    doc = approval_doc("golden_cancel_waiting")
    await imported(c, doc)
    run_id = await start_run(c, doc["procedure_id"], version="1")
    approval_id = await open_approval(w, run_id)
    r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "order withdrawn"})
    assert r.status_code in (200, 202), r.text
    run = await wait_status(c, run_id, timeout=RUN_TIMEOUT_S)
    assert run["status"] == "canceled", run
    await settled_approval(w, approval_id)
    return Recording(run_id)


@pytest.mark.parametrize("name", list(SCENARIOS))
async def test_golden_event_stream(world: World, name: str) -> None:
    recording = await SCENARIOS[name](world)
    compare(name, await golden_of(world, recording))


def test_every_golden_file_belongs_to_a_scenario() -> None:
    """A renamed or removed scenario must take its golden file with it (and every scenario has one)."""
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == sorted(SCENARIOS)
