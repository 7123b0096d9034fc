"""User errors of every ``langorch`` command are one ``error:`` line on stderr naming the file or URL at fault, with
the exit codes of ``langorch.cli``'s docstring (0 ok, 1 failed, 2 usage, 3 unreachable); ``--debug`` shows the
traceback. Each case runs the real CLI in a subprocess."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import langorch_command, platform_of
from tests.ports import free_port

FILE_COMMANDS = ("run", "validate", "explain", "graph")
PARSED_COMMANDS = ("run", "explain", "graph")  # the commands that take FILE as a document (validate checks it)

PROBE: dict[str, Any] = {
    "procedure_id": "cli_errors_probe",
    "version": "1.0.0",
    "variables_schema": {"count": {"type": "number", "required": True, "validation": {"min": 1}}},
    "workflow_graph": {
        "start_node": "start",
        "nodes": {
            "start": {"type": "sequence", "next_node": "end",
                      "steps": [{"step_id": "log_msg", "action": "log", "message": "count {{count}}"}]},
            "end": {"type": "terminate", "status": "success"},
        },
    },
}


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANGORCH_DEBUG", "LANGORCH_API_URL", "LANGORCH_NATS_URL", "LANGORCH_DATABASE_URL")}
    env["COLUMNS"] = "400"  # rich wraps log lines at the terminal width; keep URLs on one line
    return {**env, **extra}


def langorch(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(langorch_command(*args), capture_output=True, text=True, env=env or clean_env(),
                          timeout=120, check=False)


def error_line(proc: subprocess.CompletedProcess[str], exit_code: int, *names: str) -> str:
    """The one ``error:`` line of a failed command, after checking there is no traceback, the exit code and that
    the line names each of ``names``."""
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == exit_code, output
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, proc.stderr
    for name in names:
        assert name in errors[0], (name, errors[0])
    return errors[0]


def write(path: Path, doc: Any) -> Path:
    path.write_text(json.dumps(doc, indent=2))
    return path


@contextlib.contextmanager
def answering(status: int, body: bytes, content_type: str) -> Iterator[str]:
    """A real HTTP server on a free port that answers every request with ``status`` and ``body``."""

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:
            self.rfile.read(int(self.headers.get("content-length") or 0))
            self.send_response(status)
            self.send_header("content-type", content_type)
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


# -- input files -----------------------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_missing_file_is_a_usage_error_naming_it(tmp_path: Path, command: str) -> None:
    path = str(tmp_path / "nope.ckp.json")
    line = error_line(langorch(command, path), 2, path)
    assert "No such file" in line


@pytest.mark.unit
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_directory_is_a_usage_error_naming_it(tmp_path: Path, command: str) -> None:
    line = error_line(langorch(command, str(tmp_path)), 2, str(tmp_path))
    assert "is a directory" in line


@pytest.fixture
def unreadable() -> Iterator[Path]:
    """A path that exists, is no directory, passes ``os.access(R_OK)`` and cannot be opened even by root: a Unix
    socket (open() fails with ENXIO). chmod 000 would not do here, as the tests run as root."""
    folder = Path(tempfile.mkdtemp(prefix="lo-cli-"))  # short: a socket path is at most 107 bytes
    path = folder / "sock.ckp.json"
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(path))
    try:
        yield path
    finally:
        sock.close()
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.unit
@pytest.mark.parametrize("command", FILE_COMMANDS)
def test_unreadable_file_is_a_usage_error_naming_it(unreadable: Path, command: str) -> None:
    assert os.access(unreadable, os.R_OK)
    line = error_line(langorch(command, str(unreadable)), 2, str(unreadable))
    assert "cannot read" in line


@pytest.mark.unit
@pytest.mark.parametrize("command", PARSED_COMMANDS)
def test_file_that_is_not_json_names_path_line_and_column(tmp_path: Path, command: str) -> None:
    path = tmp_path / "broken.json"
    path.write_text('{\n  "procedure_id": "x",\n  "version" "1"\n}\n')
    line = error_line(langorch(command, str(path)), 2, f"{path}:3:13")
    assert "not valid JSON" in line


@pytest.mark.unit
@pytest.mark.parametrize("command", PARSED_COMMANDS)
def test_empty_file_is_a_usage_error_naming_it(tmp_path: Path, command: str) -> None:
    path = tmp_path / "empty.json"
    path.write_text("\n")
    line = error_line(langorch(command, str(path)), 2, str(path))
    assert "empty" in line


@pytest.mark.unit
def test_bad_var_syntax_is_a_usage_error_on_stderr(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    proc = langorch("run", str(path), "--var", "count", "--api", f"http://127.0.0.1:{free_port()}")
    error_line(proc, 2, "--var 'count'", "key=value")
    assert proc.stdout == ""


# -- explain ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_explain_exits_1_when_var_values_fail_the_input_validation(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    tables = langorch("explain", str(path), "--var", "count=0")
    error_line(tables, 1, str(path), "input_vars.count")
    assert "Route trace" in tables.stdout  # the report is printed all the same, with the errors
    assert "input_vars.count" in tables.stdout
    as_json = langorch("explain", str(path), "--var", "count=0", "--json")
    error_line(as_json, 1, "input_vars.count")
    assert json.loads(as_json.stdout)["input_errors"] == {"input_vars.count": ["Must be at least 1"]}
    ok = langorch("explain", str(path), "--var", "count=3", "--json")
    assert ok.returncode == 0, ok.stderr
    assert ok.stderr == ""


# -- the API ---------------------------------------------------------------------------------------------------


@pytest.mark.unit
def test_unreachable_api_names_the_url_and_how_to_point_at_it(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    api = f"http://127.0.0.1:{free_port()}"
    line = error_line(langorch("run", str(path), "--api", api), 3, api, "connection refused", "langorch up",
                      "--api", "LANGORCH_API_URL")
    assert line.startswith("error: cannot connect to the LangOrch API")
    from_env = langorch("run", str(path), env=clean_env(LANGORCH_API_URL=api))
    error_line(from_env, 3, api)


@pytest.mark.unit
def test_api_url_without_a_scheme_is_a_usage_error(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    error_line(langorch("run", str(path), "--api", "localhost:8080"), 2, "LANGORCH_API_URL", "http://host:port")


@pytest.mark.unit
def test_problem_response_prints_title_detail_and_each_field_error(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    problem = {"type": "urn:langorch:problem:forbidden", "title": "Forbidden", "status": 403, "code": "forbidden",
               "detail": "the token lacks the scope procedures:write",
               "errors": {"ckp_json.procedure_id": ["reserved prefix"], "project_id": ["unknown project"]}}
    with answering(403, json.dumps(problem).encode(), "application/problem+json") as api:
        proc = langorch("run", str(path), "--api", api)
    error_line(proc, 1, f"{api}/api/procedures", "403", "Forbidden", "the token lacks the scope procedures:write")
    assert "  ckp_json.procedure_id: reserved prefix" in proc.stderr.splitlines()
    assert "  project_id: unknown project" in proc.stderr.splitlines()


@pytest.mark.unit
def test_response_that_is_not_json_is_reported_with_the_url(tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    with answering(200, b"<html><body>hello</body></html>", "text/html") as api:
        proc = langorch("run", str(path), "--api", api)
    line = error_line(proc, 1, f"{api}/api/procedures", "text/html", "LANGORCH_API_URL")
    assert "unexpected response" in line


@pytest.mark.integration
async def test_rejected_import_shows_the_compile_diagnostics_on_the_source(nats_url: str, database_url: str,
                                                                          tmp_path: Path) -> None:
    doc = json.loads(json.dumps(PROBE))
    doc["workflow_graph"]["nodes"]["start"]["next_node"] = "nowhere"
    path = write(tmp_path / "rejected.json", doc)
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False) as p:
        proc = await asyncio.to_thread(langorch, "run", str(path), "--api", p.base_url)
    error_line(proc, 1, f"{p.base_url}/api/procedures", "422", "Compile failed")
    assert "unknown_target at /workflow_graph/nodes/start/next_node" in proc.stderr
    n = next(i for i, line in enumerate(path.read_text().splitlines(), 1) if '"nowhere"' in line)
    assert f">{n:>5} |" in proc.stderr  # the source line of the diagnostic, as `langorch validate` shows it


@pytest.mark.integration
async def test_refused_run_lists_the_input_errors(nats_url: str, database_url: str, tmp_path: Path) -> None:
    path = write(tmp_path / "probe.json", PROBE)
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False) as p:
        proc = await asyncio.to_thread(langorch, "run", str(path), "--var", "count=0", "--api", p.base_url)
    error_line(proc, 1, f"{p.base_url}/api/runs", "422", "Invalid input variables")
    assert "  input_vars.count: Must be at least 1" in proc.stderr.splitlines()


# -- NATS and PostgreSQL ---------------------------------------------------------------------------------------


@pytest.mark.unit
def test_projections_rebuild_names_an_unreachable_nats_without_its_password() -> None:
    port = free_port()
    env = clean_env(LANGORCH_NATS_URL=f"nats://admin:s3cret@127.0.0.1:{port}")
    proc = langorch("projections", "rebuild", env=env)
    error_line(proc, 3, f"NATS at nats://admin@127.0.0.1:{port}", "connection refused")
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.integration
async def test_projections_rebuild_names_an_unreachable_database_without_its_password(nats_url: str) -> None:
    port = free_port()
    env = clean_env(LANGORCH_NATS_URL=nats_url, LANGORCH_DATABASE_URL=f"postgresql://lo:s3cret@127.0.0.1:{port}/lo")
    proc = await asyncio.to_thread(langorch, "projections", "rebuild", env=env)
    error_line(proc, 3, f"PostgreSQL at postgresql://lo@127.0.0.1:{port}/lo", "connection refused")
    assert "s3cret" not in proc.stdout + proc.stderr


@pytest.mark.integration
@pytest.mark.parametrize("service", ["runtime", "gateway"])
async def test_serve_names_an_unreachable_database_without_a_traceback(nats_url: str, service: str) -> None:
    port = free_port()
    url = f"postgresql://lo@127.0.0.1:{port}/lo"
    env = clean_env(LANGORCH_NATS_URL=nats_url, LANGORCH_DATABASE_URL=url.replace("lo@", "lo:s3cret@"),
                    LANGORCH_METRICS_PORT="0", LANGORCH_AUTH_SECRET_KEY="serve-test-secret-0f1e2d3c4b5a69788796a5b4")
    proc = await asyncio.to_thread(langorch, "serve", service, "--port", str(free_port()), env=env)
    output = proc.stdout + proc.stderr
    assert "Traceback" not in output, output
    assert proc.returncode == 3, output
    assert f"PostgreSQL at {url}" in output
    assert "s3cret" not in output


@pytest.mark.unit
def test_serve_waiting_for_nats_logs_one_line_per_failure(tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "serve.log"
    env = clean_env(LANGORCH_NATS_URL=f"nats://127.0.0.1:{port}", LANGORCH_METRICS_PORT="0")
    with log.open("wb") as out:
        proc = subprocess.Popen(langorch_command("serve", "compiler"), env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        expected = f"cannot reach NATS at nats://127.0.0.1:{port}: connection refused; retrying"
        for _ in range(600):
            if expected in log.read_text() or proc.poll() is not None:
                break
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(0.1)
        assert expected in log.read_text(), log.read_text()
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    assert "Traceback" not in log.read_text(), log.read_text()


# -- --debug and internal errors -------------------------------------------------------------------------------


@pytest.mark.unit
def test_debug_shows_the_traceback_and_keeps_the_exit_code(tmp_path: Path) -> None:
    api = f"http://127.0.0.1:{free_port()}"
    path = write(tmp_path / "probe.json", PROBE)
    for proc in (langorch("--debug", "run", str(path), "--api", api),
                 langorch("run", str(path), "--api", api, env=clean_env(LANGORCH_DEBUG="1"))):
        assert proc.returncode == 3, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr
        assert "httpx.ConnectError" in proc.stderr
        assert proc.stderr.splitlines()[-1].startswith(f"error: cannot connect to the LangOrch API at {api}")
    missing = langorch("--debug", "explain", str(tmp_path / "nope.json"))
    assert missing.returncode == 2
    assert "FileNotFoundError" in missing.stderr


BUGGY = """
import sys
from langorch.cli import app

@app.command("boom")
def boom() -> None:
    {}["missing"]

app()
"""


@pytest.mark.unit
def test_an_internal_error_is_one_line_pointing_at_debug() -> None:
    proc = subprocess.run([sys.executable, "-c", BUGGY, "boom"], capture_output=True, text=True, env=clean_env(),
                          timeout=60, check=False)
    line = error_line(proc, 1, "internal error: KeyError: 'missing'", "--debug")
    assert "bug" in line
    debug = subprocess.run([sys.executable, "-c", BUGGY, "--debug", "boom"], capture_output=True, text=True,
                           env=clean_env(), timeout=60, check=False)
    assert debug.returncode == 1
    assert "Traceback (most recent call last)" in debug.stderr
    assert ", in boom" in debug.stderr
    assert debug.stderr.splitlines()[-1] == ("error: internal error: KeyError: 'missing' — this is a bug; the "
                                             "traceback is above")


@pytest.mark.unit
@pytest.mark.parametrize("command", [("up",), ("serve",), ("validate",), ("explain",), ("graph",), ("run",),
                                     ("projections", "rebuild"), ()])
def test_every_command_documents_the_exit_codes(command: tuple[str, ...]) -> None:
    proc = langorch(*command, "--help")
    assert proc.returncode == 0, proc.stderr
    text = " ".join(proc.stdout.split())
    assert "Exit codes: 0 success; 1 failed" in text
    assert "2 usage error" in text
    assert "3 server unreachable" in text
