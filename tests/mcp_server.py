"""A real MCP server for tests: the official SDK's ``MCPServer`` over streamable HTTP, served by uvicorn on a free
port (api.md §15.4). Tools record the headers and ``_meta`` of every call."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import mcp_types
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp.shared.exceptions import MCPError

from tests.helpers import serve_app

PNG = base64.b64decode("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mP8z8BQDwAEhQGAhKmMIQAAAABJRU5"
                       "ErkJggg==")  # a 1x1 PNG


@dataclass
class RunningMcp:
    url: str
    calls: list[dict[str, Any]] = field(default_factory=list)


def mcp_server(calls: list[dict[str, Any]]) -> MCPServer:
    server = MCPServer("test-tools")

    def record(ctx: Context, tool: str, arguments: dict[str, Any]) -> None:
        meta = ctx.request_context.meta
        calls.append({"tool": tool, "arguments": arguments, "headers": dict(ctx.headers or {}),
                      "meta": dict(meta) if isinstance(meta, dict) else (meta.model_dump(by_alias=True)
                                                                         if meta is not None else {})})

    @server.tool(structured_output=True)
    async def lookup_price(sku: str, ctx: Context) -> dict[str, Any]:
        """Price of a SKU (structured output)."""
        record(ctx, "lookup_price", {"sku": sku})
        return {"sku": sku, "price": 12.5}

    @server.tool(structured_output=False)
    async def as_json_text(value: int, ctx: Context) -> str:
        """One text item holding JSON."""
        record(ctx, "as_json_text", {"value": value})
        return json.dumps({"doubled": value * 2})

    @server.tool(structured_output=False)
    async def plain_text(ctx: Context) -> str:
        """One text item that is not JSON."""
        record(ctx, "plain_text", {})
        return "hello there"

    @server.tool(structured_output=False)
    async def two_lines(ctx: Context) -> list[str]:
        """Two text items: the step output is the content list."""
        record(ctx, "two_lines", {})
        return ["first", "second"]

    @server.tool(structured_output=False)
    async def slow(seconds: float, ctx: Context) -> str:
        """Sleeps; records whether the call was cancelled by the client."""
        record(ctx, "slow", {"seconds": seconds})
        try:
            await asyncio.sleep(seconds)
        except BaseException:
            calls[-1]["cancelled"] = True
            raise
        return "slept"

    @server.tool(structured_output=False)
    async def rpc_fail(code: int, ctx: Context) -> str:
        """Answers with a JSON-RPC error of the given code."""
        record(ctx, "rpc_fail", {"code": code})
        raise MCPError(code, f"failed with {code}")

    @server.tool(structured_output=False)
    async def broken(reason: str, ctx: Context) -> str:
        """Always fails with a tool error (isError)."""
        record(ctx, "broken", {"reason": reason})
        raise ToolError(f"cannot do it: {reason}")

    @server.tool(structured_output=False)
    async def snapshot(page: str, ctx: Context) -> list[mcp_types.ContentBlock]:
        """A text item, a PNG image, an embedded text resource, an embedded binary resource and a resource link
        (the image and resources become artifacts, api.md §15.4)."""
        record(ctx, "snapshot", {"page": page})
        return [
            mcp_types.TextContent(type="text", text=f"captured {page}"),
            mcp_types.ImageContent(type="image", data=base64.b64encode(PNG).decode(), mime_type="image/png"),
            mcp_types.EmbeddedResource(type="resource", resource=mcp_types.TextResourceContents(
                uri=f"file:///pages/{page}.html", mime_type="text/html", text=f"<h1>{page}</h1>")),
            mcp_types.EmbeddedResource(type="resource", resource=mcp_types.BlobResourceContents(
                uri="file:///pages/raw.bin", mime_type="application/octet-stream",
                blob=base64.b64encode(b"\x00\x01raw").decode())),
            mcp_types.ResourceLink(type="resource_link", name="elsewhere", uri="https://example.com/page.pdf",
                                   mime_type="application/pdf"),
        ]

    return server


@contextlib.asynccontextmanager
async def running_mcp(port: int | None = None) -> AsyncIterator[RunningMcp]:
    """Serve the MCP test server on 127.0.0.1 (a free port unless given) until the block ends (endpoint ``/mcp``)."""
    calls: list[dict[str, Any]] = []
    app = mcp_server(calls).streamable_http_app(streamable_http_path="/mcp")
    async with serve_app(app, port, lifespan="on", timeout_graceful_shutdown=1) as base_url:
        yield RunningMcp(f"{base_url}/mcp", calls)
