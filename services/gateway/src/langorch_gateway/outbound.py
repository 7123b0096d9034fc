"""Outbound calls of the gateway to agents (api.md §7.3, §15.1, §15.4): URL safety and capability probes.

Only ``http``/``https``; redirects are not followed; 5 s timeout; at most 1 MiB read; link-local and cloud
metadata addresses are always refused; ``agent_url_allowlist`` (hosts or CIDRs) narrows further.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import socket
from typing import Any
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from langorch_gateway.problems import ApiProblem

MAX_PROBE_BYTES = 1024 * 1024
METADATA_HOSTS = frozenset({"metadata.google.internal", "metadata.goog", "metadata", "instance-data",
                            "instance-data.ec2.internal"})
METADATA_IPS = frozenset(ipaddress.ip_address(a) for a in (
    "169.254.169.254", "169.254.170.2", "fd00:ec2::254", "100.100.100.200", "168.63.129.16"))
MCP_PROTOCOL_VERSION = "2025-06-18"
USER_AGENT = "langorch-gateway/0.1.0"


class Capability(BaseModel):
    """``Capability`` of api.md §7.1 (a bare string means ``{name, type: "tool"}``)."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    type: str = Field("tool", pattern=r"^(tool|workflow)$")
    description: str | None = None
    estimated_duration_s: float | None = Field(None, ge=0)
    is_batch: bool = False
    input_schema: dict[str, Any] | None = None
    output_schema: dict[str, Any] | None = None


class _ProbedCapability(Capability):
    model_config = ConfigDict(extra="ignore")


def normalise_capabilities(raw: list[Any], *, lenient: bool = False) -> list[dict[str, Any]]:
    """Capabilities as full objects; ``lenient`` ignores unknown members (agent answers, not request bodies)."""
    model = _ProbedCapability if lenient else Capability
    return [model(name=c).model_dump() if isinstance(c, str) else model.model_validate(c).model_dump() for c in raw]


def _refuse(detail: str, field: str) -> ApiProblem:
    return ApiProblem("url_not_allowed", detail, errors={field: [detail]})


async def check_url(url: str, allowlist: list[str], field: str = "base_url") -> None:
    """Refuse URLs LangOrch must not call (api.md §7.3); resolves the host and checks every address."""
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https"):
        raise _refuse("only http and https URLs are accepted", field)
    host = (parts.hostname or "").lower().rstrip(".")
    if not host:
        raise _refuse("the URL has no host", field)
    if parts.username or parts.password:
        raise _refuse("credentials in the URL are not accepted; use auth", field)
    if host in METADATA_HOSTS:
        raise _refuse(f"{host} is a cloud metadata address", field)
    try:
        infos = await asyncio.get_running_loop().getaddrinfo(host, parts.port or 0, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise _refuse(f"host {host} does not resolve", field) from exc
    addresses = {ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos}
    for ip in addresses:
        if ip in METADATA_IPS:
            raise _refuse(f"{ip} is a cloud metadata address", field)
        if ip.is_link_local or (ip.version == 6 and ip.ipv4_mapped is not None and ip.ipv4_mapped.is_link_local):
            raise _refuse(f"{ip} is a link-local address", field)
    if allowlist and not _allowed(host, addresses, allowlist):
        raise _refuse(f"{host} is not in LANGORCH_AGENT_URL_ALLOWLIST", field)


def _allowed(host: str, addresses: set[Any], allowlist: list[str]) -> bool:
    for entry in allowlist:
        entry = entry.strip().lower()
        try:
            network = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            if host == entry:
                return True
            continue
        if addresses and all(ip in network for ip in addresses):
            return True
    return False


def _client(timeout: float) -> httpx.AsyncClient:
    return httpx.AsyncClient(follow_redirects=False, timeout=timeout, headers={"User-Agent": USER_AGENT})


async def _read_limited(response: httpx.Response) -> bytes:
    body = bytearray()
    async for chunk in response.aiter_bytes():
        body.extend(chunk)
        if len(body) > MAX_PROBE_BYTES:
            raise ApiProblem("upstream_error", "the agent answered more than 1 MiB")
    return bytes(body)


async def probe_capabilities(base_url: str, protocol: str, timeout: float) -> tuple[list[dict[str, Any]],
                                                                                    dict[str, Any]]:
    """(capabilities, agent_info) from ``GET /capabilities`` (http) or ``initialize`` + ``tools/list`` (mcp).

    Failures are 502 ``upstream_error``; timeouts 504 ``upstream_timeout``.
    """
    try:
        async with _client(timeout) as client:
            if protocol == "mcp":
                return await _probe_mcp(client, base_url)
            return await _probe_http(client, base_url)
    except httpx.TimeoutException as exc:
        raise ApiProblem("upstream_timeout", f"the agent at {base_url} did not answer within {timeout:g} s") from exc
    except httpx.HTTPError as exc:
        raise ApiProblem("upstream_error", f"the agent at {base_url} could not be reached: "
                         f"{type(exc).__name__}") from exc


async def _probe_http(client: httpx.AsyncClient, base_url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    url = base_url.rstrip("/") + "/capabilities"
    async with client.stream("GET", url, headers={"Accept": "application/json"}) as response:
        if response.is_redirect:
            raise ApiProblem("upstream_error", f"GET {url} answered a redirect; redirects are not followed")
        if response.status_code != 200:
            raise ApiProblem("upstream_error", f"GET {url} answered HTTP {response.status_code}")
        raw = await _read_limited(response)
    try:
        body = json.loads(raw)
        capabilities = normalise_capabilities(body["capabilities"], lenient=True)
    except (ValueError, KeyError, TypeError, ValidationError) as exc:
        raise ApiProblem("upstream_error", f"GET {url} did not answer {{capabilities: [...]}}") from exc
    info = {k: body.get(k) for k in ("agent_id", "channel", "description")}
    return capabilities, info


async def _rpc(client: httpx.AsyncClient, url: str, payload: dict[str, Any],
               headers: dict[str, str]) -> tuple[dict[str, Any] | None, httpx.Headers]:
    """One JSON-RPC exchange over streamable HTTP: a JSON body or an SSE stream holding the response."""
    async with client.stream("POST", url, json=payload, headers={
            "Accept": "application/json, text/event-stream", **headers}) as response:
        if response.status_code >= 300:
            raise ApiProblem("upstream_error", f"MCP {payload['method']} answered HTTP {response.status_code}")
        raw = await _read_limited(response)
        ctype = response.headers.get("content-type", "")
        resp_headers = response.headers
    if "id" not in payload:
        return None, resp_headers
    messages: list[Any] = []
    try:
        if ctype.startswith("text/event-stream"):
            for line in raw.decode().splitlines():
                if line.startswith("data:"):
                    messages.append(json.loads(line[5:].strip()))
        else:
            messages.append(json.loads(raw))
    except ValueError as exc:
        raise ApiProblem("upstream_error", f"MCP {payload['method']} answered something other than JSON") from exc
    for message in messages:
        if isinstance(message, dict) and message.get("id") == payload["id"]:
            if "error" in message:
                raise ApiProblem("upstream_error", f"MCP {payload['method']} failed: {message['error']}")
            return message.get("result") or {}, resp_headers
    raise ApiProblem("upstream_error", f"MCP {payload['method']} got no response")


async def _probe_mcp(client: httpx.AsyncClient, url: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    init, headers = await _rpc(client, url, {
        "jsonrpc": "2.0", "id": 1, "method": "initialize",
        "params": {"protocolVersion": MCP_PROTOCOL_VERSION, "capabilities": {},
                   "clientInfo": {"name": "langorch-gateway", "version": "0.1.0"}}}, {})
    assert init is not None
    session = {"MCP-Protocol-Version": str(init.get("protocolVersion") or MCP_PROTOCOL_VERSION)}
    if headers.get("mcp-session-id"):
        session["Mcp-Session-Id"] = headers["mcp-session-id"]
    await _rpc(client, url, {"jsonrpc": "2.0", "method": "notifications/initialized"}, session)
    tools: list[dict[str, Any]] = []
    cursor: str | None = None
    for page in range(100):
        params = {"cursor": cursor} if cursor else {}
        result, _ = await _rpc(client, url, {"jsonrpc": "2.0", "id": 2 + page, "method": "tools/list",
                                             "params": params}, session)
        assert result is not None
        for tool in result.get("tools") or []:
            if isinstance(tool, dict) and tool.get("name"):
                tools.append({"name": str(tool["name"]), "type": "tool", "description": tool.get("description"),
                              "estimated_duration_s": None, "is_batch": False,
                              "input_schema": tool.get("inputSchema"), "output_schema": tool.get("outputSchema")})
        cursor = result.get("nextCursor")
        if not cursor:
            break
    server = init.get("serverInfo") or {}
    return tools, {"agent_id": None, "channel": None, "description": server.get("name"),
                   "server_info": server, "protocol_version": session["MCP-Protocol-Version"]}
