"""The runtime's MCP client sessions: one ``initialize``d session per MCP agent, held open by a task of its own and
shared by the calls of every run (:class:`McpSession`), and the per-request headers of its HTTP requests
(:func:`stamp_request`)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx2
import mcp_types
from mcp import Client
from mcp.client.streamable_http import streamable_http_client
from mcp.shared.exceptions import MCPError

from langorch_infra import tracing
from langorch_runtime.agents import VERSION

MCP_CLIENT = mcp_types.Implementation(name="langorch-runtime", version=VERSION)


class McpSession:
    """One MCP session (``initialize`` + ``notifications/initialized``) held open by its own task, so calls from
    any run can share it and the SDK's task group is entered and left in the same task."""

    def __init__(self, url: str, headers: dict[str, str]) -> None:
        self.url = url
        self.headers = headers
        self.client: Client | None = None
        self.broken = False
        self.lost = False  # the server answered 404 to a request carrying our session id
        self._ready = asyncio.Event()
        self._closing = asyncio.Event()
        self._failure: BaseException | None = None
        self._task = asyncio.create_task(self._hold(), name=f"mcp-session {url}")

    async def _hold(self) -> None:
        http = httpx2.AsyncClient(
            follow_redirects=False, timeout=httpx2.Timeout(30.0, read=300.0),
            headers={"User-Agent": f"langorch-runtime/{VERSION}", **self.headers},
            event_hooks={"request": [stamp_request], "response": [self._watch_response]})
        try:
            async with http, Client(streamable_http_client(self.url, http_client=http), mode="legacy",
                                    client_info=MCP_CLIENT) as client:
                self.client = client
                self._ready.set()
                await self._closing.wait()
        except BaseException as exc:  # reported to the callers waiting for readiness
            self._failure = exc
            if isinstance(exc, asyncio.CancelledError):
                raise
        finally:
            self.broken = True
            self.client = None
            self._ready.set()

    async def _watch_response(self, response: httpx2.Response) -> None:
        if response.status_code == 404 and response.request.headers.get("mcp-session-id"):
            self.lost = True

    async def ready(self, timeout_s: float) -> None:
        await asyncio.wait_for(self._ready.wait(), timeout_s)
        if self.client is None:
            failure = self._failure
            if isinstance(failure, MCPError):
                raise failure
            raise ConnectionError(f"MCP session to {self.url} failed: {type(failure).__name__}: {failure}")

    async def call(self, name: str, arguments: dict[str, Any], meta: dict[str, Any],
                   timeout_s: float) -> mcp_types.CallToolResult:
        client = self.client
        if client is None:
            raise ConnectionError(f"MCP session to {self.url} is closed")
        return await client.call_tool(name, arguments, read_timeout_seconds=timeout_s, meta=meta)  # type: ignore[arg-type]

    async def close(self) -> None:
        self._closing.set()
        try:
            await asyncio.wait_for(asyncio.shield(self._task), 5.0)
        except BaseException:  # not closed within 5 s, or it failed: cancelled either way
            self._task.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await self._task


async def stamp_request(request: httpx2.Request) -> None:
    """Per-request headers of MCP calls: ``Idempotency-Key`` and ``traceparent``/``tracestate`` from the
    ``tools/call`` ``_meta`` (the SDK has no per-call headers; the body is already encoded here); other requests
    (initialize, notifications) get a ``traceparent`` of their own."""
    trace_headers: dict[str, str] = {}
    message: Any = None
    if request.method == "POST":
        with contextlib.suppress(ValueError, httpx2.RequestNotRead):
            message = json.loads(request.content or b"{}")
    if isinstance(message, dict) and message.get("method") == "tools/call":
        meta = (message.get("params") or {}).get("_meta") or {}
        meta = meta if isinstance(meta, dict) else {}
        key = meta.get("langorch/idempotency_key")
        if isinstance(key, str):
            request.headers["Idempotency-Key"] = key
        trace_headers = {h: v for h in (tracing.TRACEPARENT, tracing.TRACESTATE)
                         if isinstance(v := meta.get(h), str)}
    for name, value in (trace_headers or tracing.outbound_headers("mcp.request")).items():
        request.headers.setdefault(name, value)
