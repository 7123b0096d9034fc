"""Small helpers shared by the cross-service tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx
from httpx_sse import aconnect_sse

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


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
