"""Small helpers shared by the cross-service tests."""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any, TypeVar

import httpx
from httpx_sse import aconnect_sse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
T = TypeVar("T")


def example(name: str) -> dict[str, Any]:
    return json.loads((EXAMPLES / name).read_text())  # type: ignore[no-any-return]


async def follow_run(client: httpx.AsyncClient, run_id: str, *, last_event_id: int | None = None,
                     limit: int | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """Read a run's SSE stream until ``end`` (or ``limit`` events); returns (events, end status)."""
    headers = {"Last-Event-ID": str(last_event_id)} if last_event_id is not None else {}
    events: list[dict[str, Any]] = []
    async with aconnect_sse(client, "GET", f"/api/runs/{run_id}/stream", headers=headers,
                            timeout=httpx.Timeout(60, read=60)) as source:
        async for sse in source.aiter_sse():
            if sse.event == "run_event":
                event = json.loads(sse.data)
                assert sse.id == str(event["stream_seq"])
                events.append(event)
                if limit is not None and len(events) >= limit:
                    return events, None
            elif sse.event == "end":
                return events, json.loads(sse.data)["status"]
    return events, None


async def import_procedure(client: httpx.AsyncClient, doc: dict[str, Any]) -> dict[str, Any]:
    r = await client.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


TERMINAL = ("completed", "failed", "canceled")


async def wait_until(read: Callable[[], Awaitable[T] | T], done: Callable[[T], object] = bool,
                     timeout: float = 30, every: float = 0.05) -> T:
    """Call ``read`` (a coroutine function or a plain one) until ``done`` holds for what it returns (by default:
    until it is truthy); fails the test with the last value read when ``timeout`` passes first. ``done`` sees
    whatever an endpoint answered, so it must not assume that a field is there or not null (read it with ``.get``
    and ``or``)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        got = read()
        value: T = await got if inspect.isawaitable(got) else got  # type: ignore[assignment]
        if done(value):
            return value
        assert asyncio.get_running_loop().time() < deadline, value
        await asyncio.sleep(every)


async def wait_run(client: httpx.AsyncClient, run_id: str, done: Callable[[dict[str, Any]], bool],
                   timeout: float = 30) -> dict[str, Any]:
    """Poll ``GET /api/runs/{id}`` until ``done(body)``; the body may be a problem (a 404 before the run exists)."""
    async def read() -> dict[str, Any]:
        return (await client.get(f"/api/runs/{run_id}")).json()  # type: ignore[no-any-return]

    return await wait_until(read, done, timeout)


def ended_after_a_retry(run: dict[str, Any]) -> bool:
    """For :func:`wait_run`: the run completed, or it ended again after a retry (a failure before any retry may be
    followed by an automatic one)."""
    return run.get("status") == "completed" or (
        (run.get("retry_count") or 0) >= 1 and run.get("status") in ("failed", "canceled"))


async def wait_status(client: httpx.AsyncClient, run_id: str, wanted: tuple[str, ...] = TERMINAL,
                      timeout: float = 30) -> dict[str, Any]:
    """Poll ``GET /api/runs/{id}`` until the run reads one of ``wanted`` (terminal by default); fails the test with
    the last body read when ``timeout`` passes first."""
    return await wait_run(client, run_id, lambda body: body.get("status") in wanted, timeout)


async def events_of(client: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    """A run's events from the projection (first 500)."""
    r = await client.get(f"/api/runs/{run_id}/events", params={"limit": 500})
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


async def imported(client: httpx.AsyncClient, doc: dict[str, Any]) -> None:
    """Import a procedure version; one already imported (409) is fine."""
    r = await client.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code in (201, 409), r.text


async def start_run(client: httpx.AsyncClient, procedure_id: str, inputs: dict[str, Any] | None = None,
                    version: str = "1") -> str:
    """``POST /api/runs`` for an imported procedure version; returns the run id."""
    r = await client.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": version,
                                             "input_vars": inputs or {}})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])
