"""Dispatch of channel steps to agents (ckp.md §4.5, §7.5, §9; api.md §7.3, §8, §15.1, §15.4): the runtime's
AgentDispatcher against real NATS, agents registered through the runtime's agent service (real commands and
events), real HTTP agents and a real MCP server."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from nats.js.errors import KeyDeletedError, KeyNotFoundError, NoKeysError

from ckp_core.commands import RegisterAgent, ReleaseLease, UpdateAgent
from ckp_core.events import Actor, AgentCircuitOpened, EventData, make_event
from ckp_core.ids import new_id
from ckp_core.ir import Binding, NodeIR, SequencePayload, StepIR, TemplateIR
from ckp_core.subjects import agent_presence_key, agent_probe_key, lease_key
from langorch_infra.jetstream import JetStreamEventStore, publish_command
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agent_dispatch import AgentDispatcher
from langorch_runtime.agents import AgentService
from langorch_runtime.errors import StepError
from langorch_runtime.machine import ContentArtifacts, DispatchRequest
from langorch_runtime.metrics import RuntimeMetrics
from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import _stopping, bounded, wait_until
from tests.mcp_server import PNG, running_mcp
from tests.ports import free_port

pytestmark = pytest.mark.integration

OPERATOR = Actor(kind="user", id="operator")


@dataclass
class Harness:
    service: AgentService
    dispatcher: AgentDispatcher
    events: list[EventData] = field(default_factory=list)

    async def register(self, agent_id: str, base_url: str, *, channel: str = "web", capabilities: list[Any] | None
                       = None, protocol: str = "http", concurrency_limit: int = 1, resource_key: str | None = None,
                       auth: dict[str, Any] | None = None) -> None:
        await publish_command(self.service.js, RegisterAgent(
            actor=OPERATOR, agent_id=agent_id, name=agent_id, channel=channel, protocol=protocol,
            base_url=base_url, concurrency_limit=concurrency_limit, resource_key=resource_key or agent_id,
            pool_id=f"{channel}_default", auth=auth or {}, token_sha256="0" * 64,
            capabilities=[{"name": c, "type": "tool"} if isinstance(c, str) else c
                          for c in (capabilities or ["extract_text"])]))
        await self.until(lambda: agent_id in self.dispatcher.registry and self.dispatcher.registry[agent_id].exists)

    async def update(self, agent_id: str, **changes: Any) -> None:
        before = self.dispatcher.registry[agent_id].seq
        await publish_command(self.service.js, UpdateAgent(actor=OPERATOR, agent_id=agent_id, changes=changes))
        await self.until(lambda: self.dispatcher.registry[agent_id].seq > before)

    async def until(self, check: Any, timeout: float = 5.0) -> None:
        deadline = asyncio.get_running_loop().time() + timeout
        while not check():
            assert asyncio.get_running_loop().time() < deadline, "condition not reached in time"
            await asyncio.sleep(0.01)

    async def emit(self, data: EventData) -> int:
        self.events.append(data)
        return len(self.events)

    def request(self, action: str = "extract_text", *, channel: str = "web", run_id: str | None = None,
                params: dict[str, Any] | None = None, step_id: str = "title", attempt: int = 1,
                timeout_ms: int | None = None, dispatch_mode: str = "async", node: NodeIR | None = None,
                key: str | None = None) -> DispatchRequest:
        run = run_id or new_id()
        node = node or NodeIR(id="scrape", type="sequence", agent=channel.upper(), channel=channel, orchestrator=False,
                              payload=SequencePayload())
        return DispatchRequest(node=node, step_id=step_id, action=action, channel=channel,
                               params=params if params is not None else {"selector": "h1"}, attempt=attempt,
                               idempotency_key=key or f"lo1:{run}:{node.id}:{step_id}:-:{attempt}", frame="-",
                               timeout_ms=timeout_ms, dispatch_mode=dispatch_mode, run_id=run,
                               procedure_id="proc", emit=self.emit)

    async def leases(self) -> dict[str, dict[str, Any]]:
        await self.dispatcher.settled()  # a dispatch returns before its lease's delete is acknowledged
        out: dict[str, dict[str, Any]] = {}
        try:
            keys = await self.dispatcher.leases.keys()
        except NoKeysError:
            return out
        for k in keys:
            with contextlib.suppress(KeyNotFoundError):
                entry = await self.dispatcher.leases.get(k)
                out[k] = json.loads(entry.value or b"{}")
        return out


@contextlib.asynccontextmanager
async def harness(nats_url: str, *, metrics: RuntimeMetrics | None = None, **settings: Any) -> AsyncIterator[Harness]:
    rs = RuntimeSettings(nats_url=nats_url, instance_id="runtime-test", **settings)
    service = AgentService(rs)
    await service.start()
    task = asyncio.create_task(service.run())
    dispatcher = AgentDispatcher(rs, metrics=metrics)
    await dispatcher.start()
    try:
        yield Harness(service, dispatcher)
    finally:
        await _stopping("the dispatcher", dispatcher.stop())
        task.cancel()
        await _stopping("the agent service's run", asyncio.wait({task}))
        await _stopping("the agent service", service.stop())


async def failure(coro: Any) -> Any:
    with pytest.raises(StepError) as info:
        await coro
    return info.value.error


# -- candidate selection ------------------------------------------------------------------------------------


async def test_candidates_by_channel_capability_status_and_circuit(nats_url: str) -> None:
    behaviours = {n: AgentBehaviour(name=n) for n in ("good", "other_action", "desktop", "offline", "broken", "star")}
    async with contextlib.AsyncExitStack() as stack:
        agents = {n: await stack.enter_async_context(running_agent(b)) for n, b in behaviours.items()}
        h = await stack.enter_async_context(harness(nats_url))
        await h.register("good", agents["good"].base_url)
        await h.register("other_action", agents["other_action"].base_url, capabilities=["click"])
        await h.register("desktop", agents["desktop"].base_url, channel="desktop")
        await h.register("offline", agents["offline"].base_url)
        await h.update("offline", status="offline")
        await h.register("broken", agents["broken"].base_url)
        broken = h.dispatcher.registry["broken"]
        store = JetStreamEventStore(h.service.js)
        await store.append([make_event(AgentCircuitOpened(agent_id="broken", consecutive_failures=3),
                                       aggregate_id="broken", seq=broken.seq + 1, actor=Actor.system("runtime"))],
                           expected_position=broken.position)
        await h.until(lambda: h.dispatcher.registry["broken"].circuit_open)

        found = await h.dispatcher.candidates("web", "extract_text")
        assert [c.agent_id for c in found] == ["good"]
        for _ in range(3):
            result = await h.dispatcher.dispatch(h.request(params={"selector": "h1"}))
            assert result == {"agent": "good", "action": "extract_text", "params": {"selector": "h1"}}
        assert [len(behaviours[n].executions) for n in behaviours] == [3, 0, 0, 0, 0, 0]

        # a wildcard capability serves any action; channel matching is by lower(agent)
        await h.register("star", agents["star"].base_url, channel="web", capabilities=["*"])
        assert await h.dispatcher.dispatch(h.request("click_cell", channel="web")) == {
            "agent": "star", "action": "click_cell", "params": {"selector": "h1"}}
        assert [c.agent_id for c in await h.dispatcher.candidates("desktop", "extract_text")] == ["desktop"]

        # draining agents receive nothing new, offline ones neither
        await h.update("good", status="draining")
        assert [c.agent_id for c in await h.dispatcher.candidates("web", "extract_text")] == ["star"]
        await h.update("star", status="offline")
        error = await failure(h.dispatcher.dispatch(h.request("extract_text")))
        assert (error.code, error.retryable) == ("no_executor", True)
        assert error.details == {"channel": "web", "action": "extract_text"}
        assert "'web'" in error.message
        assert "'extract_text'" in error.message


async def test_live_presence_and_half_open_circuit(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url, agent_circuit_half_open_s=0.4) as h:
        await h.register("web1", agent.base_url)
        presence = h.dispatcher.presence

        async def chosen() -> list[str]:
            return [c.agent_id for c in await h.dispatcher.candidates("web", "extract_text")]

        # the elected prober's failures count as soon as the dispatcher's view of lo_presence has them, before the
        # circuit event reaches the registry
        await presence.put(agent_probe_key("web1"), json.dumps({"ok": False, "consecutive_failures": 3}).encode())
        await wait_until(chosen, lambda found: found == [], timeout=5)
        await presence.put(agent_probe_key("web1"), json.dumps({"ok": True, "consecutive_failures": 0}).encode())
        # a fresh heartbeat's status is the live one
        await presence.put(agent_presence_key("web1"), json.dumps({"agent_id": "web1", "status": "draining"}).encode())
        await wait_until(chosen, lambda found: found == [], timeout=5)
        await presence.put(agent_presence_key("web1"), json.dumps({"agent_id": "web1", "status": "online"}).encode())
        await wait_until(chosen, lambda found: found == ["web1"], timeout=5)
        # an open circuit keeps the agent out until it turns half-open
        state = h.dispatcher.registry["web1"]
        await JetStreamEventStore(h.service.js).append(
            [make_event(AgentCircuitOpened(agent_id="web1", consecutive_failures=3), aggregate_id="web1",
                        seq=state.seq + 1, actor=Actor.system("runtime"))], expected_position=state.position)
        await h.until(lambda: h.dispatcher.registry["web1"].circuit_open)
        assert await h.dispatcher.candidates("web", "extract_text") == []
        await asyncio.sleep(0.45)
        assert (await h.dispatcher.dispatch(h.request()))["agent"] == "agent"  # half-open: tried again


async def test_no_executor_for_unknown_channel_or_action(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("web1", agent.base_url)
        for channel, action in (("web", "launch_rocket"), ("email", "extract_text")):
            error = await failure(h.dispatcher.dispatch(h.request(action, channel=channel)))
            assert error.code == "no_executor"
            assert error.retryable is True
            assert error.details == {"channel": channel, "action": action}
        assert agent.behaviour.executions == []


async def test_most_free_slots_round_robin_and_affinity(nats_url: str) -> None:
    b_big, b_a, b_b = AgentBehaviour(name="big"), AgentBehaviour(name="a"), AgentBehaviour(name="b")
    async with running_agent(b_big) as big, running_agent(b_a) as a, running_agent(b_b) as b, harness(nats_url) as h:
        await h.register("big", big.base_url, concurrency_limit=3, capabilities=["crunch"])
        await h.register("small", a.base_url, concurrency_limit=1, capabilities=["crunch"])
        assert (await h.dispatcher.dispatch(h.request("crunch")))["agent"] == "big"  # 3 free slots beat 1

        await h.register("a", a.base_url, capabilities=["ping"])
        await h.register("b", b.base_url, capabilities=["ping"])
        served = [(await h.dispatcher.dispatch(h.request("ping")))["agent"] for _ in range(4)]
        assert sorted(served) == ["a", "a", "b", "b"]  # ties: round-robin across runs
        assert served[0] != served[1]
        run = new_id()
        first = (await h.dispatcher.dispatch(h.request("ping", run_id=run)))["agent"]
        again = [(await h.dispatcher.dispatch(h.request("ping", run_id=run)))["agent"] for _ in range(3)]
        assert again == [first] * 3  # affinity of the run on this channel
        await h.update(first, status="offline")
        moved = (await h.dispatcher.dispatch(h.request("ping", run_id=run)))["agent"]
        assert moved != first  # an unhealthy preferred agent is left
        h.dispatcher.forget_run(run)
        assert not [k for k in h.dispatcher.affinity if k[0] == run]


# -- HTTP protocol ------------------------------------------------------------------------------------------


async def test_request_body_and_headers_the_agent_receives(nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LO_TEST_AGENT_SECRET", "s3cr3t-value")
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("web1", agent.base_url, auth={"type": "bearer", "secret_ref": "LO_TEST_AGENT_SECRET"})
        request = h.request(params={"selector": "h1", "n": 2}, attempt=3, step_id="title")
        await h.dispatcher.dispatch(request)
        [seen] = agent.behaviour.executions
        body, headers = seen["body"], seen["headers"]
        assert body == {"action": "extract_text", "params": {"selector": "h1", "n": 2}, "run_id": request.run_id,
                        "node_id": "scrape", "step_id": "title", "attempt": 3,
                        "idempotency_key": request.idempotency_key, "deadline_at": body["deadline_at"],
                        "dispatch_mode": "tool", "callback": None}
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?Z", body["deadline_at"])
        assert headers["idempotency-key"] == request.idempotency_key
        assert (headers["x-run-id"], headers["x-node-id"], headers["x-step-id"], headers["x-langorch-attempt"]) == (
            request.run_id, "scrape", "title", "3")
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", headers["traceparent"])
        assert headers["authorization"] == "Bearer s3cr3t-value"
        assert headers["content-type"] == "application/json"
        assert headers["user-agent"].startswith("langorch-runtime/")

        monkeypatch.delenv("LO_TEST_AGENT_SECRET")
        error = await failure(h.dispatcher.dispatch(h.request()))
        assert (error.code, error.retryable) == ("secret_not_found", False)
        assert "s3cr3t" not in error.model_dump_json()


ENVELOPE_CASES: list[tuple[str, int, Any, dict[str, str], dict[str, Any]]] = [
    ("success", 200, {"status": "success", "result": {"title": "Hi"}}, {}, {"result": {"title": "Hi"}}),
    ("null result", 200, {"status": "success", "result": None}, {}, {"result": {}}),
    ("list result", 201, {"status": "success", "result": [1, 2]}, {}, {"result": [1, 2]}),
    ("agent error", 200, {"status": "error", "error": "no such element", "error_code": "element_missing",
                          "error_type": "SelectorError"}, {},
     {"code": "agent_error", "retryable": False, "error_code": "element_missing", "type": "SelectorError",
      "message": "no such element"}),
    ("retryable agent error", 200, {"status": "error", "error": "busy", "error_code": "busy", "retryable": True}, {},
     {"code": "agent_error", "retryable": True, "error_code": "busy"}),
    ("503 with Retry-After", 503, {"error": "overloaded"}, {"Retry-After": "7"},
     {"code": "agent_unavailable", "retryable": True, "http_status": 503, "retry_after_ms": 7000}),
    ("500", 500, "boom", {}, {"code": "agent_unavailable", "retryable": True, "http_status": 500}),
    ("408", 408, {}, {}, {"code": "agent_unavailable", "retryable": True, "http_status": 408}),
    ("429", 429, {}, {"Retry-After": "2"}, {"code": "agent_unavailable", "retryable": True, "retry_after_ms": 2000}),
    ("404", 404, {"detail": "nope"}, {}, {"code": "agent_http_404", "retryable": False, "http_status": 404}),
    ("422", 422, {"error": "bad params"}, {}, {"code": "agent_http_422", "retryable": False,
                                               "message": "bad params"}),
    ("409 other", 409, {"status": "error", "error_code": "conflict"}, {}, {"code": "agent_http_409"}),
    ("202 accepted", 202, {"status": "accepted"}, {}, {"code": "agent_protocol_error", "retryable": False}),
    ("accepted in 200", 200, {"status": "accepted"}, {}, {"code": "agent_protocol_error"}),
    ("not JSON", 200, "<html>hi</html>", {}, {"code": "agent_protocol_error", "retryable": False}),
    ("no envelope", 200, {"title": "Hi"}, {}, {"code": "agent_protocol_error"}),
    ("unknown status", 200, {"status": "maybe"}, {}, {"code": "agent_protocol_error"}),
    ("redirect not followed", 302, "", {"Location": "http://169.254.169.254/"}, {"code": "agent_protocol_error"}),
]


async def test_response_status_mapping(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("web1", agent.base_url)
        for name, status, body, headers, expected in ENVELOPE_CASES:
            agent.behaviour.execute_script.append((status, body, headers))
            if "result" in expected:
                assert await h.dispatcher.dispatch(h.request()) == expected["result"], name
                continue
            error = await failure(h.dispatcher.dispatch(h.request()))
            got = error.model_dump()
            for k, v in expected.items():
                if k == "retry_after_ms":
                    assert error.details["retry_after_ms"] == v, name
                else:
                    assert got[k] == v, (name, k, got)
        assert len(agent.behaviour.executions) == len(ENVELOPE_CASES)
        assert await h.leases() == {}  # every attempt released its slot


async def test_transport_failure_is_agent_unavailable(nats_url: str) -> None:
    async with harness(nats_url) as h:
        await h.register("gone", f"http://127.0.0.1:{free_port()}")
        error = await bounded("a dispatch to a port nothing listens on", failure(h.dispatcher.dispatch(h.request())))
        assert (error.code, error.retryable) == ("agent_unavailable", True)
        assert error.details["agent_id"] == "gone"


async def test_lenient_response_takes_a_bare_object(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url, agent_strict_response=False) as h:
        await h.register("web1", agent.base_url)
        agent.behaviour.execute_script.append((200, {"title": "Hi"}, {}))
        assert await h.dispatcher.dispatch(h.request()) == {"title": "Hi"}


async def test_in_progress_asks_again_with_the_same_key(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("web1", agent.base_url)
        busy = {"status": "error", "error_code": "in_progress", "error": "still running"}
        agent.behaviour.execute_script.extend([(409, busy, {"Retry-After": "0.2"}), (409, busy, {"Retry-After": "0"}),
                                               (200, {"status": "success", "result": {"done": True}}, {})])
        request = h.request(attempt=2)
        assert await h.dispatcher.dispatch(request) == {"done": True}
        seen = agent.behaviour.executions
        assert len(seen) == 3
        assert {s["headers"]["idempotency-key"] for s in seen} == {request.idempotency_key}
        assert {s["body"]["attempt"] for s in seen} == {2}
        assert seen[1]["started"] - seen[0]["ended"] >= 0.18  # waited Retry-After before asking again


async def test_binding_default_timeout(nats_url: str) -> None:
    async with running_agent(AgentBehaviour(execute_delay_s=1)) as agent, harness(nats_url, agent_timeout_s=0.3) as h:
        await h.register("slow", agent.base_url)
        error = await failure(h.dispatcher.dispatch(h.request()))
        assert (error.code, error.retryable) == ("step_timeout", True)
        assert await h.leases() == {}


# -- workflow capabilities ----------------------------------------------------------------------------------


async def test_workflow_capability_sync_gets_context_and_async_without_callback_is_refused(nats_url: str) -> None:
    step = StepIR(step_id="fill", action="fill_form", binding=Binding(kind="channel", channel="web",
                                                                      action="fill_form"),
                  params=TemplateIR(source={"form": "{{form_id}}"}), timeout_ms=5000, output_variable="filled",
                  dispatch_mode="sync")
    node = NodeIR(id="forms", type="sequence", agent="WEB", channel="web", orchestrator=False,
                  payload=SequencePayload(steps=[step]))
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("wf", agent.base_url, capabilities=[{"name": "fill_form", "type": "workflow"}])
        request = h.request("fill_form", node=node, step_id="fill", params={"form": "F-1"}, dispatch_mode="sync")
        await h.dispatcher.dispatch(request)
        [seen] = agent.behaviour.executions
        assert seen["body"]["dispatch_mode"] == "sync"
        assert seen["body"]["params"] == {"form": "F-1", "_workflow_context": {
            "dispatch_mode": "sync", "channel": "web", "run_id": request.run_id, "procedure_id": "proc",
            "node_id": "forms", "current_step_id": "fill", "current_step_action": "fill_form",
            "current_step_params": {"form": "F-1"},
            "node_steps": [{"step_id": "fill", "action": "fill_form", "params": {"form": "{{form_id}}"},
                            "timeout_ms": 5000, "wait_ms": 0, "wait_after_ms": 0, "workflow_dispatch_mode": "sync",
                            "output_variable": "filled"}]}}

        error = await failure(h.dispatcher.dispatch(h.request("fill_form", node=node, step_id="fill",
                                                              dispatch_mode="async")))
        assert error.code == "dispatch_failed"
        assert error.message == "async workflow dispatch needs an HTTP agent and a callback"
        assert len(agent.behaviour.executions) == 1
        assert await h.leases() == {}


# -- leases -------------------------------------------------------------------------------------------------


async def test_one_slot_second_dispatch_waits_for_the_first(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=0.6)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, resource_key="printer", concurrency_limit=1)
        first_request, second_request = h.request(run_id="run-one"), h.request(run_id="run-two")
        first = asyncio.create_task(h.dispatcher.dispatch(first_request))
        await h.until(lambda: len(behaviour.executions) == 1)
        held = await h.leases()
        assert list(held) == [lease_key("printer", 0)]
        value = held[lease_key("printer", 0)]
        assert set(value) == {"lease_id", "resource_key", "slot", "agent_id", "pool_id", "run_id", "node_id",
                              "step_id", "idempotency_key", "holder", "acquired_at", "renewed_at", "expires_at"}
        assert value["idempotency_key"] == first_request.idempotency_key
        assert (value["resource_key"], value["slot"], value["agent_id"], value["pool_id"], value["run_id"],
                value["node_id"], value["step_id"], value["holder"]) == (
            "printer", 0, "solo", "web_default", "run-one", "scrape", "title", "runtime-test")
        second = asyncio.create_task(h.dispatcher.dispatch(second_request))
        await asyncio.gather(first, second)
        one, two = behaviour.executions
        assert two["started"] >= one["ended"]  # never two calls on one slot
        saturated = [e for e in h.events if e.TYPE == "pool_saturated"]
        assert len(saturated) == 1  # once per wait
        assert saturated[0].model_dump(exclude_none=True) == {
            "node_id": "scrape", "step_id": "title", "frame": "-", "attempt": 1, "agent_id": "solo",
            "channel": "web", "resource_key": "printer", "pool_id": "web_default"}
        assert await h.leases() == {}


async def test_step_timeout_covers_the_call_not_the_wait_for_a_lease(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=0.5)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, resource_key="one_slot", concurrency_limit=1)
        first = asyncio.create_task(h.dispatcher.dispatch(h.request(timeout_ms=800)))
        await h.until(lambda: len(behaviour.executions) == 1)
        # waits ~0.5 s for the slot, then its own call takes 0.5 s: 1 s in all, over its 0.8 s timeout
        await h.dispatcher.dispatch(h.request(timeout_ms=800))
        await first
        behaviour.execute_delay_s = 2.0
        error = await failure(h.dispatcher.dispatch(h.request(timeout_ms=300)))
        assert (error.code, error.retryable) == ("step_timeout", True)
        assert await h.leases() == {}


async def test_shared_resource_key_slots_and_wait_timeout(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=1.0)
    async with running_agent(behaviour) as agent, harness(nats_url, lease_wait_timeout_s=0.3) as h:
        await h.register("gpu-a", agent.base_url, resource_key="gpu", concurrency_limit=2)
        await h.register("gpu-b", agent.base_url, resource_key="gpu", concurrency_limit=2)
        busy = [asyncio.create_task(h.dispatcher.dispatch(h.request())) for _ in range(2)]
        await h.until(lambda: len(behaviour.executions) == 2)
        assert sorted(await h.leases()) == [lease_key("gpu", 0), lease_key("gpu", 1)]
        started = asyncio.get_running_loop().time()
        error = await failure(h.dispatcher.dispatch(h.request()))
        assert (error.code, error.retryable) == ("lease_wait_timeout", True)
        assert 0.25 <= asyncio.get_running_loop().time() - started < 0.9
        assert error.details["resource_keys"] == ["gpu"]
        await asyncio.gather(*busy)
        assert len(behaviour.executions) == 2
        assert await h.leases() == {}


async def test_waiting_step_takes_another_free_candidate(nats_url: str) -> None:
    slow, spare = AgentBehaviour(name="slow", execute_delay_s=1.0), AgentBehaviour(name="spare")
    async with running_agent(slow) as a, running_agent(spare) as b, harness(nats_url) as h:
        await h.register("slow", a.base_url, capabilities=["job"])
        first = asyncio.create_task(h.dispatcher.dispatch(h.request("job")))
        await h.until(lambda: len(slow.executions) == 1)
        waiting = asyncio.create_task(h.dispatcher.dispatch(h.request("job")))
        await h.until(lambda: any(e.TYPE == "pool_saturated" for e in h.events))
        await h.register("spare", b.base_url, capabilities=["job"])
        assert (await waiting)["agent"] == "spare"
        assert not first.done()  # taken while the first still held the only slot of "slow"
        await first


async def test_force_released_lease_aborts_with_lease_revoked(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=3)
    async with running_agent(behaviour) as agent, harness(nats_url, lease_ttl_s=1.5) as h:
        await h.register("solo", agent.base_url)
        call = asyncio.create_task(h.dispatcher.dispatch(h.request()))
        await h.until(lambda: len(behaviour.executions) == 1)
        key = lease_key("solo", 0)

        async def lease() -> tuple[Any, dict[str, Any]]:
            entry = await h.dispatcher.leases.get(key)
            return entry, json.loads(entry.value or b"{}")

        # renewed once already (every TTL/3 = 0.5 s)
        entry, value = await wait_until(lease, lambda got: got[1].get("renewed_at", "") > got[1].get("acquired_at", ""),
                                        timeout=2)
        await publish_command(h.service.js, ReleaseLease(actor=OPERATOR, lease_id=value["lease_id"], key=key,
                                                         revision=int(entry.revision or 0), reason="test"))
        started = asyncio.get_running_loop().time()
        error = await failure(call)
        assert (error.code, error.retryable) == ("lease_revoked", True)
        assert error.details["lease_id"] == value["lease_id"]
        assert asyncio.get_running_loop().time() - started < 2.0  # noticed at the next renewal
        assert await h.leases() == {}


async def test_cancelled_attempt_releases_its_lease(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=1.5)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url)
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(h.dispatcher.dispatch(h.request()), 0.4)  # as the interpreter's step timeout
        assert await h.leases() == {}
        behaviour.execute_delay_s = 0
        assert (await h.dispatcher.dispatch(h.request()))["agent"] == "agent"  # the slot is free at once


# -- MCP ----------------------------------------------------------------------------------------------------


async def test_mcp_tool_calls(nats_url: str) -> None:
    async with running_mcp() as server, harness(nats_url) as h:
        await h.register("docs", server.url, channel="docs", protocol="mcp",
                         capabilities=["lookup_price", "as_json_text", "plain_text", "two_lines", "broken",
                                       "missing_tool", "rpc_fail"])
        request = h.request("lookup_price", channel="docs", params={"sku": "A-1"})
        assert await h.dispatcher.dispatch(request) == {"sku": "A-1", "price": 12.5}
        [call] = server.calls
        assert call["arguments"] == {"sku": "A-1"}
        assert call["headers"]["idempotency-key"] == request.idempotency_key
        assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", call["headers"]["traceparent"])
        assert call["meta"]["langorch/run_id"] == request.run_id
        assert call["meta"]["langorch/idempotency_key"] == request.idempotency_key

        assert await h.dispatcher.dispatch(h.request("as_json_text", channel="docs", params={"value": 4})) == {
            "doubled": 8}
        assert await h.dispatcher.dispatch(h.request("plain_text", channel="docs", params={})) == "hello there"
        assert await h.dispatcher.dispatch(h.request("two_lines", channel="docs", params={})) == [
            {"type": "text", "text": "first"}, {"type": "text", "text": "second"}]
        error = await failure(h.dispatcher.dispatch(h.request("broken", channel="docs", params={"reason": "x"})))
        assert (error.code, error.retryable) == ("mcp_tool_error", False)
        assert "cannot do it: x" in error.message
        error = await failure(h.dispatcher.dispatch(h.request("missing_tool", channel="docs", params={})))
        assert (error.code, error.message) == ("mcp_tool_error", "Unknown tool: missing_tool")
        for code, retryable in ((-32602, False), (-32603, True)):
            error = await failure(h.dispatcher.dispatch(h.request("rpc_fail", channel="docs", params={"code": code})))
            assert (error.code, error.retryable, error.details["jsonrpc_code"]) == ("mcp_error", retryable, code)
            assert error.message.endswith(f"failed with {code}")
        assert await h.dispatcher.dispatch(h.request("lookup_price", channel="docs", params={"sku": "B"})) == {
            "sku": "B", "price": 12.5}
        assert len(server.calls) == 8  # the unknown tool never ran
        assert len({c["headers"]["mcp-session-id"] for c in server.calls}) == 1  # one session, reused
        assert await h.leases() == {}


async def test_mcp_timeout_cancels_the_call_and_keeps_the_session(nats_url: str) -> None:
    async with running_mcp() as server, harness(nats_url) as h:
        await h.register("docs", server.url, channel="docs", protocol="mcp", capabilities=["slow", "lookup_price"])
        call = asyncio.create_task(h.dispatcher.dispatch(h.request("slow", channel="docs", params={"seconds": 30})))
        # once the tool runs, the dispatch is cancelled, as the interpreter's step timeout cancels it (a fixed
        # 0.5 s timeout could end before the call reached the server on a loaded machine)
        await h.until(lambda: bool(server.calls) and server.calls[-1]["tool"] == "slow", timeout=30)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        assert await h.leases() == {}
        await h.until(lambda: server.calls[-1].get("cancelled") is True)  # notifications/cancelled reached it
        assert await h.dispatcher.dispatch(h.request("lookup_price", channel="docs", params={"sku": "C"})) == {
            "sku": "C", "price": 12.5}
        assert server.calls[0]["headers"]["mcp-session-id"] == server.calls[1]["headers"]["mcp-session-id"]


async def test_mcp_server_restart_reinitialises_the_session(nats_url: str) -> None:
    port = free_port()
    async with harness(nats_url) as h:
        async with running_mcp(port) as before:
            await h.register("docs", before.url, channel="docs", protocol="mcp", capabilities=["lookup_price"])
            assert (await h.dispatcher.dispatch(h.request("lookup_price", channel="docs", params={"sku": "1"})))[
                "sku"] == "1"
        async with running_mcp(port) as after:  # a new server process: it does not know the old session id
            assert (await h.dispatcher.dispatch(h.request("lookup_price", channel="docs", params={"sku": "2"})))[
                "sku"] == "2"
            assert [c["arguments"] for c in after.calls] == [{"sku": "2"}]
            assert after.calls[0]["headers"]["mcp-session-id"] != before.calls[0]["headers"]["mcp-session-id"]


async def test_mcp_server_unreachable_is_retryable_mcp_error(nats_url: str) -> None:
    async with harness(nats_url, mcp_timeout_s=3) as h:
        await h.register("gone", f"http://127.0.0.1:{free_port()}/mcp", channel="docs", protocol="mcp",
                         capabilities=["lookup_price"])
        error = await failure(h.dispatcher.dispatch(h.request("lookup_price", channel="docs", params={"sku": "x"})))
        assert (error.code, error.retryable) == ("mcp_error", True)
        assert await h.leases() == {}



async def test_mcp_image_and_resource_content_become_artifact_specs(nats_url: str) -> None:
    async with running_mcp() as server, harness(nats_url) as h:
        await h.register("docs", server.url, channel="docs", protocol="mcp", capabilities=["snapshot"])
        out = await h.dispatcher.dispatch(h.request("snapshot", channel="docs", params={"page": "home"}))
    assert isinstance(out, ContentArtifacts)
    assert out.value[0] == {"type": "text", "text": "captured home"}
    assert [item["type"] for item in out.value] == ["text", "image", "resource", "resource", "resource_link"]
    image, page, raw, link = out.artifacts
    assert (image["at"], image["kind"], image["mime_type"], image["name"]) == (1, "image", "image/png", "image.png")
    assert base64.b64decode(image["content_base64"]) == PNG
    assert (page["at"], page["name"], page["mime_type"]) == (2, "home.html", "text/html")
    assert base64.b64decode(page["content_base64"]) == b"<h1>home</h1>"
    assert (raw["at"], base64.b64decode(raw["content_base64"])) == (3, b"\x00\x01raw")
    assert (link["at"], link["uri"], "content_base64" in link) == (4, "https://example.com/page.pdf", False)


async def test_a_kept_alive_connection_the_agent_closed_is_sent_again_once_with_the_same_key(nats_url: str) -> None:
    """An agent that closes an idle kept-alive connection just as the runtime reuses it (the request reaches a
    socket the peer is closing): the request goes again at once on a new connection, with the same
    Idempotency-Key, instead of failing the attempt with ``agent_unavailable``."""
    keys: list[str] = []
    served_on: dict[int, int] = {}

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = id(writer)
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))  # type: ignore[union-attr]
            await reader.readexactly(length)
            if served_on.get(conn):  # a second request on this connection: closed without an answer
                writer.close()
                return
            served_on[conn] = 1
            keys.append(re.search(rb"(?i)idempotency-key: *(\S+)", head).group(1).decode())  # type: ignore[union-attr]
            body = json.dumps({"status": "success", "result": {"n": len(keys)}}).encode()
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nConnection: keep-alive\r\n"
                         b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
            await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        async with harness(nats_url) as h:
            await h.register("closing", f"http://127.0.0.1:{port}")
            assert await h.dispatcher.dispatch(h.request(key="k-first")) == {"n": 1}
            # the pooled connection is reused for the next call, and the agent closes it under the request
            assert await h.dispatcher.dispatch(h.request(key="k-second")) == {"n": 2}
            assert keys == ["k-first", "k-second"]
            assert len(served_on) == 2  # the second call was answered on a new connection
    finally:
        server.close()
        await server.wait_closed()


async def test_a_release_after_a_renewal_it_did_not_see_still_deletes_its_own_lease_only(nats_url: str) -> None:
    """A renewal canceled with its call can land after the revision the dispatcher knows: the release reads the key
    again and deletes it while it holds the same lease, and leaves a slot that changed hands alone."""
    from langorch_infra.kv import put_with_ttl
    from langorch_runtime.agent_dispatch import LEASES_BUCKET, Lease

    async with harness(nats_url) as h:
        d = h.dispatcher
        mine = {"lease_id": "lease-mine", "holder": d.instance}
        first = await put_with_ttl(d.js, LEASES_BUCKET, "res.0", json.dumps(mine).encode(), 60, last=0)
        await put_with_ttl(d.js, LEASES_BUCKET, "res.0", json.dumps(mine | {"renewed": 1}).encode(), 60, last=first)
        await d.release(Lease("res.0", first, mine))
        with pytest.raises((KeyNotFoundError, KeyDeletedError)):
            await d.leases.get("res.0")

        first = await put_with_ttl(d.js, LEASES_BUCKET, "res.1", json.dumps(mine).encode(), 60, last=0)
        theirs = {"lease_id": "lease-theirs", "holder": "another"}
        await put_with_ttl(d.js, LEASES_BUCKET, "res.1", json.dumps(theirs).encode(), 60, last=first)
        await d.release(Lease("res.1", first, mine))
        assert json.loads((await d.leases.get("res.1")).value or b"{}") == theirs


async def test_a_lease_written_as_the_dispatch_is_cancelled_is_released(nats_url: str) -> None:
    """The lease's write lands, and the dispatch is cancelled before its answer arrives (a run canceled, a parallel
    branch ended by its sibling): the slot is released in the background, not held until its TTL."""
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("web1", agent.base_url)
        real_put = h.dispatcher._put_lease
        landed = asyncio.Event()

        async def answer_late(*args: Any, **kwargs: Any) -> int:
            written = int(await real_put(*args, **kwargs))  # stored on the server
            landed.set()
            await asyncio.sleep(30)  # its answer never reaches the dispatch in time
            return written

        h.dispatcher._put_lease = answer_late  # type: ignore[method-assign]
        call = asyncio.create_task(h.dispatcher.dispatch(h.request()))
        await asyncio.wait_for(landed.wait(), 10)
        assert len(await h.leases()) == 1  # held: the write landed
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
        await h.until(lambda: not h.dispatcher._releases, timeout=10)
        assert await h.leases() == {}
        assert agent.behaviour.executions == []  # the agent was never called
