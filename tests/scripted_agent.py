"""A real HTTP agent for end-to-end runs: FastAPI under uvicorn on a free port, speaking the agent protocol
(api.md §15.1). Each action is answered by a handler the test supplies; every request is recorded, and a
repeated Idempotency-Key is answered from the first result instead of being executed again."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse

from langorch.server import ManagedServer
from langorch_infra.embedded import free_port

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


@dataclass
class ScriptedAgent:
    handlers: dict[str, Handler]
    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)  # every /execute body, in arrival order
    executed: list[str] = field(default_factory=list)  # idempotency keys actually executed
    results: dict[str, Any] = field(default_factory=dict)

    def app(self) -> FastAPI:
        app = FastAPI()

        @app.get("/health")
        async def health() -> dict[str, str]:
            return {"status": "ok"}

        @app.get("/capabilities")
        async def capabilities() -> dict[str, Any]:
            return {"capabilities": list(self.handlers)}

        @app.post("/execute")
        async def execute(request: Request) -> JSONResponse:
            body = await request.json()
            self.requests.append(body)
            key = request.headers.get("idempotency-key", "")
            if key in self.results:
                return JSONResponse(self.results[key])
            self.executed.append(key)
            try:
                answer = self.handlers[body["action"]](body)
                if asyncio.iscoroutine(answer):
                    answer = await answer
            except AgentFailure as failure:
                envelope: dict[str, Any] = {"status": "error", "error": failure.message,
                                            "error_code": failure.code, "retryable": failure.retryable}
            else:
                envelope = {"status": "success", "result": answer}
            self.results[key] = envelope
            return JSONResponse(envelope)

        return app


class AgentFailure(Exception):
    def __init__(self, message: str, code: str = "failed", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


@contextlib.asynccontextmanager
async def serving(agent: ScriptedAgent) -> AsyncIterator[ScriptedAgent]:
    port = free_port()
    server = ManagedServer(uvicorn.Config(agent.app(), host="127.0.0.1", port=port, log_level="warning",
                                          lifespan="off"))
    task = asyncio.create_task(server.serve())
    for _ in range(400):
        if server.started:
            break
        await asyncio.sleep(0.01)
    agent.base_url = f"http://127.0.0.1:{port}"
    try:
        yield agent
    finally:
        server.should_exit = True
        await task
