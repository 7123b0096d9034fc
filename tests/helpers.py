"""What the cross-service tests share: starting the platform and the HTTP servers tests serve, polling with a
deadline, the HTTP calls most tests make, and the CKP documents they import. The servers that play a part in a test
(agents, an LLM provider, an MCP server) have their own modules; the fixtures are in conftest.py.

One module for all of it, under the name every test already imports."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import inspect
import io
import json
import socket
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
import uvicorn
from httpx_sse import aconnect_sse

from langorch.server import SHUTDOWN_GRACE_S, ManagedServer
from langorch_approvals.service import ApprovalsService
from langorch_compiler.service import CompilerService
from langorch_gateway.app import create_app
from langorch_infra.settings import (
    ApprovalsSettings,
    CompilerSettings,
    GatewaySettings,
    RuntimeSettings,
    TriggersSettings,
)
from langorch_runtime.agents import AgentService
from langorch_runtime.creation import RunCreation
from langorch_runtime.queries import RuntimeQueries
from langorch_runtime.service import RuntimeService
from langorch_triggers.service import TriggersService
from tests.ports import free_port

if TYPE_CHECKING:
    from tests.scripted_agent import ScriptedAgent

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
T = TypeVar("T")


# -- polling with a deadline ----------------------------------------------------------------------------------------

TERMINAL = ("completed", "failed", "canceled")


async def wait_until(read: Callable[[], Awaitable[T] | T], done: Callable[[T], object] = bool,
                     timeout: float = 30, every: float = 0.05) -> T:
    """Call ``read`` (a coroutine function or a plain one) until ``done`` holds for what it returns (by default:
    until it is truthy); fails the test with the last value read when ``timeout`` passes first. ``done`` sees
    whatever an endpoint answered, so it must not assume that a field is there or not null (read it with ``.get``
    and ``or``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = read()
        value: T = await got if inspect.isawaitable(got) else got  # type: ignore[assignment]
        if done(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, value
        await asyncio.sleep(every)


async def wait_run(client: httpx.AsyncClient, run_id: str, done: Callable[[dict[str, Any]], bool],
                   timeout: float = 30) -> dict[str, Any]:
    """Poll ``GET /api/runs/{id}`` until ``done(body)``; the body may be a problem (a 404 before the run exists)."""
    async def read() -> dict[str, Any]:
        return (await client.get(f"/api/runs/{run_id}")).json()  # type: ignore[no-any-return]

    return await wait_until(read, done, timeout)


def ended_after_a_retry(run: dict[str, Any]) -> bool:
    """For :func:`wait_run`: the run completed, or it ended again after a retry (a failure before any retry may be
    followed by an automatic one)."""
    return run.get("status") == "completed" or (
        (run.get("retry_count") or 0) >= 1 and run.get("status") in ("failed", "canceled"))


async def wait_status(client: httpx.AsyncClient, run_id: str, wanted: tuple[str, ...] = TERMINAL,
                      timeout: float = 30) -> dict[str, Any]:
    """Poll ``GET /api/runs/{id}`` until the run reads one of ``wanted`` (terminal by default); fails the test with
    the last body read when ``timeout`` passes first."""
    return await wait_run(client, run_id, lambda body: body.get("status") in wanted, timeout)


async def wait_event(client: httpx.AsyncClient, run_id: str, event_type: str, timeout: float = 30) -> dict[str, Any]:
    """Poll a run's projected events until one of ``event_type`` is there; returns the first one."""
    found = await wait_until(lambda: events_of(client, run_id),
                             lambda events: any(e["event_type"] == event_type for e in events), timeout, every=0.1)
    return next(e for e in found if e["event_type"] == event_type)


async def pending_approval(c: httpx.AsyncClient, run_id: str, timeout: float = 30) -> dict[str, Any]:
    """The run's approval once the approvals service has opened it (the run is waiting on it)."""
    run = await wait_status(c, run_id, ("waiting_approval", *TERMINAL), timeout)
    assert run["status"] == "waiting_approval", run
    assert run["waiting_on"]["kind"] == "approval"
    approval_id = run["waiting_on"]["approval_id"]
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        r = await c.get(f"/api/approvals/{approval_id}")
        if r.status_code == 200:
            body: dict[str, Any] = r.json()
            assert body["run_id"] == run_id
            return body
        assert r.status_code == 404, r.text
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)


async def approval_when(c: httpx.AsyncClient, approval_id: str, status: str, timeout: float = 30) -> dict[str, Any]:
    """Poll an approval until it reads ``status``."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        body: dict[str, Any] = (await c.get(f"/api/approvals/{approval_id}")).json()
        if body["status"] == status:
            return body
        assert asyncio.get_running_loop().time() < deadline, body
        await asyncio.sleep(0.05)


async def decide(c: httpx.AsyncClient, approval_id: str, **body: Any) -> httpx.Response:
    """``POST /api/approvals/{id}/decision``; the answer is the caller's to check."""
    return await c.post(f"/api/approvals/{approval_id}/decision", json=body)

async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 30.0, what: str = "condition",
                     every: float = 0.05) -> Any:
    """Await ``check`` until it returns a truthy value, and return it; fails the test naming ``what`` when
    ``timeout`` passes first."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        result = await check()
        if result:
            return result
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(every)


# -- HTTP calls ---------------------------------------------------------------------------------------------------

async def import_procedure(client: httpx.AsyncClient, doc: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def imported(client: httpx.AsyncClient, doc: dict[str, Any]) -> None:
    """Import a procedure version; one already imported (409) is fine."""
    r = await client.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code in (201, 409), r.text


async def start_run(client: httpx.AsyncClient, procedure_id: str, inputs: dict[str, Any] | None = None,
                    version: str = "1") -> str:
    """``POST /api/runs`` for an imported procedure version; returns the run id."""
    r = await client.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": version,
                                             "input_vars": inputs or {}})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


async def start_document(c: httpx.AsyncClient, doc: dict[str, Any], inputs: dict[str, Any] | None = None) -> str:
    """Import ``doc`` (already imported is fine) and start a run of it; returns the run id."""
    r = await c.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code in (201, 409), r.text
    r = await c.post("/api/runs", json={"procedure_id": doc["procedure_id"], "procedure_version": doc["version"],
                                        "input_vars": inputs or {}})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


async def register_agent(c: httpx.AsyncClient, agent: ScriptedAgent, channel: str, name: str = "one") -> None:
    """Register a scripted agent on ``channel`` with its handlers as capabilities."""
    r = await c.post("/api/agents", json={"name": name, "channel": channel, "base_url": agent.base_url,
                                          "capabilities": list(agent.handlers)})
    # 201: the agent is registered and projected; a dispatch that finds no candidate first waits until the
    # runtime's registry has applied every agent event (AgentDispatcher.sync_registry), so nothing to wait for here
    assert r.status_code == 201, r.text


async def events_of(client: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    """A run's events from the projection (first 500)."""
    r = await client.get(f"/api/runs/{run_id}/events", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def follow_run(client: httpx.AsyncClient, run_id: str, *, last_event_id: int | None = None,
                     limit: int | None = None, until: Callable[[dict[str, Any]], bool] | None = None,
                     ) -> tuple[list[dict[str, Any]], str | None]:
    """Read a run's SSE stream until ``end`` (or ``limit`` events, or an event for which ``until`` is true, on one
    connection); returns (events, end status)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    async with aconnect_sse(client, "GET", f"/api/runs/{run_id}/stream", headers=headers,
                            timeout=httpx.Timeout(60, read=60)) as source:
        async for sse in source.aiter_sse():
            if sse.event == "run_event":
                event = json.loads(sse.data)
                assert sse.id == str(event["stream_seq"])
                events.append(event)
                if (limit is not None and len(events) >= limit) or (until is not None and until(event)):
                    return events, None
            elif sse.event == "end":
                return events, json.loads(sse.data)["status"]
    return events, None


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    """Assert an RFC 9457 problem answer: ``status``, the problem+json content type and ``code``; returns the body
    (files that check more of it do so on the body)."""
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/problem+json")
    body: dict[str, Any] = r.json()
    assert body["code"] == code
    return body


# -- CKP documents --------------------------------------------------------------------------------------------------

def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


def procedure_doc(procedure_id: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    """minimal_greeting with another identity and optional top-level members (name, retrieval_metadata …)."""
    doc = copy.deepcopy(example("minimal_greeting.ckp.json"))
    doc["procedure_id"] = procedure_id
    doc["version"] = version
    doc.update(extra)
    return doc


# -- the platform and the HTTP servers tests serve ------------------------------------------------------------------

def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def langorch_command(*args: str) -> list[str]:
    """The ``langorch`` CLI run by this interpreter."""
    return [sys.executable, "-m", "langorch", *args]


@contextlib.asynccontextmanager
async def serve_app(app: Any, port: int | None = None, *, what: str = "a test server", startup_timeout: float = 30,
                    **config: Any) -> AsyncIterator[str]:
    """Serve an ASGI app on 127.0.0.1 (a free port unless given) for the block; yields the base URL
    (``http://127.0.0.1:<port>``) once the server has started. ``config``: more ``uvicorn.Config`` options."""
    port = port or free_port()
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "off", **config}
    server = ManagedServer(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    task = asyncio.create_task(server.serve())
    deadline = asyncio.get_running_loop().time() + startup_timeout
    while not server.started:
        if task.done():
            task.result()  # it failed to start: its error
        assert asyncio.get_running_loop().time() < deadline, f"{what} did not start within {startup_timeout:g} s"
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await _stopping(what, asyncio.shield(task))


@dataclass
class Platform:
    """Services of one test, in this process; the gateway serves real HTTP on a free port."""

    base_url: str
    nats_url: str
    database_url: str
    client: httpx.AsyncClient
    app: Any
    agent_service: Any = None
    approvals_service: Any = None
    runtime_service: Any = None
    compiler_service: Any = None
    triggers_service: Any = None


async def _settled(task: asyncio.Task[Any]) -> None:
    """Wait for a cancelled task to end, whatever it ended with."""
    await asyncio.wait({task})


async def _stopping(what: str, awaitable: Any, timeout_s: float = 60.0) -> None:
    """Await one shutdown step; a step that hangs fails the test naming it, instead of a silent timeout, with
    where every task of the loop then was (the stuck one among them)."""
    await bounded(what, awaitable, timeout_s, verb="stop")


async def bounded(what: str, awaitable: Any, timeout_s: float = 60.0, *, verb: str = "end") -> Any:
    """``awaitable``'s result; one that hangs fails the test naming it, with where every task of the loop was.

    The stacks are taken before the hung awaitable is cancelled (afterwards its own would be gone), and the test
    fails even when the awaitable answers its cancellation with a result or another error: ``wait_for`` would
    hand that on, and a test expecting an error would pass after a hang (seen in CI: a dispatch expected to fail
    at once "passed" after the whole 60 s)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=timeout_s)
    except asyncio.CancelledError:
        task.cancel()
        raise
    if done:
        return task.result()
    stacks = _task_stacks()
    task.cancel()
    await asyncio.wait({task}, timeout=5.0)
    if task.done() and not task.cancelled():
        task.exception()  # retrieved: its outcome after the cancellation is not what the test waited for
    raise AssertionError(f"{what} did not {verb} within {timeout_s:g} s; the loop's tasks:\n{stacks}")


def _task_stacks() -> str:
    """The stack of every unfinished task of the running loop, innermost frame last."""
    out = io.StringIO()
    for task in asyncio.all_tasks():
        if not task.done():
            task.print_stack(limit=12, file=out)
    return out.getvalue()


@contextlib.asynccontextmanager
async def platform_of(nats_url: str, database_url: str, *, runtime: bool = True, agents: bool = True,
                      runtime_settings: dict[str, Any] | None = None,
                      gateway_settings: dict[str, Any] | None = None, approvals: bool = True,
                      approvals_settings: dict[str, Any] | None = None,
                      queries: bool = True, creation: bool = True,
                      triggers: bool = False,
                      triggers_settings: dict[str, Any] | None = None) -> AsyncIterator[Platform]:
    """The services of one test in this process, the gateway serving real HTTP on a free port (stopped in the
    reverse order when the block ends).

    ``queries``: the runtime's read side (checkpoints, step records, leases, agent liveness), which the gateway
    asks over NATS; it executes nothing, so it runs unless a test checks the gateway without any runtime.
    ``creation``: the runtime's run creation (lo.cmd.run.create); it executes nothing either, so runs are created
    (and their start commands wait) also without ``runtime``, as when the gateway created them itself.
    ``triggers``: the triggers service (api.md §10), off unless a test is about triggers (``triggers_settings``:
    its settings over the defaults)."""
    env = {"nats_url": nats_url, "database_url": database_url}
    port = free_port()
    # auth off unless the test's gateway_settings turn it on: these tests are about other things than credentials
    app = create_app(GatewaySettings(**env, port=port, **{"auth_enabled": False, **(gateway_settings or {})}))
    async with (serve_app(app, port, lifespan="on", timeout_graceful_shutdown=SHUTDOWN_GRACE_S, what="the gateway"),
                _services(env, port, app, runtime=runtime, agents=agents, runtime_settings=runtime_settings,
                          approvals=approvals, approvals_settings=approvals_settings, queries=queries,
                          creation=creation, triggers=triggers, triggers_settings=triggers_settings) as platform):
        yield platform


@contextlib.asynccontextmanager
async def _services(env: dict[str, str], port: int, app: Any, *, runtime: bool, agents: bool,
                    runtime_settings: dict[str, Any] | None, approvals: bool,
                    approvals_settings: dict[str, Any] | None, queries: bool,
                    creation: bool, triggers: bool = False,
                    triggers_settings: dict[str, Any] | None = None) -> AsyncIterator[Platform]:
    nats_url, database_url = env["nats_url"], env["database_url"]
    compiler = CompilerService(CompilerSettings(**env))
    await compiler.start()
    tasks = [asyncio.create_task(compiler.run())]
    runtime_service = None
    if runtime:
        runtime_service = RuntimeService(RuntimeSettings(**env, ack_wait_s=5, public_url=f"http://127.0.0.1:{port}",
                                                         **(runtime_settings or {})))
        await runtime_service.start()
        tasks.append(asyncio.create_task(runtime_service.run()))
    run_creation = None
    if creation:
        run_creation = RunCreation(RuntimeSettings(**env, **(runtime_settings or {})))
        await run_creation.start()
        tasks.append(asyncio.create_task(run_creation.run()))
    agent_service = None
    if agents:
        agent_service = AgentService(RuntimeSettings(**env, **(runtime_settings or {})))
        await agent_service.start()
        tasks.append(asyncio.create_task(agent_service.run()))
    runtime_queries = None
    if queries:
        runtime_queries = RuntimeQueries(RuntimeSettings(**env, **(runtime_settings or {})))
        await runtime_queries.start()
        tasks.append(asyncio.create_task(runtime_queries.run()))
    approvals_service = None
    if approvals:
        approvals_service = ApprovalsService(ApprovalsSettings(**env, **(approvals_settings or {})))
        await approvals_service.start()
        tasks.append(asyncio.create_task(approvals_service.run()))
    triggers_service = None
    if triggers:
        triggers_service = TriggersService(TriggersSettings(**env, **(triggers_settings or {})))
        await triggers_service.start()
        tasks.append(asyncio.create_task(triggers_service.run()))
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        try:
            yield Platform(base, nats_url, database_url, client, app, agent_service, approvals_service,
                           runtime_service, compiler, triggers_service)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:  # a task that outlives its cancellation fails the test (it once hid a 60 s hang)
                await _stopping(f"the service task {t.get_coro()!r}", _settled(t))
            if runtime_service is not None:
                await _stopping("the runtime", runtime_service.stop())
            if agent_service is not None:
                await _stopping("the agent service", agent_service.stop())
            if approvals_service is not None:
                await _stopping("the approvals service", approvals_service.stop())
            if triggers_service is not None:
                await _stopping("the triggers service", triggers_service.stop())
            if runtime_queries is not None:
                await _stopping("the runtime queries", runtime_queries.stop())
            if run_creation is not None:
                await _stopping("the run creation", run_creation.stop())
            await _stopping("the compiler", compiler.stop())
