"""The newcomer flow with authentication on: the real ``langorch up`` creates the first admin (its password shown
once in the banner) and an admin API key for the CLI in the state directory (0600); ``langorch run`` uses it; the
``login``, ``users`` and ``api-keys`` commands work against the real API, and a refused credential is explained in
one error line, never a traceback. A restart does not show the password again."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import ClassVar

import pytest

from tests.helpers import platform_of
from tests.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "internal_variables.ckp.json"
START_DEADLINE_S = 180
PASSWORD_LINE = re.compile(r"user (\S+), password (\S+)")


@dataclass
class Up:
    """A ``langorch up`` child in its own process group, its output collected line by line."""

    proc: subprocess.Popen[str]
    port: int
    lines: list[str] = field(default_factory=list)

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def text(self) -> str:
        return "\n".join(self.lines)

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_DEADLINE_S
        while not any("LangOrch is up" in line for line in self.lines):
            assert self.proc.poll() is None, f"langorch up exited with {self.proc.returncode}:\n{self.text}"
            assert time.monotonic() < deadline, f"no banner after {START_DEADLINE_S} s:\n{self.text}"
            time.sleep(0.05)
        # the banner's rows follow its first line
        deadline = time.monotonic() + 10
        while not any("State " in line for line in self.lines) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
        assert self.proc.wait(timeout=60) == 0, self.text


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory outside pytest's basetemp (see test_up_lifecycle's ``state_dir``) for the state and the config."""
    root = Path(tempfile.mkdtemp(prefix="langorch-cli-auth-"))
    yield root
    for entry in Path("/proc").iterdir():  # never leave servers behind, whatever the test did
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().decode(errors="replace")
            except OSError:
                continue
            if str(root) in cmdline and "pytest" not in cmdline:
                os.kill(int(entry.name), signal.SIGKILL)
    shutil.rmtree(root, ignore_errors=True)


def base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    # the banner as a person at a terminal reads it (without one, `langorch up` would log JSON lines)
    return {**env, "COLUMNS": "400", "PYTHONUNBUFFERED": "1", "LANGORCH_LOG_FORMAT": "console", **extra}


def start_up(state: Path, port: int, env: dict[str, str]) -> Up:
    proc = subprocess.Popen([sys.executable, "-m", "langorch", "up", "--state-dir", str(state), "--port", str(port)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    up = Up(proc, port)
    up.reader = threading.Thread(target=up._read, daemon=True)
    up.reader.start()
    return up


@dataclass
class Cli:
    """``langorch`` commands with one environment (state directory, config directory, API URL)."""

    env: dict[str, str]

    def __call__(self, *args: str, stdin: str | None = None, **env: str) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run([sys.executable, "-m", "langorch", *args], cwd=ROOT, env={**self.env, **env},
                              input=stdin if stdin is not None else "", capture_output=True, text=True, timeout=180)
        assert "Traceback" not in proc.stdout + proc.stderr, proc.stdout + proc.stderr
        return proc

    def ok(self, *args: str, stdin: str | None = None, **env: str) -> str:
        proc = self(*args, stdin=stdin, **env)
        assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
        return proc.stdout

    def json(self, *args: str, **env: str) -> object:
        return json.loads(self.ok(*args, "--json", **env))

    def error(self, *args: str, code: int = 1, stdin: str | None = None, **env: str) -> str:
        """The one ``error:`` line of a command that fails with ``code``."""
        proc = self(*args, stdin=stdin, **env)
        assert proc.returncode == code, (args, proc.returncode, proc.stdout, proc.stderr)
        errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1, proc.stderr
        return errors[0]


def has(text: str, *needles: str) -> None:
    missing = [n for n in needles if n not in text]
    assert not missing, (missing, text)


def wait_for_error(cli: Cli, needle: str, *args: str, deadline_s: float = 90, **env: str) -> str:
    """Repeat a command until it fails with an error line containing ``needle`` (roles and deactivation take effect
    within the gateway's role cache, 30 s)."""
    deadline = time.monotonic() + deadline_s
    while True:
        proc = cli(*args, **env)
        if proc.returncode == 1 and needle in proc.stderr:
            return next(line for line in proc.stderr.splitlines() if line.startswith("error: "))
        assert time.monotonic() < deadline, (args, proc.returncode, proc.stdout, proc.stderr)
        time.sleep(1)


def test_first_start_admin_cli_key_users_api_keys_and_a_restart(place: Path) -> None:
    state, config, alice_config = place / "state", place / "config", place / "alice-config"
    port = free_port()
    api = f"http://127.0.0.1:{port}"
    up_env = base_env(LANGORCH_AUTH_ENABLED="true")
    up = start_up(state, port, up_env)
    try:
        up.wait_ready()
        banner = up.text
        found = PASSWORD_LINE.search(banner)
        assert found, f"the banner shows no admin password:\n{banner}"
        username, password = found.group(1), found.group(2)
        assert username == "admin"
        assert len(password) >= 16
        assert banner.count(password) == 1, banner
        key_file = state / "api-key"
        assert str(key_file) in banner
        assert "export LANGORCH_API_KEY=$(cat " in banner
        for private in (key_file, state / "auth-secret-key"):
            assert stat.S_IMODE(private.stat().st_mode) == 0o600, private
        key = key_file.read_text().strip()
        assert key.startswith("lo_")
        assert key not in banner
        # the password is in no file of the state directory (logs included) but the databases' own
        for path in state.rglob("*"):
            if path.is_file() and "pgdata" not in path.parts and "jetstream" not in path.parts:
                assert password.encode() not in path.read_bytes(), path

        # the CLI finds the key of the `langorch up` of its state directory, for that API only
        cli = Cli(base_env(LANGORCH_STATE_DIR=str(state), LANGORCH_API_URL=api, LANGORCH_CONFIG_DIR=str(config)))
        out = cli.ok("run", str(EXAMPLE), "--follow")
        assert "run ended: completed" in out, out
        assert "api-key" in cli.ok("whoami")
        # without any credential: 401 explained, exit 1
        nowhere = place / "elsewhere"
        line = cli.error("run", str(EXAMPLE), LANGORCH_STATE_DIR=str(nowhere))
        has(line, "401", "needs a credential", "langorch login")

        # login as the admin (the password on standard input), saved 0600 in the config directory
        out = cli.ok("login", "--username", "admin", "--password-stdin", stdin=password + "\n",
                     LANGORCH_STATE_DIR=str(nowhere))
        assert "user:admin" in out, out
        assert stat.S_IMODE((config / "credentials.json").stat().st_mode) == 0o600
        assert "user:admin" in cli.ok("whoami", LANGORCH_STATE_DIR=str(nowhere))
        line = cli.error("login", "--username", "admin", "--password-stdin", stdin="not-the-password\n")
        assert "refused the user name or password" in line, line

        # users: create, list, set-roles, deactivate
        alice_password = "correct horse battery staple"
        out = cli.ok("users", "create", "alice", "--email", "alice@example.com", "--role", "operator",
                     "--password-stdin", stdin=alice_password + "\n")
        assert "created user alice" in out, out
        users = cli.json("users", "list")
        assert isinstance(users, list)
        alice = next(u for u in users if u["username"] == "alice")
        assert (alice["roles"], alice["is_active"]) == (["operator"], True)
        assert "alice" in cli.ok("users", "list")
        alice_cli = Cli({**cli.env, "LANGORCH_CONFIG_DIR": str(alice_config), "LANGORCH_STATE_DIR": str(nowhere)})
        alice_cli.ok("login", "-u", "alice", "--password-stdin", stdin=alice_password + "\n")
        assert "user:alice" in alice_cli.ok("whoami")
        out = alice_cli.ok("run", str(EXAMPLE), "--follow")
        assert "run ended: completed" in out, out
        line = alice_cli.error("users", "list")
        has(line, "403", "lacks the role 'admin'", "alice")
        updated = cli.json("users", "set-roles", "alice", "viewer")
        assert isinstance(updated, dict)
        assert updated["roles"] == ["viewer"]
        line = wait_for_error(alice_cli, "lacks the role 'operator'", "run", str(EXAMPLE))
        assert "403" in line, line
        cli.ok("users", "deactivate", "alice")
        assert next(u for u in cli.json("users", "list", "--inactive")  # type: ignore[attr-defined]
                    if u["username"] == "alice")["is_active"] is False
        line = wait_for_error(alice_cli, "401", "whoami")
        assert "langorch login" in line, line
        line = cli.error("users", "set-roles", "nobody-here", "viewer")
        assert "no user named 'nobody-here'" in line, line

        # API keys: create (shown once), use, list, revoke (then a clear 401)
        created = cli.json("api-keys", "create", "ci", "--role", "operator", "--expires-in-days", "30")
        assert isinstance(created, dict)
        ci_key, ci_id = created["key"], created["key_id"]
        assert ci_key.startswith("lo_")
        assert created["roles"] == ["operator"]
        assert created["expires_at"]
        out = cli.ok("run", str(EXAMPLE), "--api-key", ci_key, LANGORCH_STATE_DIR=str(nowhere))
        assert "created" in out, out
        listed = cli.json("api-keys", "list")
        assert isinstance(listed, list)
        entry = next(k for k in listed if k["key_id"] == ci_id)
        assert entry["revoked_at"] is None
        assert "key" not in entry
        assert ci_key not in json.dumps(listed)
        assert f"revoked API key {ci_id}" in cli.ok("api-keys", "revoke", ci_id)
        line = cli.error("run", str(EXAMPLE), LANGORCH_STATE_DIR=str(nowhere), LANGORCH_API_KEY=ci_key)
        has(line, "401", "LANGORCH_API_KEY was refused", "revoked")
        revoked = cli.json("api-keys", "list", "--revoked")
        assert isinstance(revoked, list)
        assert [k["key_id"] for k in revoked] == [ci_id]
        line = cli.error("api-keys", "create", "bad", "--role", "operator", "--expires-at", "tomorrow", code=2)
        assert "--expires-at" in line, line

        # logout revokes the saved token; the next command says there is no credential
        assert "logged out" in cli.ok("logout", LANGORCH_STATE_DIR=str(nowhere))
        assert not json.loads((config / "credentials.json").read_text())
        line = cli.error("whoami", LANGORCH_STATE_DIR=str(nowhere))
        assert "needs a credential" in line, line
    finally:
        up.stop()

    # a restart: no password, the same key still works
    again = start_up(state, port, up_env)
    try:
        again.wait_ready()
        assert password not in again.text
        assert not PASSWORD_LINE.search(again.text), again.text
        assert str(key_file) in again.text
        assert key_file.read_text().strip() == key
        out = cli.ok("run", str(EXAMPLE), "--follow")
        assert "run ended: completed" in out, out
    finally:
        again.stop()


class _Recorder(BaseHTTPRequestHandler):
    seen: ClassVar[list[dict[str, str]]] = []

    def do_POST(self) -> None:
        type(self).seen.append({k.lower(): v for k, v in self.headers.items()})
        body = json.dumps({"type": "urn:langorch:problem:unauthenticated", "title": "Unauthenticated",
                           "status": 401, "detail": "this endpoint needs a credential", "code": "unauthenticated",
                           "instance": self.path, "request_id": "r", "retryable": False}).encode()
        self.send_response(401)
        self.send_header("Content-Type", "application/problem+json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_the_key_of_langorch_up_goes_only_to_the_api_it_serves(place: Path) -> None:
    """A real HTTP server records what ``langorch run`` sends: the state directory's key when the API is the one
    recorded (``localhost`` and ``127.0.0.1`` alike), nothing for another port; the error line says what to do."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        port = server.server_address[1]
        state = place / "state"
        state.mkdir()
        (state / "api-key").write_text("lo_k1_secretpart\n")
        (state / "api.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}"}))
        cli = Cli(base_env(LANGORCH_STATE_DIR=str(state), LANGORCH_CONFIG_DIR=str(place / "config")))
        line = cli.error("run", str(EXAMPLE), "--api", f"http://localhost:{port}")
        assert _Recorder.seen[-1].get("x-api-key") == "lo_k1_secretpart"
        assert f"the admin API key `langorch up` stored in {state / 'api-key'} was refused" in line, line
        (state / "api.json").write_text(json.dumps({"url": f"http://127.0.0.1:{free_port()}"}))
        line = cli.error("run", str(EXAMPLE), "--api", f"http://127.0.0.1:{port}")
        assert "x-api-key" not in _Recorder.seen[-1]
        assert "authorization" not in _Recorder.seen[-1]
        has(line, "needs a credential", "--api-key")
        line = cli.error("run", str(EXAMPLE), "--api", f"http://127.0.0.1:{port}", "--api-key", "not-a-key", code=2)
        assert "--api-key is not a LangOrch API key" in line, line
        line = cli.error("login", "-u", "x", "--password-stdin", "--api", f"http://127.0.0.1:{port}", stdin="",
                         code=2)
        assert "standard input is empty" in line, line
        assert len(_Recorder.seen) == 2
    finally:
        server.shutdown()
        server.server_close()


@pytest.mark.parametrize(("env", "named"), [
    ({"LANGORCH_AUTH_SECRET_KEY": "too-short"}, "shorter than 32 bytes"),
    ({"LANGORCH_AUTH_SECRET_KEY": "s" * 40, "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD": "short"}, "at least 12"),
    ({"LANGORCH_AUTH_ENABLED": "false", "LANGORCH_HOST": "0.0.0.0"}, "not a loopback address"),
])
@pytest.mark.parametrize("command", [("up",), ("serve", "gateway")])
def test_settings_the_gateway_refuses_are_a_usage_error_before_it_serves(
        place: Path, env: dict[str, str], named: str, command: tuple[str, ...]) -> None:
    """A weak secret with auth on, a short bootstrap password, auth off on a non-loopback address: one line, exit 2,
    nothing left running (``langorch serve`` needs no server to say it)."""
    port = free_port()
    cli = Cli(base_env(LANGORCH_STATE_DIR=str(place / "state"), LANGORCH_PORT=str(port),
                       LANGORCH_NATS_URL=f"nats://127.0.0.1:{free_port()}", **env))
    proc = cli(*command)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    has(output, named)
    assert len(output.strip().splitlines()) <= 3, output


async def test_the_first_admin_of_a_gateway_without_a_bootstrap_password_is_created_with_direct(
        nats_url: str, database_url: str, place: Path) -> None:
    """A gateway with auth on and no LANGORCH_BOOTSTRAP_ADMIN_PASSWORD creates nobody: ``langorch users create
    --direct --role admin`` writes the first user to the event log over NATS, who can then log in; a second
    ``--direct`` is refused."""
    settings = {"auth_enabled": True, "auth_secret_key": "first-admin-test-secret-7c1d9e3f5a2b4c6d8e0f"}
    password = "first admin password 42"
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False, queries=False,
                           creation=False, gateway_settings=settings) as p:
        cli = Cli(base_env(LANGORCH_NATS_URL=nats_url, LANGORCH_API_URL=p.base_url,
                           LANGORCH_STATE_DIR=str(place / "no-state"), LANGORCH_CONFIG_DIR=str(place / "config")))
        line = await asyncio.to_thread(cli.error, "users", "list")
        has(line, "401", "needs a credential")
        out = await asyncio.to_thread(cli.ok, "users", "create", "root", "--email", "root@example.com", "--role",
                                      "admin", "--direct", "--password-stdin", stdin=password + "\n")
        has(out, "created user root", "admin")

        async def logged_in() -> bool:
            proc = await asyncio.to_thread(cli, "login", "-u", "root", "--password-stdin", stdin=password + "\n")
            return proc.returncode == 0

        for _ in range(8):  # the gateway's projection applies the event within moments (10 failures lock out)
            if await logged_in():
                break
            await asyncio.sleep(1)
        else:
            pytest.fail("the user created with --direct cannot log in")
        has(await asyncio.to_thread(cli.ok, "whoami"), "user:root", "admin")
        line = await asyncio.to_thread(cli.error, "users", "create", "second", "--email", "s@example.com",
                                       "--direct", "--password-stdin", stdin=password + "\n")
        has(line, "users exist already")
        line = await asyncio.to_thread(cli.error, "users", "create", "third", "--email", "t@example.com",
                                       "--direct", "--password-stdin", stdin="short\n", code=2)
        has(line, "12 to")


def test_auth_disabled_up_says_so_and_answers_without_a_credential(place: Path) -> None:
    """``LANGORCH_AUTH_ENABLED=false langorch up``: a red line in the banner, no admin, no CLI key, and the API answers
    requests without a credential (``X-LangOrch-Auth: disabled``)."""
    state, port = place / "state", free_port()
    up = start_up(state, port, base_env(LANGORCH_AUTH_ENABLED="false"))
    try:
        up.wait_ready()
        has(up.text, "DISABLED", "LANGORCH_AUTH_ENABLED=false")
        assert not PASSWORD_LINE.search(up.text), up.text
        assert not (state / "api-key").exists()
        cli = Cli(base_env(LANGORCH_STATE_DIR=str(state), LANGORCH_API_URL=f"http://127.0.0.1:{port}",
                           LANGORCH_CONFIG_DIR=str(place / "config")))
        has(cli.ok("whoami"), "anonymous", "authentication is disabled")
        out = cli.ok("run", str(EXAMPLE), "--follow")
        has(out, "run ended: completed")
    finally:
        up.stop()
