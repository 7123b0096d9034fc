"""``langorch up`` as a terminal runs it: a process group that Ctrl-C reaches as a whole.

The embedded NATS and PostgreSQL run in sessions of their own, so the group's SIGINT reaches only LangOrch, which
stops its services first and the servers last; a second Ctrl-C forces the stop; a taken port or a state directory
in use is refused before anything starts.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from langorch.up import REPEAT_WINDOW_S
from tests.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
START_DEADLINE_S = 120


@dataclass
class Up:
    """A ``langorch up`` child in a new process group, its output collected line by line with arrival times."""

    proc: subprocess.Popen[str]
    port: int
    state_dir: Path | None = None
    lines: list[tuple[float, str]] = field(default_factory=list)
    reader: threading.Thread | None = None

    @property
    def headers(self) -> dict[str, str]:
        """The admin API key this ``langorch up`` stored for the CLI (authentication is on), as a request header."""
        key_file = self.state_dir / "api-key" if self.state_dir is not None else None
        if key_file is None or not key_file.exists():
            return {}
        return {"X-API-Key": key_file.read_text().strip()}

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append((time.monotonic(), line.rstrip("\n")))

    def _read_to_the_end(self) -> None:
        """Once the process has exited, let the reader take its last lines: the exit can be seen before the reader
        thread, behind on a loaded machine, has read what was written just before it."""
        if self.proc.poll() is not None and self.reader is not None:
            self.reader.join(timeout=30)

    @property
    def text(self) -> str:
        self._read_to_the_end()
        return "\n".join(line for _, line in self.lines)

    def after(self, moment: float) -> list[str]:
        self._read_to_the_end()
        return [line for t, line in self.lines if t >= moment]

    def wait_for_line(self, needle: str, deadline_s: float = START_DEADLINE_S) -> None:
        deadline = time.monotonic() + deadline_s
        while not any(needle in line for _, line in self.lines):
            assert self.proc.poll() is None, f"langorch up exited with {self.proc.returncode}:\n{self.text}"
            assert time.monotonic() < deadline, f"no line with {needle!r} after {deadline_s} s:\n{self.text}"
            time.sleep(0.05)

    def wait_ready(self) -> None:
        self.wait_for_line("LangOrch is up")
        deadline = time.monotonic() + 30
        while True:
            try:
                if httpx.get(f"http://127.0.0.1:{self.port}/api/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, self.text
            time.sleep(0.1)

    def interrupt(self) -> float:
        """Ctrl-C in the terminal: SIGINT to the whole process group."""
        moment = time.monotonic()
        os.killpg(self.proc.pid, signal.SIGINT)
        return moment


def _env(state_dir: Path, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    # the output as a person at a terminal reads it (without one, `langorch up` would log JSON lines)
    return {**env, "LANGORCH_STATE_DIR": str(state_dir), "LANGORCH_PORT": str(port), "COLUMNS": "200",
            "PYTHONUNBUFFERED": "1", "LANGORCH_LOG_FORMAT": "console"}


def start_up(state_dir: Path, port: int, *args: str, launcher: tuple[str, ...] = (sys.executable, "-m")) -> Up:
    proc = subprocess.Popen([*launcher, "langorch", "up", *args], cwd=ROOT, env=_env(state_dir, port),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True,
                            start_new_session=True)
    up = Up(proc, port, state_dir)
    up.reader = threading.Thread(target=up._read, daemon=True)
    up.reader.start()
    return up


def _processes_using(path: Path) -> list[str]:
    """Command lines of running processes that name ``path`` on their command line (the embedded servers, the
    workers) or as their ``LANGORCH_STATE_DIR`` (``langorch up`` itself, as these tests start it)."""
    found = []
    state_dir = f"LANGORCH_STATE_DIR={path}".encode()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if "pytest" not in cmdline and (str(path) in cmdline or state_dir in environ):
            found.append(f"{entry.name}: {cmdline}")
    return found


def _wait_gone(path: Path, deadline_s: float = 10) -> list[str]:
    deadline = time.monotonic() + deadline_s
    while (left := _processes_using(path)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


@pytest.fixture
def state_dir() -> Iterator[Path]:
    """Outside pytest's basetemp: another pytest session starting meanwhile resets /tmp/pytest-of-<user> to 0700,
    and the embedded PostgreSQL's unprivileged user (when the tests run as root) loses its way to its data."""
    root = Path(tempfile.mkdtemp(prefix="langorch-up-lifecycle-"))
    path = root / "state"
    yield path
    for line in _processes_using(path):  # never leave servers behind, whatever the test did
        os.kill(int(line.split(":")[0]), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def test_ctrl_c_stops_services_then_servers_quietly_and_a_restart_keeps_data_and_ports(state_dir: Path) -> None:
    port = free_port()
    up = start_up(state_dir, port)
    up.wait_ready()
    banner = up.text
    for shown in (f"http://127.0.0.1:{port}/api", f"http://127.0.0.1:{port}/docs", f"http://127.0.0.1:{port}/metrics",
                  "nats://127.0.0.1:", "postgresql://postgres@127.0.0.1:", str(state_dir),
                  str(state_dir / "logs" / "nats-server.log"), str(state_dir / "logs" / "postgresql.log")):
        assert shown in banner, f"the banner does not show {shown}:\n{banner}"
    # the embedded servers' chatter is in their log files, not in the terminal
    assert "initdb" not in banner
    assert "database system is ready" not in banner
    assert "RuntimeDirWarning" not in banner
    assert (state_dir / "logs" / "postgresql.log").read_text().strip()
    assert "JetStream" in (state_dir / "logs" / "nats-server.log").read_text()
    servers = json.loads((state_dir / "servers.json").read_text())
    assert f"nats://127.0.0.1:{servers['nats']['port']}" in banner
    # by default the embedded NATS server syncs every JetStream write to disk before acknowledging it
    assert "synced to disk at every write" in banner
    assert 'sync_interval: "always"' in (state_dir / "nats" / "nats-server.conf").read_text()

    # async agents call back to this gateway's own port, not to the default 8080
    deadline = time.monotonic() + 30
    while True:
        replicas = httpx.get(f"http://127.0.0.1:{port}/api/config", headers=up.headers, timeout=10).json()["services"]
        runtime = [r for r in replicas if r["service"] == "runtime"]
        if runtime:
            break
        assert time.monotonic() < deadline, replicas
        time.sleep(0.2)
    assert runtime[0]["settings"]["public_url"] == f"http://127.0.0.1:{port}"

    # the data survives the stop: import a procedure now, find it after the restart
    doc = json.loads((ROOT / "examples" / "minimal_greeting.ckp.json").read_text())
    r = httpx.post(f"http://127.0.0.1:{port}/api/procedures", json={"ckp_json": doc}, headers=up.headers, timeout=30)
    assert r.status_code == 201, r.text

    # a second `langorch up` on the same state directory is refused at once, and the first keeps running
    second = subprocess.run([sys.executable, "-m", "langorch", "up", "--port", str(free_port())], cwd=ROOT,
                            env=_env(state_dir, port), capture_output=True, text=True, timeout=60)
    assert second.returncode == 2, second.stdout + second.stderr
    assert "in use by another `langorch up`" in second.stderr
    assert "Traceback" not in second.stderr + second.stdout
    assert up.proc.poll() is None

    signaled = up.interrupt()
    try:
        up.proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pytest.fail(f"langorch up still running 5 s after SIGINT:\n{up.text}")
    after = up.after(signaled)
    assert up.proc.returncode == 0, up.text
    assert "Traceback" not in up.text
    assert len(after) < 20, "\n".join(after)
    assert any("stopped in" in line for line in after), "\n".join(after)
    assert not _wait_gone(state_dir), "embedded servers left running after the stop"

    again = start_up(state_dir, port)
    again.wait_ready()
    assert f"nats://127.0.0.1:{servers['nats']['port']}" in again.text, "the NATS port changed across a restart"
    assert f"@127.0.0.1:{servers['postgres']['port']}/" in again.text, "the PostgreSQL port changed across a restart"
    r = httpx.get(f"http://127.0.0.1:{port}/api/procedures/e2e_test_procedure", headers=again.headers, timeout=30)
    assert r.status_code == 200, r.text
    again.interrupt()
    assert again.proc.wait(timeout=30) == 0, again.text


def test_requests_open_at_ctrl_c_are_answered(state_dir: Path) -> None:
    """Starts in flight when Ctrl-C comes are answered (201, or 202 pending when their command was not decided in
    the gateway's drain), never cut off with a 500: the workers stop only once the gateway has drained."""
    port = free_port()
    up = start_up(state_dir, port)
    up.wait_ready()
    base = f"http://127.0.0.1:{port}"
    doc = {"procedure_id": "at_ctrl_c", "version": "1",
           "workflow_graph": {"start_node": "end", "nodes": {"end": {"type": "terminate"}}}}
    r = httpx.post(f"{base}/api/procedures", json={"ckp_json": doc}, headers=up.headers, timeout=30)
    assert r.status_code == 201, r.text
    statuses: list[int] = []
    failures: list[str] = []

    def start_runs() -> None:
        with httpx.Client(base_url=base, headers=up.headers, timeout=30) as c:
            while True:
                try:
                    answer = c.post("/api/runs", json={"procedure_id": "at_ctrl_c", "procedure_version": "1"})
                except httpx.TransportError:
                    return  # the gateway no longer accepts requests
                statuses.append(answer.status_code)
                if answer.status_code not in (201, 202):
                    failures.append(f"{answer.status_code} {answer.headers.get('content-type')}: {answer.text}")

    clients = [threading.Thread(target=start_runs, daemon=True) for _ in range(4)]
    for client in clients:
        client.start()
    deadline = time.monotonic() + 60
    while len(statuses) < 20:  # every client is sending
        assert not failures, failures
        assert time.monotonic() < deadline, (statuses, up.text)
        time.sleep(0.05)
    up.interrupt()
    try:
        up.proc.wait(timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail(f"langorch up still running 15 s after SIGINT:\n{up.text}")
    for client in clients:
        client.join(timeout=30)
    assert up.proc.returncode == 0, up.text
    assert failures == [], failures
    assert "Traceback" not in up.text, up.text


def test_the_readme_command_under_uv_run_stops_gracefully_on_one_ctrl_c(state_dir: Path) -> None:
    """`uv run` relays the group's SIGINT to its child when it has no terminal: one Ctrl-C, not a forced stop."""
    uv = os.environ.get("UV") or shutil.which("uv")
    assert uv, "uv is not on PATH and UV is unset: run the tests with `uv run pytest`, as the README says"
    up = start_up(state_dir, free_port(), launcher=(uv, "run", "--frozen", "--no-sync"))
    up.wait_ready()
    signaled = up.interrupt()
    try:  # a graceful stop takes a second or two on an idle machine, longer on a loaded one (the suite in parallel)
        code = up.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail(f"uv run langorch up still running 30 s after SIGINT:\n{up.text}")
    after = up.after(signaled)
    assert code == 0, up.text
    assert any("stopped in" in line for line in after), "\n".join(after)
    assert not any("forced stop" in line for line in after), "\n".join(after)
    assert "Traceback" not in up.text
    assert not _wait_gone(state_dir), "embedded servers left running after the stop"


def test_a_second_ctrl_c_forces_the_stop(state_dir: Path) -> None:
    port = free_port()
    up = start_up(state_dir, port)
    up.wait_ready()
    # a request whose body is still being sent makes the gateway drain for its grace period (open event streams
    # end at once when it starts to stop), so the second Ctrl-C lands mid-stop
    with socket.create_connection(("127.0.0.1", port), timeout=30) as slow:
        key = up.headers["X-API-Key"]
        slow.sendall(f"POST /api/procedures HTTP/1.1\r\nHost: 127.0.0.1\r\nX-API-Key: {key}\r\n"
                     "Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{".encode())
        time.sleep(0.5)  # the gateway has the request and waits for the rest of its body
        signaled = up.interrupt()
        up.wait_for_line("Ctrl-C again to force", 10)
        # a repeat within REPEAT_WINDOW_S is the same Ctrl-C delivered twice (as `uv run` relays it): ignored
        os.killpg(up.proc.pid, signal.SIGINT)
        time.sleep(REPEAT_WINDOW_S + 0.2)
        assert up.proc.poll() is None, f"a repeated delivery of one Ctrl-C forced the stop:\n{up.text}"
        os.killpg(up.proc.pid, signal.SIGINT)
        try:
            code = up.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a second Ctrl-C did not stop langorch up:\n{up.text}")
    assert code == 130, up.text
    after = up.after(signaled)
    assert any("forced stop" in line for line in after), "\n".join(after)
    assert "Traceback" not in up.text
    assert not _wait_gone(state_dir), "embedded servers left running after a forced stop"


def test_a_taken_port_is_refused_before_anything_starts(state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "langorch", "up"], cwd=ROOT, env=_env(state_dir, port),
                              capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    for named in (f"port {port}", "--port", "LANGORCH_PORT"):
        assert named in output, output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) <= 2, output
    assert not (state_dir / "nats").exists(), "NATS was started"
    assert not (state_dir / "postgres").exists(), "PostgreSQL was started"
    assert not _processes_using(state_dir)


def test_an_invalid_nats_sync_is_refused_before_anything_starts(state_dir: Path) -> None:
    proc = subprocess.run([sys.executable, "-m", "langorch", "up"], cwd=ROOT,
                          env={**_env(state_dir, free_port()), "LANGORCH_NATS_SYNC": "never"},
                          capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    for named in ("--nats-sync", "LANGORCH_NATS_SYNC", "'never'", "always"):
        assert named in output, output
    assert "Traceback" not in output
    assert not (state_dir / "nats").exists(), "NATS was started"
    assert not (state_dir / "postgres").exists(), "PostgreSQL was started"


def test_a_taken_port_for_an_embedded_server_is_refused_by_name(state_dir: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        nats_port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "langorch", "up", "--nats-port", str(nats_port)], cwd=ROOT,
                              env=_env(state_dir, free_port()), capture_output=True, text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert f"port {nats_port}" in output, output
    assert "--nats-port" in output, output
    assert "Traceback" not in output
    assert not (state_dir / "nats").exists()
