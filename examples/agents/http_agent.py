"""An HTTP agent for the ``api`` channel: it performs the ``http_request`` action of steps such as the one in
``examples/simple_http_test.ckp.json``.

It speaks LangOrch's agent HTTP protocol (``GET /health``, ``GET /capabilities``, ``POST /execute``). Start it
next to ``langorch up`` and register it once (its capabilities are read from ``/capabilities``)::

    uv run python examples/agents/http_agent.py --port 9100
    curl -s -X POST localhost:8080/api/agents -H 'content-type: application/json' \\
      -d '{"name": "http", "channel": "api", "base_url": "http://127.0.0.1:9100"}'

Step parameters: ``url`` (``http`` or ``https``, required), ``method`` (default ``GET``), ``headers`` (object),
``query`` (object), ``json`` (a JSON body) or ``body`` (a text body), ``timeout_s`` (default 30).

The step result is ``{"status_code", "headers", "body"}``; ``body`` is the decoded JSON when the answer is JSON,
else its text. Every HTTP answer, a 404 or a 500 included, is a result: the procedure decides what it means. A
request that gets no answer (connection refused, timeout) is an error marked ``retryable``, so a step with
``retry_on_failure`` tries again. A repeated ``Idempotency-Key`` gets the first answer again instead of a second
request.

This is an example, not a hardened service: it requests whatever URL a procedure names, so run it only where
that is acceptable.
"""

from __future__ import annotations

import argparse
import contextlib
from collections import OrderedDict
from typing import Any
from urllib.parse import urlsplit

import httpx
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

MAX_BODY_BYTES = 1024 * 1024  # a larger answer would not fit in one run variable (1 MiB)
REMEMBERED_KEYS = 1000


def _error(message: str, code: str, *, retryable: bool = False) -> dict[str, Any]:
    return {"status": "error", "error": message, "error_code": code, "retryable": retryable}


async def http_request(params: dict[str, Any]) -> dict[str, Any]:
    """Perform one request described by the step parameters; returns the agent's response envelope."""
    url = params.get("url")
    method = str(params.get("method") or "GET").upper()
    if not isinstance(url, str) or urlsplit(url).scheme not in ("http", "https"):
        return _error(f"url must be an http or https URL, not {url!r}", "invalid_url")
    headers, query = params.get("headers") or {}, params.get("query") or {}
    if not isinstance(headers, dict) or not isinstance(query, dict):
        return _error("headers and query must be objects", "invalid_params")
    request: dict[str, Any] = {"headers": {str(k): str(v) for k, v in headers.items()},
                               "params": {str(k): str(v) for k, v in query.items()}}
    if "json" in params:
        request["json"] = params["json"]
    elif "body" in params:
        request["content"] = str(params["body"])
    try:
        async with httpx.AsyncClient(timeout=float(params.get("timeout_s") or 30)) as client:
            response = await client.request(method, url, **request)
    except httpx.HTTPError as exc:
        return _error(f"{method} {url} got no answer: {type(exc).__name__}", "no_answer", retryable=True)
    if len(response.content) > MAX_BODY_BYTES:
        return _error(f"{method} {url} answered {len(response.content)} bytes, more than {MAX_BODY_BYTES}",
                      "response_too_large")
    body: Any = response.text
    if "json" in response.headers.get("content-type", ""):
        with contextlib.suppress(ValueError):  # labelled JSON but is not: kept as text
            body = response.json()
    return {"status": "success",
            "result": {"status_code": response.status_code, "headers": dict(response.headers), "body": body}}


def create_app() -> FastAPI:
    app = FastAPI(title="LangOrch example HTTP agent")
    answers: OrderedDict[str, dict[str, Any]] = OrderedDict()  # idempotency key → first answer
    running: set[str] = set()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/capabilities")
    async def capabilities() -> dict[str, Any]:
        return {"channel": "api", "description": "Performs HTTP requests for CKP steps",
                "capabilities": [{"name": "http_request", "type": "tool",
                                  "description": "One HTTP request; the result is {status_code, headers, body}"}]}

    @app.post("/execute")
    async def execute(request: Request) -> JSONResponse:
        call = await request.json()
        key = request.headers.get("idempotency-key") or str(call.get("idempotency_key") or "")
        if key and key in answers:
            return JSONResponse(answers[key])
        if key and key in running:  # the first request with this key is still being performed: ask again later
            return JSONResponse(_error(f"idempotency key {key} is still executing", "in_progress", retryable=True),
                                status_code=409, headers={"Retry-After": "1"})
        if call.get("action") != "http_request":
            return JSONResponse(_error(f"unknown action {call.get('action')!r}", "unknown_action"))
        running.add(key)
        try:
            answer = await http_request(call.get("params") or {})
        finally:
            running.discard(key)
        if key:
            answers[key] = answer
            while len(answers) > REMEMBERED_KEYS:
                answers.popitem(last=False)
        return JSONResponse(answer)

    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=9100)
    args = parser.parse_args()
    uvicorn.run(create_app(), host=args.host, port=args.port)


if __name__ == "__main__":
    main()
