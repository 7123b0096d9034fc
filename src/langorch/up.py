"""``langorch up``: every service under one command, on embedded NATS and PostgreSQL, with a clean start and stop.

1. **Checks before anything starts.** The state directory is locked (one ``langorch up`` per directory), the API
   port must be free, and so must ports given for the embedded servers. A problem is one line and exit code 2.
2. **Embedded servers** run in sessions of their own, so a terminal's Ctrl-C reaches only this process. They keep
   their ports across restarts (chosen free on the first start and remembered in ``<state>/servers.json``), write
   their output to ``<state>/logs/``, and are stopped by this process. A server left running by a killed
   ``langorch up`` is stopped before a new one starts.
3. **Processes.** The gateway runs in this process; the compiler, runtime, approvals and triggers run in
   ``--workers`` worker processes (:mod:`langorch.workers`; ``--workers 0`` runs them here too), so that executing
   runs and answering the API do not share one event loop; with one or more workers, one more process, the
   creation worker, decides run creations alone, so a start does not wait behind executing runs. The workers
   (that one included) are started first and import their
   services while this process starts the embedded servers (in a thread) and imports the gateway; a worker that
   crashes later is reported and started again, and a worker whose parent is gone (even killed) stops by itself.
4. **A banner** names the API, docs and metrics URLs, the NATS and PostgreSQL URLs other systems connect to, the
   state directory and the log files, once the gateway serves and every worker runs. With authentication on it
   also shows the first admin's generated password (first start only) and where the CLI's API key is
   (:mod:`langorch.bootstrap` has the flow).
5. **Stop.** The first Ctrl-C (or SIGTERM) stops the services (the gateway drains for ``STOP_GRACE_S``, the
   workers still deciding the commands of its open requests; then the workers stop), then NATS, then PostgreSQL.
   A second one forces the stop: the workers and servers are killed (the servers recover on their next start) and
   the process exits with 130.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import functools
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from rich.console import Console

from langorch.bootstrap import AuthSetup
from langorch.workers import WorkerConfig, WorkerFailed, WorkerPool
from langorch_infra import loops, stacks
from langorch_infra.cancel import stop_if_cancelled

if TYPE_CHECKING:
    from langorch_infra.embedded import EmbeddedPostgres

# how long the gateway waits for open requests and SSE streams when `langorch up` stops
STOP_GRACE_S = 1.0
FORCED_EXIT_CODE = 130
# A stop signal this soon after the first is the same request, not a second Ctrl-C: `uv run` relays the SIGINT
# that the terminal already sent to the whole process group when it has no terminal of its own, so one Ctrl-C
# (or one `kill -INT -<pgid>`) can arrive twice within milliseconds.
REPEAT_WINDOW_S = 0.5
PORT_ATTEMPTS = 3
"""Starts of the embedded PostgreSQL on ports LangOrch chose, before ``langorch up`` gives up."""
# An embedded server that ends while LangOrch runs (killed, crashed) is started again, on its port and data;
# after SERVER_RESTARTS restarts within SERVER_RESTART_WINDOW_S, or a restart that fails SERVER_START_ATTEMPTS
# times, `langorch up` stops with exit code 1 instead
SERVER_POLL_S = 0.5
SERVER_RESTARTS = 3
SERVER_RESTART_WINDOW_S = 60.0
SERVER_START_ATTEMPTS = 3
SERVER_START_RETRY_S = 1.0
# how long the workers get to stop after the request, before they are killed
WORKER_STOP_S = 8.0


class UpError(Exception):
    """A problem found before or while starting, reported as one line with ``exit_code``."""

    def __init__(self, message: str, exit_code: int = 2) -> None:
        super().__init__(message)
        self.exit_code = exit_code


@dataclass
class UpOptions:
    state_dir: Path
    host: str = "127.0.0.1"
    port: int = 8080
    nats_port: int | None = None
    postgres_port: int | None = None
    nats_url: str | None = None  # an existing server instead of the embedded one
    database_url: str | None = None
    workers: int = 1  # worker processes running the compiler, runtime, approvals and triggers; 0: all in this process
    nats_sync: str = "always"  # the embedded NATS server's JetStream sync_interval (langorch_infra.embedded)


def port_in_use(host: str, port: int) -> bool:
    """Whether binding ``host:port`` fails right now (with ``SO_REUSEADDR``, as uvicorn binds)."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise UpError(f"cannot listen on host {host!r}: {exc.strerror}; give an address with --host") from exc
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(address)
        except OSError:
            return True
    return False


def _free_port() -> int:
    from langorch_infra.embedded import free_port

    return free_port()


def _synced(sync: str) -> str:
    """How the embedded NATS server flushes JetStream, for the banner."""
    return "synced to disk at every write" if sync == "always" else f"synced to disk every {sync}"


def _display_host(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def _hide_password(url: str) -> str:
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username}:***@{parts.hostname}" + (f":{parts.port}" if parts.port else "")
    return urlunsplit(parts._replace(netloc=netloc))


def _without_credentials(url: str) -> str:
    """``nats://user:pw@host:port`` → ``nats://host:port`` (each URL of a comma list)."""
    return ",".join(part.split("://", 1)[0] + "://" + part.split("://", 1)[1].rpartition("@")[2]
                    if "://" in part else part for part in url.split(","))


@dataclass
class StateDir:
    """``<state>``: ``nats/`` and ``postgres/`` data, ``logs/``, ``servers.json`` (ports and pids), the embedded
    NATS server's users (``nats-users.json``) and the lock."""

    path: Path
    _lock: TextIO | None = None

    @property
    def logs(self) -> Path:
        return self.path / "logs"

    @property
    def servers_file(self) -> Path:
        return self.path / "servers.json"

    @property
    def nats_users_file(self) -> Path:
        """The embedded NATS server's users and passwords (mode 0600)."""
        return self.path / "nats-users.json"

    def lock(self) -> None:
        """Hold ``<state>/up.lock`` while this process runs; another ``langorch up`` on it is refused."""
        self.path.mkdir(parents=True, exist_ok=True)
        handle = open(self.path / "up.lock", "a+", encoding="utf-8")  # noqa: SIM115 - held until exit
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            handle.close()
            raise UpError(f"{self.path} is in use by another `langorch up` (pid {holder}); stop it, or start this "
                          "one with another --state-dir") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        self._lock = handle

    def servers(self) -> dict[str, Any]:
        try:
            data = json.loads(self.servers_file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def remember(self, servers: dict[str, Any]) -> None:
        self.servers_file.write_text(json.dumps(servers, indent=2) + "\n", encoding="utf-8")


def choose_port(name: str, explicit: int | None, remembered: Any, option: str, notes: list[str]) -> int:
    """The explicit port (which must be free), else the remembered one when free, else a free one."""
    if explicit is not None:
        if port_in_use("127.0.0.1", explicit):
            raise UpError(f"port {explicit} for the embedded {name} is already in use; choose another with {option}")
        return explicit
    if isinstance(remembered, int) and remembered > 0:
        if not port_in_use("127.0.0.1", remembered):
            return remembered
        chosen = _free_port()
        notes.append(f"the embedded {name}'s port {remembered} is taken now; it listens on {chosen} instead")
        return chosen
    return _free_port()


NATS_CLIENT_SETTINGS = ("LANGORCH_NATS_USER", "LANGORCH_NATS_PASSWORD", "LANGORCH_NATS_TOKEN",
                        "LANGORCH_NATS_NKEY_SEED_FILE", "LANGORCH_NATS_CREDS_FILE", "LANGORCH_NATS_TLS_CA_FILE",
                        "LANGORCH_NATS_TLS_CERT_FILE", "LANGORCH_NATS_TLS_KEY_FILE")


def _refuse_nats_credentials() -> None:
    """The embedded NATS server has users of its own: NATS credential or TLS settings meant for another server
    would make every service fail to connect to it, so they are refused before anything starts."""
    given = sorted(k.upper() for k, v in os.environ.items() if k.upper() in NATS_CLIENT_SETTINGS and v)
    if given:
        raise UpError(f"{', '.join(given)} {'is' if len(given) == 1 else 'are'} set, but langorch up starts its own "
                      "NATS server, whose users are in nats-users.json in the state directory; unset "
                      f"{'it' if len(given) == 1 else 'them'}, or set LANGORCH_NATS_URL to the server "
                      f"{'it belongs' if len(given) == 1 else 'they belong'} to")


def _stop_orphan_nats(pid: Any, store: Path) -> None:
    """A ``nats-server`` on our store left running by a killed ``langorch up``: stop it."""
    if not isinstance(pid, int) or pid <= 0:
        return
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return
    if not cmdline or not cmdline[0].endswith(b"nats-server") or str(store).encode() not in cmdline:
        return
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 10
    while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
        time.sleep(0.05)


@dataclass
class Up:
    """One ``langorch up``: checks, embedded servers, services, and the stop."""

    options: UpOptions
    console: Console
    state: StateDir = field(init=False)
    embedded: list[Any] = field(default_factory=list)
    signals: int = 0
    signaled_at: float | None = None
    loop: asyncio.AbstractEventLoop | None = None
    stop_event: asyncio.Event | None = None
    notes: list[str] = field(default_factory=list)
    pool: WorkerPool | None = None
    failure: str | None = None
    auth: AuthSetup | None = None

    def __post_init__(self) -> None:
        self.state = StateDir(self.options.state_dir.absolute())

    # -- signals ------------------------------------------------------------------------------------------------
    def _on_signal(self, signum: int, frame: Any) -> None:
        now = time.monotonic()
        if self.signaled_at is not None and now - self.signaled_at < REPEAT_WINDOW_S:
            return  # the same Ctrl-C delivered twice (see REPEAT_WINDOW_S)
        self.signals += 1
        if self.signals > 1:
            self.force()
        self.signaled_at = now
        self.console.print("[dim]stopping LangOrch… (Ctrl-C again to force)[/]", highlight=False)
        if self.loop is not None and self.stop_event is not None:
            self.loop.call_soon_threadsafe(self.stop_event.set)
        else:
            raise KeyboardInterrupt  # still starting: unwind, stopping whatever has started

    def force(self) -> None:
        """The second Ctrl-C: kill the workers and the embedded servers and leave now."""
        if self.pool is not None:
            self.pool.kill()
        for server in reversed(self.embedded):
            with contextlib.suppress(Exception):  # the second Ctrl-C: one failed kill must not spare the others
                if hasattr(server, "kill"):
                    server.kill()
                else:
                    server.stop("immediate")
        self.console.print("[yellow]forced stop[/]; the servers recover their data on the next start",
                           highlight=False)
        sys.stdout.flush()
        os._exit(FORCED_EXIT_CODE)

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    # -- phases ---------------------------------------------------------------------------------------------------
    def check(self) -> dict[str, Any]:
        """Everything that can be refused before anything starts; returns the ports for the embedded servers."""
        o = self.options
        if not 0 < o.port < 65536:
            raise UpError(f"--port {o.port} is not a TCP port (1-65535)")
        if o.workers < 0:
            raise UpError(f"--workers {o.workers}: give a number of worker processes, 0 or more")
        if not o.nats_url:
            from langorch_infra.embedded import check_nats_sync

            try:
                o.nats_sync = check_nats_sync(o.nats_sync)
            except ValueError as exc:
                raise UpError(f"--nats-sync (LANGORCH_NATS_SYNC): {exc}") from None
        self.state.lock()
        if port_in_use(o.host, o.port):
            raise UpError(f"port {o.port} on {o.host} is already in use; start LangOrch on another port with "
                          f"--port <n> or LANGORCH_PORT=<n>")
        remembered = self.state.servers()
        servers: dict[str, Any] = {}
        if not o.nats_url:
            _refuse_nats_credentials()
            _stop_orphan_nats(remembered.get("nats", {}).get("pid"), self.state.path / "nats")
            servers["nats"] = {"port": choose_port("NATS server", o.nats_port, remembered.get("nats", {}).get("port"),
                                                   "--nats-port or LANGORCH_NATS_PORT", self.notes)}
        if not o.database_url:
            servers["postgres"] = {"port": choose_port(
                "PostgreSQL server", o.postgres_port, remembered.get("postgres", {}).get("port"),
                "--postgres-port or LANGORCH_POSTGRES_PORT", self.notes)}
        return servers

    def start_servers(self, servers: dict[str, Any]) -> tuple[str, str]:
        from langorch.serving import ensure_database
        from langorch_infra.embedded import EmbeddedNats, nats_users

        o = self.options
        nats_url, database_url = o.nats_url, o.database_url
        if "nats" in servers:
            # the server requires users: the services connect as the service user (its password is in the URL
            # they get, which is never printed), other systems as the example users of <state>/nats-users.json
            users = nats_users(self.state.nats_users_file)
            for attempt in range(1, PORT_ATTEMPTS + 1):  # as for PostgreSQL below: a chosen port taken meanwhile
                nats = EmbeddedNats(self.state.path / "nats", servers["nats"]["port"],
                                    log_file=self.state.logs / "nats-server.log", users=users.all, sync=o.nats_sync)
                self.embedded.append(nats)
                try:
                    nats.start()
                    break
                except (RuntimeError, TimeoutError):
                    if o.nats_port is not None or attempt == PORT_ATTEMPTS:
                        raise
                    nats.kill()
                    self.embedded.remove(nats)
                    servers["nats"]["port"] = _free_port()
                    self.notes.append(f"the embedded NATS server did not start on port {nats.port} (see "
                                      f"{nats.log_file}); it listens on {servers['nats']['port']} instead")
            assert nats.proc is not None
            servers["nats"]["pid"] = nats.proc.pid
            nats_url = users.service.url(nats.port)
        if "postgres" in servers:
            pg = self._start_postgres(servers)
            database_url = asyncio.run(ensure_database(pg.url))
        self.state.remember(servers)
        assert nats_url is not None
        assert database_url is not None
        return nats_url, database_url

    def _start_postgres(self, servers: dict[str, Any]) -> EmbeddedPostgres:
        """Start the embedded PostgreSQL. A port LangOrch chose itself can be taken by another program between the
        check and the server's bind (or the start can outlast ``pg_ctl``'s wait on a loaded machine): the server is
        then stopped and started again on a fresh port, up to ``PORT_ATTEMPTS`` times. An explicit port is never
        changed."""
        from langorch_infra.embedded import EmbeddedPostgres

        explicit = self.options.postgres_port is not None
        for attempt in range(1, PORT_ATTEMPTS + 1):
            pg = EmbeddedPostgres(self.state.path / "postgres", servers["postgres"]["port"],
                              log_file=self.state.logs / "postgresql.log")
            pg.stop_orphan()
            self.embedded.append(pg)
            try:
                return pg.start()
            except (subprocess.CalledProcessError, TimeoutError):
                if explicit or attempt == PORT_ATTEMPTS:
                    raise
                pg.stop("immediate")  # a server still starting would hold the data directory
                self.embedded.remove(pg)
                servers["postgres"]["port"] = _free_port()
                self.notes.append(f"the embedded PostgreSQL server did not start on port {pg.port} "
                                  f"(see {pg.log_file}); it listens on {servers['postgres']['port']} instead")
        raise AssertionError("unreachable")  # pragma: no cover

    def banner(self, nats_url: str, database_url: str, started: float) -> None:
        o = self.options
        base = f"http://{_display_host(o.host)}:{o.port}"
        rows = [("API", f"{base}/api"), ("API docs", f"{base}/docs  (ReDoc: {base}/redoc)"),
                ("Metrics", f"{base}/metrics"),
                ("NATS", _without_credentials(nats_url) + (f"  (embedded, JetStream {_synced(o.nats_sync)}; users "
                                                           f"in {self.state.nats_users_file})"
                                                           if not o.nats_url else "")),
                ("PostgreSQL", _hide_password(database_url) + ("  (embedded)" if not o.database_url else "")),
                ("State", str(self.state.path))]
        logs = [p for p in (self.state.logs / "nats-server.log", self.state.logs / "postgresql.log") if p.exists()]
        if logs:
            rows.append(("Logs", ", ".join(str(p) for p in logs)))
        from langorch.bootstrap import banner_rows

        rows.extend(banner_rows(self.auth))
        self.console.print(f"[bold green]LangOrch is up[/] in {time.monotonic() - started:.1f} s — "
                           "Ctrl-C stops it; the data is kept", highlight=False)
        for label, value in rows:
            self.console.print(f"  {label:<11} {value}", highlight=False, soft_wrap=True)
        for note in self.notes:
            self.console.print(f"  [yellow]note[/]: {note}", highlight=False)

    async def serve(self, nats_url: str, database_url: str, started: float) -> None:
        from langorch import bootstrap
        from langorch.serving import SERVICES, gateway_url, serve_services

        self.loop = asyncio.get_running_loop()
        self.stop_event = stop = asyncio.Event()
        if self.signals:
            stop.set()
        o = self.options
        pool = self.pool
        gateway_up = asyncio.Event()

        async def announce() -> None:
            """The banner once the gateway serves and every worker runs; a worker that cannot start stops all."""
            await gateway_up.wait()
            if pool is not None:
                pool.spawn_creation()
            if self.auth is not None:
                bootstrap.forget_password(self.auth)
            if pool is not None:
                try:
                    await pool.wait_ready()
                except WorkerFailed as exc:
                    self.failure = str(exc)
                    stop.set()
                    return
            if self.auth is not None and not stop.is_set():
                await bootstrap.finish(self.auth, gateway_url(o.host, o.port))
                self.notes.extend(self.auth.notes)
            if not stop.is_set():
                self.banner(nats_url, database_url, started)

        # the workers stop once the gateway has drained (below): a request open at the stop gets its command decided
        # (a run created, a cancel applied) and is answered as at any other time, where workers stopping meanwhile
        # left it waiting until the server cut it off
        helpers = [asyncio.create_task(announce()), asyncio.create_task(self.watch_servers(stop))]
        if pool is not None:
            helpers.append(asyncio.create_task(pool.supervise()))
            stacks.ALSO.append(forward := functools.partial(pool.send_signal, signal.SIGUSR1))
        try:
            await serve_services(("gateway",) if pool is not None else SERVICES, nats_url, database_url, o.host,
                                 o.port, on_ready=gateway_up.set, stop=stop, grace_s=STOP_GRACE_S,
                                 extra_registries=[pool.registry()] if pool is not None else ())
        finally:
            for helper in helpers:
                helper.cancel()
            await asyncio.gather(*helpers, return_exceptions=True)
            if pool is not None:
                stacks.ALSO.remove(forward)
                pool.terminate()
                await asyncio.to_thread(pool.wait, WORKER_STOP_S)
        if self.failure is not None:
            raise UpError(self.failure, 1)

    async def watch_servers(self, stop: asyncio.Event) -> None:
        """Start an embedded server again when it ends while LangOrch runs (a process killed, a crash): on its port,
        with its data (both servers recover what they had acknowledged); the services reconnect meanwhile. One that
        keeps ending, or cannot be started again, stops ``langorch up`` with exit code 1, naming it and its log.
        Runs until canceled; a restart in progress is finished first, so that the stop after it stops the server."""
        restarts: dict[int, list[float]] = {}
        while True:
            await asyncio.sleep(SERVER_POLL_S)
            stop_if_cancelled()
            for server in list(self.embedded):
                ended = server.ended()
                if ended is None or stop.is_set():
                    continue
                name, log = server.name, server.log_file
                now = time.monotonic()
                recent = [t for t in restarts.get(id(server), []) if now - t < SERVER_RESTART_WINDOW_S]
                if len(recent) >= SERVER_RESTARTS:
                    self.failure = (f"the embedded {name} {ended} again, after {len(recent)} restarts in "
                                    f"{SERVER_RESTART_WINDOW_S:g} s; see {log}")
                    stop.set()
                    return
                self._report(f"the embedded {name} {ended}; starting it again (its log: {log})")
                restart = asyncio.ensure_future(asyncio.to_thread(_start_again, server))
                try:
                    await asyncio.shield(restart)
                except asyncio.CancelledError:
                    await asyncio.wait([restart])  # the server is running or not, never half started at the stop
                    raise
                except Exception as exc:  # any failure to start is reported as such
                    self.failure = f"the embedded {name} {ended} and did not start again ({exc}); see {log}"
                    stop.set()
                    return
                restarts[id(server)] = [*recent, now]
                self._report(f"the embedded {name} runs again")

    def _start_servers_in_thread(self, servers: dict[str, Any]) -> tuple[threading.Thread, dict[str, Any]]:
        """Start the embedded servers in a thread (they wait on processes and sockets), so that this thread can
        import the gateway meanwhile; the result or the error is in the returned dict once the thread ends."""
        result: dict[str, Any] = {}

        def start() -> None:
            try:
                result["urls"] = self.start_servers(servers)
            except BaseException as exc:  # handed to the main thread, which reports it
                result["error"] = exc

        thread = threading.Thread(target=start, name="langorch-up-servers", daemon=True)
        thread.start()
        return thread, result

    def stop_workers(self) -> None:
        if self.pool is not None:
            self.pool.terminate()
            self.pool.wait(WORKER_STOP_S)

    def stop_servers(self) -> None:
        # both servers stop at once (NATS on SIGTERM while PostgreSQL writes its shutdown checkpoint); a server
        # leaves the list only once stopped, so a forced stop meanwhile still kills it
        for server in self.embedded:
            if hasattr(server, "terminate"):
                server.terminate()
        while self.embedded:
            with contextlib.suppress(Exception):  # a server that fails to stop must not keep the others running
                self.embedded[-1].stop()
            self.embedded.pop()

    def run(self) -> int:
        """Start, serve until stopped, stop; the exit code."""
        from langorch.serving import SERVICES, WORKER_SERVICES, gateway_url, import_services

        started = time.monotonic()
        o = self.options
        starter: threading.Thread | None = None
        with self._signals():
            try:
                servers = self.check()
                from langorch import bootstrap

                # the auth secret is in the environment before any service starts (the workers inherit it)
                self.auth = bootstrap.prepare(self.state.path, gateway_url(o.host, o.port), o.host)
                if o.workers:
                    from langorch_infra.settings import ApprovalsSettings, CompilerSettings, RuntimeSettings

                    # an invalid LANGORCH_* setting of theirs is a usage error here, not a worker failing to start
                    for settings in (CompilerSettings, RuntimeSettings, ApprovalsSettings):
                        settings()
                    # first: the workers import their services on the other cores while this process goes on
                    self.pool = WorkerPool(o.workers, self.state.path, report=self._report)
                    self.pool.spawn()
                bootstrap.export_password(self.auth)  # for the gateway only: the workers have started
                if servers:
                    self.console.print("[dim]starting the embedded "
                                       + " and ".join({"nats": "NATS", "postgres": "PostgreSQL"}[k] for k in servers)
                                       + " servers…[/]", highlight=False)
                starter, result = self._start_servers_in_thread(servers)
                import_services(("gateway",) if o.workers else SERVICES)
                try:  # a weak auth secret, or auth off on a non-loopback address: refused before the services start
                    bootstrap.check(self.auth)
                except bootstrap.AuthRefused as exc:
                    raise UpError(str(exc)) from exc
                if not o.workers:
                    import_services(WORKER_SERVICES)
                starter.join()
                error = result.get("error")
                if isinstance(error, KeyboardInterrupt) or (error is not None and self.signals):
                    raise KeyboardInterrupt from error
                if isinstance(error, RuntimeError | TimeoutError | OSError | subprocess.CalledProcessError):
                    raise UpError(f"an embedded server did not start ({error}); its log is in {self.state.logs}",
                                  1) from error
                if error is not None:
                    raise error
                nats_url, database_url = result["urls"]
                if self.pool is not None:
                    self.pool.configure(WorkerConfig(nats_url, database_url, gateway_url(o.host, o.port)))
                loops.run(self.serve(nats_url, database_url, started))
            except KeyboardInterrupt:
                pass
            finally:
                if starter is not None:
                    starter.join(60)  # a server still starting is stopped below once it has started
                self.stop_workers()
                self.stop_servers()
        if self.signaled_at is not None:
            self.console.print(f"stopped in {time.monotonic() - self.signaled_at:.1f} s; data kept in "
                               f"{self.state.path}", highlight=False)
        return 0

    def _report(self, line: str) -> None:
        self.console.print(f"[yellow]{line}[/]", highlight=False)


def _start_again(server: Any) -> None:
    """Start an embedded server that ended, on its port and data; a few tries (a killed PostgreSQL's backends can
    hold its shared memory for a moment)."""
    for attempt in range(1, SERVER_START_ATTEMPTS + 1):
        try:
            server.start()
            return
        except (RuntimeError, TimeoutError, OSError, subprocess.CalledProcessError):
            if hasattr(server, "kill"):
                server.kill()  # a NATS server that did not get ready is not left running
            if attempt == SERVER_START_ATTEMPTS:
                raise
            time.sleep(SERVER_START_RETRY_S)


def run(options: UpOptions, console: Console) -> int:
    """``langorch up``: the exit code (0 after a requested stop, 2 for a problem found before starting)."""
    return Up(options, console).run()
