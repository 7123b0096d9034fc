"""What authentication costs a request: the same read with auth disabled, with an API key, and with a user token.

Starts the platform in this process (as the tests do; embedded NATS and PostgreSQL unless
``LANGORCH_TEST_NATS_URL`` / ``LANGORCH_TEST_DATABASE_URL`` are set) twice on fresh databases — once with
``auth_enabled=false``, once with auth on and a bootstrap admin — and times ``GET /api/procedures?limit=1`` one
request at a time from one keep-alive client. The baseline is the auth-disabled gateway of the same run; the open
``GET /api/health`` of the auth-on gateway is reported alongside (no credential is checked there).

    python3 -m uv run python bench/auth.py [--requests 500] [--rounds 10]

Also an A/B of the API key cache on the auth-on gateway: the API key read from the projection at every request (the
cache's TTL set to 0, as keys were checked before they were cached) against the cached key, in alternating blocks.

Prints JSON: p50/p99 in ms per case, the CPU time of this process per request (``cpu_ms``: the server and the
client share it, and the client's part is the same in every case; steadier than the latencies on a shared
machine), and the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.servers import bench_servers, fresh_database
from tests.conftest import platform_of

WARMUP = 50
PASSWORD = "bench-admin-password-1"
SECRET_KEY = "bench-auth-secret-key-of-at-least-32-bytes"
CACHE_S = 30.0  # LANGORCH_AUTH_ROLE_CACHE_S's default


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


class Timed:
    """Answer times and the CPU time of this process over the requests of one case (possibly in several blocks)."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.cpu_s = 0.0

    def out(self) -> dict[str, float]:
        return {"p50_ms": round(pct(self.latencies, 50), 3), "p99_ms": round(pct(self.latencies, 99), 3),
                "cpu_ms": round(self.cpu_s / len(self.latencies) * 1000, 3)}


async def timed(client: httpx.AsyncClient, path: str, requests: int, headers: dict[str, str],
                into: Timed | None = None, warmup: int = WARMUP) -> Timed:
    into = into or Timed()
    for _ in range(warmup):
        assert (await client.get(path, headers=headers)).status_code == 200
    cpu = time.process_time()
    for _ in range(requests):
        started = time.perf_counter()
        r = await client.get(path, headers=headers)
        into.latencies.append((time.perf_counter() - started) * 1000)
        assert r.status_code == 200, r.text
    into.cpu_s += time.process_time() - cpu
    return into


async def main(requests: int, rounds: int) -> dict[str, Any]:
    path = "/api/procedures?limit=1"
    async with bench_servers("lo_bench_auth") as (nats_url, db):
        async with platform_of(nats_url, db, runtime=False, agents=False, approvals=False) as p:
            disabled = (await timed(p.client, path, requests, {})).out()
        auth_db = await fresh_database(db, "lo_bench_auth_on")
        async with platform_of(nats_url, auth_db, runtime=False, agents=False, approvals=False,
                               gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                                 "bootstrap_admin_password": PASSWORD}) as p:
            for _ in range(300):
                r = await p.client.post("/api/auth/login", json={"username": "admin", "password": PASSWORD})
                if r.status_code == 200:
                    break
                await asyncio.sleep(0.1)
            token = r.json()["access_token"]
            bearer = {"Authorization": f"Bearer {token}"}
            r = await p.client.post("/api/auth/api-keys", json={"name": "bench", "roles": ["viewer"]}, headers=bearer)
            api_key = {"X-API-Key": r.json()["key"]}
            with_key = await timed(p.client, path, requests, api_key)
            with_token = (await timed(p.client, path, requests, bearer)).out()
            health = (await timed(p.client, "/api/health", requests, {})).out()
            # the API key read from the projection at every request (as before the key cache) against the cached
            # one, in alternating blocks of the same gateway: the machine's load changes alike for both
            keys = getattr(authority_of(p.app), "keys", None)  # None: a gateway without the key cache
            cached, uncached = Timed(), Timed()
            block = max(1, requests // rounds)
            for _ in range(rounds if keys is not None else 0):
                keys.ttl_s = 0.0
                await timed(p.client, path, block, api_key, uncached, warmup=10)
                keys.ttl_s = CACHE_S
                await timed(p.client, path, block, api_key, cached, warmup=10)
    key = with_key.out()
    return {
        "request": f"GET {path}, sequential, one keep-alive connection, {requests} after {WARMUP} warm-up",
        "cpu_ms": "CPU time of this process (gateway and client) per request",
        "auth_disabled_baseline": disabled, "api_key": key, "user_token": with_token,
        "open_health_auth_on": health,
        "ratios_vs_disabled": {
            "api_key_p50": round(key["p50_ms"] / disabled["p50_ms"], 2),
            "user_token_p50": round(with_token["p50_ms"] / disabled["p50_ms"], 2),
            "api_key_p99": round(key["p99_ms"] / disabled["p99_ms"], 2),
            "user_token_p99": round(with_token["p99_ms"] / disabled["p99_ms"], 2),
            "api_key_cpu": round(key["cpu_ms"] / disabled["cpu_ms"], 2),
            "user_token_cpu": round(with_token["cpu_ms"] / disabled["cpu_ms"], 2),
        },
        "api_key_cache_ab": None if keys is None else {
            "blocks": f"{rounds} alternating blocks of {block} requests each",
            "read_every_request": uncached.out(), "cached": cached.out(),
            "cached_vs_read_cpu": round(cached.cpu_s / uncached.cpu_s, 2),
            "cached_vs_read_p50": round(pct(cached.latencies, 50) / pct(uncached.latencies, 50), 2),
        },
    }


def authority_of(app: Any) -> Any:
    return app.state.authenticator


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    parser.add_argument("--rounds", type=int, default=10, help="alternating blocks of the API key cache's A/B")
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests, args.rounds)), indent=2))
