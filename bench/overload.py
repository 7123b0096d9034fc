"""Overload: runs started at twice the sustainable rate, against admission control (issue 19, Deliver 6).

Starts a local cluster (``langorch.cluster.LocalCluster``: a NATS cluster of ``--nodes`` with JetStream, PostgreSQL,
``--runtimes`` runtime replicas and one of every other service, each a ``langorch serve`` process), imports the
10-node internal procedure of bench/runtime.py, then:

1. **calibration** (skipped with ``--rate``): ``--calibrate-runs`` POSTs at once (5 x the runtime slots by
   default), then the rate at which the runs end while every slot is busy (between the 10th and 90th percentile of
   their ends): the sustainable rate R;
2. **configuration** for the latency bound ``--bound-s``, as docs/operations/overload.md says: an admitted run ends
   within ``(max_backlog + slots) / R`` (Little's law: it waits behind at most ``max_backlog`` queued runs and the
   runs holding every slot, ``runtimes x max_concurrent_runs``, which end at R per second), so
   ``LANGORCH_ADMISSION_MAX_BACKLOG = bound x R x headroom - slots`` (``--headroom`` 0.75: the rate drops when the
   machine is busier); the gateway is restarted with it (or with ``--max-backlog``);
3. **overload, admission on**: POSTs sent open-loop at 2R (spread over ``--clients`` concurrent clients) for
   ``--seconds``; a 429 is counted as refused (not retried), a 201/202 as accepted. Then every accepted run is
   waited for. Reported: accepted vs refused, the refusals' codes and ``Retry-After`` (all must be 429
   ``rate_limited`` with it), accepted runs' POST→completed latency p50/p99 (from the POST's send time to the run's
   ``ended_at``), runs lost (accepted and never completed), runs that appeared without an accepted POST;
4. **the baseline: the same overload with admission off** (the gateway restarted with
   ``LANGORCH_ADMISSION_MAX_BACKLOG=0``; skip with ``--no-unbounded``): what latency does without refusals.

Pass: admission-on p99 within ``--bound-s``, every refusal a 429 with Retry-After, no accepted run lost.

    python3 -m uv run python bench/overload.py [--nodes 3] [--runtimes 2] [--bound-s 10] [--seconds 30]
                                                [--max-concurrent-runs 16] [--rate R] [--no-unbounded]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

from langorch.cluster import ClusterLayout, LocalCluster

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "canceled")
DRAIN_S = 300.0
"""Longest wait for the accepted runs of a phase to end before the missing ones are counted as lost."""


def bench_module(name: str) -> ModuleType:
    """bench/<name>.py (its procedure generator, closed-loop clients and statistics)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


load = bench_module("load")


class Phase:
    """One overload phase's answers, by POST."""

    def __init__(self) -> None:
        self.sent_at: dict[str, float] = {}  # run id -> wall-clock time its POST was sent
        self.answered_at: dict[str, float] = {}  # run id -> wall-clock time its 201 arrived
        self.accepted = 0
        self.pending = 0  # 202: accepted, the run id not told yet
        self.refused = 0
        self.refusal_codes: dict[str, int] = {}
        self.refusals_without_retry_after = 0
        self.retry_after: set[str] = set()
        self.other: dict[str, int] = {}
        self.post_ms: list[float] = []


async def post(c: httpx.AsyncClient, procedure_id: str, phase: Phase) -> float | None:
    """One POST, its answer counted in ``phase``; the ``Retry-After`` seconds of a 429 (else None)."""
    sent = time.time()
    started = time.perf_counter()
    try:
        r = await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
    except httpx.HTTPError as exc:
        phase.other[type(exc).__name__] = phase.other.get(type(exc).__name__, 0) + 1
        return None
    phase.post_ms.append((time.perf_counter() - started) * 1000)
    if r.status_code == 201:
        phase.accepted += 1
        run_id = r.json()["run_id"]
        phase.sent_at[run_id], phase.answered_at[run_id] = sent, time.time()
    elif r.status_code == 202:
        phase.accepted += 1
        phase.pending += 1
    elif r.status_code == 429:
        phase.refused += 1
        code = str(r.json().get("code"))
        phase.refusal_codes[code] = phase.refusal_codes.get(code, 0) + 1
        if "retry-after" in r.headers:
            phase.retry_after.add(r.headers["retry-after"])
            return float(r.headers["retry-after"])
        phase.refusals_without_retry_after += 1
    else:
        phase.other[str(r.status_code)] = phase.other.get(str(r.status_code), 0) + 1
    return None


async def open_loop(c: httpx.AsyncClient, procedure_id: str, rate: float, seconds: float, clients: int) -> Phase:
    """POSTs at ``rate`` per second for ``seconds``, each client sending every ``clients / rate`` seconds on its own
    schedule (a slow answer delays only that client's next POST)."""
    phase = Phase()
    interval = clients / rate
    begin = time.perf_counter()

    async def client(i: int) -> None:
        due = begin + i * interval / clients
        while due < begin + seconds:
            await asyncio.sleep(max(0.0, due - time.perf_counter()))
            await post(c, procedure_id, phase)
            due += interval

    await asyncio.gather(*(client(i) for i in range(clients)))
    return phase


async def runs_of(c: httpx.AsyncClient, procedure_id: str) -> list[dict[str, Any]]:
    """Every run of ``procedure_id`` (paged)."""
    out: list[dict[str, Any]] = []
    while True:
        r = await c.get("/api/runs", params={"procedure_id": procedure_id, "limit": 500, "offset": len(out),
                                             "order": "asc"})
        r.raise_for_status()
        items = r.json()["items"]
        out += items
        if len(items) < 500:
            return out


async def drained(c: httpx.AsyncClient, procedure_id: str, phase: Phase) -> list[dict[str, Any]]:
    """The runs once every accepted one ended (or ``DRAIN_S`` passed)."""
    deadline = time.monotonic() + DRAIN_S
    while True:
        runs = await runs_of(c, procedure_id)
        if (len(runs) >= phase.accepted and all(r["status"] in TERMINAL for r in runs)) or time.monotonic() > deadline:
            return runs
        await asyncio.sleep(1.0)


def seconds_of(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def report(phase: Phase, runs: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    by_id = {r["run_id"]: r for r in runs}

    def until_end(since: dict[str, float]) -> list[float]:
        return [seconds_of(by_id[i]["ended_at"]) - t for i, t in since.items()
                if i in by_id and by_id[i]["status"] == "completed" and by_id[i].get("ended_at")]

    latency_s, queued_s = until_end(phase.sent_at), until_end(phase.answered_at)
    completed = sum(1 for r in runs if r["status"] == "completed")
    statuses: dict[str, int] = {}
    for r in runs:
        statuses[r["status"]] = statuses.get(r["status"], 0) + 1
    return {
        "posts": phase.accepted + phase.refused + sum(phase.other.values()),
        "posts_per_s": round((phase.accepted + phase.refused + sum(phase.other.values())) / seconds, 2),
        "accepted": phase.accepted, "accepted_pending_202": phase.pending, "refused": phase.refused,
        "refusal_codes": phase.refusal_codes, "refusals_without_retry_after": phase.refusals_without_retry_after,
        "retry_after_values": sorted(phase.retry_after), "other_answers": phase.other,
        "runs_seen": len(runs), "runs_by_status": statuses,
        "completed": completed,
        "completed_runs_per_s": round(rate, 2) if (rate := end_rate(runs)) is not None else None,
        # accepted and never seen, or seen and not ended when the drain gave up
        "lost_accepted_runs": max(0, phase.accepted - len(runs)) + sum(1 for r in runs if r["status"] not in TERMINAL),
        "runs_without_accepted_post": max(0, len(runs) - phase.accepted),
        "latency_post_to_completed_s": {"p50": load.percentile(latency_s, 0.5),
                                        "p99": load.percentile(latency_s, 0.99),
                                        "max": round(max(latency_s), 2) if latency_s else None,
                                        "n": len(latency_s)},
        # from the 201 (the run created, its start queued) to its end: what the Little's-law bound covers
        "latency_answer_to_completed_s": {"p50": load.percentile(queued_s, 0.5),
                                          "p99": load.percentile(queued_s, 0.99)},
        "post_ms": load.summary(phase.post_ms),
    }


async def calibrate(c: httpx.AsyncClient, procedure_id: str, runs: int, clients: int) -> dict[str, Any]:
    """The sustainable rate: ``runs`` POSTs at once (one refused is sent again after its ``Retry-After``, so the
    runtime stays saturated), then the rate at which they end (between the 10th and the 90th percentile of their
    ends, leaving out the ramp-up and the tail)."""
    phase = Phase()
    todo = iter(range(runs))

    async def client() -> None:
        for _ in todo:
            while (wait := await post(c, procedure_id, phase)) is not None:
                await asyncio.sleep(wait)

    await asyncio.gather(*(client() for _ in range(clients)))
    runs_done = await drained(c, procedure_id, phase)
    rate = end_rate(runs_done)
    if rate is None:
        raise SystemExit("too few calibration runs completed to tell a rate")
    return {"posted": runs, "accepted": phase.accepted, "refused": phase.refused,
            "completed": sum(1 for r in runs_done if r["status"] == "completed"),
            "sustainable_runs_per_s": round(rate, 2)}


def end_rate(runs: list[dict[str, Any]]) -> float | None:
    """Runs completed per second between the 10th and the 90th percentile of their ends (the ramp-up and the tail
    left out); None for fewer than 10 runs."""
    ended = sorted(seconds_of(r["ended_at"]) for r in runs if r["status"] == "completed" and r.get("ended_at"))
    if len(ended) < 10:
        return None
    first, last = int(0.1 * len(ended)), int(0.9 * len(ended))
    return (last - first) / max(ended[last] - ended[first], 1e-3)


async def import_as(c: httpx.AsyncClient, doc: dict[str, Any], procedure_id: str) -> None:
    r = await c.post("/api/procedures", json={"ckp_json": {**doc, "procedure_id": procedure_id}})
    assert r.status_code in (200, 201), r.text


async def overload(c: httpx.AsyncClient, doc: dict[str, Any], procedure_id: str, rate: float,
                   args: argparse.Namespace) -> dict[str, Any]:
    await import_as(c, doc, procedure_id)
    phase = await open_loop(c, procedure_id, rate, args.seconds, args.clients)
    return report(phase, await drained(c, procedure_id, phase), args.seconds)


def backlog_for(bound_s: float, rate: float, slots: int, headroom: float) -> int:
    """The admission limit for a latency bound (docs/operations/overload.md, Choosing the limit): an admitted run
    ends within ``(max_backlog + slots) / R``, sized for ``headroom`` x the measured rate R (the rate drops when the
    machine is busier)."""
    return max(1, int(bound_s * rate * headroom) - slots)


def with_backlog_limit(cluster: LocalCluster, limit: int) -> None:
    """Restart the gateway with ``LANGORCH_ADMISSION_MAX_BACKLOG=limit`` (0: off)."""
    gateway = cluster.gateways[0]
    gateway.env["LANGORCH_ADMISSION_MAX_BACKLOG"] = str(limit)
    cluster.restart(gateway.name)


async def measure(cluster: LocalCluster, args: argparse.Namespace) -> dict[str, Any]:
    doc = bench_module("runtime").ten_node_procedure()
    slots = args.runtimes * args.max_concurrent_runs
    base = cluster.gateway_url
    out: dict[str, Any] = {}
    limits = httpx.Limits(max_connections=args.clients + 8, max_keepalive_connections=args.clients + 8,
                          keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        await import_as(c, doc, "ovl_calibration")
        if args.rate:
            rate = args.rate
            out["calibration"] = {"rate_given": args.rate}
        else:
            out["calibration"] = await calibrate(c, "ovl_calibration", args.calibrate_runs or 5 * slots,
                                                 args.clients)
            rate = out["calibration"]["sustainable_runs_per_s"]
    offered = 2 * rate
    bound_s = args.bound_s
    max_backlog = args.max_backlog or backlog_for(bound_s, rate, slots, args.headroom)
    with_backlog_limit(cluster, max_backlog)
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
        bounded = await overload(c, doc, "ovl_admission_on", offered, args)
    measured = bounded["completed_runs_per_s"]
    out["admission_on"] = {
        "configured_bound_s": bound_s, "max_backlog": max_backlog, "slots": slots,
        "offered_runs_per_s": round(offered, 2),
        # Little's law at the rate the runtime kept during this phase: (max_backlog + slots) / R
        "estimate_at_phase_rate_s": round((max_backlog + slots) / measured, 2) if measured else None, **bounded}
    if args.unbounded:
        with_backlog_limit(cluster, 0)
        async with httpx.AsyncClient(base_url=base, timeout=120, limits=limits) as c:
            out["admission_off"] = {"offered_runs_per_s": round(offered, 2),
                                    **await overload(c, doc, "ovl_admission_off", offered, args)}
    on = out["admission_on"]
    p99 = on["latency_post_to_completed_s"]["p99"]
    out["checks"] = {
        "accepted_p99_within_bound": p99 is not None and p99 <= bound_s,
        "some_refused": on["refused"] > 0,
        "every_refusal_429_rate_limited_with_retry_after": set(on["refusal_codes"]) <= {"rate_limited"}
        and on["refusals_without_retry_after"] == 0,
        "no_accepted_run_lost": on["lost_accepted_runs"] == 0,
        "no_run_without_an_accepted_post": on["runs_without_accepted_post"] == 0,
    }
    if "admission_off" in out and p99:
        off_p99 = out["admission_off"]["latency_post_to_completed_s"]["p99"]
        out["ratio_p99_admission_off_to_on"] = round(off_p99 / p99, 2) if off_p99 else None
    return out


def main(args: argparse.Namespace) -> dict[str, Any]:
    state = Path(tempfile.mkdtemp(prefix="langorch-bench-overload-"))
    layout = ClusterLayout(nodes=args.nodes, runtimes=args.runtimes, gateways=1, approvals=1, compilers=1, triggers=1)
    cluster = LocalCluster(state, layout, auth=False, fsync=False,
                           env={"LANGORCH_ADMISSION_MAX_BACKLOG": "0",  # set after the calibration
                                "LANGORCH_MAX_CONCURRENT_RUNS": str(args.max_concurrent_runs)})
    try:
        cluster.start()
        result = asyncio.run(measure(cluster, args))
    finally:
        cluster.stop()
        shutil.rmtree(state, ignore_errors=True)
    return {"machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                        "load_average_1m": round(os.getloadavg()[0], 2)},
            "cluster": {"nats_nodes": args.nodes, "runtime_replicas": args.runtimes, "gateways": 1},
            "procedure": "bench/runtime.py ten_node_procedure(): 8 sequence nodes x (set_variable, calculate, log) "
                         "+ logic + terminate",
            "overload_seconds": args.seconds, "clients": args.clients, **result}


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3, help="NATS cluster members")
    parser.add_argument("--runtimes", type=int, default=2, help="runtime replicas")
    parser.add_argument("--bound-s", type=float, default=10.0, help="the latency bound admission control is "
                        "configured for: accepted runs' POST-to-end p99 must stay within it")
    parser.add_argument("--headroom", type=float, default=0.75, help="the limit is sized for this fraction of "
                        "the measured rate")
    parser.add_argument("--max-backlog", type=int, default=None, help="LANGORCH_ADMISSION_MAX_BACKLOG (default: "
                        "from --bound-s, the measured rate and --headroom)")
    parser.add_argument("--rate", type=float, default=None, help="the sustainable rate (runs/s); default: measured")
    parser.add_argument("--max-concurrent-runs", type=int, default=16, help="LANGORCH_MAX_CONCURRENT_RUNS")
    parser.add_argument("--calibrate-runs", type=int, default=None, help="runs posted at once to find the "
                        "sustainable rate (default: 5 x the runtime slots)")
    parser.add_argument("--seconds", type=float, default=30.0, help="length of each overload phase")
    parser.add_argument("--clients", type=int, default=32, help="concurrent clients of the overload phases")
    parser.add_argument("--no-unbounded", dest="unbounded", action="store_false",
                        help="skip the phase with admission off")
    print(json.dumps(main(parser.parse_args()), indent=2))
