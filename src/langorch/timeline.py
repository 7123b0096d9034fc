"""The ``langorch run`` client: import over the REST API, start a run, print the live SSE timeline."""

from __future__ import annotations

import json
from typing import Any

import httpx
from httpx_sse import aconnect_sse
from rich.console import Console

STATUS_COLORS = {"completed": "green", "failed": "red", "canceled": "yellow"}


def describe(event: dict[str, Any]) -> str:
    """One line for a run event."""
    p = event.get("payload", {})
    parts = [f"{event['seq']:>3} {event['event_type']:<20}"]
    if event.get("node_id"):
        parts.append(str(event["node_id"]))
    if event.get("step_id"):
        parts.append(f"/ {event['step_id']}")
    for key in ("level", "message", "next_node", "outputs", "error"):
        if key in p and p[key] is not None:
            parts.append(f"{key}={json.dumps(p[key], ensure_ascii=False)}")
    return " ".join(parts)


async def import_and_run(api: str, ckp: dict[str, Any], inputs: dict[str, Any], follow: bool,
                         console: Console) -> int:
    """Return the process exit code: 0 when the run completed (or was started without --follow)."""
    async with httpx.AsyncClient(base_url=api, timeout=30) as client:
        r = await client.post("/api/procedures", json={"ckp_json": ckp})
        if r.status_code == 409 and r.json().get("identical"):
            console.print(f"[dim]{ckp.get('procedure_id')}@{ckp.get('version')} already imported[/]")
        elif r.status_code != 201:
            console.print(f"[red]import failed ({r.status_code})[/]")
            console.print_json(r.text)
            return 1
        r = await client.post("/api/runs", json={"procedure_id": ckp["procedure_id"],
                                                 "procedure_version": ckp["version"], "input_vars": inputs})
        if r.status_code != 201:
            console.print(f"[red]run refused ({r.status_code})[/]")
            console.print_json(r.text)
            return 1
        run = r.json()
        console.print(f"run [bold]{run['run_id']}[/] created")
        if not follow:
            return 0
        status = "unknown"
        async with aconnect_sse(client, "GET", f"/api/runs/{run['run_id']}/stream",
                                timeout=httpx.Timeout(30, read=None)) as source:
            async for sse in source.aiter_sse():
                if sse.event == "run_event":
                    console.print(describe(json.loads(sse.data)), highlight=False)
                elif sse.event == "end":
                    status = json.loads(sse.data)["status"]
                    break
        console.print(f"run ended: [{STATUS_COLORS.get(status, 'white')}]{status}[/]")
        return 0 if status == "completed" else 1
