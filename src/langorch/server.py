"""A uvicorn server that runs inside a process which owns signal handling (``langorch up``, tests)."""

from __future__ import annotations

from langorch_infra.hosting import ManagedServer

# how long a stopping gateway waits for open requests and SSE streams before closing them
SHUTDOWN_GRACE_S = 10

__all__ = ["SHUTDOWN_GRACE_S", "ManagedServer"]
