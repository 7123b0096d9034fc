"""``langorch up`` starts an embedded server again when it ends while LangOrch runs (killed, crashed): on its port,
with its data, the services reconnecting meanwhile; a server that cannot be started again stops ``langorch up``
with exit code 1, naming the server and its log, and nothing is left running."""

from __future__ import annotations

import json
import os
import signal
import socket
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.ports import free_port
from tests.test_up_lifecycle import ROOT, Up, _wait_gone, start_up, state_dir

pytestmark = pytest.mark.integration
__all__ = ["state_dir"]  # the fixture, shared with test_up_lifecycle

RESTART_DEADLINE_S = 60


def _nats_pid(state_dir: Path) -> int:
    return int(json.loads((state_dir / "servers.json").read_text())["nats"]["pid"])


def _postmaster_pid(state_dir: Path) -> int:
    return int((state_dir / "postgres" / "pgdata" / "postmaster.pid").read_text().splitlines()[0])


def _answered(up: Up, method: str, path: str, body: dict[str, Any] | None = None,
              headers: dict[str, str] | None = None) -> httpx.Response:
    """The API's answer once it is neither 503 nor 202: while a server restarts, the gateway answers 503 with
    Retry-After until its connection is back, or 202 when a command's outcome takes longer than the request's wait;
    a client tries again (with the same ``Idempotency-Key``, the same command), as this one does."""
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while True:
        r = httpx.request(method, f"http://127.0.0.1:{up.port}{path}", json=body,
                          headers={**up.headers, **(headers or {})}, timeout=30)
        if r.status_code not in (202, 503):
            return r
        assert time.monotonic() < deadline, r.text
        time.sleep(min(float(r.headers.get("Retry-After", "1")), 1.0))


def _run_to_completion(up: Up) -> dict[str, Any]:
    doc = json.loads((ROOT / "examples" / "internal_variables.ckp.json").read_text())
    r = _answered(up, "POST", "/api/procedures", {"ckp_json": doc})
    assert r.status_code == 201 or (r.status_code == 409 and r.json()["identical"]), r.text  # imported before
    r = _answered(up, "POST", "/api/runs", {"procedure_id": doc["procedure_id"], "procedure_version": doc["version"]},
                  {"Idempotency-Key": uuid.uuid4().hex})
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    deadline = time.monotonic() + RESTART_DEADLINE_S
    while True:
        run: dict[str, Any] = _answered(up, "GET", f"/api/runs/{run_id}").json()
        if run["status"] in ("completed", "failed", "canceled"):
            return run
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def _stop(up: Up, state_dir: Path) -> None:
    """Ctrl-C: the usual stop (the services log their reconnections meanwhile, some with the error they met)."""
    up.interrupt()
    assert up.proc.wait(timeout=60) == 0, up.text
    assert any("stopped in" in line for _, line in up.lines), up.text
    assert not _wait_gone(state_dir), "processes left running after the stop"


def test_a_killed_server_is_started_again_and_runs_go_on(state_dir: Path) -> None:
    up = start_up(state_dir, free_port())
    up.wait_ready()
    assert _run_to_completion(up)["status"] == "completed"

    os.kill(_nats_pid(state_dir), signal.SIGKILL)
    up.wait_for_line("the embedded NATS server was killed by SIGKILL; starting it again", RESTART_DEADLINE_S)
    up.wait_for_line("the embedded NATS server runs again", RESTART_DEADLINE_S)
    assert _run_to_completion(up)["status"] == "completed"  # the services reconnected; the data is there

    killed = _postmaster_pid(state_dir)
    os.kill(killed, signal.SIGKILL)
    up.wait_for_line("the embedded PostgreSQL server is gone; starting it again", RESTART_DEADLINE_S)
    up.wait_for_line("the embedded PostgreSQL server runs again", RESTART_DEADLINE_S)
    assert _postmaster_pid(state_dir) != killed
    assert _run_to_completion(up)["status"] == "completed"
    _stop(up, state_dir)


def test_a_server_that_cannot_start_again_stops_langorch_up(state_dir: Path) -> None:
    up = start_up(state_dir, free_port())
    up.wait_ready()
    port = int(json.loads((state_dir / "servers.json").read_text())["nats"]["port"])
    with socket.socket() as squatter:
        squatter.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        os.kill(_nats_pid(state_dir), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while True:  # the port is free once the killed server's socket is closed
            try:
                squatter.bind(("127.0.0.1", port))
                break
            except OSError:
                assert time.monotonic() < deadline, "the killed server's port stayed taken"
                time.sleep(0.01)
        squatter.listen()
        try:
            code = up.proc.wait(timeout=RESTART_DEADLINE_S)
        finally:
            if up.proc.poll() is None:
                up.interrupt()
    assert code == 1, up.text
    text = up.text
    [reported] = [line for line in text.splitlines() if "did not start again" in line]
    assert reported.startswith("langorch up: the embedded NATS server was killed by SIGKILL and did not start "
                               "again"), text
    assert str(state_dir / "logs" / "nats-server.log") in reported, text
    assert not _wait_gone(state_dir), "processes left running after the stop"
