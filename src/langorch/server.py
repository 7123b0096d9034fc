"""A uvicorn server that runs inside a process which owns signal handling (``langorch up``, tests)."""

from __future__ import annotations

from langorch_infra.hosting import ManagedServer

__all__ = ["ManagedServer"]
