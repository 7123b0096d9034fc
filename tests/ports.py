"""Ports for the servers tests start, none of them given to two tests of one run.

``bind(("127.0.0.1", 0))`` hands out a port from the kernel's ephemeral range, free at that moment only: when a
test passes the number to a server that binds it later (a subprocess takes a second or more to start), another
pytest worker's call may be given the same number meanwhile. One of the two servers then fails to bind, and its
test's readiness probe is answered by the other test's server: a run created in the wrong database, a connection
refused once the other test stops (both seen in CI). So each xdist worker takes ports from a block of its own,
below the ephemeral range (outgoing connections never use them), one after another, each checked free when given.
"""

from __future__ import annotations

import os
import random
import socket

FIRST = 16000
BLOCK = 1800
"""Worker ``gwN`` takes ports from ``FIRST + N * BLOCK`` on, for at most ``BLOCKS - 1`` workers; a process outside
xdist takes the last block. All below 32768, where Linux's ephemeral range starts."""
BLOCKS = 9


def _block() -> range:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    index = int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else BLOCKS - 1
    start = FIRST + (index % BLOCKS) * BLOCK
    return range(start, start + BLOCK)


class _Ports:
    def __init__(self) -> None:
        self.block = _block()
        # a random start: two pytest runs on one machine at once rarely walk the same ports at the same time
        self.next = random.randrange(len(self.block))

    def take(self) -> int:
        for _ in range(len(self.block)):
            port = self.block[self.next]
            self.next = (self.next + 1) % len(self.block)
            with socket.socket() as s:
                try:
                    s.bind(("127.0.0.1", port))
                except OSError:  # in use (a server of this machine, or a socket in TIME_WAIT)
                    continue
            return port
        raise RuntimeError(f"no free port in {self.block.start}-{self.block.stop - 1}")


_ports = _Ports()


def free_port() -> int:
    """A port free on 127.0.0.1 now that no other test of this pytest run is given before this worker has handed
    out its whole block."""
    return _ports.take()
