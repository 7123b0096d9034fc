"""A LangOrch cluster on this machine (127.0.0.1), for trying replicas, for the failover tests and for the cluster
benchmark: one implementation behind ``langorch cluster up``, the ``local_cluster`` test fixture and
``bench/cluster.py``.

:class:`LocalCluster` starts

* a NATS cluster of ``nodes`` servers with JetStream (:class:`~langorch_infra.embedded.EmbeddedNatsCluster`), every
  stream, bucket and store at ``min(nodes, 3)`` replicas (``LANGORCH_NATS_REPLICAS``);
* one embedded PostgreSQL, or the server of ``database_url``;
* replicas of every service, each a separate ``langorch serve <service>`` process with an instance id of its own
  (``runtime-0``, ``runtime-1`` …; ``LANGORCH_INSTANCE_ID``), its own port (the gateway's API, the other services'
  ``/metrics``, ``/health`` and ``/ready``) and its log in ``<state_dir>/logs/<instance>.log``.

It can SIGKILL, stop (SIGTERM) and start again any process or NATS node, tell which node leads a stream, and wait
until everything is ready. The processes run in sessions of their own (a terminal's Ctrl-C reaches only the
command, which stops them) and receive SIGTERM when the process that started them dies (Linux).
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from langorch_infra.embedded import EmbeddedNatsCluster, EmbeddedPostgres, free_port

# the order processes start and stop in: the services the others depend on first
SERVICE_ORDER = ("compiler", "approvals", "triggers", "runtime", "gateway")
STOP_TIMEOUT_S = 30.0


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    """SIGTERM to this child when the process that started it dies (Linux; kept across exec)."""
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _http_status(port: int, path: str, timeout: float = 2.0) -> int | None:
    """The status of ``GET http://127.0.0.1:<port><path>`` (None when nothing answers)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=timeout) as answer:
            return int(answer.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (OSError, ValueError):
        return None


@dataclass
class ServiceProcess:
    """One replica of one service: a ``langorch serve <service>`` child process, started again on the same port
    and with the same instance id by :meth:`start` after a stop or kill (as a StatefulSet's pod would be)."""

    service: str
    index: int
    port: int  # the gateway's API port; the ``/metrics``, ``/health`` and ``/ready`` port of the others
    log_file: Path
    env: dict[str, str]
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    @property
    def name(self) -> str:
        return f"{self.service}-{self.index}"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ready_path(self) -> str:
        return "/api/ready" if self.service == "gateway" else "/ready"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self) -> None:
        if self.running:
            return
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            log.write(f"--- start {self.starts + 1} of {self.name} at {time.strftime('%H:%M:%S')}\n".encode())
            log.flush()
            self.proc = subprocess.Popen(  # preexec_fn only sets the parent-death signal
                [sys.executable, "-m", "langorch", "serve", self.service], env=self.env, stdin=subprocess.DEVNULL,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True, preexec_fn=_die_with_parent)
        self.starts += 1

    def ready(self) -> bool:
        return self.running and _http_status(self.port, self.ready_path) == 200

    def terminate(self) -> None:
        """SIGTERM, without waiting (the service stops its consumers, a gateway drains its requests)."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        """Wait for the process to exit, SIGKILL it after ``timeout`` seconds; its exit code."""
        if self.proc is None:
            return None
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.proc.returncode

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int | None:
        self.terminate()
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL: the process dies at once, whatever it was doing."""
        if self.running:
            assert self.proc is not None
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()

    def note(self, line: str) -> None:
        """A line of the harness's own in the replica's log (``--- …``)."""
        with contextlib.suppress(OSError), self.log_file.open("ab") as log:
            log.write(f"--- {line}\n".encode())

    def log_tail(self, chars: int = 3000) -> str:
        try:
            return self.log_file.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


@dataclass
class ClusterLayout:
    """How many of everything a :class:`LocalCluster` runs."""

    nodes: int = 3
    runtimes: int = 2
    gateways: int = 1
    approvals: int = 1
    compilers: int = 1
    triggers: int = 1

    def count(self, service: str) -> int:
        return {"compiler": self.compilers, "approvals": self.approvals, "triggers": self.triggers,
                "runtime": self.runtimes, "gateway": self.gateways}[service]


class ClusterNotReady(Exception):
    """Something did not become ready in time (the message names it and ends with its log)."""


@dataclass
class LocalCluster:
    """NATS cluster, PostgreSQL and service replicas on 127.0.0.1 (see the module's docstring).

    ``auth``: the gateways require credentials (a generated ``LANGORCH_AUTH_SECRET_KEY`` shared by every process,
    the bootstrap user ``admin`` with :attr:`admin_password`); off, they run in the development mode without
    authentication (loopback only). ``env``: more ``LANGORCH_*`` settings for every process (they win over the
    cluster's own, but for the URLs, ports and instance ids). ``fsync``: the embedded PostgreSQL's (off trades
    durability for speed, as the tests do)."""

    state_dir: Path
    layout: ClusterLayout = field(default_factory=ClusterLayout)
    database_url: str | None = None
    auth: bool = True
    env: Mapping[str, str] = field(default_factory=dict)
    fsync: bool = True
    nats: EmbeddedNatsCluster = field(init=False)
    postgres: EmbeddedPostgres | None = field(init=False, default=None)
    processes: dict[str, list[ServiceProcess]] = field(init=False, default_factory=dict)
    admin_password: str | None = field(init=False, default=None)

    def __post_init__(self) -> None:
        self.state_dir = Path(self.state_dir).absolute()
        self.nats = EmbeddedNatsCluster(self.state_dir / "nats", n=self.layout.nodes)

    # -- what it is made of ---------------------------------------------------------------------------------------

    @property
    def replicas(self) -> int:
        """The replicas of every stream, bucket and store (3 at most, 1 on a single node)."""
        return min(self.layout.nodes, 3)

    @property
    def nats_url(self) -> str:
        return self.nats.url

    @property
    def gateways(self) -> list[ServiceProcess]:
        return self.processes.get("gateway", [])

    @property
    def runtimes(self) -> list[ServiceProcess]:
        return self.processes.get("runtime", [])

    @property
    def gateway_url(self) -> str:
        """The first gateway's API (every gateway serves the same API)."""
        return self.gateways[0].url

    def process(self, name: str) -> ServiceProcess:
        """The replica called ``name`` (``runtime-1``)."""
        for replicas in self.processes.values():
            for p in replicas:
                if p.name == name:
                    return p
        raise KeyError(name)

    def all_processes(self) -> list[ServiceProcess]:
        return [p for service in SERVICE_ORDER for p in self.processes.get(service, [])]

    # -- starting and stopping ------------------------------------------------------------------------------------

    def start(self, timeout: float = 180) -> LocalCluster:
        """Start NATS and PostgreSQL, then every replica at once, and wait until all are ready."""
        try:
            self.nats.start(timeout=min(timeout, 90))
            if self.database_url is None:
                self.postgres = EmbeddedPostgres(self.state_dir / "postgres", fsync=self.fsync)
                self.postgres.stop_orphan()
                self.postgres.start()
                self.database_url = self._database(self.postgres.url)
            self._make_processes()
            for p in self.all_processes():
                p.start()
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _database(self, server_url: str) -> str:
        """The ``langorch`` database on ``server_url`` (created if missing), in a thread of its own: the caller
        may be running an event loop."""
        import asyncio
        from concurrent.futures import ThreadPoolExecutor

        from langorch.serving import ensure_database

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(asyncio.run, ensure_database(server_url)).result()

    def _common_env(self) -> dict[str, str]:
        assert self.database_url is not None
        env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
        env |= {"LANGORCH_NATS_URL": self.nats_url, "LANGORCH_NATS_REPLICAS": str(self.replicas),
                "LANGORCH_DATABASE_URL": self.database_url, "LANGORCH_LOG_FORMAT": "json",
                "LANGORCH_AUTH_ENABLED": "true" if self.auth else "false"}
        if self.auth:
            env |= {"LANGORCH_AUTH_SECRET_KEY": self._secret("auth-secret-key"),
                    "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD": self._secret("admin-password")}
            self.admin_password = env["LANGORCH_BOOTSTRAP_ADMIN_PASSWORD"]
        return env | dict(self.env)

    def _secret(self, name: str) -> str:
        """A random secret kept in ``<state_dir>/<name>`` (0600), the same at every start on that directory."""
        path = self.state_dir / name
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(secrets.token_urlsafe(36))
        return path.read_text().strip()

    def _make_processes(self) -> None:
        common = self._common_env()
        gateway_ports = [free_port() for _ in range(self.layout.gateways)]
        public_url = f"http://127.0.0.1:{gateway_ports[0]}" if gateway_ports else "http://127.0.0.1:8080"
        self.processes = {}
        for service in SERVICE_ORDER:
            replicas = []
            for i in range(self.layout.count(service)):
                port = gateway_ports[i] if service == "gateway" else free_port()
                env = common | {"LANGORCH_INSTANCE_ID": f"{service}-{i}", "LANGORCH_HOST": "127.0.0.1"}
                if service == "gateway":
                    env |= {"LANGORCH_PORT": str(port), "LANGORCH_METRICS_PORT": "0"}
                else:
                    env |= {"LANGORCH_METRICS_PORT": str(port), "LANGORCH_PUBLIC_URL": public_url}
                replicas.append(ServiceProcess(service, i, port, self.state_dir / "logs" / f"{service}-{i}.log",
                                               env))
            self.processes[service] = replicas

    def wait_ready(self, timeout: float = 120, processes: Sequence[ServiceProcess] | None = None) -> None:
        """Wait until every (given) replica answers its readiness check with 200; a replica that exits meanwhile
        or stays not ready fails with :class:`ClusterNotReady` and the end of its log."""
        waiting = list(self.all_processes() if processes is None else processes)
        deadline = time.monotonic() + timeout
        while waiting:
            for p in list(waiting):
                if p.proc is not None and p.proc.poll() is not None:
                    raise ClusterNotReady(f"{p.name} exited with code {p.proc.returncode}; its log ends with:\n"
                                          f"{p.log_tail()}")
                if p.ready():
                    waiting.remove(p)
            if waiting and time.monotonic() > deadline:
                p = waiting[0]
                raise ClusterNotReady(f"{', '.join(w.name for w in waiting)} not ready after {timeout:g} s; the log "
                                      f"of {p.name} ends with:\n{p.log_tail()}")
            if waiting:
                time.sleep(0.2)

    def restart(self, name: str, *, kill: bool = False, timeout: float = 120) -> float:
        """Stop replica ``name`` (SIGTERM, or SIGKILL with ``kill``), start it again and wait until it is ready;
        the seconds it took."""
        began = time.monotonic()
        p = self.process(name)
        if kill:
            p.kill()
        else:
            p.stop()
        stopped = time.monotonic()
        p.start()
        self.wait_ready(timeout, [p])
        ready = time.monotonic()
        p.note(f"ready {ready - stopped:.1f} s after its start; stopping took {stopped - began:.1f} s")
        return ready - began

    def kill_node(self, i: int) -> None:
        """SIGKILL NATS node ``i`` (its store stays)."""
        self.nats.kill(i)

    def restart_node(self, i: int, timeout: float = 90) -> None:
        """Start NATS node ``i`` again and wait until the cluster reports itself healthy."""
        self.nats.restart(i, timeout)

    def stop(self) -> None:
        """Stop every replica (SIGTERM, all at once; SIGKILL after a while), then NATS and PostgreSQL."""
        processes = self.all_processes()
        for p in reversed(processes):
            p.terminate()
        for p in processes:
            p.wait()
        self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()

    # -- what the cluster says ------------------------------------------------------------------------------------

    def stream_leader(self, stream: str, timeout: float = 30, *, other_than: int | None = None) -> int:
        """The index of the NATS node leading ``stream`` (once one is elected), from the nodes' monitoring;
        ``other_than``: a node just lost, which the others still name as the leader until they have elected
        another."""
        deadline = time.monotonic() + timeout
        while True:
            for node in self.nats.nodes:
                if node.proc is None:
                    continue
                leader = _stream_leader(node.http_port, stream)
                with contextlib.suppress(ValueError):
                    if leader and self.nats.index_of(leader) != other_than:
                        return self.nats.index_of(leader)
            if time.monotonic() > deadline:
                raise ClusterNotReady(f"no leader of stream {stream} after {timeout:g} s")
            time.sleep(0.2)

    def describe(self) -> Iterator[str]:
        """Lines telling where everything is (without secrets)."""
        for i, node in enumerate(self.nats.nodes):
            yield (f"nats {self.nats.server_name(i)}: {node.url}  monitoring http://127.0.0.1:{node.http_port}  "
                   f"log {node.log_file}")
        if self.postgres is not None:
            yield f"postgresql: {self.database_url}  log {self.postgres.log_file}"
        for p in self.all_processes():
            what = "API" if p.service == "gateway" else "metrics/ready"
            yield f"{p.name}: {what} {p.url}  pid {p.pid}  log {p.log_file}"


def _stream_leader(http_port: int, stream: str) -> str | None:
    """The leader of ``stream`` as one node's ``/jsz`` tells it (None when it does not know or answer)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/jsz?accounts=true&streams=true",
                                    timeout=2) as answer:
            body = json.loads(answer.read())
    except (OSError, ValueError):
        return None
    for account in body.get("account_details") or []:
        for detail in account.get("stream_detail") or []:
            if detail.get("name") == stream:
                leader = (detail.get("cluster") or {}).get("leader")
                return str(leader) if leader else None
    return None
