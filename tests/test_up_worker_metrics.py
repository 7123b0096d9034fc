"""The gateway's ``GET /metrics`` in ``langorch up`` adds up the worker processes' samples: two workers' counters
and histograms are summed per name and labels, ``langorch_build_info`` stays 1, a worker that does not answer (or
is not ready) is left out of the scrape."""

from __future__ import annotations

import http.server
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from langorch.workers import Worker, WorkerMetrics, WorkerPool
from langorch_infra.metrics import combined_registry, register_build_info
from tests.ports import free_port

pytestmark = pytest.mark.unit


def _registry(started: int, seconds: list[float]) -> CollectorRegistry:
    r = CollectorRegistry()
    register_build_info(r, "runtime", "0.1.0")
    Counter("langorch_run_started", "Runs started.", ["trigger_type"], registry=r).labels(
        trigger_type="api").inc(started)
    h = Histogram("langorch_node_seconds", "Node time.", registry=r, buckets=(0.1, 1.0))
    for s in seconds:
        h.observe(s)
    return r


@pytest.fixture
def serving() -> Iterator[list[int]]:
    """Two /metrics endpoints like two workers' (3 runs and 2 runs started)."""
    bodies = [generate_latest(_registry(3, [0.05, 0.5])), generate_latest(_registry(2, [2.0]))]
    servers = []
    for body in bodies:
        class Handler(http.server.BaseHTTPRequestHandler):
            payload = body

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/plain")
                self.end_headers()
                self.wfile.write(self.payload)

            def log_message(self, *args: object) -> None:
                pass

        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    yield [s.server_address[1] for s in servers]
    for server in servers:
        server.shutdown()


def _pool(ports: list[int | None]) -> WorkerPool:
    pool = WorkerPool(len(ports), Path("/nonexistent"))
    for i, port in enumerate(ports, 1):
        worker = Worker(i, Path("/nonexistent"))
        worker.metrics_port = port
        worker.ready.set()
        pool.workers.append(worker)
    return pool


def _samples(registry: CollectorRegistry) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for family in registry.collect()
            for s in family.samples}


def test_two_workers_samples_are_added_up_and_build_info_stays_one(serving: list[int]) -> None:
    got = _samples(combined_registry([WorkerMetrics(_pool(serving))]))
    assert got[("langorch_build_info", (("service", "runtime"), ("version", "0.1.0")))] == 1
    assert got[("langorch_run_started_total", (("trigger_type", "api"),))] == 5
    assert got[("langorch_node_seconds_count", ())] == 3
    assert got[("langorch_node_seconds_bucket", (("le", "0.1"),))] == 1
    assert got[("langorch_node_seconds_bucket", (("le", "1.0"),))] == 2
    assert got[("langorch_node_seconds_bucket", (("le", "+Inf"),))] == 3
    assert generate_latest(combined_registry([WorkerMetrics(_pool(serving))])).count(
        b"# TYPE langorch_run_started_total counter") == 1


def test_a_worker_that_does_not_answer_or_is_not_ready_is_left_out(serving: list[int]) -> None:
    pool = _pool([serving[0], free_port()])
    assert _samples(WorkerMetrics(pool))[("langorch_run_started_total", (("trigger_type", "api"),))] == 3
    pool = _pool(serving)
    pool.workers[0].ready.clear()
    assert _samples(WorkerMetrics(pool))[("langorch_run_started_total", (("trigger_type", "api"),))] == 2
