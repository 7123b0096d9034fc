"""The console's run list with 10,000 runs in the projection: server time of its pages, and when the page is
interactive in a real browser.

    uv run python bench/console.py [--runs 10000] [--requests 20]

The platform runs as in the tests (``platform_of``: the gateway under uvicorn, auth disabled, no runtime, so the
runs stay ``created``). The runs are ``run_created`` events appended to LO_EVT with the JetStream event store, as
the gateway appends them, then projected; nothing is written to the projection directly.

Measured, ``--requests`` times each after 3 warm-up requests (``httpx``, one connection): ``GET /ui/runs`` (the
first page of 50), its last page, a status-filtered page, and the dashboard (9 status counts, recent runs, pending
approvals); each beside ``GET /api/runs`` of the same page, the API read the page is built on. With Debian's
``chromium`` installed, Playwright loads ``/ui/runs`` and reports the Navigation Timing ``domInteractive`` and
``loadEventEnd`` (ms from navigation start).

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.api import pct
from bench.servers import bench_servers
from ckp_core.events import ANONYMOUS, RunCreated, make_event
from ckp_core.ids import new_id
from langorch_infra.jetstream import JetStreamEventStore
from tests.helpers import example, import_procedure, platform_of

BATCH = 200  # appends in flight at once while filling the projection


async def fill(store: JetStreamEventStore, runs: int) -> int:
    """Append ``runs`` new runs' ``run_created``; the highest stream position."""
    head = 0

    async def one() -> int:
        run_id = new_id()
        data = RunCreated(procedure_id="internal-variables", procedure_version="1.0.0", input_vars={"post_id": 1},
                          trigger_type="api", root_run_id=run_id)
        event = make_event(data, aggregate_id=run_id, seq=1, actor=ANONYMOUS, causation_id=new_id(),
                           correlation_id=run_id)
        [position] = await store.append([event], expected_position=0)
        return position

    for start in range(0, runs, BATCH):
        positions = await asyncio.gather(*(one() for _ in range(min(BATCH, runs - start))))
        head = max(head, *positions)
    return head


async def timed(client: httpx.AsyncClient, path: str, requests: int) -> dict[str, float]:
    for _ in range(3):
        (await client.get(path)).raise_for_status()
    took = []
    for _ in range(requests):
        started = time.perf_counter()
        (await client.get(path)).raise_for_status()
        took.append((time.perf_counter() - started) * 1000)
    return {"p50_ms": round(pct(took, 50), 1), "p95_ms": round(pct(took, 95), 1), "max_ms": round(max(took), 1)}


async def in_browser(url: str) -> dict[str, float] | str:
    executable = shutil.which("chromium")
    if executable is None:
        return "chromium not installed"
    from playwright.async_api import async_playwright

    async with async_playwright() as pw:
        browser = await pw.chromium.launch(executable_path=executable)
        page = await browser.new_page()
        await page.goto(url)  # warm-up: the browser's cache holds the scripts and styles after this
        samples: list[dict[str, float]] = []
        for _ in range(5):
            await page.goto(url, wait_until="load")
            samples.append(await page.evaluate(
                """() => { const n = performance.getEntriesByType("navigation")[0];
                           return {interactive: n.domInteractive, load: n.loadEventEnd}; }"""))
        await browser.close()
    return {"dom_interactive_ms_median": round(sorted(s["interactive"] for s in samples)[2], 1),
            "load_event_end_ms_median": round(sorted(s["load"] for s in samples)[2], 1)}


async def main(args: argparse.Namespace) -> dict[str, Any]:
    async with bench_servers("lo_bench_console") as (nats_url, db), \
            platform_of(nats_url, db, runtime=False, agents=False, approvals=False) as p:
        await import_procedure(p.client, example("internal_variables.ckp.json"))
        started = time.perf_counter()
        head = await fill(p.app.state.store, args.runs)
        if not await p.app.state.projector.wait(head, 600):
            raise TimeoutError(f"the projector did not reach {head}")
        filled_s = time.perf_counter() - started
        total = (await p.client.get("/api/runs", params={"limit": 1})).json()["total"]
        last = max(total - 50, 0)
        n = args.requests
        async with httpx.AsyncClient(base_url=p.base_url, timeout=60) as c:
            server = {
                "ui_runs_first_page": await timed(c, "/ui/runs", n),
                "api_runs_first_page": await timed(c, "/api/runs?limit=50", n),
                "ui_runs_last_page": await timed(c, f"/ui/runs?offset={last}", n),
                "api_runs_last_page": await timed(c, f"/api/runs?limit=50&offset={last}", n),
                "ui_runs_status_filter": await timed(c, "/ui/runs?status=created&status=failed", n),
                "ui_dashboard": await timed(c, "/ui/", n),
            }
        browser = await in_browser(f"{p.base_url}/ui/runs")
    return {"setup": {"runs_in_projection": total, "fill_seconds": round(filled_s, 1), "cpus": os.cpu_count(),
                      "server": "uvicorn, one process (gateway + compiler), auth disabled",
                      "client": "httpx in the same process, one connection"},
            "server_ms": server, "browser_runs_page": browser}


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10_000)
    parser.add_argument("--requests", type=int, default=20)
    print(json.dumps(asyncio.run(main(parser.parse_args())), indent=2))
