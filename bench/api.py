"""Gateway HTTP throughput/latency against an empty FastAPI endpoint, and the projector's lag behind LO_EVT.

    uv run python bench/api.py [--requests 3000] [--post-requests 1000] [--concurrency 32]
                               [--lag-rate 200] [--lag-seconds 10]
    uv run python bench/api.py --in-process [--requests 3000] [--rounds 10] [--profile FILE]

Process model: this process hosts the platform exactly like the tests (``tests.conftest.platform_of``: the
gateway under uvicorn plus compiler, runtime, agents and approvals on one event loop) and, on the same loop, an
empty FastAPI app under uvicorn with the same settings. The load comes from a separate client process
(``--load``, this same file) running ``--concurrency`` coroutines, each with its own httpx client and
keep-alive connection, so client and server share the 2 cores but not one event loop. Each measurement is preceded by a
warm-up of 200 requests that is not counted.

Measured:
* ``GET /api/runs/{id}`` of a completed internal_variables run vs ``GET /empty``;
* ``POST /api/runs`` (each request starts a real run, which the in-process runtime then executes) vs
  ``POST /empty`` with the same JSON body;
* the same ``POST /api/runs`` against a second gateway with no runtime, agents or approvals in the process
  (``post_run_gateway_only``: the gateway's own cost of starting a run, no run executing beside it);
* projection lag: ``run_created`` events of fresh runs appended to LO_EVT with the JetStream event store at a
  steady rate (paced on absolute ticks), and for each the time from its append (before the publish, and after the
  PubAck that gives its stream position) until the gateway's projector reports that position applied.

``--in-process`` measures only the CPU of one read instead: ``GET /api/runs/{id}`` of a completed run with an API key
(authentication on, as ``bench/load.py`` reads), served in this process through httpx's ASGI transport, against
``GET /empty`` of the empty app through the same transport, in alternating blocks (medians of the blocks; the
client's share is in both); ``--profile FILE`` then writes the cProfile statistics of ``--requests`` reads.

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import json
import os
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx
import nats
import uvicorn
from fastapi import FastAPI

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.servers import bench_servers, fresh_database
from ckp_core.events import ANONYMOUS, RunCreated, make_event
from ckp_core.ids import new_id
from langorch.server import ManagedServer
from langorch_infra.embedded import free_port
from langorch_infra.jetstream import JetStreamEventStore
from tests.conftest import platform_of
from tests.helpers import example, follow_run, import_procedure

RUN_BODY = {"procedure_id": "internal-variables", "procedure_version": "1.0.0"}
WARMUP = 200


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


# -- load generator (child process) -------------------------------------------------------------------------


async def load(url: str, method: str, body: str | None, requests: int, concurrency: int) -> dict[str, Any]:
    content = body.encode() if body is not None else None
    headers = {"Content-Type": "application/json"} if body is not None else {}
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    # one client (one keep-alive connection) per worker: a single httpx pool shared by 32 connections is itself
    # the bottleneck (measured here: ~390 req/s at 32 vs ~1,190 at 1 against the same empty endpoint)
    clients = [httpx.AsyncClient(limits=httpx.Limits(max_connections=1), timeout=60) for _ in range(concurrency)]

    async def worker(client: httpx.AsyncClient, count: list[int], record: bool) -> None:
        while count[0] > 0:
            count[0] -= 1
            t = time.perf_counter()
            r = await client.request(method, url, content=content, headers=headers)
            if record:
                latencies.append((time.perf_counter() - t) * 1000)
                statuses[str(r.status_code)] = statuses.get(str(r.status_code), 0) + 1

    try:
        await asyncio.gather(*(worker(cl, [WARMUP // concurrency + 1], False) for cl in clients))
        remaining = [requests]
        started = time.perf_counter()
        await asyncio.gather(*(worker(cl, remaining, True) for cl in clients))
        elapsed = time.perf_counter() - started
    finally:
        for cl in clients:
            await cl.aclose()
    return {"requests": requests, "seconds": round(elapsed, 3), "req_per_s": round(requests / elapsed, 1),
            "p50_ms": round(pct(latencies, 50), 2), "p99_ms": round(pct(latencies, 99), 2), "statuses": statuses}


async def measure(url: str, method: str, requests: int, concurrency: int, body: Any = None) -> dict[str, Any]:
    """Run the load generator in a child process while this process's loop keeps serving."""
    args = [sys.executable, __file__, "--load", url, "--method", method, "--requests", str(requests),
            "--concurrency", str(concurrency)]
    if body is not None:
        args += ["--body", json.dumps(body)]
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE)
    out, _ = await proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"load generator failed ({proc.returncode}) for {method} {url}")
    return json.loads(out)  # type: ignore[no-any-return]


# -- servers ------------------------------------------------------------------------------------------------


def empty_app() -> FastAPI:
    # FastAPI's own instrumentation off, as in the gateway (it turns itself on when a tracer provider is installed)
    app = FastAPI(telemetry={"tracing": False, "metrics": False, "logs": False, "operation_spans": False})

    @app.get("/empty")
    async def get_empty() -> dict[str, Any]:
        return {}

    @app.post("/empty")
    async def post_empty() -> dict[str, Any]:
        return {}

    return app


@contextlib.asynccontextmanager
async def serve_empty() -> Any:
    """The empty app under uvicorn, configured as the tests serve the gateway (tests.conftest._serve_gateway)."""
    port = free_port()
    server = ManagedServer(uvicorn.Config(empty_app(), host="127.0.0.1", port=port, log_level="warning",
                                          lifespan="on"))
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.025)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await task


# -- projection lag -----------------------------------------------------------------------------------------


async def projection_lag(nats_url: str, projector: Any, rate: float, seconds: float) -> dict[str, Any]:
    nc = await nats.connect(nats_url)
    store = JetStreamEventStore(nc.jetstream())
    from_send: list[float] = []
    from_ack: list[float] = []
    behind: list[int] = []
    head = [0]

    async def one() -> None:
        run_id = new_id()
        data = RunCreated(procedure_id="internal-variables", procedure_version="1.0.0", input_vars={"post_id": 1},
                          trigger_type="api", root_run_id=run_id)
        event = make_event(data, aggregate_id=run_id, seq=1, actor=ANONYMOUS, causation_id=new_id(),
                           correlation_id=run_id)
        sent = time.perf_counter()
        [position] = await store.append([event], expected_position=0)
        acked = time.perf_counter()
        head[0] = max(head[0], position)
        if not await projector.wait(position, 60):
            raise TimeoutError(f"projector did not reach {position}")
        applied = time.perf_counter()
        from_send.append((applied - sent) * 1000)
        from_ack.append((applied - acked) * 1000)

    async def sampler(stop: asyncio.Event) -> None:
        while not stop.is_set():
            if head[0]:
                behind.append(max(0, head[0] - projector.position))
            await asyncio.sleep(0.01)

    total = int(rate * seconds)
    stop = asyncio.Event()
    sampling = asyncio.create_task(sampler(stop))
    tasks = []
    started = time.perf_counter()
    for i in range(total):
        delay = started + i / rate - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        tasks.append(asyncio.create_task(one()))
    publish_seconds = time.perf_counter() - started
    await asyncio.gather(*tasks)
    stop.set()
    await sampling
    await nc.close()
    return {
        "events": total, "target_rate_per_s": rate, "achieved_rate_per_s": round(total / publish_seconds, 1),
        "lag_from_append_ms": {"p50": round(pct(from_send, 50), 2), "p99": round(pct(from_send, 99), 2),
                               "max": round(max(from_send), 2)},
        "lag_from_puback_ms": {"p50": round(pct(from_ack, 50), 2), "p99": round(pct(from_ack, 99), 2),
                               "max": round(max(from_ack), 2)},
        "events_behind_sampled_every_10ms": {"p50": pct([float(b) for b in behind], 50),
                                             "p99": pct([float(b) for b in behind], 99), "max": max(behind)},
    }


# -- CPU of one read, in process ---------------------------------------------------------------------------

SECRET_KEY = "bench-api-secret-key-of-at-least-32-bytes"
PASSWORD = "bench-admin-password-1"


async def cpu_per_request(client: httpx.AsyncClient, path: str, requests: int) -> float:
    """CPU seconds of this process per request (client and server share it)."""
    started = time.process_time()
    for _ in range(requests):
        r = await client.get(path)
        assert r.status_code == 200, r.text
    return (time.process_time() - started) / requests


async def in_process(requests: int, rounds: int, profile: str | None) -> dict[str, Any]:
    """The CPU of ``GET /api/runs/{id}`` with an API key (as bench/load.py reads), served in this process through
    httpx's ASGI transport (no sockets, no other process on the path), against ``GET /empty`` of an empty FastAPI
    app through the same transport; alternating blocks of both, so the machine's load changes alike for both."""
    auth_on = {"auth_enabled": True, "auth_secret_key": SECRET_KEY, "bootstrap_admin_password": PASSWORD}
    async with (bench_servers("lo_bench_api_cpu") as (nats_url, db),
                platform_of(nats_url, db, agents=False, approvals=False, gateway_settings=auth_on) as p):
            for _ in range(300):
                r = await p.client.post("/api/auth/login", json={"username": "admin", "password": PASSWORD})
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            bearer = {"Authorization": f"Bearer {r.json()['access_token']}"}
            r = await p.client.post("/api/auth/api-keys", json={"name": "bench", "roles": ["operator"]},
                                    headers=bearer)
            p.client.headers["X-API-Key"] = r.json()["key"]
            await import_procedure(p.client, example("internal_variables.ckp.json"))
            run_id = (await p.client.post("/api/runs", json=RUN_BODY)).json()["run_id"]
            _, end = await follow_run(p.client, run_id)
            assert end == "completed", end
            path = f"/api/runs/{run_id}"
            gateway = httpx.AsyncClient(transport=httpx.ASGITransport(app=p.app), base_url="http://gateway",
                                        headers={"X-API-Key": p.client.headers["X-API-Key"]})
            empty = httpx.AsyncClient(transport=httpx.ASGITransport(app=empty_app()), base_url="http://empty")
            async with gateway, empty:
                await cpu_per_request(gateway, path, WARMUP)
                await cpu_per_request(empty, "/empty", WARMUP)
                block = max(1, requests // rounds)
                run_cpu: list[float] = []
                empty_cpu: list[float] = []
                for _ in range(rounds):
                    run_cpu.append(await cpu_per_request(gateway, path, block))
                    empty_cpu.append(await cpu_per_request(empty, "/empty", block))
                if profile:
                    profiler = cProfile.Profile()
                    profiler.enable()
                    await cpu_per_request(gateway, path, requests)
                    profiler.disable()
                    profiler.dump_stats(profile)
    get_run, get_empty = sorted(run_cpu)[len(run_cpu) // 2] * 1000, sorted(empty_cpu)[len(empty_cpu) // 2] * 1000
    return {"request": f"GET /api/runs/{{id}} with an API key, in process, {rounds} blocks of {block}",
            "get_run_cpu_ms": round(get_run, 3), "get_empty_cpu_ms": round(get_empty, 3),
            "get_run_vs_empty_cpu": round(get_run / get_empty, 2), "profiled": bool(profile)}


# -- main ---------------------------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> dict[str, Any]:
    n, c = args.requests, args.concurrency
    async with bench_servers("lo_bench_api") as (nats_url, db):
        async with platform_of(nats_url, db) as p, serve_empty() as empty:
            await import_procedure(p.client, example("internal_variables.ckp.json"))
            r = await p.client.post("/api/runs", json=RUN_BODY)
            run_id = r.json()["run_id"]
            _, end = await follow_run(p.client, run_id)
            assert end == "completed", end
            get_run = await measure(f"{p.base_url}/api/runs/{run_id}", "GET", n, c)
            get_empty = await measure(f"{empty}/empty", "GET", n, c)
            post_run = await measure(f"{p.base_url}/api/runs", "POST", args.post_requests, c, RUN_BODY)
            post_empty = await measure(f"{empty}/empty", "POST", args.post_requests, c, RUN_BODY)
            await p.app.state.projector.catch_up(120)  # the POSTed runs' events are applied before the lag test
            lag = await projection_lag(nats_url, p.app.state.projector, args.lag_rate, args.lag_seconds)
        # the same POST with no runtime (nor agents, approvals) in the process: the gateway's own cost of a start
        gw_db = await fresh_database(db, "lo_bench_api_gw")
        async with platform_of(nats_url, gw_db, runtime=False, agents=False, approvals=False) as p:
            await p.app.state.projector.catch_up(120)
            post_run_gateway_only = await measure(f"{p.base_url}/api/runs", "POST", args.post_requests, c, RUN_BODY)
    return {
        "setup": {"concurrency": c, "cpus": os.cpu_count(), "server": "uvicorn, one process, one event loop "
                  "(gateway + services, empty app alongside)", "client": "separate process, httpx"},
        "get_run": get_run, "get_empty": get_empty, "post_run": post_run, "post_empty": post_empty,
        "post_run_gateway_only": post_run_gateway_only,
        "ratios": {
            "get_run_throughput_vs_empty": round(get_run["req_per_s"] / get_empty["req_per_s"], 3),
            "get_run_p50_vs_empty": round(get_run["p50_ms"] / get_empty["p50_ms"], 2),
            "get_run_p99_vs_empty": round(get_run["p99_ms"] / get_empty["p99_ms"], 2),
            "post_run_throughput_vs_empty": round(post_run["req_per_s"] / post_empty["req_per_s"], 3),
            "post_run_p99_vs_empty": round(post_run["p99_ms"] / post_empty["p99_ms"], 2),
            "post_run_gateway_only_throughput_vs_empty": round(
                post_run_gateway_only["req_per_s"] / post_empty["req_per_s"], 3),
            "post_run_gateway_only_p99_vs_empty": round(post_run_gateway_only["p99_ms"] / post_empty["p99_ms"], 2),
        },
        "projection_lag": lag,
    }


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--post-requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--lag-rate", type=float, default=200)
    parser.add_argument("--lag-seconds", type=float, default=10)
    parser.add_argument("--in-process", action="store_true", help="only the CPU of GET /api/runs/{id} served in "
                        "this process (API key, ASGI transport) against an empty app's GET through the same transport")
    parser.add_argument("--rounds", type=int, default=10, help="--in-process: alternating blocks")
    parser.add_argument("--profile", help="--in-process: write cProfile statistics of --requests reads to this file")
    parser.add_argument("--load", help=argparse.SUPPRESS)
    parser.add_argument("--method", help=argparse.SUPPRESS)
    parser.add_argument("--body", help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.load:
        print(json.dumps(asyncio.run(load(ns.load, ns.method, ns.body, ns.requests, ns.concurrency))))
    elif ns.in_process:
        print(json.dumps(asyncio.run(in_process(ns.requests, ns.rounds, ns.profile)), indent=2))
    else:
        print(json.dumps(asyncio.run(main(ns)), indent=2))
