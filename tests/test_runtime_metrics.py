"""api.md §13.1 metrics of the runtime's calls and of the bus: agent, MCP and LLM requests by outcome, fallbacks,
open circuits, lease waits and saturation, queue depth, bus messages and append conflicts — each read from the
service's own registry after real calls to real HTTP agents, a real MCP server, a real OpenAI-compatible
server, real NATS and PostgreSQL."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import nats
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, AgentCircuitOpened, Log, RunCreated, make_event
from ckp_core.ids import new_id
from langorch_infra.bus import BusMetrics, subject_template
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology
from langorch_infra.settings import LlmModelConfig, RuntimeSettings
from langorch_runtime import service as runtime_service_module
from langorch_runtime.errors import StepError
from langorch_runtime.llm import LlmClient, LlmRequest
from langorch_runtime.metrics import RuntimeMetrics
from langorch_runtime.service import RuntimeService
from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import Platform, events_of, platform_of, register_agent, start_document, wait_status
from tests.llm_server import RunningLlmServer, running_llm_server
from tests.mcp_server import running_mcp
from tests.ports import free_port
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_agent_dispatch import failure, harness

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(registry: CollectorRegistry) -> Samples:
    text = generate_latest(registry).decode()
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def value(got: Samples, name: str, **labels: str) -> float:
    return got.get((name, tuple(sorted(labels.items()))), 0.0)


class Selected:
    """Records what the dispatcher announces when it has chosen the agent (agent id, binding)."""

    def __init__(self) -> None:
        self.items: list[tuple[str | None, str | None]] = []

    async def __call__(self, agent_id: str | None, binding: str | None) -> None:
        self.items.append((agent_id, binding))


# -- agent and MCP calls ------------------------------------------------------------------------------------


async def test_agent_requests_by_outcome_and_duration(nats_url: str) -> None:
    metrics = RuntimeMetrics()
    async with running_agent() as agent, harness(nats_url, metrics=metrics, agent_timeout_s=0.5) as h:
        await h.register("web1", agent.base_url)
        agent.behaviour.execute_script.extend([
            (200, {"status": "success", "result": {"ok": 1}}, {}),
            (200, {"status": "error", "error": "no such page", "retryable": False}, {}),
            (503, {"status": "error", "error": "busy"}, {}),
            (200, "not json at all", {}),
        ])
        selected = Selected()
        request = h.request()
        request.on_selected = selected
        assert await h.dispatcher.dispatch(request) == {"ok": 1}
        assert selected.items == [("web1", "agent_http")]
        for code in ("agent_error", "agent_unavailable", "agent_protocol_error"):
            assert (await failure(h.dispatcher.dispatch(h.request()))).code == code
        agent.behaviour.execute_delay_s = 2.0
        assert (await failure(h.dispatcher.dispatch(h.request()))).code == "step_timeout"  # binding default
        assert (await failure(h.dispatcher.dispatch(h.request(timeout_ms=200)))).code == "step_timeout"  # the step's
        cancelled = asyncio.create_task(h.dispatcher.dispatch(h.request()))  # a run canceled mid-call: no outcome
        await h.until(lambda: len(agent.behaviour.executions) == 7)
        cancelled.cancel()
        with pytest.raises(asyncio.CancelledError):
            await cancelled
        agent.behaviour.execute_delay_s = 0.0
        await h.register("gone", f"http://127.0.0.1:{free_port()}", channel="void")
        # refused at once; the step's own timeout (not the binding's 0.5 s) leaves room for the lease and the
        # registry on a loaded machine (CI once saw step_timeout here)
        assert (await failure(h.dispatcher.dispatch(h.request(channel="void", timeout_ms=10_000)))).code == \
            "agent_unavailable"

        got = samples(metrics.registry)
        count = "langorch_agent_requests_total"
        assert value(got, count, channel="web", outcome="success") == 1
        assert value(got, count, channel="web", outcome="error") == 2  # agent error envelope, HTTP 503
        assert value(got, count, channel="web", outcome="protocol_error") == 1
        assert value(got, count, channel="web", outcome="timeout") == 2
        assert value(got, count, channel="void", outcome="transport_error") == 1
        assert value(got, "langorch_agent_request_duration_seconds_count", channel="web") == 6
        assert value(got, "langorch_agent_request_duration_seconds_sum", channel="web") >= 0.5  # the timeout
        assert value(got, "langorch_mcp_requests_total", channel="web", outcome="success") == 0


async def test_mcp_requests_by_outcome_and_binding(nats_url: str) -> None:
    metrics = RuntimeMetrics()
    async with running_mcp() as server, harness(nats_url, metrics=metrics, mcp_timeout_s=3) as h:
        await h.register("docs", server.url, channel="docs", protocol="mcp", capabilities=["lookup_price", "broken"])
        selected = Selected()
        request = h.request("lookup_price", channel="docs", params={"sku": "A"})
        request.on_selected = selected
        assert (await h.dispatcher.dispatch(request))["sku"] == "A"
        assert selected.items == [("docs", "mcp_tool")]
        error = await failure(h.dispatcher.dispatch(h.request("broken", channel="docs", params={"reason": "x"})))
        assert error.code == "mcp_tool_error"
        await h.register("gone", f"http://127.0.0.1:{free_port()}/mcp", channel="nowhere", protocol="mcp",
                         capabilities=["lookup_price"])
        error = await failure(h.dispatcher.dispatch(h.request("lookup_price", channel="nowhere",
                                                              params={"sku": "x"})))
        assert error.code == "mcp_error"
        got = samples(metrics.registry)
        assert value(got, "langorch_mcp_requests_total", channel="docs", outcome="success") == 1
        assert value(got, "langorch_mcp_requests_total", channel="docs", outcome="error") == 1
        assert value(got, "langorch_mcp_requests_total", channel="nowhere", outcome="transport_error") == 1
        assert value(got, "langorch_agent_requests_total", channel="docs", outcome="success") == 0


async def test_lease_wait_saturation_and_active_leases(nats_url: str) -> None:
    metrics = RuntimeMetrics()
    behaviour = AgentBehaviour(execute_delay_s=0.5)
    async with running_agent(behaviour) as agent, harness(nats_url, metrics=metrics) as h:
        await h.register("solo", agent.base_url, concurrency_limit=1)
        first = asyncio.create_task(h.dispatcher.dispatch(h.request()))
        await h.until(lambda: len(behaviour.executions) == 1)
        got = samples(metrics.registry)
        assert value(got, "langorch_leases_active", pool_id="web_default") == 1
        second = asyncio.create_task(h.dispatcher.dispatch(h.request()))
        await asyncio.gather(first, second)
        got = samples(metrics.registry)
        assert value(got, "langorch_leases_active", pool_id="web_default") == 0
        assert value(got, "langorch_pool_saturation_total", pool_id="web_default") == 1
        assert value(got, "langorch_lease_wait_seconds_count", pool_id="web_default") == 2
        assert value(got, "langorch_lease_wait_seconds_sum", pool_id="web_default") >= 0.3  # the second waited


async def test_open_agent_circuits_are_a_gauge(nats_url: str) -> None:
    metrics = RuntimeMetrics()
    async with running_agent() as agent, harness(nats_url, metrics=metrics) as h:
        await h.register("web1", agent.base_url)
        await h.register("docs1", agent.mcp_url, channel="docs", protocol="mcp")
        assert not [k for k in samples(metrics.registry) if k[0] == "langorch_circuit_breaker_open"]
        store = JetStreamEventStore(h.service.js)
        for agent_id in ("web1", "docs1"):
            state = h.dispatcher.registry[agent_id]
            await store.append([make_event(AgentCircuitOpened(agent_id=agent_id, consecutive_failures=3),
                                           aggregate_id=agent_id, seq=state.seq + 1, actor=Actor.system("runtime"))],
                               expected_position=state.position)
            await h.until(lambda a=agent_id: h.dispatcher.registry[a].circuit_open)  # type: ignore[misc]
        got = samples(metrics.registry)
        assert value(got, "langorch_circuit_breaker_open", target_kind="agent", target="web1") == 1
        assert value(got, "langorch_circuit_breaker_open", target_kind="mcp", target="docs1") == 1


# -- LLM calls ----------------------------------------------------------------------------------------------


@pytest.fixture
async def llm() -> AsyncIterator[RunningLlmServer]:
    async with running_llm_server() as server:
        yield server


async def test_llm_requests_fallbacks_and_open_circuits(llm: RunningLlmServer) -> None:
    metrics = RuntimeMetrics()
    settings = RuntimeSettings(llm_base_url=llm.base_url(), llm_default_model="m-small", llm_models={
        "m-small": LlmModelConfig(fallbacks=["m-backup"]), "m-backup": LlmModelConfig()})
    llm.state.model("m-small").status = 503
    llm.state.model("m-backup").script = [(200, {"no": "choices"}, {})]
    async with LlmClient(settings, metrics=metrics, circuit_failures=1, circuit_open_s=3600) as client:
        with pytest.raises(StepError) as info:  # m-small: 503; m-backup: an answer without choices
            await client.complete(LlmRequest(messages=[{"role": "user", "content": "hi"}]))
        assert info.value.error.details["reason"] == "invalid_response"
        result = await client.complete(LlmRequest(messages=[{"role": "user", "content": "hi"}]))
        assert result.model == "m-backup"  # m-small's circuit is open now: straight to the fallback
        llm.state.model("gpt-unlisted").status = 200
        await client.complete(LlmRequest(messages=[{"role": "user", "content": "hi"}], model="gpt-unlisted"))
    got = samples(metrics.registry)
    count = "langorch_llm_requests_total"
    assert value(got, count, model="m-small", outcome="error") == 1
    assert value(got, count, model="m-backup", outcome="protocol_error") == 1
    assert value(got, count, model="m-backup", outcome="success") == 1
    assert value(got, count, model="other", outcome="success") == 1  # unconfigured models are "other"
    assert value(got, "langorch_llm_request_duration_seconds_count", model="m-backup") == 2
    assert value(got, "langorch_llm_fallbacks_total", primary_model="m-small", used_model="m-backup") == 1
    assert value(got, "langorch_circuit_breaker_open", target_kind="llm", target="m-small") == 1
    assert ("langorch_circuit_breaker_open", (("target", "m-backup"), ("target_kind", "llm"))) not in got


# -- through the whole platform -----------------------------------------------------------------------------

AGENT_DOC = {
    "procedure_id": "metered", "version": "1",
    "workflow_graph": {"start_node": "fetch", "nodes": {
        "fetch": {"type": "sequence", "agent": "WEB", "steps": [
            {"step_id": "get", "action": "get_title", "output_variable": "title"}], "next_node": "done"},
        "done": {"type": "terminate", "outputs": {"title": "{{title}}"}}}},
}


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


async def test_run_records_binding_and_bus_metrics(platform: Platform) -> None:
    c = platform.client
    async with serving(ScriptedAgent({"get_title": lambda body: {"title": "Hello"}})) as agent:
        await register_agent(c, agent, "web")
        run = await wait_status(c, await start_document(c, AGENT_DOC))
    assert run["status"] == "completed", run["error"]
    events = await events_of(c, run["run_id"])
    [started] = [e["payload"] for e in events if e["event_type"] == "step_started"]
    assert started["binding_kind"] == "agent_http"  # ckp.md §8: the binding once the agent is chosen

    runtime = samples(platform.runtime_service.metrics.registry)
    assert value(runtime, "langorch_step_execution_total", binding="agent_http", status="completed",
                 procedure_id="metered", node_id="fetch") == 1
    assert value(runtime, "langorch_agent_requests_total", channel="web", outcome="success") == 1
    assert value(runtime, "langorch_bus_messages_total", service="runtime", kind="cmd", outcome="ack") >= 1
    assert value(runtime, "langorch_bus_handler_duration_seconds_count", service="runtime",
                 subject="lo.cmd.run.start") == 1
    compiler = samples(platform.compiler_service.metrics.registry)
    assert value(compiler, "langorch_bus_messages_total", service="compiler", kind="cmd", outcome="ack") >= 1
    approvals = samples(platform.approvals_service.metrics.registry)
    assert value(approvals, "langorch_bus_messages_total", service="approvals", kind="evt", outcome="ack") >= 1
    await platform.app.state.projector.catch_up()
    gateway = samples(platform.app.state.metrics.registry)
    assert value(gateway, "langorch_bus_messages_total", service="gateway", kind="evt", outcome="ack") >= len(events)
    assert value(gateway, "langorch_bus_handler_duration_seconds_count", service="gateway",
                 subject="lo.evt.run.*.run_completed") == 1


async def test_queue_depth_counts_commands_waiting_for_a_runtime(nats_url: str, database_url: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(runtime_service_module, "QUEUE_POLL_S", 0.05)
    async with platform_of(nats_url, database_url, runtime=False) as p:
        runtime = RuntimeService(RuntimeSettings(nats_url=nats_url, database_url=database_url))
        await runtime.start()  # consumer bound, but run() is not fetching: start commands wait
        try:
            for _ in range(2):
                await start_document(p.client, {**AGENT_DOC, "procedure_id": "queued"})
            for _ in range(100):
                got = samples(runtime.metrics.registry)
                if value(got, "langorch_queue_depth", queue_type="run_queue") == 2:
                    break
                await asyncio.sleep(0.05)
            assert value(got, "langorch_queue_depth", queue_type="run_queue") == 2
            assert ("langorch_queue_depth", (("queue_type", "control"),)) in got
        finally:
            await runtime.stop()


# -- the bus helpers ----------------------------------------------------------------------------------------


def test_subject_templates_hide_ids() -> None:
    assert subject_template("lo.evt.run.01JABC.step_started") == "lo.evt.run.*.step_started"
    assert subject_template("lo.cmd.run.start") == "lo.cmd.run.start"
    assert subject_template("lo.audit.run.start") == "lo.audit.run.start"
    assert subject_template("lo.ext.orders.A-17.created") == "lo.ext.>"  # external subjects: one label


async def test_append_conflicts_are_counted(nats_url: str) -> None:
    registry = CollectorRegistry()
    BusMetrics(registry, "test")
    before = value(samples(registry), "langorch_event_append_conflicts_total", aggregate="run")
    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        store = JetStreamEventStore(js)
        run_id = new_id()
        actor = Actor.system("test")
        [first] = await store.append([make_event(RunCreated(procedure_id="p", procedure_version="1",
                                                            root_run_id=run_id), aggregate_id=run_id, seq=1,
                                                 actor=actor)], expected_position=0)
        await store.append([make_event(Log(level="INFO", message="a"), aggregate_id=run_id, seq=2, actor=actor)],
                           expected_position=first)
        with pytest.raises(ConcurrencyError):
            await store.append([make_event(Log(level="INFO", message="b"), aggregate_id=run_id, seq=2,
                                           actor=actor)], expected_position=first)
    finally:
        await nc.close()
    after = value(samples(registry), "langorch_event_append_conflicts_total", aggregate="run")
    assert after == before + 1
