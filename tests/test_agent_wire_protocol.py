"""What the runtime sends to and accepts from agents (ckp.md §4.5–§4.6, §7.5, §9; api.md §15)
through the real platform: malformed, slow and hostile answers of real HTTP agents and MCP servers must end as
precise step errors, never as a crash or a hung run.

Every test uses its own channel and procedure id, so the module shares one platform. Its binding default agent
timeout (``LANGORCH_AGENT_TIMEOUT_S``) and MCP timeout are short so that "never hangs" is observable."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.helpers import Platform, events_of, platform_of, serve_app, start_document, wait_status, wait_until

pytestmark = pytest.mark.integration

AGENT_TIMEOUT_S = 2.0
MCP_TIMEOUT_S = 3.0
LEASE_TTL_S = 3.0  # renewed every second
LEASE_WAIT_S = 1.5
ACCEPT_TIMEOUT_S = 2.0  # async acceptance per try (10 s by default)


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    settings = {"agent_timeout_s": AGENT_TIMEOUT_S, "mcp_timeout_s": MCP_TIMEOUT_S, "lease_ttl_s": LEASE_TTL_S,
                "lease_wait_timeout_s": LEASE_WAIT_S, "agent_async_accept_timeout_s": ACCEPT_TIMEOUT_S}
    async with platform_of(module_nats_url, module_database_url, runtime_settings=settings) as p:
        yield p


Answer = Callable[[dict[str, Any]], Response]


def raw_agent(answers: dict[str, Answer], seen: list[dict[str, Any]]) -> FastAPI:
    """An HTTP agent whose ``/execute`` answers are whatever ``answers[action]`` builds (any status, body, headers)."""
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/capabilities")
    async def capabilities() -> dict[str, Any]:
        return {"capabilities": list(answers)}

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        body = await request.json()
        seen.append({"body": body, "headers": dict(request.headers)})
        return answers[body["action"]](body)

    return app


async def register_raw(c: httpx.AsyncClient, base_url: str, channel: str, actions: list[str],
                       protocol: str = "http") -> None:
    r = await c.post("/api/agents", json={"name": f"{channel}-agent", "channel": channel, "base_url": base_url,
                                          "protocol": protocol, "capabilities": actions})
    assert r.status_code == 201, r.text  # registered: a dispatch syncs the runtime's registry before it looks


def doc_of(pid: str, channel: str, steps: list[dict[str, Any]], outputs: dict[str, Any] | None = None,
           node: dict[str, Any] | None = None) -> dict[str, Any]:
    work = {"type": "sequence", "agent": channel.upper(), "next_node": "done", "steps": steps, **(node or {})}
    return {"procedure_id": pid, "version": "1", "workflow_graph": {"start_node": "work", "nodes": {
        "work": work, "done": {"type": "terminate", "outputs": outputs or {}}}}}


async def failed_with(c: httpx.AsyncClient, doc: dict[str, Any], timeout: float = 30) -> dict[str, Any]:
    run = await wait_status(c, await start_document(c, doc), timeout=timeout)
    assert run["status"] == "failed", run
    error: dict[str, Any] = run["error"]
    return error


def drip(first: bytes, seconds: float, every: float = 0.25) -> StreamingResponse:
    """A 200 whose headers come at once and whose body trickles in, one byte every ``every`` seconds."""

    async def body() -> AsyncIterator[bytes]:
        yield first
        for _ in range(int(seconds / every)):
            await asyncio.sleep(every)
            yield b" "

    return StreamingResponse(body(), media_type="application/json")


# -- §9.1 / api.md §15.1: malformed or slow /execute answers -----------------------------------------------------


async def test_a_body_that_trickles_in_is_cut_at_the_binding_default_timeout(platform: Platform) -> None:
    """The binding default (LANGORCH_AGENT_TIMEOUT_S) bounds the whole call, body included: an agent that sends its
    headers and then one byte at a time never keeps the step past it."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    app = raw_agent({"trickle": lambda b: drip(b'{"status": "success", "result": {}', 60)}, seen)
    async with serve_app(app) as base_url:
        await register_raw(c, base_url, "wa_drip", ["trickle"])
        # the wait is generous for a loaded machine; a drip that were not cut would end in 60 s as another error
        error = await failed_with(c, doc_of("wire_drip", "wa_drip", [{"step_id": "s", "action": "trickle"}]),
                                  timeout=50)
    assert error["code"] == "step_timeout", error
    assert len(seen) == 1


async def test_envelope_fields_of_the_wrong_type_are_a_protocol_error(platform: Platform) -> None:
    """``error``, ``error_code``, ``error_type`` are strings and ``retryable`` a boolean (api.md §15.1): an error
    envelope that breaks that is not the envelope, so ``agent_protocol_error`` (not a crash of the attempt)."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    bodies = {
        "bad_type": {"status": "error", "error": "boom", "error_code": "x", "error_type": {"class": "E"}},
        "bad_code": {"status": "error", "error": "boom", "error_code": 42},
        "bad_retryable": {"status": "error", "error": "boom", "retryable": "yes"},
        "bad_message": {"status": "error", "error": ["boom"]},
    }
    app = raw_agent({a: (lambda b, body=body: JSONResponse(body)) for a, body in bodies.items()}, seen)
    async with serve_app(app) as base_url:
        await register_raw(c, base_url, "wa_types", list(bodies))
        for action in bodies:
            error = await failed_with(c, doc_of(f"wire_types_{action}", "wa_types",
                                                [{"step_id": "s", "action": action}]))
            assert error["code"] == "agent_protocol_error", (action, error)
            assert "wrong type" in error["message"], error
            assert error["step_id"] == "s"
    assert len(seen) == len(bodies)


async def test_a_4xx_with_a_wrongly_typed_error_code_is_still_agent_http_status(platform: Platform) -> None:
    c = platform.client
    seen: list[dict[str, Any]] = []
    answer = lambda b: JSONResponse({"error": {"why": "bad"}, "error_code": 42}, status_code=400)  # noqa: E731
    async with serve_app(raw_agent({"reject": answer}, seen)) as base_url:
        await register_raw(c, base_url, "wa_4xx", ["reject"])
        error = await failed_with(c, doc_of("wire_4xx_types", "wa_4xx", [{"step_id": "s", "action": "reject"}]))
    assert error["code"] == "agent_http_400", error
    assert len(seen) == 1


# -- §9.2 / api.md §15.4: malformed MCP answers, cancellation ----------------------------------------------------

McpAnswer = Callable[[int | str], Response]


def raw_mcp(calls: dict[str, McpAnswer], seen: list[dict[str, Any]]) -> FastAPI:
    """A streamable-HTTP MCP server speaking just enough JSON-RPC (initialize, tools/list) whose ``tools/call``
    answers are whatever ``calls[name]`` builds; every message it receives is recorded."""
    app = FastAPI()

    @app.post("/mcp")
    async def mcp(request: Request) -> Response:
        message = await request.json()
        seen.append(message)
        method, rid = message.get("method"), message.get("id")
        if rid is None:
            return Response(status_code=202)
        if method == "initialize":
            result = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                      "serverInfo": {"name": "raw-mcp", "version": "1.0"}}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result}, headers={"Mcp-Session-Id": "raw-1"})
        if method == "tools/list":
            tools = [{"name": n, "inputSchema": {"type": "object"}} for n in calls]
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"tools": tools}})
        if method == "tools/call":
            answer = calls[message["params"]["name"]]
            response = answer(rid)
            if isinstance(response, _Slow):
                await asyncio.sleep(response.seconds)
                return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {"content": []}})
            return response
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {}})

    return app


class _Slow(Response):
    def __init__(self, seconds: float) -> None:
        super().__init__()
        self.seconds = seconds


def rpc(result: Any) -> McpAnswer:
    return lambda rid: JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result})


async def test_malformed_mcp_answers_are_mcp_errors(platform: Platform) -> None:
    """A ``tools/call`` answer that is not a valid result (wrong shapes, an HTTP error, a body that is not JSON-RPC)
    fails the step with ``mcp_error`` at once: never a crash, never a hang until the timeout."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    calls: dict[str, McpAnswer] = {
        "bad_content": rpc({"content": "not a list"}),
        "bad_item": rpc({"content": [{"type": "text"}]}),
        "http_500": lambda rid: Response("boom", status_code=500, media_type="text/plain"),
        "not_json": lambda rid: Response("<html>nope</html>", media_type="application/json"),
        "redirect": lambda rid: Response(status_code=307, headers={"Location": "http://169.254.169.254/mcp"}),
        "rpc_garbage": lambda rid: JSONResponse({"jsonrpc": "2.0", "id": rid, "error": {"code": "x"}}),
    }
    async with serve_app(raw_mcp(calls, seen)) as base_url:
        await register_raw(c, f"{base_url}/mcp", "wm_bad", list(calls), protocol="mcp")
        for tool in calls:
            error = await failed_with(c, doc_of(f"wire_mcp_{tool}", "wm_bad", [{"step_id": "s", "action": tool}]))
            assert error["code"] == "mcp_error", (tool, error)
    assert {m["params"]["name"] for m in seen if m.get("method") == "tools/call"} == set(calls)


async def test_canceling_a_run_sends_notifications_cancelled_to_the_mcp_server(platform: Platform) -> None:
    c = platform.client
    seen: list[dict[str, Any]] = []
    async with serve_app(raw_mcp({"slow": lambda rid: _Slow(6)}, seen)) as base_url:
        await register_raw(c, f"{base_url}/mcp", "wm_cancel", ["slow"], protocol="mcp")
        run_id = await start_document(c, doc_of("wire_mcp_cancel", "wm_cancel", [{"step_id": "s", "action": "slow",
                                                                         "timeout_ms": 60_000}]))
        await wait_until(lambda: any(m.get("method") == "tools/call" for m in seen))
        r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "operator"})
        assert r.status_code == 202, r.text
        run = await wait_status(c, run_id)
        for _ in range(100):
            if any(m.get("method") == "notifications/cancelled" for m in seen):
                break
            await asyncio.sleep(0.05)
    assert run["status"] == "canceled"
    [call] = [m for m in seen if m.get("method") == "tools/call"]
    cancelled = [m for m in seen if m.get("method") == "notifications/cancelled"]
    assert [m["params"]["requestId"] for m in cancelled] == [call["id"]], seen


# -- §4.6 / api.md §15.2: workflow dispatch mode and the async dispatch on the wire ------------------------------


def workflow_agent(seen: list[dict[str, Any]], async_answer: Callable[[], Response]) -> FastAPI:
    """A workflow capability ``job``: sync calls succeed, async dispatches get ``async_answer()``."""

    def answer(body: dict[str, Any]) -> Response:
        if body["dispatch_mode"] == "async":
            return async_answer()
        return JSONResponse({"status": "success", "result": {"mode": body["dispatch_mode"]}})

    return raw_agent({"job": answer}, seen)


async def register_workflow(c: httpx.AsyncClient, base_url: str, channel: str) -> None:
    r = await c.post("/api/agents", json={"name": f"{channel}-agent", "channel": channel, "base_url": base_url,
                                          "capabilities": [{"name": "job", "type": "workflow"}]})
    assert r.status_code == 201, r.text


async def test_workflow_dispatch_mode_is_step_then_node_then_global_then_async(platform: Platform) -> None:
    c = platform.client
    seen: list[dict[str, Any]] = []
    refuse = lambda: JSONResponse({"status": "error", "error": "no async here"}, status_code=422)  # noqa: E731
    async with serve_app(workflow_agent(seen, refuse)) as base_url:
        await register_workflow(c, base_url, "wf_modes")
        node_over_global = doc_of("wire_modes_1", "wf_modes", [
            {"step_id": "a", "action": "job"},
            {"step_id": "b", "action": "job", "workflow_dispatch_mode": "async"}], node={"dispatch_mode": "sync"})
        node_over_global["global_config"] = {"workflow_dispatch_mode": "async"}
        error = await failed_with(c, node_over_global)
        assert (error["code"], error["step_id"]) == ("agent_http_422", "b")
        assert [(s["body"]["step_id"], s["body"]["dispatch_mode"]) for s in seen] == [("a", "sync"), ("b", "async")]

        seen.clear()
        global_sync = doc_of("wire_modes_2", "wf_modes", [{"step_id": "a", "action": "job", "output_variable": "r"}],
                             outputs={"r": "{{r}}"})
        global_sync["global_config"] = {"workflow_dispatch_mode": "sync"}
        run = await wait_status(c, await start_document(c, global_sync))
        assert run["status"] == "completed", run
        assert run["output_vars"]["r"] == {"mode": "sync"}
        assert [s["body"]["dispatch_mode"] for s in seen] == ["sync"]

        seen.clear()
        error = await failed_with(c, doc_of("wire_modes_3", "wf_modes", [{"step_id": "a", "action": "job"}]))
        assert error["code"] == "agent_http_422"
        assert [s["body"]["dispatch_mode"] for s in seen] == ["async"]
    async_body = next(s for s in seen if s["body"]["dispatch_mode"] == "async")["body"]
    assert async_body["params"]["_workflow_context"]["dispatch_mode"] == "async"


async def test_async_dispatch_tries_three_times_with_one_key_then_dispatch_failed(platform: Platform) -> None:
    """api.md §15.2 step 1–2: the async POST carries ``dispatch_mode: async``, ``params.callback_url`` (with the
    token) and ``callback {url (without it), token, expires_at}``; 5xx answers are tried 3 times with the same
    Idempotency-Key, then the step fails with ``dispatch_failed``."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    busy = lambda: JSONResponse({"error": "overloaded"}, status_code=503)  # noqa: E731
    async with serve_app(workflow_agent(seen, busy)) as base_url:
        await register_workflow(c, base_url, "wf_busy")
        error = await failed_with(c, doc_of("wire_async_busy", "wf_busy", [{"step_id": "a", "action": "job"}]))
    assert error["code"] == "dispatch_failed", error
    assert len(seen) == 3
    assert len({s["headers"]["idempotency-key"] for s in seen}) == 1
    body = seen[0]["body"]
    assert body["dispatch_mode"] == "async"
    callback = body["callback"]
    assert set(callback) == {"url", "token", "expires_at"}
    assert "token" not in callback["url"]
    assert callback["url"].endswith("/callback")
    assert body["params"]["callback_url"] == f"{callback['url']}?token={callback['token']}"
    assert body["params"]["_workflow_context"]["current_step_id"] == "a"
    events = await events_of(c, body["run_id"])
    assert not [e for e in events if e["event_type"] == "workflow_delegated"]


async def test_async_dispatch_answered_in_progress_asks_again_after_retry_after(platform: Platform) -> None:
    """ckp.md §9.1: HTTP 409 ``in_progress`` means the same key is still running, ask again after ``Retry-After``;
    for an async dispatch too (the agent still handling the previous dispatch of that key), and the acceptance that
    follows delegates the step."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    answers = [JSONResponse({"status": "error", "error_code": "in_progress", "error": "still dispatching"},
                            status_code=409, headers={"Retry-After": "0.2"}),
               JSONResponse({"status": "accepted"}, status_code=202)]
    async with serve_app(workflow_agent(seen, lambda: answers.pop(0))) as base_url:
        await register_workflow(c, base_url, "wf_again")
        run_id = await start_document(c, doc_of("wire_async_again", "wf_again", [{"step_id": "a", "action": "job"}]))
        run = await wait_status(c, run_id, ("paused", "failed", "completed"))
        assert run["status"] == "paused", run
        events = await events_of(c, run_id)
        assert len([e for e in events if e["event_type"] == "workflow_delegated"]) == 1
        assert len(seen) == 2
        assert len({s["headers"]["idempotency-key"] for s in seen}) == 1
        assert {s["body"]["attempt"] for s in seen} == {1}
        # ckp.md §7.5: an async workflow dispatch holds no lease while it waits for the callback
        assert (await c.get("/api/leases", params={"run_id": run_id})).json()["total"] == 0
        r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "done"})
        assert r.status_code in (200, 202), r.text
        assert (await wait_status(c, run_id))["status"] == "canceled"


# -- §7.5 leases around a real call ------------------------------------------------------------------------------


HOLD = [{"step_id": "s", "action": "hold", "timeout_ms": 20_000}]


async def held_lease(c: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    for _ in range(200):
        items = (await c.get("/api/leases", params={"run_id": run_id})).json()["items"]
        if items:
            lease: dict[str, Any] = items[0]
            return lease
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never held a lease")


def slow_agent(seen: list[dict[str, Any]], release: asyncio.Event) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        seen.append(await request.json())
        await asyncio.wait_for(release.wait(), 30)
        return JSONResponse({"status": "success", "result": {"late": True}})

    return app


async def test_lease_is_renewed_during_the_call_and_a_force_release_aborts_it(platform: Platform) -> None:
    """The lease of an attempt names it (run, node, step, idempotency key), is renewed every TTL/3 while the call
    runs, and a force release (``DELETE /api/leases/{id}``) aborts the attempt with ``lease_revoked``."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()
    async with serve_app(slow_agent(seen, release)) as base_url:
        await register_raw(c, base_url, "wl_revoke", ["hold"])
        run_id = await start_document(c, doc_of("wire_lease_revoke", "wl_revoke", HOLD))
        lease = await held_lease(c, run_id)
        assert (lease["node_id"], lease["step_id"], lease["is_active"]) == ("work", "s", True)
        for _ in range(100):  # renewed while the call runs (TTL 3 s: every second)
            renewed = (await c.get(f"/api/leases/{lease['lease_id']}")).json()
            if renewed["renewed_at"] != lease["renewed_at"]:
                break
            await asyncio.sleep(0.1)
        assert renewed["renewed_at"] > lease["renewed_at"]
        assert renewed["expires_at"] > lease["expires_at"]
        r = await c.delete(f"/api/leases/{lease['lease_id']}", params={"reason": "stuck"})
        assert r.status_code == 204, r.text
        run = await wait_status(c, run_id, timeout=20)
        release.set()
    assert run["status"] == "failed", run
    assert run["error"]["code"] == "lease_revoked", run["error"]
    assert len(seen) == 1


async def test_canceling_a_run_releases_the_lease_of_its_call(platform: Platform) -> None:
    c = platform.client
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()
    async with serve_app(slow_agent(seen, release)) as base_url:
        await register_raw(c, base_url, "wl_cancel", ["hold"])
        run_id = await start_document(c, doc_of("wire_lease_cancel", "wl_cancel", HOLD))
        lease = await held_lease(c, run_id)
        r = await c.post(f"/api/runs/{run_id}/cancel", json={"reason": "operator"})
        assert r.status_code == 202, r.text
        assert (await wait_status(c, run_id))["status"] == "canceled"
        gone = (await c.get(f"/api/leases/{lease['lease_id']}")).status_code
        release.set()
    assert gone == 404
    assert (await c.get("/api/leases", params={"run_id": run_id})).json()["total"] == 0


async def test_mcp_binding_default_timeout_fails_the_step_and_sends_notifications_cancelled(
        platform: Platform) -> None:
    """api.md §15.4: without ``timeout_ms`` the call is bounded by ``LANGORCH_MCP_TIMEOUT_S``; on timeout the runtime
    sends ``notifications/cancelled {requestId, reason}`` and the step fails with ``step_timeout``."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    async with serve_app(raw_mcp({"slow": lambda rid: _Slow(6)}, seen)) as base_url:
        await register_raw(c, f"{base_url}/mcp", "wm_timeout", ["slow"], protocol="mcp")
        error = await failed_with(c, doc_of("wire_mcp_timeout", "wm_timeout", [{"step_id": "s", "action": "slow"}]),
                                  timeout=15)
        for _ in range(100):
            if any(m.get("method") == "notifications/cancelled" for m in seen):
                break
            await asyncio.sleep(0.05)
    assert error["code"] == "step_timeout", error
    [call] = [m for m in seen if m.get("method") == "tools/call"]
    [cancelled] = [m for m in seen if m.get("method") == "notifications/cancelled"]
    assert cancelled["params"]["requestId"] == call["id"]
    assert cancelled["params"].get("reason")


async def test_in_progress_is_asked_again_without_a_new_attempt(platform: Platform) -> None:
    """ckp.md §9.1: 409 ``in_progress`` → ask again after ``Retry-After`` with the same key; not a new attempt (one
    ``step_started``, no ``step_retrying``, the same ``attempt`` on the wire)."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    answers = [JSONResponse({"status": "error", "error_code": "in_progress"}, status_code=409,
                            headers={"Retry-After": "0.3"}),
               JSONResponse({"status": "success", "result": {"n": 1}})]
    async with serve_app(raw_agent({"once": lambda b: answers.pop(0)}, seen)) as base_url:
        await register_raw(c, base_url, "wa_again", ["once"])
        doc = doc_of("wire_in_progress", "wa_again", [{"step_id": "s", "action": "once", "output_variable": "r"}],
                     outputs={"r": "{{r}}"})
        run = await wait_status(c, await start_document(c, doc))
    assert run["status"] == "completed", run
    assert run["output_vars"]["r"] == {"n": 1}
    assert len(seen) == 2
    assert len({s["headers"]["idempotency-key"] for s in seen}) == 1
    assert [s["body"]["attempt"] for s in seen] == [1, 1]
    events = await events_of(c, run["run_id"])
    assert len([e for e in events if e["event_type"] == "step_started"]) == 1
    assert not [e for e in events if e["event_type"] == "step_retrying"]


async def callback_of(c: httpx.AsyncClient, run_id: str, seen: list[dict[str, Any]], n: int,
                      body: dict[str, Any]) -> None:
    """Wait for the run's n-th async dispatch to be delegated (run paused), then post ``body`` to its callback."""
    async def delegated() -> bool:
        found = [e for e in await events_of(c, run_id) if e["event_type"] == "workflow_delegated"]
        return len(found) >= n and (await c.get(f"/api/runs/{run_id}")).json().get("status") == "paused"

    await wait_until(delegated, timeout=15)
    url = [s for s in seen if s["body"]["run_id"] == run_id][n - 1]["body"]["params"]["callback_url"]
    async with httpx.AsyncClient() as outside:
        r = await outside.post(url, json=body)
    assert r.status_code == 202, r.text


async def test_success_callback_output_is_stored_or_merged_and_failure_defaults_to_workflow_failed(
        platform: Platform) -> None:
    """ckp.md §4.6: a ``success`` callback's ``output`` is the step result — in ``output_variable``, or merged key by
    key into the variables when the step has none — and the node continues; a ``failure`` callback without an
    ``error_code`` fails the step with ``workflow_failed``."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    accept = lambda: JSONResponse({"status": "accepted"}, status_code=202)  # noqa: E731
    async with serve_app(workflow_agent(seen, accept)) as base_url:
        await register_workflow(c, base_url, "wf_cb")
        doc = doc_of("wire_callbacks", "wf_cb", [{"step_id": "a", "action": "job", "output_variable": "r"},
                                                 {"step_id": "b", "action": "job"}],
                     outputs={"r": "{{r}}", "x": "{{x}}", "y": "{{y}}"})
        run_id = await start_document(c, doc)
        await callback_of(c, run_id, seen, 1, {"status": "success", "output": {"first": True}, "node_id": "work",
                                                "step_id": "a"})
        await callback_of(c, run_id, seen, 2, {"status": "success", "output": {"x": 1, "y": "two"},
                                                "node_id": "work", "step_id": "b"})
        run = await wait_status(c, run_id)
        assert run["status"] == "completed", run
        assert run["output_vars"] == {"r": {"first": True}, "x": 1, "y": "two"}

        failing = await start_document(c, doc_of("wire_callback_failure", "wf_cb", [{"step_id": "a", "action": "job"}]))
        await callback_of(c, failing, seen, 1, {"status": "failure", "error": "gave up", "node_id": "work",
                                                "step_id": "a"})
        run = await wait_status(c, failing)
    assert run["status"] == "failed", run
    assert (run["error"]["code"], run["error"]["step_id"]) == ("workflow_failed", "a")


async def test_a_full_resource_waits_with_one_pool_saturated_then_lease_wait_timeout(platform: Platform) -> None:
    """ckp.md §7.5: every slot held → the step waits, ``pool_saturated {agent_id, channel, resource_key, pool_id}``
    once per wait, and after ``LANGORCH_LEASE_WAIT_TIMEOUT_S`` the attempt fails with ``lease_wait_timeout``."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    release = asyncio.Event()
    async with serve_app(slow_agent(seen, release)) as base_url:
        await register_raw(c, base_url, "wl_full", ["hold"])
        holder = await start_document(c, doc_of("wire_lease_holder", "wl_full", HOLD))
        await held_lease(c, holder)
        waiter = await start_document(c, doc_of("wire_lease_waiter", "wl_full", HOLD))
        run = await wait_status(c, waiter)
        release.set()
        assert (await wait_status(c, holder))["status"] == "completed"
    assert run["status"] == "failed", run
    assert run["error"]["code"] == "lease_wait_timeout", run["error"]
    events = await events_of(c, waiter)
    [saturated] = [e for e in events if e["event_type"] == "pool_saturated"]
    agent = (await c.get("/api/agents", params={"channel": "wl_full"})).json()["items"][0]
    assert saturated["payload"]["agent_id"] == agent["agent_id"]
    assert saturated["payload"]["channel"] == "wl_full"
    assert saturated["payload"]["resource_key"] == (agent.get("resource_key") or agent["agent_id"])
    assert "pool_id" in saturated["payload"]
    assert len(seen) == 1  # the waiting run never reached the agent


async def test_an_async_acceptance_that_trickles_in_is_cut_at_the_acceptance_timeout_per_try(
        platform: Platform) -> None:
    """api.md §15.2: the acceptance must arrive within the acceptance timeout (10 s by default; body included); an
    agent trickling it is tried 3 times and the step fails with ``dispatch_failed`` instead of the run hanging."""
    c = platform.client
    seen: list[dict[str, Any]] = []
    trickle = lambda: drip(b'{"status": "accepted"', 120)  # noqa: E731
    async with serve_app(workflow_agent(seen, trickle)) as base_url:
        await register_workflow(c, base_url, "wf_trickle")
        error = await failed_with(c, doc_of("wire_async_trickle", "wf_trickle", [{"step_id": "a", "action": "job"}]),
                                  timeout=60)
    assert error["code"] == "dispatch_failed", error
    assert len(seen) == 3
