"""Step and runtime semantics (ckp.md §4, §7.4–§7.16, §8) through the real platform.

Every procedure here runs end to end: the gateway accepts it, the compiler compiles it, the runtime executes it and
dispatches to a real HTTP agent; the assertions read the run view and its event timeline (``/api/runs/{id}/events``).
Each test uses its own channel and procedure ids, so the module shares one platform."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from tests.helpers import (
    Platform,
    events_of,
    platform_of,
    register_agent,
    serve_app,
    start_document,
    wait_status,
    wait_until,
)
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url) as p:
        yield p


def of(events: list[dict[str, Any]], kind: str, step_id: str | None = None) -> list[dict[str, Any]]:
    return [e for e in events if e["event_type"] == kind and (step_id is None or e["step_id"] == step_id)]


async def finished(c: httpx.AsyncClient, doc: dict[str, Any], inputs: dict[str, Any] | None = None,
                   timeout: float = 30) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    run = await wait_status(c, await start_document(c, doc, inputs), timeout=timeout)
    return run, await events_of(c, run["run_id"])


def one_node(pid: str, channel: str, steps: list[dict[str, Any]], outputs: dict[str, Any] | None = None,
             gc: dict[str, Any] | None = None, handlers: list[dict[str, Any]] | None = None,
             extra: dict[str, Any] | None = None, node: dict[str, Any] | None = None) -> dict[str, Any]:
    """A sequence node ``work`` on ``channel`` followed by a terminate ``done`` returning ``outputs``."""
    work: dict[str, Any] = {"type": "sequence", "agent": channel.upper(), "next_node": "done", "steps": steps,
                            **(node or {})}
    if handlers is not None:
        work["error_handlers"] = handlers
    doc: dict[str, Any] = {"procedure_id": pid, "version": "1", "workflow_graph": {"start_node": "work", "nodes": {
        "work": work, "done": {"type": "terminate", "outputs": outputs or {}}, **(extra or {})}}}
    if gc is not None:
        doc["global_config"] = gc
    return doc


def failing_times(n: int, code: str = "busy", retryable: bool = True, then: Any = "ok") -> Any:
    calls = {"n": 0}

    def handler(body: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] <= n:
            raise AgentFailure(f"attempt {calls['n']} failed", code, retryable=retryable)
        return then

    return handler


def always(code: str, retryable: bool = False, message: str = "failed") -> Any:
    def handler(body: dict[str, Any]) -> Any:
        raise AgentFailure(message, code, retryable=retryable)

    return handler


# -- §4.8 retry policies ---------------------------------------------------------------------------------------------

async def test_step_retry_policy_attempts_keys_and_events(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"fetch": failing_times(2)})
    doc = one_node("audit_retry_fixed", "rp1", [
        {"step_id": "call", "action": "fetch", "output_variable": "r",
         "retry_config": {"max_retries": 2, "strategy": "fixed", "delay_ms": 20}}], {"r": "{{r}}"})
    async with serving(agent):
        await register_agent(c, agent, "rp1", "rp1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"r": "ok"}
    rid = run["run_id"]
    assert [b["attempt"] for b in agent.requests] == [1, 2, 3]
    assert [b["idempotency_key"] for b in agent.requests] == [f"lo1:{rid}:work:call:-:{n}" for n in (1, 2, 3)]
    retrying = of(events, "step_retrying", "call")
    assert [(e["attempt"], e["payload"]["next_attempt"], e["payload"]["delay_ms"], e["payload"]["source"])
            for e in retrying] == [(1, 2, 20, "retry_policy"), (2, 3, 20, "retry_policy")]
    assert all(e["payload"]["error"]["code"] == "agent_error" for e in retrying)
    assert [e["attempt"] for e in of(events, "step_started", "call")] == [1, 2, 3]
    [done] = of(events, "step_completed", "call")
    assert (done["attempt"], done["payload"]["retry_count"]) == (3, 2)
    assert not of(events, "step_failed")


def strategy_step(step_id: str, policy: dict[str, Any]) -> dict[str, Any]:
    return {"step_id": step_id, "action": "flaky", "output_variable": step_id, "retry_config": policy}


async def test_every_retry_strategy_gives_the_spec_delays(platform: Platform) -> None:
    """fixed b, linear b·(n+1), exponential b·m^n capped by max_delay_ms, fibonacci b·F(n+1), max_attempts, jitter
    in [b·(1−j), b]; an ``ignore`` handler suppresses each exhausted step so the node goes on."""
    c = platform.client
    agent = ScriptedAgent({"flaky": always("down", retryable=True)})
    steps = [
        strategy_step("fixed", {"strategy": "fixed", "retry_delay_ms": 10, "max_retries": 3}),
        strategy_step("linear", {"strategy": "linear", "base_delay_ms": 10, "max_retries": 3}),
        strategy_step("expo", {"strategy": "exponential_backoff", "delay_ms": 10, "multiplier": 3,
                               "max_delay_ms": 50, "max_retries": 3}),
        strategy_step("fibo", {"strategy": "fibonacci", "backoff_ms": 10, "max_retries": 5}),
        strategy_step("attempts", {"strategy": "fixed", "retry_delay_ms": 5, "max_attempts": 2}),
        strategy_step("jittered", {"strategy": "fixed", "retry_delay_ms": 100, "max_retries": 3, "jitter": 0.5}),
    ]
    doc = one_node("audit_strategies", "rp2", steps, {"fixed": "{{fixed}}"}, handlers=[{"action": "ignore"}])
    async with serving(agent):
        await register_agent(c, agent, "rp2", "rp2")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"fixed": None}  # a suppressed step's output_variable is null (§4.10)

    def delays(step_id: str) -> list[int]:
        return [e["payload"]["delay_ms"] for e in of(events, "step_retrying", step_id)]

    assert delays("fixed") == [10, 10, 10]
    assert delays("linear") == [10, 20, 30]
    assert delays("expo") == [10, 30, 50]
    assert delays("fibo") == [10, 10, 20, 30, 50]
    assert delays("attempts") == [5]
    jittered = delays("jittered")
    assert len(jittered) == 3
    assert all(50 <= d <= 100 for d in jittered), jittered
    for step_id in ("fixed", "linear", "expo", "fibo", "attempts", "jittered"):
        [done] = of(events, "step_completed", step_id)
        assert done["payload"]["suppressed_error"]["code"] == "agent_error"
        assert done["payload"]["retry_count"] == len(delays(step_id))


async def test_effective_policy_takes_each_key_from_step_then_global_policy_then_flat_fields(
        platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"flaky": always("down", retryable=True)})
    gc = {"max_retries": 4, "retry_delay_ms": 7, "retry_policy": {"strategy": "linear", "retry_delay_ms": 15}}
    steps = [
        {"step_id": "merged", "action": "flaky", "retry_config": {"max_retries": 2}},  # linear 15 from the policy
        {"step_id": "flat", "action": "flaky", "retry_on_failure": True},  # max_retries 4 from the flat field
        {"step_id": "zero", "action": "flaky", "retry_config": {"retry_delay_ms": 0, "max_retries": 1}},
        {"step_id": "off", "action": "flaky"},  # retries are off without retry_on_failure / retry_config
    ]
    doc = one_node("audit_policy_merge", "rp3", steps, gc=gc, handlers=[{"action": "ignore"}])
    async with serving(agent):
        await register_agent(c, agent, "rp3", "rp3")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]

    def delays(step_id: str) -> list[int]:
        return [e["payload"]["delay_ms"] for e in of(events, "step_retrying", step_id)]

    assert delays("merged") == [15, 30]
    assert delays("flat") == [15, 30, 45, 60]
    assert delays("zero") == [0]
    assert delays("off") == []
    zero = one_node("audit_policy_zero", "rp3", [{"step_id": "s", "action": "flaky", "retry_on_failure": True}],
                    gc={"retry_policy": {"max_retries": 0}}, handlers=[{"action": "ignore"}])
    async with serving(agent):
        await register_agent(c, agent, "rp3", "rp3b")
        run, events = await finished(c, zero)
    assert run["status"] == "completed", run["error"]
    assert of(events, "step_retrying") == []  # an explicit zero is honoured


async def test_retry_on_selects_codes_and_non_retryable_errors_are_not_retried(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"strict": failing_times(1, "bad_input", retryable=False),
                           "picky": failing_times(1, "flaky_code", retryable=False),
                           "other": failing_times(1, "busy", retryable=True)})
    steps = [
        {"step_id": "strict", "action": "strict", "retry_config": {"delay_ms": 0}},  # not retryable → no retry
        {"step_id": "picky", "action": "picky", "retry_config": {"delay_ms": 0, "retry_on": ["flaky_code"]}},
        {"step_id": "other", "action": "other", "retry_config": {"delay_ms": 0, "retry_on": ["flaky_code"]}},
    ]
    doc = one_node("audit_retry_on", "rp4", steps, handlers=[{"action": "ignore"}])
    async with serving(agent):
        await register_agent(c, agent, "rp4", "rp4")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert [b["action"] for b in agent.requests] == ["strict", "picky", "picky", "other"]
    assert [e["step_id"] for e in of(events, "step_retrying")] == ["picky"]
    assert of(events, "step_completed", "picky")[0]["payload"]["suppressed_error"] is None


def status_agent(answers: list[tuple[int, dict[str, Any], dict[str, str]]]) -> tuple[FastAPI, list[dict[str, Any]]]:
    """An HTTP agent that answers ``/execute`` with the scripted (status, body, headers) in order."""
    app = FastAPI()
    seen: list[dict[str, Any]] = []

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/execute")
    async def execute(request: Request) -> JSONResponse:
        seen.append(await request.json())
        status, body, headers = answers[min(len(seen), len(answers)) - 1]
        return JSONResponse(body, status_code=status, headers=headers)

    return app, seen


async def register_url(c: httpx.AsyncClient, base_url: str, channel: str, name: str, caps: list[str]) -> None:
    r = await c.post("/api/agents", json={"name": name, "channel": channel, "base_url": base_url,
                                          "capabilities": caps})
    assert r.status_code == 201, r.text  # registered: a dispatch syncs the runtime's registry before it looks


async def test_retry_after_raises_the_retry_delay(platform: Platform) -> None:
    """§4.8: a Retry-After from an agent raises the policy delay to at least that value."""
    c = platform.client
    app, _ = status_agent([(503, {"status": "error", "error": "overloaded"}, {"Retry-After": "1"}),
                              (200, {"status": "success", "result": "ok"}, {})])
    doc = one_node("audit_retry_after", "rp5", [
        {"step_id": "call", "action": "fetch", "output_variable": "r",
         "retry_config": {"max_retries": 1, "strategy": "fixed", "delay_ms": 10}}], {"r": "{{r}}"})
    async with serve_app(app) as url:
        await register_url(c, url, "rp5", "rp5", ["fetch"])
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"r": "ok"}
    [retrying] = of(events, "step_retrying", "call")
    assert retrying["payload"]["error"]["code"] == "agent_unavailable"
    assert retrying["payload"]["delay_ms"] == 1000


# -- §4.9 timeouts ---------------------------------------------------------------------------------------------------

TIMEOUT_MS = 1500


async def test_step_timeout_event_and_retry(platform: Platform) -> None:
    c = platform.client
    calls = {"n": 0}
    released = asyncio.Event()

    async def slow_once(body: dict[str, Any]) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            await released.wait()  # the first attempt answers only once the run has ended
        return "fast"

    agent = ScriptedAgent({"slow": slow_once})
    # long enough for the second attempt's call on a loaded machine (300 ms was not, in CI)
    doc = one_node("audit_timeout", "to1", [
        {"step_id": "call", "action": "slow", "output_variable": "r",
         "retry_config": {"max_retries": 1, "delay_ms": 0}}], {"r": "{{r}}"},
        gc={"default_step_timeout_ms": TIMEOUT_MS})
    async with serving(agent):
        await register_agent(c, agent, "to1", "to1")
        try:
            run, events = await finished(c, doc)
        finally:
            released.set()
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"r": "fast"}
    [timeout] = of(events, "step_timeout", "call")
    assert timeout["attempt"] == 1
    assert timeout["payload"]["action"] == "slow"
    assert timeout["payload"]["timeout_ms"] == TIMEOUT_MS
    assert timeout["payload"]["binding_kind"] == "agent_http"
    [retrying] = of(events, "step_retrying", "call")
    assert retrying["payload"]["error"]["code"] == "step_timeout"
    assert retrying["payload"]["error"]["retryable"] is True


# -- §4.10 error handlers --------------------------------------------------------------------------------------------

async def test_trigger_filters_choose_the_handler_and_metadata_and_notification_follow(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"find": always("E42", message="Element NOT Found: #go"),
                           "after": lambda b: "after"})
    handlers = [
        {"error_type": "agent_error", "trigger": {"error_text_contains": "timeout"}, "action": "fail"},
        {"error_type": "AgentActionError", "trigger": {"error_code": ["E41"]}, "action": "fail"},
        {"error_type": "e42", "trigger": {"error_text_contains": ["nothing", "not found"], "error_code": "E42"},
         "action": "ignore", "error_metadata": {"team": "ops"}, "notify_on_error": True},
        {"action": "fail"},
    ]
    doc = one_node("audit_triggers", "eh1", [
        {"step_id": "find", "action": "find", "output_variable": "found"},
        {"step_id": "after", "action": "after", "output_variable": "later"}],
        {"found": "{{found}}", "later": "{{later}}"}, handlers=handlers)
    async with serving(agent):
        await register_agent(c, agent, "eh1", "eh1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"found": None, "later": "after"}
    [done] = of(events, "step_completed", "find")
    suppressed = done["payload"]["suppressed_error"]
    assert (suppressed["code"], suppressed["error_code"]) == ("agent_error", "E42")
    assert suppressed["details"]["handler_metadata"] == {"team": "ops"}
    [note] = of(events, "step_error_notification", "find")
    assert note["payload"]["handler_action"] == "ignore"
    assert note["payload"]["error_type"] == "e42"
    assert not of(events, "step_failed")


async def test_http_status_trigger_and_escalate_to_fallback_sets_the_error_builtin(platform: Platform) -> None:
    c = platform.client
    app, seen = status_agent([(404, {"status": "error", "error": "no such record"}, {})])
    handlers = [
        {"trigger": {"http_status_codes": [500, 502]}, "action": "ignore"},
        {"error_type": "agent_http_404", "trigger": {"http_status_codes": [404]}, "action": "escalate",
         "fallback_node": "alt"},
    ]
    extra = {"alt": {"type": "processing", "next_node": "done", "operations": [
        {"action": "set_variable", "variable": "why", "value": "{{error.code}}/{{error.http_status}}"}]}}
    doc = one_node("audit_http_status", "eh2", [{"step_id": "get", "action": "get", "output_variable": "r"}],
                   {"why": "{{why}}"}, handlers=handlers, extra=extra)
    async with serve_app(app) as url:
        await register_url(c, url, "eh2", "eh2", ["get"])
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"why": "agent_http_404/404"}
    [escalated] = of(events, "step_escalated", "get")
    assert escalated["payload"]["handler_index"] == 1
    assert escalated["payload"]["fallback_node"] == "alt"
    assert escalated["payload"]["error"]["http_status"] == 404
    [node_error] = of(events, "node_error")
    assert (node_error["node_id"], node_error["payload"]["routed_to"]) == ("work", "alt")
    assert len(seen) == 1


async def test_escalate_without_fallback_fails_and_is_not_offered_at_node_scope(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"go": failing_times(5, "nope", retryable=False)})
    handlers = [{"error_type": "nope", "action": "escalate"}, {"action": "ignore"}]
    doc = one_node("audit_escalate", "eh3", [{"step_id": "go", "action": "go"}], handlers=handlers)
    async with serving(agent):
        await register_agent(c, agent, "eh3", "eh3")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    error = of(events, "run_failed")[0]["payload"]["error"]  # the run view's error is {code, message, node_id, step_id}
    assert (error["code"], error["error_code"], error["retryable"]) == ("agent_error", "nope", False)
    assert (error["node_id"], error["step_id"], error["frame"], error["attempt"]) == ("work", "go", "-", 1)
    assert (run["error"]["code"], run["error"]["node_id"], run["error"]["step_id"]) == ("agent_error", "work", "go")
    assert len(of(events, "step_escalated", "go")) == 1
    [failed] = of(events, "step_failed", "go")
    assert failed["payload"]["action"] == "go"
    [node_error] = of(events, "node_error")
    assert node_error["payload"]["routed_to"] is None
    assert of(events, "run_failed")[0]["payload"]["error"]["code"] == "agent_error"


async def test_handler_retry_with_recovery_steps_each_time(platform: Platform) -> None:
    """``retry``: one more attempt per retry up to max_retries, ``step_retrying {source: error_handler}``; the
    recovery steps run each time the handler applies (§4.10); exhausted → the step error is unresolved."""
    c = platform.client
    agent = ScriptedAgent({"go": failing_times(9, "stuck", retryable=False), "reset": lambda b: "reset"})
    handlers = [{"error_type": "stuck", "action": "retry", "max_retries": 2,
                 "retry_policy": {"strategy": "linear", "retry_delay_ms": 5},
                 "recovery_steps": [{"step_id": "reset", "action": "reset"},
                                    {"step_id": "note", "action": "append_to_array", "array": "resets",
                                     "value": "{{step_id}}"}]}]
    doc = one_node("audit_handler_retry", "eh4", [{"step_id": "go", "action": "go"}], handlers=handlers,
                   extra={"rec": {"type": "terminate", "outputs": {"resets": "{{resets}}"}}},
                   gc={"on_failure": "rec"})
    async with serving(agent):
        await register_agent(c, agent, "eh4", "eh4")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    rid = run["run_id"]
    gos = [b for b in agent.requests if b["action"] == "go"]
    assert [b["attempt"] for b in gos] == [1, 2, 3]
    retrying = of(events, "step_retrying", "go")
    assert [(e["payload"]["source"], e["payload"]["next_attempt"], e["payload"]["delay_ms"]) for e in retrying] == [
        ("error_handler", 2, 5), ("error_handler", 3, 10)]
    resets = [b for b in agent.requests if b["action"] == "reset"]
    assert len(resets) == 3  # each time the handler applied, including the time its retries were exhausted
    assert len({b["idempotency_key"] for b in resets}) == 3
    assert all(b["step_id"] == "go/recovery/reset" for b in resets)
    assert resets[0]["idempotency_key"].startswith(f"lo1:{rid}:work:go/recovery/reset:-:")
    assert run["output_vars"]["resets"] == ["note", "note", "note"]  # step_id is the recovery step's own
    [failed] = of(events, "step_failed", "go")
    assert failed["attempt"] == 3


async def test_retry_node_reruns_completed_steps_under_new_identities(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"first": lambda b: "A", "second": failing_times(1, "glitch", retryable=False)})
    handlers = [{"error_type": "glitch", "action": "retry_node", "max_retries": 1, "delay_ms": 0}]
    doc = one_node("audit_retry_node", "eh5", [{"step_id": "first", "action": "first"},
                                               {"step_id": "second", "action": "second", "output_variable": "b"}],
                   {"b": "{{b}}"}, handlers=handlers)
    async with serving(agent):
        await register_agent(c, agent, "eh5", "eh5")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    rid = run["run_id"]
    assert [b["idempotency_key"] for b in agent.requests] == [
        f"lo1:{rid}:work:first:-:1", f"lo1:{rid}:work:second:-:1",
        f"lo1:{rid}:work:first:#2:1", f"lo1:{rid}:work:second:#2:1"]
    assert [e["payload"]["visit"] for e in of(events, "node_started") if e["node_id"] == "work"] == [1, 2]
    assert not of(events, "step_replayed")


async def test_screenshot_and_fail_dispatches_to_the_agent_or_requests_one(platform: Platform) -> None:
    c = platform.client
    shooter = ScriptedAgent({"go": failing_times(9, "broken", retryable=False),
                             "screenshot": lambda b: {"screenshot": "https://shots.example/1.png"}})
    doc = one_node("audit_shot_agent", "sh1", [{"step_id": "go", "action": "go"}],
                   handlers=[{"action": "screenshot_and_fail"}])
    async with serving(shooter):
        await register_agent(c, shooter, "sh1", "sh1")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    assert of(events, "run_failed")[0]["payload"]["error"]["error_code"] == "broken"
    rid = run["run_id"]
    shots = [b for b in shooter.requests if b["action"] == "screenshot"]
    assert [b["idempotency_key"] for b in shots] == [f"lo1:{rid}:work:go~screenshot:-:1"]
    [artifact] = of(events, "artifact_created")
    assert (artifact["payload"]["kind"], artifact["payload"]["uri"]) == ("screenshot", "https://shots.example/1.png")
    assert not of(events, "screenshot_requested")

    blind = ScriptedAgent({"go": failing_times(9, "broken", retryable=False)})
    doc = one_node("audit_shot_request", "sh2", [{"step_id": "go", "action": "go"}],
                   handlers=[{"action": "screenshot_and_fail"}])
    async with serving(blind):
        await register_agent(c, blind, "sh2", "sh2")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    [requested] = of(events, "screenshot_requested", "go")
    assert requested["payload"]["reason"] == "screenshot_and_fail"
    assert requested["payload"]["error"]["error_code"] == "broken"


async def test_recovery_strategy_fallback_node_is_escalate(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"go": failing_times(9, "x", retryable=False)})
    extra = {"alt": {"type": "terminate", "outputs": {"via": "alt", "code": "{{error.code}}"}}}
    doc = one_node("audit_strategy_alias", "eh6", [{"step_id": "go", "action": "go"}],
                   handlers=[{"recovery_strategy": "fallback_node", "fallback_node": "alt"}], extra=extra)
    async with serving(agent):
        await register_agent(c, agent, "eh6", "eh6")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"via": "alt", "code": "agent_error"}
    assert len(of(events, "step_escalated", "go")) == 1


async def test_no_executor_matches_its_class_name_alias(platform: Platform) -> None:
    c = platform.client
    doc = one_node("audit_no_executor", "nobody_here", [
        {"step_id": "go", "action": "go", "output_variable": "r"},
        {"step_id": "after", "action": "log", "message": "after"}], {"r": "{{r}}"},
        handlers=[{"error_type": "NoExecutorError", "action": "ignore"}])
    run, events = await finished(c, doc, timeout=60)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"r": None}
    [done] = of(events, "step_completed", "go")
    assert done["payload"]["suppressed_error"]["code"] == "no_executor"
    assert [e["payload"]["message"] for e in of(events, "log")] == ["after"]


# -- §7.4 idempotency ------------------------------------------------------------------------------------------------

async def test_custom_idempotency_keys_step_node_loop_and_hashing(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"charge": lambda b: b["params"].get("n"), "ship": lambda b: "shipped",
                           "long": lambda b: "long"})
    long_key = "k" * 300
    doc = {"procedure_id": "audit_custom_keys", "version": "1",
           "variables_schema": {"order": {"type": "string", "default": "o7"}, "batch": {"type": "number",
                                                                                      "default": 1}},
           "workflow_graph": {"start_node": "each", "nodes": {
               "each": {"type": "loop", "iterator": "[10, 20]", "iterator_variable": "n", "body_node": "pay",
                        "next_node": "ship"},
               "pay": {"type": "sequence", "agent": "IK1", "steps": [
                   {"step_id": "charge", "action": "charge", "n": "{{n}}",
                    "idempotency_key": "charge-{{order}}-{{loop_index}}"}]},
               "ship": {"type": "sequence", "agent": "IK1", "next_node": "done",
                        "idempotency_key": "ship-{{order}}-{{batch}}", "steps": [
                            {"step_id": "bump", "action": "set_variable", "variable": "batch", "value": 99},
                            {"step_id": "send", "action": "ship"},
                            {"step_id": "big", "action": "long", "idempotency_key": long_key}]},
               "done": {"type": "terminate"}}}}
    async with serving(agent):
        await register_agent(c, agent, "ik1", "ik1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    keys = {b["action"] + str(b["params"].get("n", "")): b["idempotency_key"] for b in agent.requests}
    assert keys["charge10"] == "lo1:charge-o7-0:1"
    assert keys["charge20"] == "lo1:charge-o7-1:1"
    # a node idempotency_key is rendered at node entry: the batch written by the node's first step does not count
    assert keys["ship"] == "lo1:ship-o7-1/send:1"
    assert keys["long"] == "lo1:sha256:" + hashlib.sha256(f"lo1:{long_key}:1".encode()).hexdigest()
    started = {e["step_id"]: e["payload"]["idempotency_key"] for e in of(events, "step_started")}
    assert started["send"] == "lo1:ship-o7-1/send:1"


async def test_revisits_and_loop_iterations_get_their_own_frames(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"tick": lambda b: "t"})
    doc = {"procedure_id": "audit_frames", "version": "1",
           "variables_schema": {"count": {"type": "number", "default": 0}},
           "workflow_graph": {"start_node": "work", "nodes": {
               "work": {"type": "sequence", "agent": "IK2", "next_node": "count", "steps": [
                   {"step_id": "tick", "action": "tick"}]},
               "count": {"type": "processing", "next_node": "again", "operations": [
                   {"action": "calculate", "expression": "count + 1", "output_variable": "count"}]},
               "again": {"type": "logic", "rules": [{"condition": "count < 3", "next_node": "work"}],
                         "default_next_node": "done"},
               "done": {"type": "terminate", "outputs": {"count": "{{count}}"}}}}}
    async with serving(agent):
        await register_agent(c, agent, "ik2", "ik2")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    rid = run["run_id"]
    assert [b["idempotency_key"] for b in agent.requests] == [
        f"lo1:{rid}:work:tick:-:1", f"lo1:{rid}:work:tick:#2:1", f"lo1:{rid}:work:tick:#3:1"]
    assert [e["payload"]["frame"] for e in of(events, "step_started", "tick")] == ["-", "#2", "#3"]


# -- §7.9 execution modes --------------------------------------------------------------------------------------------

async def test_dry_run_skips_dispatch_runs_internal_operations_and_overrides_win(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"fetch": lambda b: "real", "store": lambda b: "real"})
    doc = one_node("audit_dry_run", "md1", [
        {"step_id": "fetch", "action": "fetch", "output_variable": "f"},
        {"step_id": "store", "action": "store", "output_variable": "s"},
        {"step_id": "calc", "action": "calculate", "expression": "2 + 3", "output_variable": "sum"},
        {"step_id": "tell", "action": "notify", "channel": "ops", "message": "hi"}],
        {"f": "{{f}}", "s": "{{s}}", "sum": "{{sum}}"},
        gc={"execution_mode": "dry_run", "test_data_overrides": {"store": {"stored": 1}, "calc": 999}})
    async with serving(agent):
        await register_agent(c, agent, "md1", "md1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"f": {"dry_run": True, "skipped_action": "fetch", "channel": "md1"},
                                  "s": {"stored": 1}, "sum": 5}
    assert agent.requests == []
    [skipped] = of(events, "dry_run_step_skipped")
    assert (skipped["step_id"], skipped["payload"]["action"], skipped["payload"]["binding_kind"],
            skipped["payload"]["channel"]) == ("fetch", "fetch", "channel", "md1")
    [override] = of(events, "step_test_override_applied")
    assert (override["step_id"], override["payload"]["override_key"]) == ("store", "store")
    assert [e["payload"]["binding_kind"] for e in of(events, "step_started") if e["step_id"] in ("fetch", "store")] \
        == ["channel", "channel"]
    assert len(of(events, "notification_requested")) == 1


async def test_mock_external_calls_and_override_precedence(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"a": lambda b: "real", "b": lambda b: "real"})
    doc = one_node("audit_mock", "md2", [
        {"step_id": "a", "action": "a", "output_variable": "a"},
        {"step_id": "b", "action": "b", "output_variable": "b"}], {"a": "{{a}}", "b": "{{b}}"},
        gc={"mock_external_calls": True, "test_data_overrides": {"work.b": "node-level", "b": "step-level"}})
    async with serving(agent):
        await register_agent(c, agent, "md2", "md2")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"a": {"mocked": True, "action": "a", "channel": "md2"}, "b": "node-level"}
    assert agent.requests == []
    [mock] = of(events, "step_mock_applied")
    assert (mock["step_id"], mock["payload"]["binding_kind"], mock["payload"]["channel"]) == ("a", "channel", "md2")
    assert of(events, "step_test_override_applied")[0]["payload"]["override_key"] == "work.b"


# -- §7.7 SLA --------------------------------------------------------------------------------------------------------

def sla_doc(pid: str, on_breach: str, handlers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    slow: dict[str, Any] = {"type": "sequence", "next_node": "after", "steps": [
        {"step_id": "nap", "action": "wait", "duration_ms": 300}],
        "sla": {"max_duration_ms": 50, "on_breach": on_breach, "escalation_handler": "esc"}}
    if handlers is not None:
        slow["error_handlers"] = handlers
    return {"procedure_id": pid, "version": "1", "workflow_graph": {"start_node": "slow", "nodes": {
        "slow": slow,
        "after": {"type": "terminate", "outputs": {"via": "after", "err": "{{error.code}}"}},
        "esc": {"type": "terminate", "outputs": {"via": "esc", "err": "{{error.code}}"}}}}}


async def test_sla_warn_fail_and_escalate(platform: Platform) -> None:
    c = platform.client
    run, events = await finished(c, sla_doc("audit_sla_warn", "warn"))
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"]["via"] == "after"
    [breach] = of(events, "sla_breached")
    assert (breach["node_id"], breach["payload"]["limit_ms"], breach["payload"]["on_breach"],
            breach["payload"]["escalation_handler"], breach["payload"]["enforced"]) == ("slow", 50, "warn", "esc",
                                                                                          False)
    assert breach["payload"]["elapsed_ms"] > 50

    run, events = await finished(c, sla_doc("audit_sla_fail", "fail"))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "sla_breached"
    assert len(of(events, "sla_breached")) == 1

    run, events = await finished(c, sla_doc("audit_sla_fail_ignored", "fail", [
        {"error_type": "sla_breached", "action": "ignore"}]))
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"]["via"] == "after"  # node scope ignore → next(next_node)

    run, events = await finished(c, sla_doc("audit_sla_escalate", "escalate"))
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"via": "esc", "err": "sla_breached"}
    assert len(of(events, "sla_breached")) == 1


# -- §7.11 deadlines, §7.12 recovery ---------------------------------------------------------------------------------

async def test_deadline_bypasses_handlers_and_retries_and_goes_to_recovery(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_deadline", "version": "1",
           "global_config": {"timeout_ms": 400, "on_failure": "rescue"},
           "workflow_graph": {"start_node": "slow", "nodes": {
               "slow": {"type": "sequence", "next_node": "done",
                        "error_handlers": [{"action": "ignore"}],
                        "steps": [{"step_id": "nap", "action": "wait", "duration_ms": 5000,
                                   "retry_on_failure": True}]},
               "done": {"type": "terminate", "outputs": {"via": "done"}},
               "rescue": {"type": "terminate", "outputs": {"via": "rescue", "err": "{{error.code}}"}}}}}
    run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"via": "rescue", "err": "deadline_exceeded"}
    assert of(events, "step_retrying") == []
    [rec] = of(events, "recovery_started")
    assert (rec["payload"]["on_failure_node"], rec["payload"]["error"]["code"]) == ("rescue", "deadline_exceeded")
    [completed] = of(events, "run_completed")
    assert completed["payload"]["recovered_via"] == "rescue"


async def test_failing_recovery_path_reports_both_errors(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_recovery_fails", "version": "1", "global_config": {"on_failure": "rescue"},
           "workflow_graph": {"start_node": "bad", "nodes": {
               "bad": {"type": "processing", "next_node": "done", "operations": [
                   {"action": "parse_json", "source": "not json"}]},
               "done": {"type": "terminate"},
               "rescue": {"type": "processing", "next_node": "done", "operations": [
                   {"action": "convert_type", "value": "abc", "target_type": "integer"}]}}}}
    run, events = await finished(c, doc)
    assert run["status"] == "failed"
    [failed] = of(events, "run_failed")
    assert failed["payload"]["error"]["code"] == "operation_failed"
    assert failed["payload"]["error"]["node_id"] == "bad"
    assert failed["payload"]["recovery_error"]["code"] == "conversion_failed"
    assert failed["payload"]["recovered_via"] == "rescue"


# -- §4.11 validations -----------------------------------------------------------------------------------------------

def validation_doc(pid: str, on_failure: str, handlers: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    node: dict[str, Any] = {"type": "sequence", "next_node": "done", "steps": [
        {"step_id": "count", "action": "calculate", "expression": "tries + 1", "output_variable": "tries"}],
        "validations": [{"id": "enough", "condition": "tries >= 10", "on_failure": on_failure,
                         "max_node_retries": 2, "message": "only {{tries}}"}]}
    if handlers is not None:
        node["error_handlers"] = handlers
    return {"procedure_id": pid, "version": "1", "variables_schema": {"tries": {"type": "number", "default": 0}},
            "workflow_graph": {"start_node": "v", "nodes": {
                "v": node, "done": {"type": "terminate", "outputs": {"tries": "{{tries}}"}}}}}


async def test_validation_failure_modes(platform: Platform) -> None:
    c = platform.client
    run, events = await finished(c, validation_doc("audit_val_throw", "throw_exception",
                                                   [{"error_type": "validation_failed", "action": "ignore"}]))
    assert run["status"] == "completed", run["error"]
    [failed] = of(events, "validation_failed")
    assert failed["payload"] == {**failed["payload"], "validation_id": "enough", "message": "only 1",
                                 "on_failure": "throw_exception"}

    run, events = await finished(c, validation_doc("audit_val_bypass", "fail_workflow", [{"action": "ignore"}]))
    assert run["status"] == "failed"
    assert (run["error"]["code"], run["error"]["message"]) == ("validation_failed", "only 1")

    run, events = await finished(c, validation_doc("audit_val_retry", "retry_node"))
    assert run["status"] == "failed"
    assert run["error"]["code"] == "validation_failed"
    assert [e["payload"]["message"] for e in of(events, "validation_failed")] == ["only 1", "only 2", "only 3"]
    assert [e["payload"]["visit"] for e in of(events, "node_started")] == [1, 2, 3]


# -- §7.15 redaction -------------------------------------------------------------------------------------------------

async def test_sensitive_parameters_are_redacted_in_events_but_reach_the_agent(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"call": lambda b: {"echo": "ok", "session_token": "tok-123"}})
    doc = {"procedure_id": "audit_redaction", "version": "1",
           "variables_schema": {"pin": {"type": "string", "sensitive": True}},
           "workflow_graph": {"start_node": "work", "nodes": {
               "work": {"type": "sequence", "agent": "RD1", "next_node": "done", "steps": [
                   {"step_id": "call", "action": "call", "api_key": "k-999", "Authorization": "Bearer zzz",
                    "prompt_tokens": 12, "author": "ann", "note": "pin is {{pin}}", "output_variable": "r"},
                   {"step_id": "say", "action": "log", "message": "the pin {{pin}} was used"}]},
               "done": {"type": "terminate", "outputs": {"r": "{{r}}"}}}}}
    async with serving(agent):
        await register_agent(c, agent, "rd1", "rd1")
        run, events = await finished(c, doc, {"pin": "4711-secret"})
    assert run["status"] == "completed", run["error"]
    sent = agent.requests[0]["params"]
    assert (sent["api_key"], sent["note"]) == ("k-999", "pin is 4711-secret")
    [started] = of(events, "step_started", "call")
    params = started["payload"]["params"]
    assert params["api_key"] == params["Authorization"] == "***REDACTED***"
    assert (params["prompt_tokens"], params["author"]) == (12, "ann")
    assert "4711-secret" not in params["note"]
    [log] = of(events, "log")
    assert "4711-secret" not in log["payload"]["message"]
    assert "***REDACTED***" in log["payload"]["message"]
    assert run["output_vars"]["r"]["session_token"] == "***REDACTED***"


# -- §4.9 timeouts of internal operations, §7.11 deadline caps an agent attempt, §7.10 cancellation ----------------

async def test_step_timeout_bounds_an_internal_operation_too(platform: Platform) -> None:
    """§4.9: the attempt timeout is the step's ``timeout_ms`` first; only the *binding default* is absent for
    internal operations."""
    c = platform.client
    doc = {"procedure_id": "audit_internal_timeout", "version": "1", "workflow_graph": {"start_node": "w", "nodes": {
        "w": {"type": "sequence", "next_node": "done", "error_handlers": [{"error_type": "TimeoutError",
                                                                           "action": "ignore"}],
              "steps": [{"step_id": "nap", "action": "wait", "duration_ms": 5000, "timeout_ms": 200,
                         "output_variable": "napped"}]},
        "done": {"type": "terminate", "outputs": {"napped": "{{napped}}"}}}}}
    run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"napped": None}
    [timeout] = of(events, "step_timeout", "nap")
    assert (timeout["payload"]["action"], timeout["payload"]["timeout_ms"], timeout["payload"]["binding_kind"]) == (
        "wait", 200, "internal")
    [done] = of(events, "step_completed", "nap")
    assert done["payload"]["suppressed_error"]["code"] == "step_timeout"


async def test_run_deadline_caps_an_agent_attempt(platform: Platform) -> None:
    c = platform.client

    async def slow(body: dict[str, Any]) -> Any:
        await asyncio.sleep(5)
        return "late"

    agent = ScriptedAgent({"slow": slow})
    doc = one_node("audit_deadline_agent", "dl1", [{"step_id": "call", "action": "slow", "retry_on_failure": True}],
                   gc={"timeout_ms": 500}, handlers=[{"action": "ignore"}])
    async with serving(agent):
        await register_agent(c, agent, "dl1", "dl1")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "deadline_exceeded"
    assert len(agent.requests) == 1
    assert of(events, "step_retrying") == []
    assert of(events, "step_timeout") == []


async def test_cancel_during_an_internal_wait_runs_no_handler_or_recovery(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_cancel_wait", "version": "1", "global_config": {"on_failure": "rescue"},
           "workflow_graph": {"start_node": "w", "nodes": {
               "w": {"type": "sequence", "next_node": "done", "error_handlers": [{"action": "ignore"}],
                     "steps": [{"step_id": "nap", "action": "wait", "duration_ms": 20000}]},
               "done": {"type": "terminate"},
               "rescue": {"type": "terminate", "outputs": {"rescued": True}}}}}
    run_id = await start_document(c, doc)

    async def napping() -> bool:
        return bool(of(await events_of(c, run_id), "step_started", "nap"))

    await wait_until(napping)
    r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "enough"})
    assert r.status_code == 202, r.text
    run = await wait_status(c, run_id, timeout=10)
    assert run["status"] == "canceled"
    events = await events_of(c, run_id)
    types = [e["event_type"] for e in events]
    assert types.index("run_cancel_requested") < types.index("run_canceled")
    assert of(events, "run_canceled")[0]["payload"]["reason"] == "enough"
    for absent in ("step_completed", "step_failed", "recovery_started", "node_error"):
        assert absent not in types, absent


# -- §4.3 / §7.4 internal steps are recorded and replayed; §7.12 retry at the failure point -------------------------

async def test_generate_id_is_replayed_with_the_same_value_when_the_run_is_retried(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"use": failing_times(1, "later", retryable=False, then="used")})
    doc = one_node("audit_replay_internal", "rr1", [
        {"step_id": "mint", "action": "generate_id", "prefix": "ord-", "output_variable": "oid"},
        {"step_id": "stamp", "action": "append_to_array", "array": "log", "value": "{{oid}}"},
        {"step_id": "use", "action": "use", "oid": "{{oid}}", "output_variable": "u"}],
        {"oid": "{{oid}}", "log": "{{log}}", "u": "{{u}}"})
    async with serving(agent):
        await register_agent(c, agent, "rr1", "rr1")
        run_id = await start_document(c, doc)
        failed = await wait_status(c, run_id)
        assert failed["status"] == "failed"
        assert (await c.post(f"/api/runs/{run_id}/retry", json={})).status_code == 200
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    first, second = (b["params"]["oid"] for b in agent.requests)
    assert first == second == run["output_vars"]["oid"]
    assert first.startswith("ord-")
    assert run["output_vars"]["log"] == [first]  # append_to_array re-applied from the record, not appended twice
    assert [b["attempt"] for b in agent.requests] == [1, 2]
    events = await events_of(c, run_id)
    replayed = {e["step_id"]: e["payload"] for e in of(events, "step_replayed")}
    assert replayed["mint"]["original_attempt"] == 1
    assert replayed["mint"]["output_variable"] == "oid"
    assert "stamp" in replayed
    assert [e["payload"]["resume_reason"] for e in of(events, "execution_resumed")] == ["retry"]


# -- §4.12 artifacts ------------------------------------------------------------------------------------------------

async def test_artifact_forms_in_a_step_result(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"export": lambda b: {
        "screenshot": "https://shots.example/a.png",
        "artifacts": [{"kind": "file", "uri": "s3://bucket/r.csv", "name": "r.csv", "mime_type": "text/csv"},
                      {"kind": "file", "uri": "C:/agent/local.txt"}],
        "artifact_uri": "https://files.example/x.pdf", "artifact_kind": "document",
        "uri": "https://not-an-artifact.example/"}})
    doc = one_node("audit_artifacts", "ar1", [{"step_id": "e", "action": "export", "output_variable": "x"}],
                   {"x": "{{x}}"})
    async with serving(agent):
        await register_agent(c, agent, "ar1", "ar1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    created = [e["payload"] for e in of(events, "artifact_created", "e")]
    assert sorted((a["kind"], a["uri"], a["stored"]) for a in created) == sorted([
        ("screenshot", "https://shots.example/a.png", False), ("file", "s3://bucket/r.csv", False),
        ("file", "C:/agent/local.txt", False), ("document", "https://files.example/x.pdf", False)])
    assert run["output_vars"]["x"]["uri"] == "https://not-an-artifact.example/"


# -- §4.11 screen validations ---------------------------------------------------------------------------------------

async def test_screen_validations_dispatch_per_expected_value(platform: Platform) -> None:
    c = platform.client
    def element(body: dict[str, Any]) -> Any:
        if body["params"]["target"] == "#missing":
            raise AgentFailure("missing", "nf")
        return {}

    agent = ScriptedAgent({"navigate": lambda b: {}, "wait_for_text": lambda b: {}, "wait_for_element": element})
    doc = one_node("audit_screen_validations", "sv1", [{"step_id": "open", "action": "navigate"}],
                   node={"validations": [
                       {"id": "texts", "check": "screen_text_contains", "expected_values": ["Welcome", "Cart"]},
                       {"id": "els", "check": "element_exists", "expected_values": ["#ok", "#missing"],
                        "message": "element missing"}]})
    async with serving(agent):
        await register_agent(c, agent, "sv1", "sv1")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "validation_failed"
    rid = run["run_id"]
    checks = [(b["action"], b["params"], b["idempotency_key"]) for b in agent.requests if b["action"] != "navigate"]
    assert checks == [
        ("wait_for_text", {"text": "Welcome"}, f"lo1:{rid}:work:validation/texts/0:-:1"),
        ("wait_for_text", {"text": "Cart"}, f"lo1:{rid}:work:validation/texts/1:-:1"),
        ("wait_for_element", {"target": "#ok"}, f"lo1:{rid}:work:validation/els/0:-:1"),
        ("wait_for_element", {"target": "#missing"}, f"lo1:{rid}:work:validation/els/1:-:1")]
    [failed] = of(events, "validation_failed")
    assert (failed["payload"]["validation_id"], failed["payload"]["message"]) == ("els", "element missing")


# -- §4.3 log levels, §4.10 screenshots on complete and on fail ----------------------------------------------------

async def test_log_below_logging_level_is_not_emitted(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_log_level", "version": "1", "global_config": {"logging_level": "warning"},
           "workflow_graph": {"start_node": "p", "nodes": {
               "p": {"type": "sequence", "next_node": "done", "steps": [
                   {"step_id": "d", "action": "log", "message": "debug", "level": "DEBUG"},
                   {"step_id": "i", "action": "log", "message": "info"},
                   {"step_id": "w", "action": "log", "message": "warn", "level": "warning",
                    "output_variable": "logged"},
                   {"step_id": "e", "action": "log", "value": "error", "level": "ERROR"}]},
               "done": {"type": "terminate", "outputs": {"logged": "{{logged}}"}}}}}
    run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"logged": None}
    assert [(e["payload"]["level"], e["payload"]["message"]) for e in of(events, "log")] == [
        ("WARNING", "warn"), ("ERROR", "error")]


async def test_screenshot_on_complete_and_on_fail_reasons(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"ok": lambda b: "fine", "bad": failing_times(9, "bad", retryable=True)})
    doc = one_node("audit_shot_reasons", "sh3", [
        {"step_id": "ok", "action": "ok", "screenshot_on_complete": True},
        {"step_id": "bad", "action": "bad", "retry_config": {"max_retries": 1, "delay_ms": 0}}],
        gc={"screenshot_on_fail": True})
    async with serving(agent):
        await register_agent(c, agent, "sh3", "sh3")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    requested = [(e["step_id"], e["payload"]["reason"]) for e in of(events, "screenshot_requested")]
    assert requested == [("ok", "on_complete"), ("bad", "screenshot_on_fail")]  # once, after the retries
    [on_fail] = of(events, "screenshot_requested", "bad")
    assert on_fail["payload"]["error"]["code"] == "agent_error"
    assert on_fail["attempt"] == 2


# -- §4.10 matching on the agent's error type, §4.8 retry_on agent types ---------------------------------------------

async def test_agent_error_type_matches_handlers_and_retry_on(platform: Platform) -> None:
    c = platform.client
    envelope = {"status": "error", "error": "no such element", "error_type": "ElementNotFound",
                "error_code": "E_NF"}
    app, seen = status_agent([(200, envelope, {}), (200, envelope, {}), (200, envelope, {})])
    doc = one_node("audit_error_type", "et1", [
        {"step_id": "find", "action": "find", "output_variable": "f",
         "retry_config": {"max_retries": 1, "delay_ms": 0, "retry_on": ["ElementNotFound"]}}],
        {"f": "{{f}}"}, handlers=[{"error_type": "E_NF", "trigger": {"error_code": "E_XX"}, "action": "fail"},
                                  {"error_type": "elementnotfound", "action": "retry", "max_retries": 0},
                                  {"action": "ignore"}])
    async with serve_app(app) as url:
        await register_url(c, url, "et1", "et1", ["find"])
        run, events = await finished(c, doc)
    assert run["status"] == "failed"  # handler 1 matched (by type); retries 0 → unresolved; handler 2 not tried
    assert len(seen) == 2  # the policy retried once on the agent type
    error = of(events, "run_failed")[0]["payload"]["error"]
    assert (error["code"], error["type"], error["error_code"], error["attempt"]) == (
        "agent_error", "ElementNotFound", "E_NF", 2)
    assert [e["payload"]["source"] for e in of(events, "step_retrying")] == ["retry_policy"]


# -- §7.12 retry of a run discards what the recovery path changed ---------------------------------------------------

async def test_run_retry_discards_recovery_changes_and_resumes_at_the_failure_point(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"work": failing_times(1, "once", retryable=False, then="worked")})
    doc = {"procedure_id": "audit_retry_recovery", "version": "1", "global_config": {"on_failure": "rescue"},
           "variables_schema": {"flag": {"type": "string", "default": "orig"}},
           "workflow_graph": {"start_node": "prep", "nodes": {
               "prep": {"type": "processing", "next_node": "work", "operations": [
                   {"action": "append_to_array", "array": "trail", "value": "prep"}]},
               "work": {"type": "sequence", "agent": "RC1", "next_node": "done", "steps": [
                   {"step_id": "w", "action": "work", "output_variable": "r"}]},
               "done": {"type": "terminate", "outputs": {"flag": "{{flag}}", "r": "{{r}}", "trail": "{{trail}}"}},
               "rescue": {"type": "processing", "next_node": "rescue_end", "operations": [
                   {"action": "set_variable", "variable": "flag", "value": "recovered"}]},
               "rescue_end": {"type": "terminate", "status": "failed", "outputs": {"flag": "{{flag}}"}}}}}
    async with serving(agent):
        await register_agent(c, agent, "rc1", "rc1")
        run_id = await start_document(c, doc)
        failed = await wait_status(c, run_id)
        assert failed["status"] == "failed"
        events = await events_of(c, run_id)
        [first_failure] = of(events, "run_failed")
        assert first_failure["payload"]["recovered_via"] == "rescue"
        assert first_failure["payload"]["error"]["code"] == "agent_error"
        r = await c.post(f"/api/runs/{run_id}/retry", json={})
        assert r.status_code == 200, r.text
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"flag": "orig", "r": "worked", "trail": ["prep"]}
    events = await events_of(c, run_id)
    [requested] = of(events, "run_retry_requested")
    assert (requested["payload"]["retry_count"], requested["payload"]["automatic"],
            requested["payload"]["failure_node_id"]) == (1, False, "work")
    assert [b["attempt"] for b in agent.requests] == [1, 2]


# -- §7.15 redacted_fields and bounded payloads -----------------------------------------------------------------------

async def test_redacted_fields_and_oversized_fields_in_events(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"send": lambda b: {"ssn": "123-45-6789", "ok": True}, "upload": lambda b: "stored"})
    big = "x" * (70 * 1024)
    doc = one_node("audit_redacted_fields", "rf1", [
        {"step_id": "send", "action": "send", "ssn": "123-45-6789", "output_variable": "r"},
        {"step_id": "upload", "action": "upload", "blob": big}],
        {"r": "{{r}}"}, gc={"audit_config": {"redacted_fields": ["ssn"]}})
    async with serving(agent):
        await register_agent(c, agent, "rf1", "rf1")
        run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert agent.requests[0]["params"]["ssn"] == "123-45-6789"
    assert len(agent.requests[1]["params"]["blob"]) == len(big)
    [started] = of(events, "step_started", "send")
    assert started["payload"]["params"]["ssn"] == "***REDACTED***"
    [upload] = of(events, "step_started", "upload")
    stub = upload["payload"]["params"]  # a payload field over 64 KiB is replaced by a stub
    assert stub == {"_truncated": True, "bytes": stub["bytes"], "sha256": stub["sha256"]}
    assert stub["bytes"] > len(big)
    assert upload["payload"]["action"] == "upload"
    assert run["output_vars"]["r"] == {"ssn": "***REDACTED***", "ok": True}


# -- §7.7 enforced SLA ------------------------------------------------------------------------------------------------

async def test_enforced_sla_cancels_the_node_at_its_deadline(platform: Platform) -> None:
    c = platform.client
    doc = {"procedure_id": "audit_sla_enforced", "version": "1", "workflow_graph": {"start_node": "slow", "nodes": {
        "slow": {"type": "processing", "next_node": "after", "operations": [
            {"action": "wait", "duration_ms": 20000}, {"action": "set_variable", "variable": "late", "value": True}],
            "sla": {"max_duration_ms": 200, "on_breach": "escalate", "escalation_handler": "esc", "enforce": True}},
        "after": {"type": "terminate", "outputs": {"via": "after"}},
        "esc": {"type": "terminate", "outputs": {"via": "esc", "late": "{{late}}", "err": "{{error.code}}"}}}}}
    run, events = await finished(c, doc, timeout=15)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"via": "esc", "late": None, "err": "sla_breached"}
    [breach] = of(events, "sla_breached")
    assert (breach["payload"]["enforced"], breach["payload"]["on_breach"]) == (True, "escalate")


# -- §7.9 a dry run dispatches nothing: child runs, screen validations, failure screenshots --------------------------

async def test_dry_run_child_run_and_screen_checks_dispatch_nothing(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"touch": lambda b: "touched", "wait_for_text": lambda b: {},
                           "screenshot": lambda b: {"screenshot": "https://shots.example/dry.png"}})
    child = one_node("audit_dry_child", "dr9", [{"step_id": "touch", "action": "touch", "output_variable": "t"}],
                     {"t": "{{t}}"})
    r = await c.post("/api/procedures", json={"ckp_json": child})
    assert r.status_code in (201, 409), r.text
    parent = {"procedure_id": "audit_dry_parent", "version": "1", "global_config": {"execution_mode": "dry_run"},
              "workflow_graph": {"start_node": "check", "nodes": {
                  "check": {"type": "sequence", "agent": "DR9", "next_node": "call",
                            "steps": [{"step_id": "touch", "action": "touch", "screenshot_on_complete": True}],
                            "validations": [{"id": "shown", "check": "screen_text_contains",
                                             "expected_values": ["Welcome"]}]},
                  "call": {"type": "subflow", "procedure_id": "audit_dry_child", "version": "1",
                           "output_mapping": {"child_t": "t"}, "next_node": "done"},
                  "done": {"type": "terminate", "outputs": {"child_t": "{{child_t}}"}}}}}
    async with serving(agent):
        await register_agent(c, agent, "dr9", "dr9")
        run, events = await finished(c, parent)
        assert run["status"] == "completed", run["error"]
        assert run["output_vars"] == {"child_t": {"dry_run": True, "skipped_action": "touch", "channel": "dr9"}}
        assert agent.requests == []
        skipped = [(e["step_id"], e["payload"]["action"]) for e in of(events, "dry_run_step_skipped")]
        assert skipped == [("touch", "touch"), ("touch~screenshot", "screenshot"),
                           ("validation/shown/0", "wait_for_text")]
        [sub] = of(events, "subflow_started")
        child_events = await events_of(c, sub["payload"]["child_run_id"])
        assert of(child_events, "execution_started")[0]["payload"]["execution_mode"] == "dry_run"
        assert [e["step_id"] for e in of(child_events, "dry_run_step_skipped")] == ["touch"]

        mocked = one_node("audit_mock_checks", "dr9", [{"step_id": "touch", "action": "touch"}],
                          gc={"mock_external_calls": True, "screenshot_on_fail": True},
                          node={"validations": [{"id": "shown", "check": "screen_text_contains",
                                                 "expected_values": ["Welcome"]}]})
        run, events = await finished(c, mocked)
    assert run["status"] == "completed", run["error"]
    assert agent.requests == []
    assert [e["step_id"] for e in of(events, "step_mock_applied")] == ["touch", "validation/shown/0"]


async def test_screenshot_on_fail_covers_internal_steps_of_a_channel_node(platform: Platform) -> None:
    """§4.7: the failure screenshot is taken for any step that finally fails, internal operations included."""
    c = platform.client
    agent = ScriptedAgent({"read": lambda b: "not json", "screenshot": lambda b: {"uri": "file:///tmp/x.png"}})
    doc = one_node("audit_shot_internal", "sh4", [
        {"step_id": "read", "action": "read", "output_variable": "raw"},
        {"step_id": "parse", "action": "parse_json", "source": "{{raw}}"}], gc={"screenshot_on_fail": True})
    async with serving(agent):
        await register_agent(c, agent, "sh4", "sh4")
        run, events = await finished(c, doc)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "operation_failed"
    rid = run["run_id"]
    shots = [b for b in agent.requests if b["action"] == "screenshot"]
    assert [(b["params"]["reason"], b["idempotency_key"]) for b in shots] == [
        ("screenshot_on_fail", f"lo1:{rid}:work:parse~screenshot:-:1")]
    assert not of(events, "screenshot_requested")


async def test_binding_default_timeout_is_reported_in_step_timeout(nats_url: str, database_url: str) -> None:
    """§4.9: without a step or default timeout the binding default (LANGORCH_AGENT_TIMEOUT_S) bounds an agent call;
    ``step_timeout.timeout_ms`` names it."""
    async def slow(body: dict[str, Any]) -> Any:
        await asyncio.sleep(5)
        return "late"

    agent = ScriptedAgent({"slow": slow})
    doc = one_node("audit_binding_timeout", "bt1", [{"step_id": "call", "action": "slow"}])
    async with platform_of(nats_url, database_url, runtime_settings={"agent_timeout_s": 1}) as p, serving(agent):
        await register_agent(p.client, agent, "bt1", "bt1")
        run, events = await finished(p.client, doc)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "step_timeout"
    [timeout] = of(events, "step_timeout", "call")
    assert (timeout["payload"]["timeout_ms"], timeout["payload"]["binding_kind"]) == (1000, "agent_http")


# -- §4.3 internal operation failures carry their codes and reasons ------------------------------------------------

async def test_internal_operation_errors_codes_and_reasons(platform: Platform) -> None:
    c = platform.client
    steps = [
        {"step_id": "scalar", "action": "set_variable", "variable": "s", "value": 5},
        {"step_id": "deep", "action": "set_variable", "variable": "s.inner", "value": 1},
        {"step_id": "made", "action": "set_variable", "variable": "cfg.a.b", "value": 2},
        {"step_id": "push", "action": "append_to_array", "array": "s", "value": 1},
        {"step_id": "json", "action": "parse_json", "source": "```json\n{\"k\": 1}\n```", "output_variable": "j"},
        {"step_id": "badjson", "action": "parse_json", "source": "{nope"},
        {"step_id": "div", "action": "calculate", "expression": "1 / 0"},
        {"step_id": "conv", "action": "convert_type", "value": "1.5", "target_type": "integer"},
        {"step_id": "schema", "action": "validate_schema", "value": {"n": "x"}, "on_invalid": "report",
         "schema": {"type": "object", "properties": {"n": {"type": "number"}}}, "output_variable": "report"},
        {"step_id": "strict", "action": "validate_schema", "value": {"n": "x"},
         "schema": {"type": "object", "properties": {"n": {"type": "number"}}}},
        {"step_id": "regex", "action": "extract_regex", "source": "abc", "pattern": "{{pat}}"},
    ]
    doc = {"procedure_id": "audit_op_errors", "version": "1",
           "variables_schema": {"pat": {"type": "string", "default": "("}},
           "workflow_graph": {"start_node": "ops", "nodes": {
        "ops": {"type": "sequence", "next_node": "done", "error_handlers": [{"action": "ignore"}], "steps": steps},
        "done": {"type": "terminate", "outputs": {"s": "{{s}}", "cfg": "{{cfg}}", "j": "{{j}}",
                                                  "valid": "{{report.valid}}"}}}}}
    run, events = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"s": 5, "cfg": {"a": {"b": 2}}, "j": {"k": 1}, "valid": False}
    suppressed = {e["step_id"]: e["payload"]["suppressed_error"] for e in of(events, "step_completed")
                  if e["payload"].get("suppressed_error")}
    codes = {k: (v["code"], v["details"].get("reason")) for k, v in suppressed.items()}
    assert codes == {"deep": ("operation_failed", "not_an_object"), "push": ("operation_failed", "not_a_list"),
                     "badjson": ("operation_failed", "invalid_json"), "div": ("expression_error", codes["div"][1]),
                     "conv": ("conversion_failed", codes["conv"][1]),
                     "strict": ("schema_validation_failed", None), "regex": ("operation_failed", "invalid_regex")}
    assert suppressed["strict"]["details"]["errors"]
    assert all(v["retryable"] is False for v in suppressed.values())


async def test_frame_strings_of_branches_nested_loops_revisited_loops_and_recovery(platform: Platform) -> None:
    """§7.4 frame strings: ``<parallel>/<branch_id>``, ``<loop>[<i>]`` nested inward, ``<loop>#<visit>[i]`` when the
    loop node itself is revisited, and ``recovery`` for the recovery frame."""
    c = platform.client
    agent = ScriptedAgent({"ping": lambda b: "pong", "boom": failing_times(99, "boom", retryable=False)})
    doc = {"procedure_id": "audit_frame_strings", "version": "1", "global_config": {"on_failure": "rescue"},
           "variables_schema": {"round": {"type": "number", "default": 0}},
           "workflow_graph": {"start_node": "fan", "nodes": {
               "fan": {"type": "parallel", "branches": [{"branch_id": "b1", "start_node": "outer"},
                                                        {"branch_id": "b2", "start_node": "solo"}],
                       "next_node": "again"},
               "outer": {"type": "loop", "iterator": "[0, 1]", "iterator_variable": "o", "body_node": "inner",
                         "next_node": "again"},
               "inner": {"type": "loop", "iterator": "[0]", "iterator_variable": "x", "body_node": "call",
                         "next_node": "outer"},
               "call": {"type": "sequence", "agent": "FS1", "next_node": "inner",
                        "steps": [{"step_id": "p", "action": "ping"}]},
               "solo": {"type": "sequence", "agent": "FS1", "next_node": "again",
                        "steps": [{"step_id": "p", "action": "ping"}]},
               "again": {"type": "processing", "next_node": "loop2", "operations": [
                   {"action": "calculate", "expression": "round + 1", "output_variable": "round"}]},
               "loop2": {"type": "loop", "iterator": "[0]", "iterator_variable": "y", "body_node": "call2",
                         "next_node": "check"},
               "call2": {"type": "sequence", "agent": "FS1", "next_node": "loop2",
                         "steps": [{"step_id": "p", "action": "ping"}]},
               "check": {"type": "logic", "rules": [{"condition": "round < 2", "next_node": "again"}],
                         "default_next_node": "fail"},
               "fail": {"type": "sequence", "agent": "FS1", "steps": [{"step_id": "b", "action": "boom"}]},
               "rescue": {"type": "sequence", "agent": "FS1", "steps": [{"step_id": "p", "action": "ping"}]}}}}
    async with serving(agent):
        await register_agent(c, agent, "fs1", "fs1")
        run, _ = await finished(c, doc)
    assert run["status"] == "completed", run["error"]
    frames = sorted(f"{b['node_id']}@{b['idempotency_key'].split(':')[4]}" for b in agent.requests
                    if b["action"] == "ping")
    assert frames == sorted(["call@fan/b1/outer[0]/inner[0]", "call@fan/b1/outer[1]/inner[0]", "solo@fan/b2",
                             "call2@loop2[0]", "call2@loop2#2[0]", "rescue@recovery"])


# -- §7.11 the deadline counts executing time only ------------------------------------------------------------------

async def test_time_suspended_on_an_approval_does_not_count_toward_the_deadline(platform: Platform) -> None:
    from tests.helpers import decide, pending_approval

    c = platform.client
    doc = {"procedure_id": "audit_deadline_suspended", "version": "1", "global_config": {"timeout_ms": 1500},
           "workflow_graph": {"start_node": "gate", "nodes": {
               "gate": {"type": "human_approval", "on_approve": "nap", "on_reject": "nap"},
               "nap": {"type": "processing", "next_node": "done", "operations": [
                   {"action": "wait", "duration_ms": 800}]},
               "done": {"type": "terminate", "outputs": {"ok": True}}}}}
    run_id = await start_document(c, doc)
    approval = await pending_approval(c, run_id)
    await asyncio.sleep(2)  # longer than the whole deadline, but suspended
    r = await decide(c, approval["approval_id"], decision="approved")
    assert r.status_code == 200, r.text
    run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"ok": True}


# -- §4.8/§4.10 retry budgets hold across async callback pauses ------------------------------------------------------

async def test_retry_budgets_of_an_async_workflow_step_hold_across_its_pauses(platform: Platform) -> None:
    """A failure callback fails the step (§4.6); the step policy and the handler then retry it, each within its
    budget for this step instance, even though every attempt suspends the run until its callback."""
    from tests.scripted_agent import ACCEPTED

    c = platform.client
    agent = ScriptedAgent({"job": lambda b: ACCEPTED})
    doc = one_node("audit_async_budgets", "aw1", [
        {"step_id": "job", "action": "job", "workflow_dispatch_mode": "async",
         "retry_config": {"max_retries": 1, "delay_ms": 0, "retry_on": ["job_failed"]}}],
        handlers=[{"error_type": "job_failed", "action": "retry", "max_retries": 1, "delay_ms": 0}])
    async with serving(agent):
        r = await c.post("/api/agents", json={"name": "aw1", "channel": "aw1", "base_url": agent.base_url,
                                              "capabilities": [{"name": "job", "type": "workflow"}]})
        assert r.status_code == 201, r.text
        run_id = await start_document(c, doc)
        for _ in range(5):
            run = await wait_status(c, run_id, ("paused", "failed", "completed"))
            if run["status"] != "paused":
                break
            body = agent.requests[-1]
            async with httpx.AsyncClient() as outside:
                answer = await outside.post(body["params"]["callback_url"], json={
                    "status": "failure", "error": "job broke", "error_code": "job_failed"})
            assert answer.status_code == 202, answer.text
            seen = len(agent.requests)
            for _ in range(300):  # until the next attempt is dispatched or the run ends
                now = (await c.get(f"/api/runs/{run_id}")).json()
                if len(agent.requests) > seen or now["status"] in ("failed", "completed"):
                    break
                await asyncio.sleep(0.05)
    assert run["status"] == "failed"
    assert run["error"]["code"] == "job_failed"
    assert [b["attempt"] for b in agent.requests] == [1, 2, 3]
    events = await events_of(c, run_id)
    assert [e["payload"]["source"] for e in of(events, "step_retrying", "job")] == ["retry_policy", "error_handler"]


async def test_a_run_retry_gives_the_failed_step_its_retry_policy_again(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"flaky": failing_times(3, "busy", retryable=True, then="finally")})
    doc = one_node("audit_retry_budget_reset", "rb1", [
        {"step_id": "f", "action": "flaky", "output_variable": "r",
         "retry_config": {"max_retries": 1, "delay_ms": 0}}], {"r": "{{r}}"})
    async with serving(agent):
        await register_agent(c, agent, "rb1", "rb1")
        run_id = await start_document(c, doc)
        failed = await wait_status(c, run_id)
        assert failed["status"] == "failed"
        assert (await c.post(f"/api/runs/{run_id}/retry", json={})).status_code == 200
        run = await wait_status(c, run_id)
    assert run["status"] == "completed", run["error"]
    assert run["output_vars"] == {"r": "finally"}
    assert [b["attempt"] for b in agent.requests] == [1, 2, 3, 4]


async def test_resume_on_failure_leaves_a_non_retryable_failure_alone(platform: Platform) -> None:
    c = platform.client
    agent = ScriptedAgent({"strict": failing_times(1, "invalid", retryable=False, then="ok")})
    doc = one_node("audit_auto_retry_strict", "ar2", [{"step_id": "s", "action": "strict"}],
                   gc={"resume_on_failure": True, "retry_delay_ms": 50})
    async with serving(agent):
        await register_agent(c, agent, "ar2", "ar2")
        run, _ = await finished(c, doc)
        await asyncio.sleep(1)  # an automatic retry would have been requested by now
        events = await events_of(c, run["run_id"])
        again = (await c.get(f"/api/runs/{run['run_id']}")).json()
    assert run["status"] == again["status"] == "failed"
    assert of(events, "run_retry_requested") == []
    assert len(agent.requests) == 1
