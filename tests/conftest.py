"""Fixtures that start real servers: NATS with JetStream and PostgreSQL from the project's own wheels (one of each
per pytest-xdist worker), or the servers named by LANGORCH_TEST_NATS_URL / LANGORCH_TEST_DATABASE_URL. Each test
gets an empty JetStream (a fresh account, or a wiped server) and a fresh database copied from a migrated template."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import nats
import psycopg
import pytest
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver

from langorch_gateway.projector import ensure_schema
from langorch_infra.embedded import EmbeddedPostgres, nats_server_binary
from tests.helpers import (  # noqa: F401 - Platform, platform_of, langorch_command: re-exported for imports from conftest
    Platform,
    langorch_command,
    platform_of,
    port_open,
)
from tests.ports import free_port

pytest_plugins = ["tests.fake_aws"]  # the `moto` fixture (AWS Secrets Manager) of the secret tests

# -- order and distribution over pytest-xdist workers (`-n` in pyproject.toml) -----------------------------------
# The suite mostly waits (documents' pauses, timeouts, subprocesses starting), so it runs on more workers than cores.
# The files whose tests take longest go first, so that they overlap with everything else instead of running alone
# at the end; those whose tests start their own servers or subprocesses are split into one work unit per test
# (``SPLIT``). Every other file is one work unit (its module-scoped servers start once per run). The order and the
# split are only about speed: the tests pass in any order.
SLOW_FIRST = (
    "test_cluster_failover.py",  # one 12-process cluster for its five scenarios (~5 min): first, and never split
    "test_schemathesis.py", "test_multi_agent_invoice_run.py", "test_runtime_crash_recovery.py", "test_chaos.py",
    "test_fast_recovery.py", "test_triggers_scheduler_failover.py", "test_up_lifecycle.py",
    "test_readme_quickstart.py", "test_product_enrichment_runs.py",
    "test_deploy_image.py", "test_ui_browser.py", "test_approvals_service.py", "test_cli_triggers.py",
    "test_cli_auth.py", "test_deploy_prometheus.py", "test_agent_wire_protocol.py",
    "test_cli_errors.py", "test_service_config.py", "test_step_execution_end_to_end.py",
    "test_webhooks.py", "test_projection_kill_restart.py", "test_projection_rebuild.py", "test_golden_event_streams.py",
)
# one work unit per test: files whose tests each start their own servers or subprocesses
SPLIT = frozenset(SLOW_FIRST[1:10]) | {"test_cli_errors.py", "test_deploy_image.py"}


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


# -- servers: one NATS and one PostgreSQL per pytest-xdist worker (a session), a clean slate per test ----------------
# Each worker starts one NATS server whose JetStream is split into accounts: every test (or module, for the module
# fixtures) connects as the user of an account nobody used before, so it sees no stream, KV bucket or object store
# of another test, and a client left over from an earlier test cannot reach its subjects either. Accounts are
# declared in batches in the server's configuration file and a reload (SIGHUP) adds the next batch. Each worker
# also starts one PostgreSQL cluster holding a template database with the projections' tables and LangGraph's
# checkpoint tables; a test's database is a copy of it (``CREATE DATABASE … TEMPLATE``), so no test migrates.
# Tests that stop, kill or restart a server start their own (``EmbeddedNats``/``EmbeddedPostgres`` in the test).
# With LANGORCH_TEST_NATS_URL, a test gets that server with every stream deleted (its accounts are not ours);
# with LANGORCH_TEST_DATABASE_URL, the template and the test databases are created on that server.

ACCOUNT_BATCH = 64  # accounts declared at a time: a reload adds the next batch once a worker has used them all


class NatsAccounts:
    """A ``nats-server`` whose JetStream-enabled accounts are handed out one at a time (:meth:`account`)."""

    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.config = state_dir / "nats-server.conf"
        self.port = free_port()
        self.declared = 0
        self.used = 0
        self.proc: subprocess.Popen[bytes] | None = None

    def _write_config(self, accounts: int) -> None:
        declared = "\n".join(f"  T{i} {{ jetstream: enabled, users: [{{user: t{i}, password: {PASSWORD}}}] }}"
                             for i in range(accounts))
        self.config.write_text(f'listen: "127.0.0.1:{self.port}"\n'
                               f'jetstream {{ store_dir: "{self.state_dir / "jetstream"}" }}\n'
                               f"accounts {{\n{declared}\n}}\n")
        self.declared = accounts

    def start(self) -> NatsAccounts:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self._write_config(ACCOUNT_BATCH)
        with open(self.state_dir / "nats-server.log", "ab") as log:
            self.proc = subprocess.Popen([nats_server_binary(), "-c", str(self.config)], stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + 30
        while not port_open(self.port):
            assert self.proc.poll() is None, f"nats-server exited: see {self.state_dir / 'nats-server.log'}"
            assert time.monotonic() < deadline, "nats-server does not listen after 30 s"
            time.sleep(0.02)
        return self

    def url(self, account: int) -> str:
        return f"nats://t{account}:{PASSWORD}@127.0.0.1:{self.port}"

    async def account(self) -> str:
        """The URL of an account no test has used (a reload declares the next batch when all are used)."""
        if self.used == self.declared:
            assert self.proc is not None
            self._write_config(self.declared + ACCOUNT_BATCH)
            self.proc.send_signal(signal.SIGHUP)
            await _connectable(self.url(self.declared - 1), "the reloaded NATS configuration's last account")
        self.used += 1
        return self.url(self.used - 1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


PASSWORD = "langorch-test"


async def _connectable(url: str, what: str, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            nc = await nats.connect(url, allow_reconnect=False, connect_timeout=2)
        except Exception as error:  # refused until the server has reloaded its configuration
            if time.monotonic() >= deadline:
                raise AssertionError(f"{what} refused for {timeout:g} s") from error
            await asyncio.sleep(0.05)
        else:
            await nc.close()
            return


async def _delete_streams(url: str) -> None:
    """Delete every stream (KV buckets and object stores are streams too) that ``url``'s account holds."""
    nc = await nats.connect(url, allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture(scope="session")
def nats_accounts(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NatsAccounts | None]:
    """This worker's NATS server (None with LANGORCH_TEST_NATS_URL)."""
    if os.environ.get("LANGORCH_TEST_NATS_URL"):
        yield None
        return
    server = NatsAccounts(tmp_path_factory.mktemp("nats-accounts")).start()
    try:
        yield server
    finally:
        server.stop()


async def _clean_nats(accounts: NatsAccounts | None) -> str:
    if accounts is None:
        url = os.environ["LANGORCH_TEST_NATS_URL"]
        await _delete_streams(url)
        return url
    return await accounts.account()


@pytest.fixture
async def nats_url(nats_accounts: NatsAccounts | None) -> AsyncIterator[str]:
    """A NATS server with an empty JetStream for one test: a fresh account of the worker's server."""
    url = await _clean_nats(nats_accounts)
    yield url
    if nats_accounts is not None:  # frees the server's memory and disk; the account is not used again
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_delete_streams(url), 10)


@pytest.fixture(scope="module")
async def module_nats_url(nats_accounts: NatsAccounts | None) -> AsyncIterator[str]:
    """A NATS server with an empty JetStream shared by the tests of one module: a fresh account."""
    url = await _clean_nats(nats_accounts)
    yield url
    if nats_accounts is not None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_delete_streams(url), 10)


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


def _database(server_url: str, name: str) -> str:
    return server_url.rsplit("/", 1)[0] + f"/{name}"


async def _admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(server_url)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
async def pg_template(pg_server_url: str) -> AsyncIterator[str]:
    """A database with every table the services create at start-up (the gateway's projections, LangGraph's
    checkpoints), made once per worker by the services' own code; the template of each test's database."""
    name = f"lo_template_{uuid.uuid4().hex[:12]}"
    await _admin(pg_server_url, f'CREATE DATABASE "{name}"')
    url = _database(pg_server_url, name)
    pool = await asyncpg.create_pool(url, min_size=1, max_size=1)
    try:
        await ensure_schema(pool)
    finally:
        await pool.close()
    async with await psycopg.AsyncConnection.connect(url, autocommit=True) as conn:
        await AsyncPostgresSaver(conn).setup()  # type: ignore[arg-type]
    yield name
    await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextlib.asynccontextmanager
async def _copy_of_template(pg_server_url: str, template: str, prefix: str) -> AsyncIterator[str]:
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    await _admin(pg_server_url, f'CREATE DATABASE "{name}" TEMPLATE "{template}"')
    try:
        yield _database(pg_server_url, name)
    finally:
        await _admin(pg_server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(pg_server_url: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh database for one test, with the tables the services create at start-up and no data of a test."""
    async with _copy_of_template(pg_server_url, pg_template, "lo_test") as url:
        yield url


@pytest.fixture(scope="module")
async def module_database_url(pg_server_url: str, pg_template: str) -> AsyncIterator[str]:
    """A fresh database shared by the tests of one module (they must use distinct ids)."""
    async with _copy_of_template(pg_server_url, pg_template, "lo_mod") as url:
        yield url


@pytest.fixture
async def platform(nats_url: str, database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(nats_url, database_url) as p:
        yield p
