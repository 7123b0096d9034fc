"""``langorch cluster up`` (issue 19's harness from the command line): it starts a cluster, prints the API and the
NATS seed list once every process is ready, the API answers, and SIGTERM stops every process it started and exits
0; a bad count is a usage error."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.helpers import langorch_command

pytestmark = pytest.mark.integration

START_S = 240  # three NATS servers, PostgreSQL and five Python processes importing the services, on a busy machine


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return Path(f"/proc/{pid}/stat").read_text().split(")")[-1].split()[0] != "Z"


@pytest.mark.timeout(START_S + 120)
def test_cluster_up_serves_and_stops_on_sigterm(tmp_path: Path) -> None:
    state = tmp_path / "cluster"
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    proc = subprocess.Popen(langorch_command("cluster", "up", "--runtimes", "1", "--triggers", "0", "--no-auth",
                                             "--state-dir", str(state)),
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    ready = threading.Event()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "Ctrl-C stops the cluster" in line:
                ready.set()

    threading.Thread(target=read, daemon=True).start()
    try:
        assert ready.wait(START_S), "".join(lines)
        out = "".join(lines)
        api = re.search(r"^API: (http://127\.0\.0\.1:\d+)", out, re.M)
        assert api, out
        seeds = re.search(r"^export LANGORCH_NATS_URL=(\S+)$", out, re.M)
        assert seeds, out
        assert len(seeds.group(1).split(",")) == 3
        assert "export LANGORCH_NATS_REPLICAS=3" in out
        pids = [int(p) for p in re.findall(r"pid (\d+)", out)]
        assert len(pids) == 4  # compiler, approvals, runtime, gateway
        assert httpx.get(f"{api.group(1)}/api/ready", timeout=10).status_code == 200
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(90) == 0, "".join(lines)
        deadline = time.monotonic() + 10
        while any(alive(pid) for pid in pids):
            assert time.monotonic() < deadline, [pid for pid in pids if alive(pid)]
            time.sleep(0.1)
        assert (state / "logs" / "runtime-0.log").exists()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_a_count_below_one_is_a_usage_error() -> None:
    r = subprocess.run(langorch_command("cluster", "up", "--runtimes", "0"), capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2
    assert "give 1 or more" in r.stdout + r.stderr
