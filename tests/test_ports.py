"""The ports tests give their servers (tests/ports.py): two pytest workers are never given the same port, and
none comes from the kernel's ephemeral range, which ``bind(0)`` and outgoing connections draw from."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests import ports

ROOT = Path(__file__).resolve().parents[1]
TAKE = "import json; from tests.ports import free_port; print(json.dumps([free_port() for _ in range(200)]))"


def _ports_of(worker: str) -> list[int]:
    out = subprocess.run([sys.executable, "-c", TAKE], cwd=ROOT, env={"PYTEST_XDIST_WORKER": worker},
                         capture_output=True, text=True, check=True, timeout=60).stdout
    ports: list[int] = json.loads(out)
    return ports


@pytest.mark.unit
def test_workers_are_given_disjoint_ports_below_the_ephemeral_range() -> None:
    ephemeral_from = int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    by_worker = {w: _ports_of(w) for w in ("gw0", "gw1", "gw3", "")}
    for worker, given in by_worker.items():
        assert len(set(given)) == len(given), worker  # one worker never hands a port out twice in a row
        assert all(1024 < p < ephemeral_from for p in given), (worker, given)
    workers = list(by_worker)
    for i, a in enumerate(workers):
        for b in workers[i + 1:]:
            assert not set(by_worker[a]) & set(by_worker[b]), (a, b)


@pytest.mark.unit
def test_a_port_in_use_is_skipped() -> None:
    taken = ports._Ports()
    port = taken.block[taken.next]
    with socket.socket() as held:
        with contextlib.suppress(OSError):  # already in use by something else: it must be skipped all the same
            held.bind(("127.0.0.1", port))
            held.listen()
        assert taken.take() != port
