"""Run events only the services emit (ckp.md §7.1, §7.2, §7.12, §8), pinned end to end against real NATS JetStream
and PostgreSQL: ``run_created``, ``execution_started``/``_resumed``, ``run_completed``/``run_failed``,
``run_retry_requested``, ``run_canceled``, and the start gates of §7.2."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from datetime import datetime
from typing import Any

import pytest

from langorch_infra.settings import RuntimeSettings
from langorch_runtime.service import RuntimeService
from tests.helpers import (
    Platform,
    ended_after_a_retry,
    events_of,
    imported,
    pending_approval,
    platform_of,
    register_agent,
    start_run,
    wait_run,
    wait_status,
    wait_until,
)
from tests.llm_server import LlmServerState, running_llm_server
from tests.scripted_agent import AgentFailure, ScriptedAgent, serving

pytestmark = pytest.mark.integration

RUN_CREATED = ("procedure_id", "procedure_version", "release_channel", "input_vars", "trigger_type", "triggered_by",
               "parent_run_id", "parent_node_id", "root_run_id", "rerun_of", "execution_mode")
ERROR_FIELDS = ("code", "message", "retryable", "node_id", "step_id", "frame", "attempt", "type", "error_code",
                "http_status", "details", "cause")


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def of(events: list[dict[str, Any]], kind: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in events if e["event_type"] == kind]


def graph(procedure_id: str, nodes: dict[str, Any], start: str, **extra: Any) -> dict[str, Any]:
    return {"procedure_id": procedure_id, "version": "1", **extra,
            "workflow_graph": {"start_node": start, "nodes": nodes}}


async def test_run_created_and_execution_started_carry_the_documents_execution_mode(platform: Platform) -> None:
    """§8: ``run_created.execution_mode`` and ``execution_started.execution_mode`` are the run's mode — for an API
    run, the document's ``global_config.execution_mode`` (a dry run skips the agent step)."""
    c = platform.client
    doc = graph("contract_dry", {
        "fetch": {"type": "sequence", "agent": "WEB", "next_node": "done",
                  "steps": [{"step_id": "open", "action": "open_page", "output_variable": "page"}]},
        "done": {"type": "terminate", "outputs": {"page": "{{page}}", "who": "{{who}}"}}}, "fetch",
        variables_schema={"who": {"type": "string", "default": "ann"}},
        global_config={"execution_mode": "dry_run"})
    await imported(c, doc)
    run_id = await start_run(c, "contract_dry")
    run = await wait_status(c, run_id)
    assert run["status"] == "completed", run
    events = await events_of(c, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    [created] = of(events, "run_created")
    assert set(RUN_CREATED) <= set(created), sorted(created)
    assert (created["procedure_id"], created["procedure_version"], created["input_vars"], created["trigger_type"],
            created["root_run_id"], created["parent_run_id"], created["rerun_of"], created["execution_mode"]) == \
        ("contract_dry", "1", {"who": "ann"}, "api", run_id, None, None, "dry_run")
    [started] = of(events, "execution_started")
    assert (started["entry_node_id"], started["execution_mode"]) == ("fetch", "dry_run")
    [skipped] = of(events, "dry_run_step_skipped")
    assert (skipped["action"], skipped["binding_kind"], skipped["channel"]) == ("open_page", "channel", "web")
    [completed] = of(events, "run_completed")
    assert completed["outputs"] == {"page": {"dry_run": True, "skipped_action": "open_page", "channel": "web"},
                                    "who": "ann"}
    assert completed["recovered_via"] is None
    assert "mode" not in completed or completed["mode"] is None


async def test_validation_only_run_completes_with_mode_and_message(platform: Platform) -> None:
    c = platform.client
    doc = graph("contract_validate", {"a": {"type": "terminate"}}, "a",
                global_config={"execution_mode": "validation_only"})
    await imported(c, doc)
    run_id = await start_run(c, "contract_validate")
    assert (await wait_status(c, run_id))["status"] == "completed"
    events = await events_of(c, run_id)
    assert [e["event_type"] for e in events] == ["run_created", "execution_started", "run_completed"]
    assert of(events, "run_created")[0]["execution_mode"] == "validation_only"
    assert of(events, "execution_started")[0]["execution_mode"] == "validation_only"
    [completed] = of(events, "run_completed")
    assert completed["mode"] == "validation_only"
    assert completed["outputs"] == {}
    assert completed["message"] == ("Execution skipped (mode=validation_only). CKP compiled and validated "
                                    "successfully.")


async def test_retry_of_a_run_failed_at_a_terminate_names_that_node(platform: Platform) -> None:
    """§7.12: a run failed at a ``terminate`` has that node as its failure point; ``run_retry_requested
    {retry_count, automatic, failure_node_id}`` names it and ``execution_resumed`` enters there."""
    c = platform.client
    doc = graph("contract_stop", {
        "a": {"type": "sequence", "next_node": "stop",
              "steps": [{"step_id": "s", "action": "set_variable", "variable": "n", "value": 1}]},
        "stop": {"type": "terminate", "status": "failed", "outputs": {"n": "{{n}}"}}}, "a")
    await imported(c, doc)
    run_id = await start_run(c, "contract_stop")
    assert (await wait_status(c, run_id))["status"] == "failed"
    events = await events_of(c, run_id)
    [failed] = of(events, "run_failed")
    assert set(ERROR_FIELDS) <= set(failed["error"])
    assert (failed["error"]["code"], failed["error"]["retryable"], failed["error"]["node_id"]) == \
        ("terminated_failed", False, "stop")
    assert (failed["outputs"], failed["recovered_via"], failed["recovery_error"]) == ({"n": 1}, None, None)
    r = await c.post(f"/api/runs/{run_id}/retry", json={})
    assert r.status_code in (200, 202), r.text
    events = await wait_until(lambda: events_of(c, run_id), lambda got: len(of(got, "run_failed")) == 2)
    [retry] = of(events, "run_retry_requested")
    assert (retry["retry_count"], retry["automatic"], retry["failure_node_id"]) == (1, False, "stop")
    resumed = of(events, "execution_resumed")
    assert [(e["entry_node_id"], e["resume_reason"]) for e in resumed] == [("stop", "retry")]
    types = [e["event_type"] for e in events]
    i = types.index("run_retry_requested")
    assert types[i + 1] == "execution_resumed"
    # the failing node ran again from the failure point: the sequence before it did not
    assert [e["node_id"] for e in events[i:] if e["event_type"] == "node_started"] == ["stop"]
    assert len(of(events, "run_failed")) == 2


async def test_resume_after_an_approval_enters_at_the_approval_node(platform: Platform) -> None:
    """§7.2: ``execution_resumed {entry_node_id, resume_reason}`` — the node the resumed frame continues in."""
    c = platform.client
    doc = graph("contract_resume", {
        "review": {"type": "human_approval", "prompt": "ok?", "on_approve": "yes", "on_reject": "no"},
        "yes": {"type": "terminate", "outputs": {"r": "yes"}},
        "no": {"type": "terminate", "outputs": {"r": "no"}}}, "review")
    await imported(c, doc)
    run_id = await start_run(c, "contract_resume")
    approval = await pending_approval(c, run_id)  # the run may read waiting_approval before its approval row exists
    r = await c.post(f"/api/approvals/{approval['approval_id']}/decision", json={"decision": "approve"})
    assert r.status_code == 200, r.text
    assert (await wait_status(c, run_id))["status"] == "completed"
    events = await events_of(c, run_id)
    [resumed] = of(events, "execution_resumed")
    assert (resumed["entry_node_id"], resumed["resume_reason"]) == ("review", "approval_decision")
    [decided] = of(events, "approval_decision_received")
    assert (decided["approval_id"], decided["source"], decided["routed_to"], decided["resumes_run"]) == \
        (approval["approval_id"], "human", "yes", True)


async def test_cancel_of_a_waiting_run_is_run_canceled_with_reason_and_requester(platform: Platform) -> None:
    c = platform.client
    doc = graph("contract_cancel", {
        "review": {"type": "human_approval", "prompt": "ok?", "on_approve": "done", "on_reject": "done"},
        "done": {"type": "terminate"}}, "review")
    await imported(c, doc)
    run_id = await start_run(c, "contract_cancel")
    await wait_status(c, run_id, ("waiting_approval",))
    r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "operator said so"})
    assert r.status_code in (200, 202), r.text
    assert (await wait_status(c, run_id))["status"] == "canceled"
    events = await events_of(c, run_id)
    [canceled] = of(events, "run_canceled")
    assert canceled["reason"] == "operator said so"
    assert isinstance(canceled["requested_by"], str)
    assert canceled["requested_by"]
    assert not of(events, "run_cancel_requested")  # not executing: ended at once (§7.10)


@pytest.mark.parametrize(("moves", "status", "events_seen"), [
    (["archived"], "failed", ["run_created", "run_failed"]),
    (["active", "deprecated"], "completed", ["run_created", "execution_started", "node_started", "node_completed",
                                             "run_completed"]),
])
async def test_start_gate_refuses_a_version_archived_before_its_run_starts(
        nats_url: str, database_url: str, moves: list[str], status: str, events_seen: list[str]) -> None:
    """§7.2 (2): the runtime refuses a version archived since the run was created (``procedure_not_runnable``) by
    failing the run; nothing executes. A version only deprecated meanwhile still runs it (api.md §4.4 refuses new
    runs only)."""
    pid = f"contract_gate_{moves[-1]}"
    async with platform_of(nats_url, database_url, runtime=False) as p:
        c = p.client
        await imported(c, graph(pid, {"a": {"type": "terminate"}}, "a"))
        if moves[0] == "active":
            r = await c.patch(f"/api/procedures/{pid}/1/status", json={"status": "active"})
            assert r.status_code == 200, r.text
        run_id = await start_run(c, pid)
        r = await c.patch(f"/api/procedures/{pid}/1/status", json={"status": moves[-1]})
        assert r.status_code == 200, r.text
        runtime = RuntimeService(RuntimeSettings(nats_url=nats_url, database_url=database_url, ack_wait_s=5))
        await runtime.start()
        task = asyncio.create_task(runtime.run())
        try:
            run = await wait_status(c, run_id)
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await runtime.stop()
        assert run["status"] == status, run
        events = await events_of(c, run_id)
        assert [e["event_type"] for e in events] == events_seen
        if status == "failed":
            [failed] = of(events, "run_failed")
            assert (failed["error"]["code"], failed["error"]["retryable"]) == ("procedure_not_runnable", False)


async def test_rate_limit_wait_over_a_second_is_reported_before_the_attempt_starts(platform: Platform) -> None:
    """§7.6 / §8: a rate-limit wait over 1 s emits ``rate_limit_wait {limiter, waited_ms}`` (with the step's
    position), before that attempt's ``step_started``."""
    c = platform.client
    release = asyncio.Event()

    async def hold(body: dict[str, Any]) -> str:
        if not release.is_set():
            release.set()
            await asyncio.sleep(1.5)  # the other branch waits for the one concurrency slot meanwhile
        return "done"

    doc = graph("contract_ratelimit", {
        "fan": {"type": "parallel", "next_node": "done", "branches": [
            {"branch_id": "a", "start_node": "x"}, {"branch_id": "b", "start_node": "y"}]},
        "x": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [{"step_id": "s", "action": "hold"}]},
        "y": {"type": "sequence", "agent": "API", "next_node": "done", "steps": [{"step_id": "s", "action": "hold"}]},
        "done": {"type": "terminate"}}, "fan",
        global_config={"rate_limiting": {"enabled": True, "max_concurrent_operations": 1, "max_wait_ms": 10000}})
    agent = ScriptedAgent({"hold": hold})
    async with serving(agent):
        await register_agent(c, agent, "api", name="holder")
        await imported(c, doc)
        run = await wait_status(c, await start_run(c, "contract_ratelimit"))
    assert run["status"] == "completed", run
    events = await events_of(c, run["run_id"])
    [wait] = [e for e in events if e["event_type"] == "rate_limit_wait"]
    assert wait["payload"]["limiter"] == "concurrent_operations"
    assert wait["payload"]["waited_ms"] > 1000
    assert (wait["node_id"], wait["step_id"], wait["attempt"]) in (("x", "s", 1), ("y", "s", 1))
    started = [e for e in events if e["event_type"] == "step_started" and e["node_id"] == wait["node_id"]]
    assert [e["seq"] > wait["seq"] for e in started] == [True]


async def test_automatic_retry_comes_retry_delay_ms_after_the_failure(platform: Platform) -> None:
    """§7.12: with ``resume_on_failure``, a retryable failure is retried once, ``retry_delay_ms`` after it
    (``run_retry_requested {retry_count: 1, automatic: true, failure_node_id}``); the delay is honoured as given
    (it was cut to 60 s and slept while holding a run slot)."""
    c = platform.client
    calls = {"n": 0}

    def flaky(body: dict[str, Any]) -> str:
        calls["n"] += 1
        if calls["n"] == 1:
            raise AgentFailure("busy", "busy", retryable=True)
        return "ok"

    doc = graph("contract_auto_retry", {
        "work": {"type": "sequence", "agent": "API", "next_node": "done",
                 "steps": [{"step_id": "call", "action": "flaky", "output_variable": "r"}]},
        "done": {"type": "terminate", "outputs": {"r": "{{r}}"}}}, "work",
        global_config={"resume_on_failure": True, "retry_delay_ms": 1500})
    agent = ScriptedAgent({"flaky": flaky})
    async with serving(agent):
        await register_agent(c, agent, "api", name="flaky")
        await imported(c, doc)
        run_id = await start_run(c, "contract_auto_retry")
        # failed first (retryable), then retried automatically once and completed
        run = await wait_run(c, run_id, ended_after_a_retry)
    assert run["status"] == "completed", run
    assert run["output_vars"] == {"r": "ok"}
    events = await events_of(c, run_id)
    [failed] = [e for e in events if e["event_type"] == "run_failed"]
    assert failed["payload"]["error"]["retryable"] is True
    [retry] = [e for e in events if e["event_type"] == "run_retry_requested"]
    assert (retry["payload"]["retry_count"], retry["payload"]["automatic"], retry["payload"]["failure_node_id"]) == \
        (1, True, "work")
    gap = datetime.fromisoformat(retry["created_at"]) - datetime.fromisoformat(failed["created_at"])
    assert gap.total_seconds() >= 1.5
    assert calls["n"] == 2


async def test_recovery_path_past_the_deadline_has_its_grace_then_fails(nats_url: str, database_url: str) -> None:
    """§7.11: after ``deadline_exceeded`` the recovery path gets ``LANGORCH_RECOVERY_GRACE_S`` of its own; past it
    the run fails with ``run_failed {error: deadline_exceeded, recovered_via, recovery_error: deadline_exceeded}``."""
    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(3)
        return "late"

    doc = graph("contract_grace", {
        "work": {"type": "sequence", "agent": "API", "next_node": "done",
                 "steps": [{"step_id": "s", "action": "slow"}]},
        "rescue": {"type": "sequence", "agent": "API", "next_node": "done",
                   "steps": [{"step_id": "r", "action": "slow"}]},
        "done": {"type": "terminate"}}, "work", global_config={"timeout_ms": 300, "on_failure": "rescue"})
    agent = ScriptedAgent({"slow": slow})
    async with serving(agent), platform_of(nats_url, database_url, runtime_settings={"recovery_grace_s": 0.3}) as p:
        c = p.client
        await register_agent(c, agent, "api", name="slowpoke")
        await imported(c, doc)
        run = await wait_status(c, await start_run(c, "contract_grace"))
        events = await events_of(c, run["run_id"])
    assert run["status"] == "failed", run
    [recovery] = of(events, "recovery_started")
    assert (recovery["on_failure_node"], recovery["error"]["code"]) == ("rescue", "deadline_exceeded")
    [failed] = of(events, "run_failed")
    assert (failed["error"]["code"], failed["recovered_via"], failed["recovery_error"]["code"]) == \
        ("deadline_exceeded", "rescue", "deadline_exceeded")
    assert failed["recovery_error"]["node_id"] == "rescue"


LLM_USAGE = ("model", "requested_model", "provider_host", "prompt_tokens", "completion_tokens", "total_tokens",
             "estimated_cost_usd", "usage_reported", "latency_ms", "attempt", "fallback_attempt")


async def test_llm_usage_budget_exceeded_and_llm_error_payloads(nats_url: str, database_url: str) -> None:
    """§7.13 / §8: ``llm_usage`` of a fallback call, ``budget_exceeded {max_cost_usd, spent_usd, projected_usd}``
    and ``llm_error`` (retryable when the chain ended on 5xx) against a real OpenAI-compatible server."""
    models = {"m-small": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0, "fallbacks": ["m-backup"]},
              "m-backup": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0}}
    state = LlmServerState()
    async with running_llm_server(state) as llm, platform_of(nats_url, database_url, runtime_settings={
            "llm_base_url": llm.base_url(), "llm_models": models, "llm_default_model": "m-small"}) as p:
        c = p.client
        state.model("m-small").script = [(503, None, {})]
        ok = graph("contract_llm", {"ask": {"type": "llm_action", "model": "m-small", "prompt": "hi",
                                            "next_node": "done"},
                                    "done": {"type": "terminate", "outputs": {"t": "{{llm_output}}"}}}, "ask")
        await imported(c, ok)
        run = await wait_status(c, await start_run(c, "contract_llm"))
        assert run["status"] == "completed", run
        events = await events_of(c, run["run_id"])
        [usage_event] = [e for e in events if e["event_type"] == "llm_usage"]
        usage = usage_event["payload"]
        assert set(LLM_USAGE) - {"attempt"} <= set(usage), sorted(usage)
        assert (usage_event["node_id"], usage_event["step_id"], usage_event["attempt"]) == ("ask", "llm", 1)
        assert (usage["model"], usage["requested_model"], usage["fallback_attempt"], usage["usage_reported"]) == \
            ("m-backup", "m-small", 1, True)
        assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
        assert usage["estimated_cost_usd"] == pytest.approx(
            (usage["prompt_tokens"] * 1.0 + usage["completion_tokens"] * 2.0) / 1000)
        assert isinstance(usage["provider_host"], str)
        assert usage["provider_host"]
        assert isinstance(usage["latency_ms"], int)

        poor = graph("contract_llm_budget", {"ask": {"type": "llm_action", "model": "m-small", "prompt": "hi",
                                                     "max_tokens": 500, "next_node": "done"},
                                             "done": {"type": "terminate"}}, "ask",
                     global_config={"max_cost_usd": 0.000001})
        await imported(c, poor)
        run = await wait_status(c, await start_run(c, "contract_llm_budget"))
        assert run["status"] == "failed", run
        events = await events_of(c, run["run_id"])
        [budget] = of(events, "budget_exceeded")
        assert (budget["max_cost_usd"], budget["spent_usd"]) == (0.000001, 0.0)
        assert budget["projected_usd"] > budget["max_cost_usd"]
        [failed] = of(events, "run_failed")
        assert (failed["error"]["code"], failed["error"]["retryable"]) == ("budget_exceeded", False)

        state.model("m-small").status = 503
        state.model("m-backup").status = 502
        down = graph("contract_llm_down", {"ask": {"type": "llm_action", "model": "m-small", "prompt": "hi",
                                                   "next_node": "done"},
                                           "done": {"type": "terminate"}}, "ask")
        await imported(c, down)
        run = await wait_status(c, await start_run(c, "contract_llm_down"))
        assert run["status"] == "failed", run
        [failed] = of(await events_of(c, run["run_id"]), "run_failed")
        assert (failed["error"]["code"], failed["error"]["retryable"], failed["error"]["node_id"]) == \
            ("llm_error", True, "ask")


async def test_a_validation_only_child_run_resumes_its_parent(platform: Platform) -> None:
    """§3.9 step 4 / §8: a child run ends (here at once, ``validation_only``) → the parent resumes with
    ``subflow_completed {child_run_id, procedure_id, version, resumes_run, mapped_variables}`` (the parent used to wait
    for ever: the validation-only path never told it)."""
    c = platform.client
    child = graph("contract_child_check", {"a": {"type": "terminate", "outputs": {"x": 1}}}, "a",
                  global_config={"execution_mode": "validation_only"})
    parent = graph("contract_parent", {
        "call": {"type": "subflow", "procedure_id": "contract_child_check", "version": "1", "next_node": "done"},
        "done": {"type": "terminate", "outputs": {"child": "{{subflow_output}}"}}}, "call")
    await imported(c, child)
    await imported(c, parent)
    run = await wait_status(c, await start_run(c, "contract_parent"))
    assert run["status"] == "completed", run
    assert run["output_vars"] == {"child": {}}
    events = await events_of(c, run["run_id"])
    [started_event] = [e for e in events if e["event_type"] == "subflow_started"]
    started = started_event["payload"]
    assert (started["procedure_id"], started["version"], started_event["attempt"], started["suspends_run"]) == \
        ("contract_child_check", "1", 1, True)
    [completed] = of(events, "subflow_completed")
    assert (completed["child_run_id"], completed["procedure_id"], completed["version"], completed["resumes_run"],
            completed["mapped_variables"]) == (started["child_run_id"], "contract_child_check", "1", True,
                                               ["subflow_output"])
    [resumed] = of(events, "execution_resumed")
    assert (resumed["entry_node_id"], resumed["resume_reason"]) == ("call", "child_run_finished")


async def test_a_defect_fails_the_run_with_retryable_internal_error(platform: Platform,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """§7.16 ``internal_error`` (retryable): a node that keeps raising an unexpected exception (a defect, injected
    here into the in-process runtime) fails the run after a few deliveries instead of being redelivered for ever."""
    from langorch_runtime.machine.nodes import verification

    original = verification.run

    async def broken(m: Any, state: Any, frame: Any, node: Any, current: Any, p: Any) -> Any:
        if node.id == "boom":
            raise TypeError("a defect")
        return await original(m, state, frame, node, current, p)

    monkeypatch.setattr(verification, "run", broken)
    c = platform.client
    doc = graph("contract_defect", {
        "boom": {"type": "verification", "next_node": "done", "checks": [{"id": "c", "condition": "1 == 1"}]},
        "done": {"type": "terminate"}}, "boom")
    await imported(c, doc)
    run = await wait_status(c, await start_run(c, "contract_defect"))
    assert run["status"] == "failed", run
    events = await events_of(c, run["run_id"])
    [failed] = of(events, "run_failed")
    assert (failed["error"]["code"], failed["error"]["retryable"]) == ("internal_error", True)
    assert "TypeError" in failed["error"]["message"]
    assert "a defect" not in failed["error"]["message"]
    assert len(of(events, "execution_recovered")) == 2  # redelivered twice, then failed


async def test_resume_on_failure_retries_a_run_failed_by_a_defect(platform: Platform,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """§7.12 / §7.16: ``internal_error`` is retryable, so with ``resume_on_failure`` a run failed by a defect is
    retried automatically once, like any run failed with a retryable error (it stayed failed: the flag said
    retryable, the engine never retried). Here the defect lasts for the three deliveries of the start command."""
    from langorch_runtime.machine.nodes import verification

    original = verification.run
    calls = {"n": 0}

    async def broken_three_times(m: Any, state: Any, frame: Any, node: Any, current: Any, p: Any) -> Any:
        calls["n"] += 1
        if calls["n"] <= 3:
            raise TypeError("a defect")
        return await original(m, state, frame, node, current, p)

    monkeypatch.setattr(verification, "run", broken_three_times)
    c = platform.client
    doc = graph("contract_defect_retried", {
        "boom": {"type": "verification", "next_node": "done", "checks": [{"id": "c", "condition": "1 == 1"}]},
        "done": {"type": "terminate", "outputs": {"ok": True}}}, "boom",
        global_config={"resume_on_failure": True, "retry_delay_ms": 200})
    await imported(c, doc)
    run_id = await start_run(c, "contract_defect_retried")
    run = await wait_run(c, run_id, ended_after_a_retry)
    assert run["status"] == "completed", run
    assert run["output_vars"] == {"ok": True}
    events = await events_of(c, run_id)
    [failed] = of(events, "run_failed")
    assert (failed["error"]["code"], failed["error"]["retryable"]) == ("internal_error", True)
    [retry] = of(events, "run_retry_requested")
    assert (retry["retry_count"], retry["automatic"]) == (1, True)
    assert calls["n"] == 4


async def test_a_child_of_a_version_not_yet_effective_fails_at_the_start_gate(platform: Platform) -> None:
    """§7.2 (2): a version whose ``effective_date`` is still ahead fails the run with ``procedure_not_effective``
    before it executes (reached here through a subflow, which the API cannot refuse); the parent sees
    ``subflow_failed {…, error}``."""
    c = platform.client
    child = {**graph("contract_future", {"a": {"type": "terminate"}}, "a"), "effective_date": "2999-01-01"}
    parent = graph("contract_future_parent", {
        "call": {"type": "subflow", "procedure_id": "contract_future", "version": "1", "on_failure": "continue",
                 "next_node": "done"},
        "done": {"type": "terminate"}}, "call")
    await imported(c, child)
    await imported(c, parent)
    run = await wait_status(c, await start_run(c, "contract_future_parent"))
    assert run["status"] == "completed", run
    events = await events_of(c, run["run_id"])
    [failed] = of(events, "subflow_failed")
    assert (failed["procedure_id"], failed["on_failure"], failed["resumes_run"]) == \
        ("contract_future", "continue", True)
    assert (failed["error"]["code"], failed["error"]["retryable"]) == ("procedure_not_effective", False)
    child_events = await events_of(c, failed["child_run_id"])
    assert [e["event_type"] for e in child_events] == ["run_created", "run_failed"]


async def test_async_delegation_and_callback_payloads_with_callback_artifacts(nats_url: str,
                                                                             database_url: str) -> None:
    """§4.6 / §8: ``workflow_delegated {delegation_id, action, agent_id, agent_url, callback_url (no token),
    expires_at, dispatch_mode, suspends_run}``, ``workflow_callback_received {delegation_id, status, output, error,
    error_code, resumes_run}`` and the callback's own artifacts as ``artifact_created`` (api.md §5.10)."""
    import httpx

    from tests.helpers import example
    from tests.test_async_workflow_runs import hybrid_agent, register_hybrid

    async with platform_of(nats_url, database_url, runtime_settings={"callback_timeout_s": 60}) as p:
        c = p.client
        async with serving(hybrid_agent()) as agent:
            await register_hybrid(c, agent)
            doc = example("hybrid_dispatch.ckp.json")
            await imported(c, doc)
            run_id = await start_run(c, doc["procedure_id"], version=doc["version"])
            await wait_status(c, run_id, ("paused",))
            url = agent.requests[1]["params"]["callback_url"]
            async with httpx.AsyncClient() as outside:
                r = await outside.post(url, json={"status": "failure", "error": "bad password",
                                                  "error_code": "login_failed", "artifacts": [
                                                      {"kind": "screenshot", "uri": "file:///tmp/login.png",
                                                       "name": "login"}]})
            assert r.status_code == 202, r.text
            run = await wait_status(c, run_id)
        events = await events_of(c, run_id)
    assert run["status"] == "failed", run
    [delegated_event] = [e for e in events if e["event_type"] == "workflow_delegated"]
    delegated = delegated_event["payload"]
    assert (delegated["action"], delegated["dispatch_mode"], delegated["suspends_run"]) == \
        ("run_full_salesforce_login", "async", True)
    assert delegated["agent_url"] == agent.base_url
    assert isinstance(delegated["agent_id"], str)
    assert delegated["callback_url"].endswith(f"/api/runs/{run_id}/callback")
    assert "token" not in delegated["callback_url"]
    assert delegated["expires_at"].endswith("Z")
    [received] = of(events, "workflow_callback_received")
    assert (received["delegation_id"], received["status"], received["output"], received["error"],
            received["error_code"], received["resumes_run"]) == \
        (delegated["delegation_id"], "failure", None, "bad password", "login_failed", True)
    [artifact_event] = [e for e in events if e["event_type"] == "artifact_created"]
    artifact = artifact_event["payload"]
    assert (artifact_event["node_id"], artifact_event["step_id"]) == (delegated_event["node_id"],
                                                                       delegated_event["step_id"])
    assert (artifact["kind"], artifact["uri"], artifact["name"], artifact["stored"]) == \
        ("screenshot", "file:///tmp/login.png", "login", False)
    [step_failed] = of(events, "step_failed")
    assert (step_failed["error"]["code"], step_failed["error"]["error_code"]) == ("login_failed", "login_failed")
