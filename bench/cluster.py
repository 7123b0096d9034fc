"""Throughput of LangOrch on a local cluster with 1, 2 and 3 runtime replicas, the 1-replica figures measured in the
same run as the baseline.

One :class:`langorch.cluster.LocalCluster` (3 NATS nodes, every stream at R3, an embedded PostgreSQL, one gateway,
compiler and approvals replica, no triggers, 3 runtime replicas; each service a ``langorch serve`` process) serves
the three measurements: runtime-1 and runtime-2 are stopped for the first, runtime-1 is started for the second,
runtime-2 for the third. Each measurement creates ``--runs`` runs of a procedure with two agent steps (the agent,
tests/scripted_agent.py served by this process, answers after 10 ms) with ``--clients`` concurrent clients, after
``--warmup`` runs that are not counted, and waits until every one is terminal. Reported per replica count:

* ``runs_per_s``: runs completed / (last run terminal - first POST), and ``events_per_s`` (``LO_EVT`` messages
  appended meanwhile, per second);
* ``cpu_s_per_run``: CPU time (user + system, from /proc) of every LangOrch process and NATS server during the
  measurement, per run, in total and by kind (runtime replicas, gateway, other services, nats-server;
  PostgreSQL's is not counted);
* ``rss_mb``: the resident memory of each runtime replica at the end;
* ratios to the 1-replica baseline: ``runs_per_s`` and ``cpu_s_per_run``;
* the machine's 1-minute load average at the end (wall-clock figures mean little on a busy machine; CPU per run
  is steadier).

    uv run python bench/cluster.py [--runs 150] [--clients 10] [--warmup 20] [--state-dir DIR]

Prints one JSON object. On a machine of few cores the replicas share them: near-linear scaling is not expected,
but the cost of a run (``cpu_s_per_run``) must not grow with replicas.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the scripted agent of the tests

from ckp_core.subjects import EVENT_STREAM
from langorch.cluster import ClusterLayout, LocalCluster, ServiceProcess
from langorch_infra.jetstream import connect
from tests.scripted_agent import ScriptedAgent, serving
from tests.test_cluster_failover import AGENTS_DOC

AGENT_MS = 10
DOC = AGENTS_DOC  # the procedure of the failover tests: one sequence node of two agent steps
TERMINAL = ("completed", "failed", "canceled")
TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (0 when it is gone)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / TICKS


def rss_mb(pid: int | None) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return 0.0


def kind(p: ServiceProcess) -> str:
    return p.service if p.service in ("runtime", "gateway") else "other services"


def cpu_by_kind(cluster: LocalCluster) -> dict[str, float]:
    out: dict[str, float] = {"runtime": 0.0, "gateway": 0.0, "other services": 0.0, "nats-server": 0.0}
    for p in cluster.all_processes():
        if p.running:
            out[kind(p)] += cpu_s(p.pid)
    for node in cluster.nats.nodes:
        out["nats-server"] += cpu_s(node.proc.pid if node.proc is not None else None)
    return out


async def create(c: httpx.AsyncClient, n: int, clients: int) -> list[str]:
    todo = iter(range(n))
    ids: list[str] = []

    async def one_client() -> None:
        for _ in todo:
            r = await c.post("/api/runs", json={"procedure_id": DOC["procedure_id"], "procedure_version": "1"})
            r.raise_for_status()
            if r.status_code == 202:
                record = (await c.get(r.headers["Location"])).json()
                ids.append(str(record["resource"]).rsplit("/", 1)[1])
            else:
                ids.append(str(r.json()["run_id"]))

    await asyncio.gather(*(one_client() for _ in range(clients)))
    return ids


async def terminal(c: httpx.AsyncClient, run_ids: list[str], timeout: float = 600) -> dict[str, int]:
    """Poll until every run is terminal; the number of runs per status."""
    pending, statuses = set(run_ids), dict[str, int]()
    deadline = time.monotonic() + timeout
    while pending:
        for run_id in list(pending):
            status = (await c.get(f"/api/runs/{run_id}")).json().get("status")
            if status in TERMINAL:
                statuses[status] = statuses.get(status, 0) + 1
                pending.discard(run_id)
        if pending:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{len(pending)} runs not terminal after {timeout} s")
            await asyncio.sleep(0.25)
    return statuses


async def measure(cluster: LocalCluster, c: httpx.AsyncClient, js: Any, runs: int, clients: int,
                  warmup: int) -> dict[str, Any]:
    await terminal(c, await create(c, warmup, clients))
    events_before = (await js.stream_info(EVENT_STREAM)).state.messages
    cpu_before = cpu_by_kind(cluster)
    began = time.monotonic()
    run_ids = await create(c, runs, clients)
    statuses = await terminal(c, run_ids)
    elapsed = time.monotonic() - began
    cpu = {k: v - cpu_before[k] for k, v in cpu_by_kind(cluster).items()}
    events = (await js.stream_info(EVENT_STREAM)).state.messages - events_before
    live = [p for p in cluster.runtimes if p.running]
    return {
        "runtime_replicas": len(live), "runs": runs, "statuses": statuses, "seconds": round(elapsed, 2),
        "runs_per_s": round(statuses.get("completed", 0) / elapsed, 2), "events_per_s": round(events / elapsed, 1),
        "events_per_run": round(events / runs, 1),
        "cpu_s_per_run": round(sum(cpu.values()) / runs, 4),
        "cpu_s_per_run_by_kind": {k: round(v / runs, 4) for k, v in cpu.items()},
        "rss_mb": {p.name: rss_mb(p.pid) for p in live},
        "load_average_1m_at_end": round(os.getloadavg()[0], 1),  # others' load on the machine shows here
    }


async def bench(state: Path, runs: int, clients: int, warmup: int) -> dict[str, Any]:
    layout = ClusterLayout(nodes=3, runtimes=3, gateways=1, approvals=1, compilers=1, triggers=0)
    cluster = LocalCluster(state, layout, auth=False, fsync=False)
    await asyncio.to_thread(cluster.start, 240)
    agent = ScriptedAgent({"touch": lambda body: asyncio.sleep(AGENT_MS / 1000, {"ok": True})})
    nc = await connect(cluster.nats_url, "lo-bench-cluster")
    try:
        async with serving(agent), httpx.AsyncClient(base_url=cluster.gateway_url, timeout=60) as c:
            r = await c.post("/api/agents", json={"name": "bench-agent", "channel": "api",
                                                  "base_url": agent.base_url, "capabilities": ["touch"],
                                                  "concurrency_limit": 100})
            r.raise_for_status()
            (await c.post("/api/procedures", json={"ckp_json": DOC})).raise_for_status()
            for name in ("runtime-1", "runtime-2"):
                await asyncio.to_thread(cluster.process(name).stop)
            results = [await measure(cluster, c, nc.jetstream(), runs, clients, warmup)]
            for name in ("runtime-1", "runtime-2"):
                p = cluster.process(name)
                p.start()
                await asyncio.to_thread(cluster.wait_ready, 120, [p])
                results.append(await measure(cluster, c, nc.jetstream(), runs, clients, warmup))
    finally:
        await nc.close()
        await asyncio.to_thread(cluster.stop)
    base = results[0]
    for result in results:
        result["runs_per_s_vs_1_replica"] = round(result["runs_per_s"] / base["runs_per_s"], 2)
        result["cpu_s_per_run_vs_1_replica"] = round(result["cpu_s_per_run"] / base["cpu_s_per_run"], 2)
    return {"bench": "cluster", "cpus": os.cpu_count(), "agent_ms": AGENT_MS, "agent_steps_per_run": 2,
            "clients": clients, "nats_nodes": 3, "replicas_of_streams": 3, "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--runs", type=int, default=150)
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--state-dir", type=Path, help="the cluster's stores and logs (default: a temporary "
                        "directory, removed at the end)")
    args = parser.parse_args()
    state = args.state_dir or Path(tempfile.mkdtemp(prefix="langorch-bench-cluster-"))
    try:
        print(json.dumps(asyncio.run(bench(state, args.runs, args.clients, args.warmup)), indent=2))
    finally:
        if args.state_dir is None:
            shutil.rmtree(state, ignore_errors=True)


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
