"""Run LangOrch services in this process: every service for ``langorch up --workers 0``, the gateway for ``langorch
up``, the compiler, runtime, approvals and triggers for one of its worker processes, one service for ``langorch
serve``."""

from __future__ import annotations

import asyncio
import contextlib
import io
import logging
import signal
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

    from langorch_infra.hosting import ServiceHost

SERVICES = ("compiler", "runtime", "approvals", "triggers", "gateway")
# what a `langorch up` worker process runs: everything but the gateway, which stays in the process of the command
WORKER_SERVICES = ("compiler", "runtime", "approvals", "triggers")


async def ensure_database(url: str, name: str = "langorch") -> str:
    """Create database ``name`` on the server of ``url`` if missing; return the URL pointing at it."""
    import asyncpg

    conn = await asyncpg.connect(url)
    try:
        if await conn.fetchval("SELECT 1 FROM pg_database WHERE datname = $1", name) is None:
            with contextlib.suppress(asyncpg.DuplicateDatabaseError):
                await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    base = url.rsplit("/", 1)[0]
    return f"{base}/{name}"


def gateway_url(host: str, port: int) -> str:
    """The gateway's own address as agents on this machine reach it."""
    shown = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    return f"http://{shown}:{port}"


def build_hosts(names: Sequence[str], nats_url: str, database_url: str,
                public_url: str | None = None, *, creation_apart: bool = False) -> list[ServiceHost]:
    """The replicas of the non-gateway services among ``names``; ``public_url`` is the runtime's callback base
    unless ``LANGORCH_PUBLIC_URL`` sets it. The runtime decides run creations too unless ``creation_apart``;
    ``creation`` among ``names`` is run creation alone (:func:`langorch_runtime.creation.host`)."""
    from langorch_infra.settings import ApprovalsSettings, CompilerSettings, RuntimeSettings, TriggersSettings

    env: dict[str, Any] = {"nats_url": nats_url, "database_url": database_url}
    hosts: list[ServiceHost] = []
    if "compiler" in names:
        from langorch_compiler.service import host as compiler_host

        hosts.append(compiler_host(CompilerSettings(**env)))
    if "runtime" in names:
        from langorch_runtime.service import host as runtime_host

        runtime = RuntimeSettings(**env)
        if public_url is not None and "public_url" not in runtime.model_fields_set:
            runtime = RuntimeSettings(**env, public_url=public_url)
        hosts.append(runtime_host(runtime, creation=not creation_apart))  # runs and the agent/lease side
    if "creation" in names:
        from langorch_runtime.creation import host as creation_host

        hosts.append(creation_host(RuntimeSettings(**env)))
    if "approvals" in names:
        from langorch_approvals.service import host as approvals_host

        hosts.append(approvals_host(ApprovalsSettings(**env)))
    if "triggers" in names:
        from langorch_triggers.service import host as triggers_host

        hosts.append(triggers_host(TriggersSettings(**env)))
    return hosts


def import_services(names: Sequence[str]) -> None:
    """Import the modules of ``names`` now (the slow part of a start, most of it pydantic and LangGraph), so that
    it can overlap with something else, such as the embedded servers starting."""
    import importlib

    modules = {"compiler": "langorch_compiler.service", "runtime": "langorch_runtime.service",
               "approvals": "langorch_approvals.service", "triggers": "langorch_triggers.service",
               "gateway": "langorch_gateway.app", "creation": "langorch_runtime.creation"}
    for name in names:
        importlib.import_module(modules[name])
    if "gateway" in names:
        importlib.import_module("uvicorn")


def _log_stuck(task: asyncio.Task[Any]) -> None:
    """Log where a service that did not stop within its budget is stuck (its coroutine's stack), to find out why."""
    out = io.StringIO()
    task.print_stack(file=out)
    logging.getLogger("langorch.serving").warning("%s did not stop within its budget; it is at:\n%s",
                                                  task.get_name(), out.getvalue())


STRAGGLER_GRACE_S = 3.0


async def stop_stragglers(grace: float = STRAGGLER_GRACE_S) -> None:
    """Cancel the tasks still alive once the services stopped (left behind by a library or a call abandoned at its
    deadline) and wait ``grace`` for them; those still running are logged with their stacks. ``asyncio.run`` would
    cancel them too, but then waits for them without any bound and says nothing: a replica slow to exit after SIGTERM
    is explained in its log this way. Only for a loop the services own (:func:`serve_until_stopped`): every other
    task of the loop is canceled."""
    current = asyncio.current_task()
    others = {t for t in asyncio.all_tasks() if t is not current and not t.done()}
    for task in others:
        task.cancel()
    if not others:
        return
    _, pending = await asyncio.wait(others, timeout=grace)
    for task in pending:
        _log_stuck(task)


async def stop_tasks(tasks: list[asyncio.Task[Any]], grace: float, keep: str | None = None) -> None:
    """Cancel ``tasks`` (but ``keep``, which stops by itself within ``grace``) and wait for them, bounded.

    A service canceled during its start-up has been seen to swallow that one cancellation and keep its consumers
    running (the stop then waited the whole budget), so a service still running is canceled again every 0.5 s.
    """
    for task in tasks:
        if task.get_name() != keep:
            task.cancel()
    loop = asyncio.get_running_loop()
    deadline = loop.time() + grace + 3
    pending = {t for t in tasks if not t.done()}
    while pending and loop.time() < deadline:
        _, pending = await asyncio.wait(pending, timeout=min(0.5, max(0.0, deadline - loop.time())))
        for task in pending:
            if task.get_name() != keep:
                task.cancel()
    for task in pending:
        _log_stuck(task)
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=2)
    for task in tasks:
        if task.done() and not task.cancelled():
            task.exception()  # retrieved, so asyncio does not log it again at exit


async def serve_until_stopped(names: tuple[str, ...], nats_url: str, database_url: str, host: str,
                              port: int) -> None:
    """``langorch serve``: :func:`serve_services` on an event loop of its own, then :func:`stop_stragglers`."""
    try:
        await serve_services(names, nats_url, database_url, host, port)
    finally:
        await stop_stragglers()


async def _settle_when_started(hosts: Sequence[ServiceHost]) -> None:
    """:func:`~langorch_infra.hosting.settle_heap` shortly after every service of this process has started (the
    gateway, when there is one, serves already: :func:`serve_services` waited for it)."""
    from langorch_infra.hosting import settle_heap_later

    for host in hosts:
        await host.started.wait()
    await settle_heap_later()


async def serve_services(names: tuple[str, ...], nats_url: str, database_url: str, host: str, port: int,
                         on_ready: Callable[[], None] | None = None, stop: asyncio.Event | None = None,
                         grace_s: float | None = None,
                         extra_registries: Sequence[CollectorRegistry] = ()) -> None:
    """Run ``names`` in this process until SIGINT/SIGTERM (or ``stop`` is set, when given).

    With the gateway and other services together the gateway's ``GET /metrics`` serves every service's registry
    as one, and no service opens the metrics port; a single service (``langorch serve``) serves its own
    ``/metrics``, ``/health`` and ``/ready`` on ``LANGORCH_METRICS_PORT``. ``extra_registries`` (the worker
    processes of ``langorch up``) are served by the gateway's ``GET /metrics`` too.

    Stopping: the gateway stops accepting requests and gets ``grace_s`` (default ``SHUTDOWN_GRACE_S``) for open
    requests and streams; the other services are canceled at once (a run in progress is picked up again from its
    last checkpoint). The whole stop is bounded by ``grace_s`` plus a few seconds.
    """
    import uvicorn

    from langorch.server import SHUTDOWN_GRACE_S, ManagedServer
    from langorch_infra import logs, tracing
    from langorch_infra.settings import GatewaySettings

    tracing.setup(names)  # OTLP export when the OTEL_* variables ask for it
    grace = SHUTDOWN_GRACE_S if grace_s is None else grace_s
    hosts = build_hosts(names, nats_url, database_url, gateway_url(host, port) if "gateway" in names else None)
    combined = "gateway" in names and bool(hosts)
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(logs.serve_as(h.service, h.serve(0 if combined else None)),
                                                          name=h.service) for h in hosts]
    server = None
    if "gateway" in names:
        from langorch_gateway.app import create_app

        settings = GatewaySettings(nats_url=nats_url, database_url=database_url, host=host, port=port)
        registries: list[CollectorRegistry] = [*(h.registry for h in hosts), *extra_registries]
        config = uvicorn.Config(create_app(settings, extra_registries=registries), host=host, port=port,
                                log_level="warning", log_config=None, lifespan="on",
                                timeout_graceful_shutdown=max(1, round(grace)))
        server = ManagedServer(config)
        tasks.append(asyncio.create_task(logs.serve_as("gateway", server.serve()), name="gateway"))

    if stop is None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
    stopper = asyncio.create_task(stop.wait())
    if server is not None:
        while not server.started and not stop.is_set() and not any(t.done() for t in tasks):
            await asyncio.sleep(0.01)
    settling = asyncio.create_task(_settle_when_started(hosts))
    if on_ready is not None and not stop.is_set() and not any(t.done() for t in tasks):
        on_ready()
    done, _ = await asyncio.wait([*tasks, stopper], return_when=asyncio.FIRST_COMPLETED)
    failed = [t for t in done if t is not stopper and not t.cancelled() and t.exception() is not None]
    if server is not None:
        server.should_exit = True
    # The gateway drains within ``grace``; the canceled services close their NATS and database connections.
    await stop_tasks(tasks, grace, keep="gateway")
    stopper.cancel()
    settling.cancel()
    await asyncio.to_thread(tracing.shutdown)  # the spans still queued are exported
    if failed:
        raise failed[0].exception()  # type: ignore[misc]
