"""Running one service replica (compiler, runtime, approvals): its components, its presence key and its small
HTTP endpoint on ``LANGORCH_METRICS_PORT`` (api.md §3, §13.1, §14).

The endpoint is a tiny ASGI app served by uvicorn: ``GET /metrics`` (the service's own registry),
``GET /health`` (liveness: the process serves HTTP) and ``GET /ready`` (the service's own checks; 503 when one
fails). It starts before the components, so a replica that is still connecting answers ``/health`` and reports
``not_ready``. The gateway serves the same on its API port and needs none of this.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import socket
from collections.abc import Awaitable, Callable, Generator, Sequence
from typing import Any, Protocol

import uvicorn
from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import NotFoundError
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from langorch_infra.presence import Presence, new_instance_id
from langorch_infra.settings import CommonSettings

log = logging.getLogger(__name__)

CHECK_TIMEOUT_S = 2.0
Checks = Callable[[], Awaitable[dict[str, str]]]


def settle_heap() -> None:
    """Once a process's services have started: move every object alive now (modules, settings, compiled procedures,
    connections) out of the garbage collector's reach with ``gc.freeze()``. The collector's full (oldest
    generation) pass otherwise walks all of them each time it runs, and it runs on the event loop's thread: measured
    under ``bench/load.py`` these passes took 100-230 ms each in the API process and the worker, every request
    and run step of the moment waiting for them. Objects that become garbage later are still freed by their
    reference counts; only cycles among the frozen ones are kept.

    The youngest generation is then collected every ``GC_YOUNG_THRESHOLD`` allocations instead of Python's 700: a
    run's step allocates and frees thousands of short-lived containers, and most are gone by the time a collection
    comes, so ten times fewer collections cut the collector's time in a worker under load by about ten (about 0.6 s
    of each 20 s in `bench/load.py` to under 0.1 s), for at most that many more young objects held at once."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(GC_YOUNG_THRESHOLD, *gc.get_threshold()[1:])


GC_YOUNG_THRESHOLD = 10_000
SETTLE_DELAY_S = 3.0
"""How long after its services started a process settles its heap: the full collection that begins it takes
100-200 ms, which would otherwise hold up the first requests of a start (``bench/startup.py``)."""


async def settle_heap_later(delay_s: float = SETTLE_DELAY_S) -> None:
    """:func:`settle_heap` ``delay_s`` from now."""
    await asyncio.sleep(delay_s)
    settle_heap()


DRAIN_MARGIN_S = 0.25
"""How long before the server's graceful-shutdown timeout a draining request's long waits end: its answer is
written in that time."""


class Drain:
    """A server's stop as the requests it drains see it.

    A request can wait long for something another process does: a command's outcome (up to
    ``LANGORCH_COMMAND_TIMEOUT_S``), a projection catching up (``LANGORCH_RYW_TIMEOUT_MS``). When the server stops,
    uvicorn gives open requests ``timeout_graceful_shutdown`` seconds and then cancels them, and a request cancelled
    before its answer began is answered ``500 Internal Server Error`` in plain text. The waits a request makes
    through :meth:`settle` (or polls that look at :attr:`released`) end instead :data:`DRAIN_MARGIN_S` before that
    timeout, so each request is answered as its wait running out says (a command still pending: ``202``; a read
    that may be stale), by the request itself; event streams end at once (:meth:`stopping`). An application keeps
    its ``Drain`` as ``app.state.drain``; :class:`ManagedServer` begins it."""

    def __init__(self) -> None:
        self._stopping: asyncio.Future[None] | None = None
        self._released: asyncio.Future[None] | None = None
        self.draining = False
        self.released = False

    @staticmethod
    def _shared(future: asyncio.Future[None] | None, done: bool) -> asyncio.Future[None]:
        """``future``, created on the running loop when it is None (and resolved at once when ``done``)."""
        if future is None:
            future = asyncio.get_running_loop().create_future()
            if done:
                future.set_result(None)
        return future

    def stopping(self) -> asyncio.Future[None]:
        """A future done once the server starts to stop (shared: await it, do not cancel it)."""
        self._stopping = self._shared(self._stopping, self.draining)
        return self._stopping

    def begin(self, grace_s: float | None) -> None:
        """The server stops now and cancels what is open after ``grace_s`` (None: it waits as long as it takes)."""
        if self.draining:
            return
        self.draining = True
        _resolve(self._stopping)
        if grace_s is not None:
            asyncio.get_running_loop().call_later(max(0.0, grace_s - DRAIN_MARGIN_S), self._release)

    def _release(self) -> None:
        self.released = True
        _resolve(self._released)

    async def settle(self, fut: asyncio.Future[Any], timeout: float) -> bool:
        """Wait until ``fut`` is done, ``timeout`` seconds have passed, or the drain's time is up; True when ``fut``
        is done. ``fut`` is neither cancelled nor awaited (its outcome is the caller's), and a cancellation of the
        caller is not swallowed."""
        if fut.done() or self.released:
            return fut.done()
        self._released = self._shared(self._released, self.released)
        await asyncio.wait({fut, self._released}, timeout=max(0.0, timeout), return_when=asyncio.FIRST_COMPLETED)
        return fut.done()


def _resolve(future: asyncio.Future[None] | None) -> None:
    if future is not None and not future.done():
        future.set_result(None)


class ManagedServer(uvicorn.Server):
    """Leaves SIGINT/SIGTERM to the host process, which stops the server with ``should_exit``; begins the
    :class:`Drain` an application keeps as ``app.state.drain`` when it starts to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drain = getattr(getattr(self.config.app, "state", None), "drain", None)
        if isinstance(drain, Drain):
            drain.begin(self.config.timeout_graceful_shutdown)
        await super().shutdown(sockets)


class Component(Protocol):
    """One part of a replica: started, run until cancelled, stopped; reports its locks and readiness."""

    @property
    def js(self) -> JetStreamContext | None: ...

    async def start(self) -> None: ...

    async def run(self) -> None: ...

    async def stop(self) -> None: ...

    def leader_of(self) -> list[str]: ...

    async def ready_checks(self) -> dict[str, str]: ...


async def bus_checks(nc: NATS | None, js: JetStreamContext | None, streams: Sequence[str],
                     buckets: Sequence[str] = ()) -> dict[str, str]:
    """``nats`` (connected) and ``streams`` (the named streams and KV buckets exist); never raises."""
    checks = {"nats": "ok" if nc is not None and nc.is_connected else "disconnected"}
    if js is None or nc is None or not nc.is_connected:
        checks["streams"] = "unknown: not connected"
        return checks
    missing: list[str] = []
    try:
        for name in [*streams, *(f"KV_{b}" for b in buckets)]:
            try:
                await asyncio.wait_for(js.stream_info(name), CHECK_TIMEOUT_S)
            except NotFoundError:
                missing.append(name.removeprefix("KV_"))
        checks["streams"] = "ok" if not missing else "missing " + ", ".join(missing)
    except Exception as exc:  # any NATS failure means not ready
        checks["streams"] = f"unavailable: {type(exc).__name__}"
    return checks


async def probe_check(probe: Callable[[], Awaitable[Any]] | None) -> str:
    """``"ok"`` when ``probe()`` answers within the check timeout, else a short reason."""
    if probe is None:
        return "unknown: not connected"
    try:
        await asyncio.wait_for(probe(), CHECK_TIMEOUT_S)
    except Exception as exc:  # any failure of the probe (a database or NATS) means not ready
        return f"unavailable: {type(exc).__name__}"
    return "ok"


class OpsApp:
    """The ASGI app of ``/metrics``, ``/health`` and ``/ready``."""

    def __init__(self, service: str, version: str, registry: CollectorRegistry, checks: Checks) -> None:
        self.service = service
        self.version = version
        self.registry = registry
        self.checks = checks

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        status, content_type, body = await self.answer(scope["method"], scope["path"])
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", content_type.encode()),
                                (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": b"" if scope["method"] == "HEAD" else body})

    async def answer(self, method: str, path: str) -> tuple[int, str, bytes]:
        if method not in ("GET", "HEAD"):
            return _json(405, {"title": "Method Not Allowed", "status": 405, "detail": f"{method} is not served"})
        if path == "/metrics":
            return 200, CONTENT_TYPE_LATEST, generate_latest(self.registry)
        if path == "/health":
            return _json(200, {"status": "ok", "service": self.service, "version": self.version})
        if path == "/ready":
            try:
                checks = await self.checks()
            except Exception as exc:  # a failing check means not ready, never a 500
                checks = {"service": f"unavailable: {type(exc).__name__}"}
            ok = all(v == "ok" for v in checks.values())
            return _json(200 if ok else 503, {"status": "ready" if ok else "not_ready", "service": self.service,
                                              "checks": checks})
        return _json(404, {"title": "Not Found", "status": 404, "detail": f"{path} is not served here"})


def _json(status: int, body: dict[str, Any]) -> tuple[int, str, bytes]:
    return status, "application/json", json.dumps(body).encode()


class OpsServer:
    """:class:`OpsApp` under uvicorn on ``host:port``, started and stopped with the replica."""

    def __init__(self, app: OpsApp, port: int, host: str = "0.0.0.0") -> None:
        """``port`` 0 binds a free port, which :attr:`port` holds once :meth:`start` returned True."""
        config = uvicorn.Config(app, host=host, port=port, log_level="warning", log_config=None,
                                lifespan="off")  # its records go through the process's handler (logs.py)
        self.server = ManagedServer(config)
        self.host = host
        self.port = port
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> bool:
        """Serve; False (logged) when the port cannot be bound, which does not stop the replica.

        The socket is bound here, not by uvicorn, whose bind failure exits the whole process.
        """
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((self.host, self.port))
        except OSError as exc:
            sock.close()
            log.warning("metrics, health and readiness not served on port %s: %s", self.port, exc)
            return False
        self.port = int(sock.getsockname()[1])
        self._task = asyncio.create_task(self.server.serve(sockets=[sock]), name=f"ops-http-{self.port}")
        while not self.server.started and not self._task.done():
            await asyncio.sleep(0.01)
        return True

    async def stop(self) -> None:
        if self._task is None:
            return
        self.server.should_exit = True
        with contextlib.suppress(BaseException):  # the server's own error or the 5 s timeout: stopping either way
            await asyncio.wait_for(self._task, 5)
        self._task = None


class ServiceHost:
    """One replica of ``service``: its components, its presence key, and its ops endpoint on the metrics port."""

    def __init__(self, service: str, version: str, settings: CommonSettings, components: Sequence[Component],
                 registry: CollectorRegistry) -> None:
        self.service = service
        self.version = version
        self.settings = settings
        self.components = list(components)
        self.registry = registry
        self.instance_id = settings.instance_id or new_instance_id()
        self.presence: Presence | None = None
        self.ops: OpsServer | None = None
        # set once every component has started and the presence key is published (the replica does its work)
        self.started = asyncio.Event()

    def leader_of(self) -> list[str]:
        return sorted({name for c in self.components for name in c.leader_of()})

    async def ready_checks(self) -> dict[str, str]:
        checks: dict[str, str] = {}
        for component in self.components:
            for name, verdict in (await component.ready_checks()).items():
                checks[name] = verdict if checks.get(name, "ok") == "ok" else checks[name]
        return checks

    async def serve(self, metrics_port: int | None = None) -> None:
        """Run until cancelled; ``metrics_port`` overrides the setting (0: no HTTP endpoint)."""
        port = self.settings.metrics_port if metrics_port is None else metrics_port
        if port:
            self.ops = OpsServer(OpsApp(self.service, self.version, self.registry, self.ready_checks), port)
            await self.ops.start()
        tasks: list[asyncio.Task[None]] = []
        try:
            for component in self.components:
                await component.start()
            js = self.components[0].js
            assert js is not None
            self.presence = Presence(js, self.service, self.instance_id, self.version, self.settings,
                                     leader_of=self.leader_of, ttl_s=self.settings.presence_ttl_s)
            await self.presence.start()
            tasks = [asyncio.create_task(c.run(), name=f"{self.service}-{i}") for i, c in enumerate(self.components)]
            self.started.set()
            await asyncio.gather(*tasks)
        finally:
            for task in tasks:
                task.cancel()
            for task in tasks:
                with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                    await task
            if self.presence is not None:
                await self.presence.stop()
            for component in reversed(self.components):
                with contextlib.suppress(Exception):  # one failed stop must not keep the others running
                    await component.stop()
            if self.ops is not None:
                await self.ops.stop()
