"""A real, small OpenAI-compatible chat-completions server for tests: FastAPI under uvicorn on a free port.

``POST /<prefix>/chat/completions`` (any prefix, so one server can stand for several base URLs) answers per
requested model as the test scripts it (:class:`ModelBehaviour`) and records every request with its headers,
whether it finished and whether the client went away before the answer.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from tests.helpers import serve_app

DEFAULT_USAGE = {"prompt_tokens": 11, "completion_tokens": 7, "total_tokens": 18}


@dataclass
class ModelBehaviour:
    """How the server answers one model. ``script`` entries ``(status, body, headers)`` are used first, in order
    (a ``None`` body means the normal completion); afterwards ``status`` applies (200 = the completion)."""

    answer: str = "hello"
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    script: list[tuple[int, Any, dict[str, str]]] = field(default_factory=list)
    delay_s: float = 0.0
    usage: dict[str, Any] | None = field(default_factory=lambda: dict(DEFAULT_USAGE))
    provider_model: str | None = None  # the ``model`` field of the answer (default: the requested one)


@dataclass
class LlmServerState:
    models: dict[str, ModelBehaviour] = field(default_factory=dict)
    requests: list[dict[str, Any]] = field(default_factory=list)

    def model(self, name: str) -> ModelBehaviour:
        return self.models.setdefault(name, ModelBehaviour())

    def calls(self, model: str | None = None, prefix: str | None = None) -> list[dict[str, Any]]:
        return [r for r in self.requests
                if (model is None or r["model"] == model) and (prefix is None or r["prefix"] == prefix)]

    def reset(self) -> None:
        self.models.clear()
        self.requests.clear()


def llm_app(state: LlmServerState) -> FastAPI:
    app = FastAPI()

    @app.post("/{prefix}/chat/completions")
    async def completions(prefix: str, request: Request) -> Response:
        body = await request.json()
        model = body.get("model")
        record: dict[str, Any] = {"prefix": prefix, "model": model, "body": body, "headers": dict(request.headers),
                                  "raw_headers": [(k.lower(), v) for k, v in request.headers.items()],
                                  "finished": False, "disconnected": False}
        state.requests.append(record)
        b = state.model(model)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + b.delay_s
        while loop.time() < deadline:
            if await request.is_disconnected():
                record["disconnected"] = True
                return Response(status_code=499)
            await asyncio.sleep(0.005)
        status, answer, headers = (b.script.pop(0) if b.script else (b.status, None, b.headers))
        record["finished"] = True
        if status != 200 or answer is not None:
            if isinstance(answer, str):
                return Response(answer, status_code=status, headers=headers, media_type="text/plain")
            return JSONResponse(answer if answer is not None else {"error": {"message": f"scripted {status}"}},
                                status_code=status, headers=headers)
        completion: dict[str, Any] = {
            "id": f"chatcmpl-{len(state.requests)}", "object": "chat.completion",
            "model": b.provider_model or model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": b.answer}, "finish_reason": "stop"}]}
        if b.usage is not None:
            completion["usage"] = b.usage
        return JSONResponse(completion, headers=headers)

    return app


@dataclass
class RunningLlmServer:
    root: str
    state: LlmServerState

    def base_url(self, prefix: str = "v1") -> str:
        return f"{self.root}/{prefix}"


@contextlib.asynccontextmanager
async def running_llm_server(state: LlmServerState | None = None) -> AsyncIterator[RunningLlmServer]:
    """Serve the fake provider on 127.0.0.1 until the block ends."""
    s = state or LlmServerState()
    async with serve_app(llm_app(s)) as root:
        yield RunningLlmServer(root, s)
