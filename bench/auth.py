"""What authentication costs a request: the same read with auth disabled, with an API key, and with a user token.

Starts the platform in this process (as the tests do; embedded NATS and PostgreSQL unless
``LANGORCH_TEST_NATS_URL`` / ``LANGORCH_TEST_DATABASE_URL`` are set) twice on fresh databases — once with
``auth_enabled=false``, once with auth on and a bootstrap admin — and times ``GET /api/procedures?limit=1`` one
request at a time from one keep-alive client. The baseline is the auth-disabled gateway of the same run; the open
``GET /api/health`` of the auth-on gateway is reported alongside (no credential is checked there).

    python3 -m uv run python bench/auth.py [--requests 500]

Prints JSON: p50/p99 in ms per case and the ratios against the baseline.
"""

from __future__ import annotations

import argparse
import asyncio
import json
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


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


async def timed(client: httpx.AsyncClient, path: str, requests: int, headers: dict[str, str]) -> dict[str, float]:
    latencies = []
    for i in range(WARMUP + requests):
        started = time.perf_counter()
        r = await client.get(path, headers=headers)
        elapsed = (time.perf_counter() - started) * 1000
        assert r.status_code == 200, r.text
        if i >= WARMUP:
            latencies.append(elapsed)
    return {"p50_ms": round(pct(latencies, 50), 3), "p99_ms": round(pct(latencies, 99), 3)}


async def main(requests: int) -> dict[str, Any]:
    path = "/api/procedures?limit=1"
    async with bench_servers("lo_bench_auth") as (nats_url, db):
        async with platform_of(nats_url, db, runtime=False, agents=False, approvals=False) as p:
            disabled = await timed(p.client, path, requests, {})
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
            with_token = await timed(p.client, path, requests, bearer)
            health = await timed(p.client, "/api/health", requests, {})
    return {
        "request": f"GET {path}, sequential, one keep-alive connection, {requests} after {WARMUP} warm-up",
        "auth_disabled_baseline": disabled, "api_key": with_key, "user_token": with_token,
        "open_health_auth_on": health,
        "ratios_vs_disabled": {
            "api_key_p50": round(with_key["p50_ms"] / disabled["p50_ms"], 2),
            "user_token_p50": round(with_token["p50_ms"] / disabled["p50_ms"], 2),
            "api_key_p99": round(with_key["p99_ms"] / disabled["p99_ms"], 2),
            "user_token_p99": round(with_token["p99_ms"] / disabled["p99_ms"], 2),
        },
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=500)
    print(json.dumps(asyncio.run(main(parser.parse_args().requests)), indent=2))
