"""deploy/prometheus and deploy/grafana against a real Prometheus (Debian's ``prometheus`` package).

``promtool`` checks the alert rules and runs their unit tests (every alert has a firing and a quiet case). Then a
live stack: ``langorch up`` as an operator runs it (on the test's NATS and PostgreSQL), real agents, an MCP server
and an OpenAI-compatible LLM server, and a real Prometheus scraping the stack's ``/metrics`` every second. A small
workload runs twice (so that counters move between scrapes, as under steady traffic), then every query of every
dashboard panel is evaluated through Prometheus's HTTP API (with every dashboard variable at All): each must return
at least one finite value, and every variable's label values query lists values. A cron trigger firing every minute
gives the scheduler's lag data.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import nats
import pytest
import yaml

from tests.agent_server import AgentBehaviour, RunningAgent, running_agent
from tests.deploy_support import DASHBOARDS, ROOT
from tests.helpers import TERMINAL, decide, pending_approval, procedure_doc, wait_status, wait_until
from tests.llm_server import running_llm_server
from tests.mcp_server import running_mcp
from tests.ports import free_port

pytestmark = pytest.mark.integration

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"
START_DEADLINE_S = 180
RATE_WINDOW = "5m"  # $__rate_interval: covers both rounds of the workload
RANGE_WINDOW = "15m"  # $__range
# panels whose series only exist after a fault the workload cannot cause on purpose, and why
NO_DATA_EXPECTED = {
    "Append conflicts": "only counted when two writers race on one aggregate (tested in test_runtime_metrics.py)",
}


def _promtool(*args: str, cwd: Path = PROMETHEUS_DIR) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["promtool", *args], cwd=cwd, capture_output=True, text=True, timeout=120)


def test_alert_rules_are_valid() -> None:
    result = _promtool("check", "rules", "alerts.yml")
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_alert_unit_tests_pass() -> None:
    result = _promtool("test", "rules", "alerts_test.yml")
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_firing_and_a_quiet_case_and_a_runbook() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    tests = yaml.safe_load((PROMETHEUS_DIR / "alerts_test.yml").read_text())["tests"]
    runbooks = (ROOT / "docs" / "operations" / "alerts.md").read_text()
    anchors = {re.sub(r"[^a-z0-9 -]", "", line[3:].strip().lower()).replace(" ", "-")
               for line in runbooks.splitlines() if line.startswith("## ")}
    alerts = [rule for group in rules["groups"] for rule in group["rules"]]
    assert len(alerts) == 8
    for rule in alerts:
        name = rule["alert"]
        cases = [case for test in tests for case in test["alert_rule_test"] if case["alertname"] == name]
        assert any(case["exp_alerts"] for case in cases), f"{name}: no case where it fires"
        assert any(not case["exp_alerts"] for case in cases), f"{name}: no case where it stays quiet"
        path, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert path == "docs/operations/alerts.md"
        assert anchor == name.lower()
        assert anchor in anchors, f"{name}: no runbook section #{anchor}"


# -- the live stack --------------------------------------------------------------------------------------------


@dataclass
class Process:
    proc: subprocess.Popen[bytes]
    log: Path

    def text(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


def _spawn(args: list[str], log: Path, env: dict[str, str] | None = None) -> Process:
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Process(proc, log)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    """Outside pytest's basetemp, like test_up_lifecycle.py's state directories."""
    path = Path(tempfile.mkdtemp(prefix="langorch-deploy-prom-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


LLM_MODELS = {"m-priced": {"prompt_usd_per_1k": 0.5, "completion_usd_per_1k": 1.5}}


def _up_env(work_dir: Path, port: int, nats_url: str, database_url: str, llm_url: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    return {**env, "PYTHONUNBUFFERED": "1", "LANGORCH_STATE_DIR": str(work_dir / "state"),
            "LANGORCH_PORT": str(port), "LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
            "LANGORCH_AUTH_ENABLED": "false", "LANGORCH_LLM_BASE_URL": llm_url, "LANGORCH_LLM_API_KEY": "test",
            "LANGORCH_LLM_DEFAULT_MODEL": "m-priced", "LANGORCH_LLM_MODELS": json.dumps(LLM_MODELS),
            "LANGORCH_AGENT_HEALTH_INTERVAL_S": "1", "LANGORCH_AGENT_PROBE_TIMEOUT_S": "1"}


async def _wait_http(url: str, what: str, process: Process) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        async def answered() -> bool:
            assert process.proc.poll() is None, f"{what} exited:\n{process.text()}"
            try:
                return (await client.get(url)).status_code == 200
            except httpx.HTTPError:
                return False
        await wait_until(answered, timeout=START_DEADLINE_S, every=0.2)


@contextlib.asynccontextmanager
async def live_stack(work_dir: Path, nats_url: str, database_url: str, llm_url: str) -> AsyncIterator[str]:
    """``langorch up`` on the test's servers; yields the API's base URL."""
    port = free_port()
    up = _spawn([sys.executable, "-m", "langorch", "up", "--workers", "1"], work_dir / "up.log",
                _up_env(work_dir, port, nats_url, database_url, llm_url))
    try:
        base = f"http://127.0.0.1:{port}"
        await _wait_http(f"{base}/api/ready", "langorch up", up)
        yield base
    finally:
        up.stop()


@contextlib.asynccontextmanager
async def prometheus(work_dir: Path, target: str) -> AsyncIterator[httpx.AsyncClient]:
    """A real Prometheus scraping ``target`` every second with LangOrch's alert rules loaded; yields a client of
    its HTTP API."""
    config = {"global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
              "rule_files": [str(PROMETHEUS_DIR / "alerts.yml")],
              "scrape_configs": [{"job_name": "langorch", "static_configs": [{"targets": [target]}]}]}
    (work_dir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    server = _spawn(["prometheus", f"--config.file={work_dir / 'prometheus.yml'}",
                     f"--storage.tsdb.path={work_dir / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
                    work_dir / "prometheus.log")
    try:
        await _wait_http(f"http://127.0.0.1:{port}/-/ready", "prometheus", server)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as client:
            yield client
    finally:
        server.stop()


async def query(prom: httpx.AsyncClient, expr: str) -> list[dict[str, Any]]:
    r = await prom.get("/api/v1/query", params={"query": expr})
    body = r.json()
    assert r.status_code == 200, f"{expr}: {r.text}"
    assert body["status"] == "success", f"{expr}: {r.text}"
    return body["data"]["result"]  # type: ignore[no-any-return]


def finite(result: list[dict[str, Any]]) -> bool:
    return any(math.isfinite(float(sample["value"][1])) for sample in result)


def concrete(expr: str) -> str:
    """A panel's query with Grafana's interval variables replaced by windows that cover the workload, and the
    dashboards' own variables by their All value (any value)."""
    expr = expr.replace("$__rate_interval", RATE_WINDOW).replace("$__range", RANGE_WINDOW)
    variables = {v.name for d in DASHBOARDS for v in d.variables}
    return re.sub(r"\$([a-z_]+)", lambda m: ".*" if m.group(1) in variables else m.group(0), expr)


async def variable_values(prom: httpx.AsyncClient, variable: Any) -> set[str]:
    """The values Grafana lists for a ``label_values(metric{selector}, label)`` variable (all at All)."""
    r = await prom.get(f"/api/v1/label/{variable.label}/values",
                       params={"match[]": concrete(f"{variable.metric}{variable.selector}")})
    assert r.status_code == 200, r.text
    return {value for value in r.json()["data"] if value}


# -- the workload -----------------------------------------------------------------------------------------------

MAIN = {"procedure_id": "dash_main", "version": "1", "workflow_graph": {"start_node": "fetch", "nodes": {
    "fetch": {"type": "sequence", "agent": "DASHWEB", "next_node": "tool",
              "telemetry": {"custom_metrics": ["dash_seen"]},
              "steps": [{"step_id": "get", "action": "extract_text", "retry_on_failure": True,
                         "output_variable": "text"}]},
    "tool": {"type": "sequence", "agent": "DASHTOOLS", "next_node": "ask",
             "steps": [{"step_id": "hello", "action": "plain_text", "output_variable": "said"}]},
    "ask": {"type": "llm_action", "model": "m-priced", "prompt": "Say hello", "next_node": "review"},
    "review": {"type": "human_approval", "prompt": "Go on?", "on_approve": "done", "on_reject": "done"},
    "done": {"type": "terminate", "outputs": {"said": "{{said}}"}}}}}
FAILING = {"procedure_id": "dash_fail", "version": "1", "workflow_graph": {"start_node": "late", "nodes": {
    "late": {"type": "sequence", "next_node": "slow", "steps": [{"step_id": "nap", "action": "wait",
                                                                  "duration_ms": 300}],
             "sla": {"max_duration_ms": 50, "on_breach": "warn"}},
    "slow": {"type": "sequence", "next_node": "done", "steps": [{"step_id": "stuck", "action": "wait",
                                                                  "duration_ms": 5000, "timeout_ms": 200}]},
    "done": {"type": "terminate"}}}}
LEASED = {"procedure_id": "dash_lease", "version": "1", "workflow_graph": {"start_node": "call", "nodes": {
    "call": {"type": "sequence", "agent": "DASHSLOW", "next_node": "done",
             "steps": [{"step_id": "s", "action": "extract_text"}]},
    "done": {"type": "terminate"}}}}
TRIGGERED = procedure_doc("dash_trig", "1")
CRON = procedure_doc("dash_cron", "1")  # active, with a schedule firing every minute (the scheduler's lag)
# registered so that it can be fired by hand (an event trigger of a draft version: dormant, never fired by events)
TRIGGER = {"trigger_type": "event", "event_source": "nats://lo.ext.dash.orders", "dedupe_window_seconds": 600}


@dataclass
class Agents:
    web: RunningAgent
    slow: RunningAgent
    sick: RunningAgent
    mcp_url: str


async def _post(c: httpx.AsyncClient, path: str, body: dict[str, Any]) -> dict[str, Any]:
    r = await c.post(path, json=body)
    assert r.status_code in (200, 201, 202), r.text
    return r.json()  # type: ignore[no-any-return]


async def setup(c: httpx.AsyncClient, agents: Agents) -> None:
    for doc in (MAIN, FAILING, LEASED, TRIGGERED, CRON):
        await _post(c, "/api/procedures", {"ckp_json": doc})
    await _post(c, "/api/triggers/dash_trig/1", TRIGGER)
    assert (await c.patch("/api/procedures/dash_cron/1/status", json={"status": "active"})).status_code == 200
    await _post(c, "/api/triggers/dash_cron/1", {"trigger_type": "scheduled", "schedule": "* * * * *",
                                                 "input_vars": {"greeting": "on schedule"}})
    for name, channel, url, extra in (
            ("dash-web", "dashweb", agents.web.base_url, {}),
            ("dash-slow", "dashslow", agents.slow.base_url, {"concurrency_limit": 1}),
            ("dash-sick", "dashsick", agents.sick.base_url, {}),
            ("dash-tools", "dashtools", agents.mcp_url, {"protocol": "mcp", "capabilities": ["plain_text"]})):
        await _post(c, "/api/agents", {"name": name, "channel": channel, "base_url": url,
                                       "capabilities": ["extract_text"], **extra})


async def run_of(c: httpx.AsyncClient, procedure_id: str) -> str:
    return str((await _post(c, "/api/runs", {"procedure_id": procedure_id, "procedure_version": "1"}))["run_id"])


async def fires(c: httpx.AsyncClient, js: Any, round_no: int) -> str:
    """A manual fire and its duplicate (the same inputs within the dedupe window); a webhook call for a procedure
    without a webhook registration; a message on LO_EXT that no event trigger matches."""
    fire = "/api/triggers/dash_trig/1/fire"
    body = {"input_vars": {"greeting": f"round {round_no}"}}
    run_id = str((await _post(c, fire, body))["run_id"])
    assert (await c.post(fire, json=body)).status_code == 409  # duplicate_delivery
    assert (await c.post("/api/triggers/webhook/dash_main", json={})).status_code == 404
    await js.publish("lo.ext.dash.unwatched", json.dumps({"round": round_no}).encode())
    return run_id


async def workload(c: httpx.AsyncClient, agents: Agents, js: Any, round_no: int) -> None:
    """One round: a run through an agent (a retry after a 503), an MCP tool, a priced LLM and an approval; a run
    that breaches an SLA and fails on a step timeout; two runs competing for a one-slot agent; trigger fires."""
    agents.web.behaviour.execute_script.append((503, {"status": "error", "error": "busy"}, {}))
    main = await run_of(c, "dash_main")
    failing = await run_of(c, "dash_fail")
    leased = [await run_of(c, "dash_lease") for _ in range(2)]
    fired = await fires(c, js, round_no)
    approval = await pending_approval(c, main, timeout=180)
    assert (await decide(c, approval["approval_id"], decision="approve")).status_code in (200, 202)
    runs = (main, failing, *leased, fired)
    ended = {run_id: (await wait_status(c, run_id, TERMINAL, 180))["status"] for run_id in runs}
    assert ended == {main: "completed", failing: "failed", leased[0]: "completed", leased[1]: "completed",
                     fired: "completed"}, ended


@pytest.mark.timeout(900)  # a whole installation, two workload rounds and Prometheus scrapes on a loaded machine
async def test_every_dashboard_panel_has_data_on_a_live_stack(nats_url: str, database_url: str,
                                                              work_dir: Path) -> None:
    async with (running_llm_server() as llm, running_agent() as web,
                running_agent(AgentBehaviour(execute_delay_s=0.5)) as slow,
                running_agent(AgentBehaviour(healthy=False)) as sick, running_mcp() as mcp,
                live_stack(work_dir, nats_url, database_url, llm.base_url()) as base,
                prometheus(work_dir, base.removeprefix("http://")) as prom,
                httpx.AsyncClient(base_url=base, timeout=60) as c):
        agents = Agents(web, slow, sick, mcp.url)
        nc = await nats.connect(nats_url)
        try:
            js = nc.jetstream()
            await setup(c, agents)
            await workload(c, agents, js, 1)

            async def scraped() -> list[dict[str, Any]]:  # the first round's counters, seen by Prometheus
                return await query(prom, 'langorch_run_completed_total{status="failed"}')
            await wait_until(scraped, timeout=180, every=0.5)
            await workload(c, agents, js, 2)
        finally:
            await nc.close()

        async def without_data() -> list[str]:
            empty = []
            for dashboard in DASHBOARDS:
                for panel in dashboard.panels():
                    for q in panel.queries:
                        expr = concrete(q.expr)
                        if panel.title not in NO_DATA_EXPECTED and not finite(await query(prom, expr)):
                            empty.append(f"{dashboard.title} / {panel.title}: {expr}")
            return empty
        # every panel has data once the second round's last scrape is in and the schedule fired (a slot every
        # minute); a deadline, then the panels still empty
        await wait_until(without_data, lambda empty: not empty, timeout=240, every=1)

        # the procedure and node variables list the workload's procedures and the nodes of their steps
        [runs] = [d for d in DASHBOARDS if d.uid == "langorch-runs-steps"]
        values = {v.name: await variable_values(prom, v) for v in runs.variables}
        assert {"dash_main", "dash_fail", "dash_lease", "dash_trig"} <= values["procedure"], values
        assert {"fetch", "tool", "late", "slow", "call"} <= values["node"], values

        # the alert rules evaluate on the real series without errors
        rules = (await prom.get("/api/v1/rules")).json()["data"]["groups"]
        assert [r["health"] for g in rules for r in g["rules"]] == ["ok"] * 8, rules
