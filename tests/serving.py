"""Serve an ASGI app on 127.0.0.1 for the duration of a test (the real HTTP servers tests start)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import uvicorn

from langorch.server import ManagedServer
from langorch_infra.embedded import free_port


@contextlib.asynccontextmanager
async def serve_app(app: Any, port: int | None = None, **config: Any) -> AsyncIterator[str]:
    """Yield the base URL (``http://127.0.0.1:<port>``) once the server accepts connections."""
    port = port or free_port()
    options: dict[str, Any] = {"log_level": "warning", "lifespan": "off", **config}
    server = ManagedServer(uvicorn.Config(app, host="127.0.0.1", port=port, **options))
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        if task.done():
            task.result()
        await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task
