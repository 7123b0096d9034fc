"""``langorch up`` runs the compiler, runtime and approvals in a worker process beside the gateway's: a run completes
in another process than the one answering the API, one Ctrl-C stops them all, a crashed worker is started again,
and a worker never outlives a killed ``langorch up``."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.test_up_lifecycle import ROOT, Up, _env, _processes_using, _wait_gone, start_up, state_dir

pytestmark = pytest.mark.integration
__all__ = ["state_dir"]  # the fixture, shared with test_up_lifecycle


def _pid_of(instance_id: str) -> int:
    """The process id in a replica's instance id (``<host>-<pid>-<hex>``)."""
    return int(instance_id.rsplit("-", 2)[1])


def _parent_of(pid: int) -> int:
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat.rsplit(")", 1)[1].split()[1])


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _replicas(up: Up, dead: frozenset[int] = frozenset()) -> dict[str, int]:
    """Service → process id of the live replicas in GET /api/config (a replica of a process in ``dead`` is one whose
    presence key has not expired yet)."""
    body = httpx.get(f"http://127.0.0.1:{up.port}/api/config", headers=up.headers, timeout=10).json()
    return {r["service"]: _pid_of(r["instance_id"]) for r in body["services"]
            if _pid_of(r["instance_id"]) not in dead}


def _wait_replicas(up: Up, dead: frozenset[int] = frozenset(), deadline_s: float = 60) -> dict[str, int]:
    deadline = time.monotonic() + deadline_s
    while True:
        found = _replicas(up, dead)
        if {"gateway", "compiler", "runtime", "approvals", "creation"} <= set(found):
            return found
        assert time.monotonic() < deadline, found
        time.sleep(0.2)


def _run_to_completion(up: Up) -> dict[str, object]:
    base = f"http://127.0.0.1:{up.port}"
    doc = json.loads((ROOT / "examples" / "internal_variables.ckp.json").read_text())
    r = httpx.post(f"{base}/api/procedures", json={"ckp_json": doc}, headers=up.headers, timeout=30)
    assert r.status_code in (200, 201) or (r.status_code == 409 and r.json()["identical"]), r.text  # imported before
    r = httpx.post(f"{base}/api/runs", json={"procedure_id": doc["procedure_id"], "procedure_version": doc["version"]},
                   headers=up.headers, timeout=30)
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    deadline = time.monotonic() + 60
    while True:
        run = httpx.get(f"{base}/api/runs/{run_id}", headers=up.headers, timeout=10).json()
        if run["status"] in ("completed", "failed", "canceled"):
            return run  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, run
        time.sleep(0.1)


def _start(state_dir: Path) -> Up:
    up = start_up(state_dir, free_port())
    up.wait_ready()
    return up


def test_a_run_completes_in_a_worker_process_and_one_ctrl_c_stops_every_process(state_dir: Path) -> None:
    up = _start(state_dir)
    replicas = _wait_replicas(up)
    assert replicas["gateway"] == up.proc.pid, replicas
    worker = replicas["runtime"]
    assert worker != up.proc.pid
    assert _parent_of(worker) == up.proc.pid
    assert replicas["compiler"] == replicas["approvals"] == worker, replicas

    run = _run_to_completion(up)
    assert run["status"] == "completed", run
    # the gateway's one /metrics shows the worker's services too
    metrics = httpx.get(f"http://127.0.0.1:{up.port}/metrics", headers=up.headers, timeout=10).text
    for service in ("gateway", "compiler", "runtime", "approvals"):
        assert f'langorch_build_info{{service="{service}",version="0.1.0"}} 1.0' in metrics, metrics
    assert re.search(r'^langorch_run_completed_total\{(?=.*status="completed")(?=.*procedure_id="internal-variables")'
                     r'[^}]*\} 1\.0$', metrics, re.MULTILINE), metrics

    signaled = up.interrupt()
    assert up.proc.wait(timeout=15) == 0, up.text
    assert any("stopped in" in line for line in up.after(signaled)), up.text
    assert not _alive(worker), "the worker outlived langorch up"
    assert not _wait_gone(state_dir), "processes left running after the stop"
    assert "Traceback" not in up.text


def test_a_crashed_worker_is_started_again_and_a_killed_up_leaves_no_worker(state_dir: Path) -> None:
    up = _start(state_dir)
    first = _wait_replicas(up)["runtime"]
    os.kill(first, signal.SIGKILL)
    up.wait_for_line(f"(pid {first}", 30)
    assert any("exited with code -9" in line and "starting it again" in line for _, line in up.lines), up.text
    second = _wait_replicas(up, dead=frozenset({first}))["runtime"]
    assert second != first
    assert _parent_of(second) == up.proc.pid
    assert _run_to_completion(up)["status"] == "completed"

    os.kill(up.proc.pid, signal.SIGKILL)  # no stop at all: the worker notices its parent is gone
    up.proc.wait(timeout=10)
    deadline = time.monotonic() + 20
    while _alive(second):
        assert time.monotonic() < deadline, "the worker outlived a killed langorch up"
        time.sleep(0.1)
    # the creation worker notices it on its own, as every worker does
    while left := [line for line in _processes_using(state_dir) if "langorch.workers" in line]:
        assert time.monotonic() < deadline, f"workers outlived a killed langorch up: {left}"
        time.sleep(0.1)


def test_run_creations_are_decided_in_a_process_of_their_own(state_dir: Path) -> None:
    """The creation worker alone decides starts: stopped, a start stays pending (the executing worker does not
    take it); resumed, it decides the start and the run completes; killed, it is started again."""
    up = _start(state_dir)
    replicas = _wait_replicas(up)
    creation = replicas["creation"]
    assert creation not in (up.proc.pid, replicas["runtime"]), replicas
    assert _parent_of(creation) == up.proc.pid
    assert _run_to_completion(up)["status"] == "completed"

    base = f"http://127.0.0.1:{up.port}"
    os.kill(creation, signal.SIGSTOP)
    try:
        r = httpx.post(f"{base}/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "1.0.0"},
                       headers=up.headers, timeout=60)
        assert r.status_code == 202, r.text  # no decision within the gateway's wait: nobody else decides starts
        command = r.json()["location"]
    finally:
        os.kill(creation, signal.SIGCONT)
    deadline = time.monotonic() + 60
    while (outcome := httpx.get(f"{base}{command}", headers=up.headers, timeout=10).json())["status"] == "pending":
        assert time.monotonic() < deadline, outcome
        time.sleep(0.1)
    assert outcome["status"] == "accepted", outcome

    os.kill(creation, signal.SIGKILL)
    up.wait_for_line(f"(pid {creation}", 30)
    assert any("the creation worker" in line and "run creation" in line and "starting it again" in line
               for _, line in up.lines), up.text
    again = _wait_replicas(up, dead=frozenset({creation}))["creation"]
    assert again != creation
    assert _run_to_completion(up)["status"] == "completed"
    up.interrupt()
    assert up.proc.wait(timeout=15) == 0, up.text
    assert not _wait_gone(state_dir), "processes left running after the stop"


def test_an_invalid_setting_of_a_worker_service_is_refused_before_anything_starts(state_dir: Path) -> None:
    env = {**_env(state_dir, free_port()), "LANGORCH_CALLBACK_TIMEOUT_S": "-1"}  # a runtime setting
    proc = subprocess.run([sys.executable, "-m", "langorch", "up"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 2, output
    assert "invalid setting: LANGORCH_CALLBACK_TIMEOUT_S" in output, output
    assert "Traceback" not in output
    assert not _processes_using(state_dir)
    assert not (state_dir / "nats").exists(), "NATS was started"
