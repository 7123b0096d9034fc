"""Fixtures that start real servers: NATS with JetStream and PostgreSQL from the project's own wheels, or
the servers named by LANGORCH_TEST_NATS_URL / LANGORCH_TEST_DATABASE_URL. Each test gets a fresh JetStream
store (a new embedded server, or a wiped one) and a fresh database."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import nats
import pytest
import uvicorn

from langorch.server import SHUTDOWN_GRACE_S, ManagedServer
from langorch_approvals.service import ApprovalsService
from langorch_compiler.service import CompilerService
from langorch_gateway.app import create_app
from langorch_infra.embedded import EmbeddedNats, EmbeddedPostgres, free_port
from langorch_infra.settings import ApprovalsSettings, CompilerSettings, GatewaySettings, RuntimeSettings
from langorch_runtime.agents import AgentService
from langorch_runtime.creation import RunCreation
from langorch_runtime.queries import RuntimeQueries
from langorch_runtime.service import RuntimeService

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


# -- order and distribution over pytest-xdist workers (`-n` in pyproject.toml) -----------------------------------
# The suite mostly waits (documents' pauses, timeouts, subprocesses starting), so it runs on more workers than cores.
# The files whose tests take longest go first, so that they overlap with everything else instead of running alone
# at the end; those whose tests start their own servers or subprocesses are split into one work unit per test
# (``SPLIT``). Every other file is one work unit (its module-scoped servers start once per run). The order and the
# split are only about speed: the tests pass in any order.
SLOW_FIRST = (
    "test_multi_agent_invoice_run.py", "test_schemathesis.py", "test_up_lifecycle.py", "test_runtime_crash_recovery.py",
    "test_chaos.py", "test_readme_quickstart.py", "test_product_enrichment_runs.py", "test_wire_protocol_audit.py",
    "test_cli_errors.py", "test_service_config.py", "test_step_semantics_audit.py", "test_approvals_service.py",
    "test_webhooks.py", "test_projection_kill_restart.py", "test_projection_rebuild.py", "test_golden_event_streams.py",
)
SPLIT = frozenset(SLOW_FIRST[:7]) | {"test_cli_errors.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(SLOW_FIRST)))  # stable: files stay together


@pytest.hookimpl(optionalhook=True)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    if config.getoption("dist") != "load":  # another --dist was asked for
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlowFirstScheduling(LoadScopeScheduling):  # type: ignore[misc]
        """Work units in collection order: one per test of a ``SPLIT`` file, else one per file."""

        def _split_scope(self, nodeid: str) -> str:
            path = nodeid.split("::", 1)[0]
            return nodeid if path.rsplit("/", 1)[-1] in SPLIT else path

    config.option.loadscopereorder = False  # keep SLOW_FIRST's order
    return SlowFirstScheduling(config, log)


@pytest.fixture(scope="session")
def pg_server_url() -> Iterator[str]:
    url = os.environ.get("LANGORCH_TEST_DATABASE_URL")
    if url:
        yield url
        return
    # not under pytest's basetemp: a second pytest session starting on this machine resets the permissions of
    # /tmp/pytest-of-<user> to 0700, and the unprivileged server user (when we run as root) then loses its way
    # to the data directory and PANICs in the middle of this session
    state = Path(tempfile.mkdtemp(prefix="langorch-test-pg-"))
    server = EmbeddedPostgres(state, fsync=False).start()  # tests trade durability for speed
    try:
        yield server.url
    finally:
        server.stop()
        shutil.rmtree(state, ignore_errors=True)


@pytest.fixture
async def database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh, empty database for one test."""
    name = f"lo_test_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield pg_server_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


async def _wipe_jetstream(url: str) -> None:
    nc = await nats.connect(url)
    js = nc.jetstream()
    for name in ("LO_EVT", "LO_CMD", "LO_EXT", "LO_AUDIT", "KV_lo_procedures", "KV_lo_steps", "KV_lo_leases",
                 "KV_lo_locks", "KV_lo_presence",
                 "KV_lo_ratelimits", "OBJ_lo_artifacts"):
        with contextlib.suppress(Exception):
            await js.delete_stream(name)
    await nc.close()


@pytest.fixture
async def nats_url(tmp_path: Path) -> AsyncIterator[str]:
    """A NATS server with an empty JetStream store for one test."""
    url = os.environ.get("LANGORCH_TEST_NATS_URL")
    if url:
        await _wipe_jetstream(url)
        yield url
        return
    server = EmbeddedNats(tmp_path / "nats").start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="module")
async def module_database_url(pg_server_url: str) -> AsyncIterator[str]:
    """A fresh database shared by the tests of one module (they must use distinct ids)."""
    name = f"lo_mod_{uuid.uuid4().hex[:12]}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    yield pg_server_url.rsplit("/", 1)[0] + f"/{name}"
    conn = await asyncpg.connect(pg_server_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@pytest.fixture(scope="module")
async def module_nats_url(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[str]:
    """A NATS server with an empty JetStream store shared by the tests of one module."""
    url = os.environ.get("LANGORCH_TEST_NATS_URL")
    if url:
        await _wipe_jetstream(url)
        yield url
        return
    server = EmbeddedNats(tmp_path_factory.mktemp("nats")).start()
    try:
        yield server.url
    finally:
        server.stop()


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


async def _serve_gateway(settings: GatewaySettings) -> tuple[uvicorn.Server, asyncio.Task[None], Any]:
    app = create_app(settings)
    config = uvicorn.Config(app, host="127.0.0.1", port=settings.port, log_level="warning", lifespan="on",
                            timeout_graceful_shutdown=SHUTDOWN_GRACE_S)
    server = ManagedServer(config)
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.025)
    return server, task, app


async def _stopping(what: str, awaitable: Any, timeout_s: float = 60.0) -> None:
    """Await one shutdown step; a step that hangs fails the test naming it, instead of a silent timeout."""
    try:
        await asyncio.wait_for(awaitable, timeout_s)
    except TimeoutError:
        raise AssertionError(f"{what} did not stop within {timeout_s:g} s") from None


@contextlib.asynccontextmanager
async def platform_of(nats_url: str, database_url: str, *, runtime: bool = True, agents: bool = True,
                      runtime_settings: dict[str, Any] | None = None,
                      gateway_settings: dict[str, Any] | None = None, approvals: bool = True,
                      approvals_settings: dict[str, Any] | None = None,
                      queries: bool = True, creation: bool = True) -> AsyncIterator[Platform]:
    # ``queries``: the runtime's read side (checkpoints, step records, leases, agent liveness), which the gateway
    # asks over NATS; it executes nothing, so it runs unless a test checks the gateway without any runtime
    # ``creation``: the runtime's run creation (lo.cmd.run.create); it executes nothing either, so runs are created
    # (and their start commands wait) also without ``runtime``, as when the gateway created them itself
    env = {"nats_url": nats_url, "database_url": database_url}
    port = free_port()
    server, gateway_task, app = await _serve_gateway(GatewaySettings(**env, port=port, **(gateway_settings or {})))
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
    base = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=base, timeout=30) as client:
        try:
            yield Platform(base, nats_url, database_url, client, app, agent_service, approvals_service,
                           runtime_service, compiler)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):
                    await _stopping("a service task", asyncio.shield(t))
            if runtime_service is not None:
                await _stopping("the runtime", runtime_service.stop())
            if agent_service is not None:
                await _stopping("the agent service", agent_service.stop())
            if approvals_service is not None:
                await _stopping("the approvals service", approvals_service.stop())
            if runtime_queries is not None:
                await _stopping("the runtime queries", runtime_queries.stop())
            if run_creation is not None:
                await _stopping("the run creation", run_creation.stop())
            await _stopping("the compiler", compiler.stop())
            server.should_exit = True
            await _stopping("the gateway", asyncio.shield(gateway_task))


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p


def langorch_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "langorch", *args]


def port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0
