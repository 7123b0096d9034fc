"""Structured logs (langorch_infra/logs.py): the JSON line's fields, exceptions, trace ids of the current span, the
bound run/procedure/command ids, the format's choice; then every service as ``langorch serve <service>`` and
``langorch up`` without a terminal, as operators run them, on real NATS JetStream and PostgreSQL: every line they
write is a JSON object naming its service, and the lines written while a run is handled carry its ``run_id`` and
the trace of the request that started it."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import format_span_id, format_trace_id

from langorch_infra import logs
from tests.helpers import decide, langorch_command, pending_approval, wait_status, wait_until
from tests.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
START_DEADLINE_S = 240
RFC3339_UTC = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z")
SERVED = ("compiler", "runtime", "approvals", "triggers", "gateway")


def _record(message: str = "hello %s", args: tuple[Any, ...] = ("world",), *, exc: bool = False,
            **extra: Any) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("broken on purpose")
        except ValueError as error:
            exc_info = (type(error), error, error.__traceback__)
    record = logging.LogRecord("langorch_runtime.test", logging.WARNING, __file__, 1, message, args, exc_info)
    record.__dict__.update(extra)
    return record


def _line(record: logging.LogRecord, service: str = "runtime") -> dict[str, Any]:
    line: dict[str, Any] = json.loads(logs.JsonLines(service).format(record))
    return line


# -- the formatter ------------------------------------------------------------------------------------------------

@pytest.mark.unit
def test_a_json_line_has_the_record_fields_and_the_service() -> None:
    line = _line(_record())
    assert set(line) == {"timestamp", "level", "logger", "message", "service"}
    assert RFC3339_UTC.fullmatch(line["timestamp"])
    assert datetime.fromisoformat(line["timestamp"]).utcoffset() is not None
    assert (line["level"], line["logger"], line["message"], line["service"]) == (
        "warning", "langorch_runtime.test", "hello world", "runtime")


@pytest.mark.unit
def test_extra_fields_are_kept_as_the_gateway_access_log_gives_them() -> None:
    line = _line(_record("request", (), request_id="req-1", actor="anonymous", method="GET", route="/api/runs",
                         path="/api/runs", status=200, duration_ms=1.5, trace_id="ab" * 16), "gateway")
    assert {k: line[k] for k in ("request_id", "actor", "method", "route", "path", "status", "duration_ms",
                                 "trace_id")} == {
        "request_id": "req-1", "actor": "anonymous", "method": "GET", "route": "/api/runs", "path": "/api/runs",
        "status": 200, "duration_ms": 1.5, "trace_id": "ab" * 16}


@pytest.mark.unit
def test_an_exception_is_one_string_field_with_its_traceback() -> None:
    line = _line(_record(exc=True))
    assert isinstance(line["exc_info"], str)
    assert line["exc_info"].startswith("Traceback (most recent call last)")
    assert line["exc_info"].rstrip().endswith("ValueError: broken on purpose")
    assert "\n" not in logs.JsonLines("runtime").format(_record(exc=True))  # still one line


@pytest.mark.unit
def test_inside_a_span_the_line_carries_its_trace_and_span_ids() -> None:
    tracer = TracerProvider().get_tracer("test-logging")
    with tracer.start_as_current_span("outer"), tracer.start_as_current_span("inner") as span:
        line = _line(_record())
    context = span.get_span_context()
    assert line["trace_id"] == format_trace_id(context.trace_id)
    assert line["span_id"] == format_span_id(context.span_id)
    assert "trace_id" not in _line(_record())  # outside any span


@pytest.mark.unit
def test_bound_fields_apply_inside_their_block_only() -> None:
    with logs.fields(run_id="run-a", command_id="cmd-a", procedure_id=None):
        logs.bind(procedure_id="proc-a")
        with logs.fields(command_id="cmd-b"):
            inner = _line(_record())
        outer = _line(_record())
    after = _line(_record())
    assert {k: inner.get(k) for k in ("run_id", "procedure_id", "command_id")} == {
        "run_id": "run-a", "procedure_id": "proc-a", "command_id": "cmd-b"}
    assert {k: outer.get(k) for k in ("run_id", "procedure_id", "command_id")} == {
        "run_id": "run-a", "procedure_id": "proc-a", "command_id": "cmd-a"}
    assert not {"run_id", "procedure_id", "command_id"} & set(after)


@pytest.mark.unit
async def test_a_service_task_marks_its_records_and_no_others() -> None:
    async def log_line() -> dict[str, Any]:
        return _line(_record(), "worker")

    marked = await asyncio.create_task(logs.serve_as("approvals", log_line()))
    assert marked["service"] == "approvals"
    assert (await log_line())["service"] == "worker"


# -- the format's choice and the setup ----------------------------------------------------------------------------

class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.mark.unit
def test_console_is_the_default_only_for_up_at_a_terminal() -> None:
    assert logs.choose_format(None, terminal_default=True, stream=_Terminal()) == "console"
    assert logs.choose_format(None, terminal_default=True, stream=io.StringIO()) == "json"
    assert logs.choose_format(None, terminal_default=False, stream=_Terminal()) == "json"
    assert logs.choose_format("json", terminal_default=True, stream=_Terminal()) == "json"
    assert logs.choose_format("console", terminal_default=False, stream=io.StringIO()) == "console"


@contextlib.contextmanager
def _root_restored() -> Iterator[logging.Logger]:
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    quiet = {name: logging.getLogger(name).level for name in logs.QUIET_LOGGERS}
    try:
        yield root
    finally:
        root.handlers[:] = handlers
        root.setLevel(level)
        for name, was in quiet.items():
            logging.getLogger(name).setLevel(was)


@pytest.mark.unit
def test_setup_reads_the_format_and_level_settings_and_replaces_its_handler(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_LOG_FORMAT", "JSON")
    monkeypatch.setenv("LANGORCH_LOG_LEVEL", "warning")
    first, second = io.StringIO(), io.StringIO()
    with _root_restored() as root:
        assert logs.setup("compiler", terminal_default=True, stream=_Terminal()) == "json"
        assert logs.setup("compiler", stream=first) == "json"
        assert logs.setup("compiler", stream=second) == "json"
        assert len([h for h in root.handlers if getattr(h, "langorch", False)]) == 1
        logging.getLogger("langorch_compiler.test").info("not at warning")
        logging.getLogger("langorch_compiler.test").warning("at warning")
        assert root.level == logging.WARNING
    assert first.getvalue() == ""
    [line] = [json.loads(text) for text in second.getvalue().splitlines()]
    assert (line["message"], line["service"], line["level"]) == ("at warning", "compiler", "warning")


@pytest.mark.unit
def test_an_unknown_log_format_is_refused_naming_the_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    monkeypatch.setenv("LANGORCH_LOG_FORMAT", "xml")
    with _root_restored(), pytest.raises(ValidationError) as refused:
        logs.setup("compiler", stream=io.StringIO())
    assert [e["loc"] for e in refused.value.errors()] == [("log_format",)]


@pytest.mark.unit
def test_the_console_format_is_text_ending_with_the_run_it_is_about() -> None:
    stream = io.StringIO()
    handler = logs.handler("console", "up", stream)
    logger = logging.getLogger("langorch_test_console")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with logs.fields(run_id="run-console-1"):
            logger.warning("waiting for %s", "an agent")
    finally:
        logger.removeHandler(handler)
    text = " ".join(stream.getvalue().split())
    assert "langorch_test_console: waiting for an agent [run_id=run-console-1]" in text
    assert not text.startswith("{")


@pytest.mark.unit
def test_printed_lines_become_info_records() -> None:
    stream = io.StringIO()
    logger = logging.getLogger("langorch_test_printed")
    logger.addHandler(logs.handler("json", "up", stream))
    logger.propagate = False
    logger.setLevel(logging.INFO)
    out = logs.LineLogger(logger)
    out.write("LangOrch is up\n  API  http://127.0.0.1:1/api\n\n  pending")
    out.write(" line\n")
    lines = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert [(x["message"], x["level"], x["service"]) for x in lines] == [
        ("LangOrch is up", "info", "up"), ("  API  http://127.0.0.1:1/api", "info", "up"),
        ("  pending line", "info", "up")]


# -- the processes ------------------------------------------------------------------------------------------------

@dataclass
class Process:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def lines(self) -> list[str]:
        return [line for line in self.log.read_text(errors="replace").splitlines() if line.strip()]

    def stop(self) -> None:
        """SIGTERM (what Kubernetes sends), then a kill when it does not stop in time."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)


@pytest.fixture
def work_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="langorch-logs-"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def _env(nats_url: str, database_url: str, **more: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LANGORCH_", "OTEL_"))}
    return {**env, "PYTHONUNBUFFERED": "1", "LANGORCH_NATS_URL": nats_url, "LANGORCH_DATABASE_URL": database_url,
            "LANGORCH_AUTH_ENABLED": "false", "LANGORCH_LOG_LEVEL": "debug", **more}


def _spawn(name: str, args: list[str], log: Path, env: dict[str, str]) -> Process:
    """No terminal: stdin from /dev/null, stdout and stderr into one file."""
    with log.open("wb") as out:
        proc = subprocess.Popen(args, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    return Process(name, proc, log)


async def _ready(base: str, processes: list[Process]) -> None:
    async with httpx.AsyncClient(timeout=5) as client:
        async def answered() -> bool:
            for p in processes:
                assert p.proc.poll() is None, f"{p.name} exited:\n" + "\n".join(p.lines()[-40:])
            try:
                return (await client.get(f"{base}/api/ready")).status_code == 200
            except httpx.HTTPError:
                return False
        ready: bool = await wait_until(answered, timeout=START_DEADLINE_S, every=0.25)
        assert ready


def _doc(procedure_id: str) -> dict[str, Any]:
    """A step, an approval and the end: the compiler, runtime, approvals and gateway all handle the run."""
    return {"procedure_id": procedure_id, "version": "1", "workflow_graph": {"start_node": "work", "nodes": {
        "work": {"type": "sequence", "next_node": "review", "steps": [
            {"step_id": "say", "action": "log", "message": "working"}]},
        "review": {"type": "human_approval", "prompt": "Go on?", "on_approve": "done", "on_reject": "done"},
        "done": {"type": "terminate"}}}}


async def _drive_a_run(base: str, procedure_id: str) -> tuple[str, str]:
    """Import, start, approve and finish a run through the API; its id and the trace of its start request."""
    async with httpx.AsyncClient(base_url=base, timeout=30) as c:
        r = await c.post("/api/procedures", json={"ckp_json": _doc(procedure_id)})
        assert r.status_code == 201, r.text
        r = await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
        assert r.status_code == 201, r.text
        run_id, trace_id = r.json()["run_id"], r.headers["X-Trace-ID"]
        approval = await pending_approval(c, run_id, timeout=120)
        assert (await decide(c, approval["approval_id"], decision="approve")).status_code in (200, 202)
        run = await wait_status(c, run_id, timeout=120)
        assert run["status"] == "completed", run
    return run_id, trace_id


def _parsed(process: Process) -> list[dict[str, Any]]:
    """Every line ``process`` wrote, each one a JSON object naming a service."""
    parsed = []
    for text in process.lines():
        try:
            line = json.loads(text)
        except json.JSONDecodeError:
            pytest.fail(f"{process.name} wrote a line that is not JSON: {text!r}")
        assert isinstance(line, dict), text
        assert isinstance(line.get("service"), str), text
        assert line["service"], text
        assert RFC3339_UTC.fullmatch(line["timestamp"]), text
        assert {"level", "logger", "message"} <= set(line), text
        parsed.append(line)
    return parsed


def _about_the_run(lines: list[dict[str, Any]], run_id: str, trace_id: str) -> list[dict[str, Any]]:
    """The lines bound to ``run_id``: each inside a trace (the start's, or the approval decision's for what
    follows it), the start's among them."""
    mine = [line for line in lines if line.get("run_id") == run_id]
    for line in mine:
        assert re.fullmatch(r"[0-9a-f]{32}", line.get("trace_id", "")), line
        assert re.fullmatch(r"[0-9a-f]{16}", line.get("span_id", "")), line
    assert not mine or trace_id in {line["trace_id"] for line in mine}, mine
    return mine


@pytest.mark.integration
async def test_every_served_service_logs_json_lines_and_the_run_they_handle(
        nats_url: str, database_url: str, work_dir: Path) -> None:
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    processes = [_spawn(name, langorch_command("serve", name), work_dir / f"{name}.log",
                        _env(nats_url, database_url, LANGORCH_PORT=str(port),
                             LANGORCH_METRICS_PORT=str(free_port())))
                 for name in SERVED]
    try:
        await _ready(base, processes)
        run_id, trace_id = await _drive_a_run(base, "logs_serve_json")
    finally:
        for p in processes:
            p.stop()
    by_service = {p.name: _parsed(p) for p in processes}
    for name, lines in by_service.items():
        assert lines, f"{name} logged nothing"
        assert {line["service"] for line in lines} == {name}, name
    for name in ("runtime", "approvals"):
        assert _about_the_run(by_service[name], run_id, trace_id), f"{name}: no line carries run {run_id}"
    assert any(line.get("procedure_id") == "logs_serve_json" and line.get("command_id")
               for line in by_service["compiler"])
    [access] = [line for line in by_service["gateway"]
                if line.get("route") == "/api/runs" and line.get("method") == "POST"]
    assert (access["trace_id"], access["status"], access["logger"]) == (trace_id, 201, "langorch_gateway.access")
    assert {"request_id", "actor", "duration_ms", "path"} <= set(access)


@contextlib.asynccontextmanager
async def _up(work_dir: Path, nats_url: str, database_url: str) -> AsyncIterator[tuple[str, Process]]:
    port = free_port()
    up = _spawn("langorch up", langorch_command("up", "--workers", "1"), work_dir / "up.log",
                _env(nats_url, database_url, LANGORCH_PORT=str(port), LANGORCH_STATE_DIR=str(work_dir / "state")))
    try:
        yield f"http://127.0.0.1:{port}", up
    finally:
        up.stop()


@pytest.mark.integration
async def test_up_without_a_terminal_logs_json_lines_from_every_process(
        nats_url: str, database_url: str, work_dir: Path) -> None:
    async with _up(work_dir, nats_url, database_url) as (base, up):
        await _ready(base, [up])
        run_id, trace_id = await _drive_a_run(base, "logs_up_json")
    lines = _parsed(up)
    services = {line["service"] for line in lines}
    assert {"up", "runtime", "creation", "approvals"} <= services, services
    assert any(line["message"].startswith("LangOrch is up") for line in lines if line["service"] == "up")
    mine = _about_the_run(lines, run_id, trace_id)
    # the run's creation is decided by the creation worker (langorch.workers), its approval by the approvals service
    assert {"creation", "approvals"} <= {line["service"] for line in mine}, mine
