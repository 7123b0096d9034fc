"""A real HTTP agent for end-to-end runs: FastAPI under uvicorn on a free port, speaking the agent protocol
(api.md §15.1). Each action is answered by a handler the test supplies; every request is recorded, and a
repeated Idempotency-Key is answered from the first result instead of being executed again. A key whose first
execution is still running is not executed again either: it is answered with HTTP 409 ``{"status": "error",
"error_code": "in_progress"}`` and ``Retry-After`` (``in_progress="conflict"``, the default), or the request waits
for the first execution and gets its result (``in_progress="wait"``)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from starlette.background import BackgroundTask

from tests.helpers import serve_app

Handler = Callable[[dict[str, Any]], Awaitable[Any] | Any]


@dataclass
class ScriptedAgent:
    handlers: dict[str, Handler]
    base_url: str = ""
    requests: list[dict[str, Any]] = field(default_factory=list)  # every /execute body, in arrival order
    headers: list[dict[str, str]] = field(default_factory=list)  # the headers of each of ``requests``
    executed: list[str] = field(default_factory=list)  # idempotency keys actually executed
    results: dict[str, Any] = field(default_factory=dict)
    in_progress: str = "conflict"  # a key still executing: "conflict" (409 in_progress) or "wait" (first result)
    retry_after_s: int = 1  # Retry-After of a 409 in_progress answer
    in_progress_answers: list[str] = field(default_factory=list)  # keys answered 409 in_progress (or made to wait)
    running: dict[str, asyncio.Event] = field(default_factory=dict)  # keys whose first execution is running
    on_answered: Callable[[str, dict[str, Any]], Any] | None = None  # called once an execution's answer is sent

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
            self.headers.append(dict(request.headers))
            key = request.headers.get("idempotency-key", "")
            if key in self.results:
                return JSONResponse(self.results[key])
            first = self.running.get(key)
            if first is not None:  # the first execution of this key has not finished: never execute it twice
                self.in_progress_answers.append(key)
                if self.in_progress == "wait":
                    await first.wait()
                    if key in self.results:
                        return JSONResponse(self.results[key])
                return JSONResponse({"status": "error", "error": f"idempotency key {key} is still executing",
                                     "error_code": "in_progress", "retryable": True}, status_code=409,
                                    headers={"Retry-After": str(self.retry_after_s)})
            self.executed.append(key)
            finished = self.running[key] = asyncio.Event()
            try:
                envelope = await self._run_handler(body)
                self.results[key] = envelope  # recorded before anyone waiting on the key is woken
            finally:
                self.running.pop(key, None)
                finished.set()
            after = BackgroundTask(self.on_answered, key, envelope) if self.on_answered is not None else None
            return JSONResponse(envelope, background=after)  # the background task runs after the body is sent

        return app

    async def _run_handler(self, body: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = self.handlers[body["action"]](body)
            if asyncio.iscoroutine(answer):
                answer = await answer
        except AgentFailure as failure:
            return {"status": "error", "error": failure.message, "error_code": failure.code,
                    "retryable": failure.retryable}
        if answer is ACCEPTED:  # an async workflow accepted: the agent calls back later (api.md §15.2)
            return {"status": "accepted"}
        return {"status": "success", "result": answer}


ACCEPTED = object()


class AgentFailure(Exception):
    def __init__(self, message: str, code: str = "failed", retryable: bool = False) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.retryable = retryable


@contextlib.asynccontextmanager
async def serving(agent: ScriptedAgent) -> AsyncIterator[ScriptedAgent]:
    async with serve_app(agent.app()) as base_url:
        agent.base_url = base_url
        yield agent
