"""A real, small agent for tests: FastAPI under uvicorn on a free port, speaking the agent HTTP protocol
(api.md §15.1: /health, /capabilities, /execute) and, at /mcp, enough MCP streamable HTTP for discovery (§15.4)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from tests.helpers import serve_app


@dataclass
class AgentBehaviour:
    """What the agent answers; tests change it while the agent runs."""

    healthy: bool = True
    capabilities: list[Any] = field(default_factory=lambda: [
        "extract_text", {"name": "fill_form", "type": "workflow", "description": "Fills a form",
                         "estimated_duration_s": 12.5, "input_schema": {"type": "object"}}])
    capabilities_status: int = 200
    capabilities_delay_s: float = 0.0
    redirect: bool = False
    health_hits: list[str] = field(default_factory=list)  # X-LangOrch-Instance of each prober
    capabilities_hits: int = 0  # GET /capabilities requests received (counted before the delay)
    # /execute: scripted answers (status, JSON body or raw text, headers) taken in order, then the default
    # success envelope echoing the request; every request is recorded with its headers and arrival/end times
    name: str = "agent"
    execute_script: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    execute_delay_s: float = 0.0
    executions: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class RunningAgent:
    base_url: str
    behaviour: AgentBehaviour

    @property
    def mcp_url(self) -> str:
        return f"{self.base_url}/mcp"


TOOLS = [{"name": "search_docs", "description": "Full-text search", "inputSchema": {
    "type": "object", "properties": {"q": {"type": "string"}}, "required": ["q"]}},
         {"name": "summarise", "description": "Summarise text", "inputSchema": {"type": "object"}}]


def agent_app(b: AgentBehaviour) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health(request: Request) -> Response:
        b.health_hits.append(request.headers.get("x-langorch-instance", "?"))
        return JSONResponse({"status": "ok" if b.healthy else "down"}, status_code=200 if b.healthy else 503)

    @app.get("/capabilities")
    async def capabilities() -> Response:
        if b.redirect:
            return Response(status_code=302, headers={"Location": "http://169.254.169.254/"})
        b.capabilities_hits += 1
        await asyncio.sleep(b.capabilities_delay_s)
        if b.capabilities_status != 200:
            return JSONResponse({"error": "nope"}, status_code=b.capabilities_status)
        return JSONResponse({"agent_id": "web-1", "channel": "web", "description": "test agent",
                             "capabilities": b.capabilities})

    @app.post("/execute")
    async def execute(request: Request) -> Response:
        record: dict[str, Any] = {"body": await request.json(), "headers": dict(request.headers),
                                  "started": asyncio.get_running_loop().time(), "ended": None}
        b.executions.append(record)
        try:
            await asyncio.sleep(b.execute_delay_s)
        finally:
            record["ended"] = asyncio.get_running_loop().time()
        if b.execute_script:
            status, body, headers = b.execute_script.pop(0)
            if isinstance(body, str):
                return Response(body, status_code=status, headers=headers, media_type="text/plain")
            return JSONResponse(body, status_code=status, headers=headers)
        return JSONResponse({"status": "success", "result": {"agent": b.name, "action": record["body"]["action"],
                                                             "params": record["body"]["params"]}})

    @app.post("/mcp")
    async def mcp(request: Request) -> Response:
        message = await request.json()
        method, rid = message.get("method"), message.get("id")
        if rid is None:
            return Response(status_code=202)
        if method == "initialize":
            result: dict[str, Any] = {"protocolVersion": "2025-06-18", "capabilities": {"tools": {}},
                                      "serverInfo": {"name": "docs-mcp", "version": "1.0"}}
            return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": result}, headers={"Mcp-Session-Id": "s-1"})
        if request.headers.get("mcp-session-id") != "s-1":
            return JSONResponse({"error": "no session"}, status_code=400)
        if method == "tools/list":
            cursor = (message.get("params") or {}).get("cursor")
            page = {"tools": TOOLS[1:]} if cursor else {"tools": TOOLS[:1], "nextCursor": "p2"}
            # answer as an SSE stream, as streamable HTTP servers may
            data = json.dumps({"jsonrpc": "2.0", "id": rid, "result": page})
            return StreamingResponse(iter([f"event: message\ndata: {data}\n\n"]), media_type="text/event-stream")
        return JSONResponse({"jsonrpc": "2.0", "id": rid, "result": {}})

    return app


@contextlib.asynccontextmanager
async def running_agent(behaviour: AgentBehaviour | None = None) -> AsyncIterator[RunningAgent]:
    """Serve a test agent on 127.0.0.1 until the block ends."""
    b = behaviour or AgentBehaviour()
    async with serve_app(agent_app(b)) as base_url:
        yield RunningAgent(base_url, b)
