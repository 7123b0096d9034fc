"""Time of one 4-node run end to end (POST /api/runs → run_completed on the SSE stream), against the same
services, with the two JetStream/PostgreSQL baselines measured in the same process for comparison.

    uv run python bench/run_latency.py [--runs 20]

Prints JSON. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import time
from pathlib import Path

import asyncpg
import nats

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.servers import bench_servers
from tests.conftest import platform_of
from tests.helpers import example, follow_run, import_procedure


async def baseline_publish(url: str, n: int = 200) -> float:
    """JetStream publish awaiting each ack, per message (ms)."""
    nc = await nats.connect(url)
    js = nc.jetstream()
    await js.add_stream(name="BENCH", subjects=["bench.>"])
    t = time.perf_counter()
    for i in range(n):
        await js.publish("bench.x", str(i).encode())
    ms = (time.perf_counter() - t) * 1000 / n
    await js.delete_stream("BENCH")
    await nc.close()
    return ms


async def baseline_insert(url: str, n: int = 200) -> float:
    """asyncpg single-row insert, per row (ms)."""
    conn = await asyncpg.connect(url)
    await conn.execute("CREATE TEMP TABLE b (i int, s text)")
    t = time.perf_counter()
    for i in range(n):
        await conn.execute("INSERT INTO b VALUES ($1, $2)", i, "x")
    ms = (time.perf_counter() - t) * 1000 / n
    await conn.close()
    return ms


async def main(runs: int) -> dict[str, object]:
    async with bench_servers("lo_bench") as (nats_url, db):
        async with platform_of(nats_url, db) as p:
            await import_procedure(p.client, example("internal_variables.ckp.json"))
            times = []
            for _ in range(runs + 2):
                t = time.perf_counter()
                r = await p.client.post("/api/runs", json={"procedure_id": "internal-variables",
                                                           "procedure_version": "1.0.0"})
                events, end = await follow_run(p.client, r.json()["run_id"])
                assert end == "completed"
                times.append((time.perf_counter() - t) * 1000)
            times = times[2:]  # warm-up
            n_events = len(events)
        publish_ms = await baseline_publish(nats_url)
        insert_ms = await baseline_insert(db)
    median = statistics.median(times)
    return {
        "procedure": "internal_variables (4 nodes, 3 executed, 2 internal steps)",
        "runs": runs, "events_per_run": n_events,
        "run_end_to_end_ms": {"median": round(median, 1), "p90": round(sorted(times)[int(0.9 * len(times)) - 1], 1),
                              "min": round(min(times), 1)},
        "baseline_jetstream_publish_ms": round(publish_ms, 3),
        "baseline_asyncpg_insert_ms": round(insert_ms, 3),
        "ratio_run_to_one_publish": round(median / publish_ms, 1),
        "ratio_run_to_events_x_publish": round(median / (publish_ms * n_events), 2),
    }


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    print(json.dumps(asyncio.run(main(parser.parse_args().runs)), indent=2))
