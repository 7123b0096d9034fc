"""A uvicorn server that runs inside a process which owns signal handling (``langorch up``, tests)."""

from __future__ import annotations

import contextlib
from collections.abc import Generator

import uvicorn


class ManagedServer(uvicorn.Server):
    """Leaves SIGINT/SIGTERM to the host process, which stops the server with ``should_exit``."""

    @contextlib.contextmanager
    def capture_signals(self) -> Generator[None, None, None]:
        yield
