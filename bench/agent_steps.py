"""A run of 40 agent steps, with its baselines measured in the same run on the same machine.

The procedure has 40 sequential ``sequence`` nodes of one agent step each; the agent (tests/scripted_agent.py,
served in this process like the platform) answers every step after AGENT_MS. Measured:

* end to end: ``POST /api/runs`` → ``run_completed`` (seen on a core NATS subscription, so waiting costs the
  gateway nothing), per run; goal ≤ 600 ms, i.e. ≤ 5 ms of overhead per step over the 10 ms the agent takes;
* per step: ``step_started`` → ``step_completed`` event timestamps (lease, the HTTP call, lease release, the step
  record written) against one direct httpx POST of the same request to the same agent; goal ≤ 1.5×;
* baselines, between the runs so that they share the machine's load: 40 sequential direct POSTs (the floor of a
  run) and a direct POST per call;
* this process's CPU time per run and per 40 direct POSTs (less sensitive to a busy machine than wall time: the
  gateway, runtime and agent all run here; NATS and PostgreSQL are other processes).

    uv run python bench/agent_steps.py [--runs 8] [--profile FILE] [--nats-delay-ms MS] [--up [--nats-sync S]]

``--profile FILE``: after the measured runs, a few more runs under cProfile timed by this process's CPU time (the
whole process: gateway, runtime and agent share one event loop; waiting and other processes' load do not count),
stats written to FILE (``python -m pstats FILE``); their times are not reported.

``--up``: the same runs through ``langorch up`` as it is deployed on one machine instead (the gateway in its own
process, the runtime in its worker process, the agent in a third process: the bench's own ``--serve-agent``),
started on a fresh state directory; a run is timed from just before its ``POST /api/runs`` to its
``run_completed`` event's timestamp (one clock: the same machine), read with the run's events once it has ended.
Reported beside the same baseline of 40 direct POSTs from this process, and each process's CPU time per run.
``--nats-sync`` (with ``--up``) is handed to ``langorch up``: ``always`` (its default) or a duration such as ``2m``.

``--nats-delay-ms MS``: every NATS request of this process (appends, KV reads and writes, API calls) waits MS more
before it is sent, as on a network that much slower: the round trips one after the other on a step's path then
decide its time rather than the machine's load, so a change in their number shows on a busy machine.

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import itertools
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.load import ROOT, Up, cpu_by_kind, free_port, postmaster_pid
from bench.runtime import Completions, run_events, start, stats
from bench.servers import bench_servers
from ckp_core.ir import NodeIR, SequencePayload
from langorch_infra import hosting, loops
from langorch_runtime.machine import DispatchRequest
from tests.conftest import platform_of
from tests.helpers import import_procedure
from tests.scripted_agent import ScriptedAgent, serving

NODES = 40
AGENT_MS = 10
PROFILED_RUNS = 3
DISPATCHES = 100


def forty_steps() -> dict[str, Any]:
    """40 sequence nodes, each one step dispatched to the ``bench`` channel; the last ends the run."""
    nodes = {f"n{i}": {"type": "sequence", "agent": "BENCH", **({"next_node": f"n{i + 1}"} if i < NODES else {}),
                       "steps": [{"step_id": "work", "action": "work", "n": i, "output_variable": f"r{i}"}]}
             for i in range(1, NODES + 1)}
    return {"procedure_id": "bench_forty_agent_steps", "version": "1",
            "workflow_graph": {"start_node": "n1", "nodes": nodes}}


async def work(body: dict[str, Any]) -> dict[str, Any]:
    await asyncio.sleep(AGENT_MS / 1000)
    return {"n": body["params"]["n"]}


async def direct_posts(http: httpx.AsyncClient, base_url: str, label: str) -> tuple[float, list[float]]:
    """40 sequential POSTs of the runtime's request shape straight to the agent: (total ms, ms per POST)."""
    each: list[float] = []
    began = time.perf_counter()
    for i in range(1, NODES + 1):
        key = f"lo1:{label}:n{i}:work:-:1"
        body = {"action": "work", "params": {"n": i}, "run_id": label, "node_id": f"n{i}", "step_id": "work",
                "attempt": 1, "idempotency_key": key, "deadline_at": None, "dispatch_mode": "tool", "callback": None}
        t = time.perf_counter()
        r = await http.post(f"{base_url}/execute", json=body, headers={"Idempotency-Key": key})
        each.append((time.perf_counter() - t) * 1000)
        assert r.json() == {"status": "success", "result": {"n": i}}, r.text
    return (time.perf_counter() - began) * 1000, each


GAPS = (("node_started", "step_started"), ("step_started", "step_completed"), ("step_completed", "node_completed"),
        ("node_completed", "node_started"))


def gaps_ms(events: list[tuple[str, float]]) -> dict[str, list[float]]:
    """The time between consecutive events (type, timestamp in seconds) of each kind in ``GAPS`` (a node's own
    events, then the next node's start): where a node's time goes."""
    out: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in GAPS}
    for (a, at), (b, bt) in itertools.pairwise(events):
        if (a, b) in GAPS:
            out[f"{a}->{b}"].append((bt - at) * 1000)
    return out


def step_ms(events: list[Any]) -> list[float]:
    """``step_started`` → ``step_completed`` of every step of a run (event timestamps)."""
    started = {e.data["node_id"]: e.occurred_at for e in events if e.type == "step_started"}
    return [(e.occurred_at - started[e.data["node_id"]]).total_seconds() * 1000
            for e in events if e.type == "step_completed"]


async def dispatcher_alone(dispatcher: Any, http: httpx.AsyncClient, base_url: str) -> dict[str, list[float]]:
    """The runtime's ``AgentDispatcher.dispatch`` on its own (candidates, lease, call, release), the same request
    as a step's, alternating with a direct POST of it: the dispatch path without the run around it (events, step
    records, checkpoints). Also the NATS messages the dispatcher's connection sends per dispatch."""
    node = NodeIR(id="n1", type="sequence", agent="BENCH", channel="bench", orchestrator=False,
                  payload=SequencePayload())
    out: dict[str, list[float]] = {"dispatch_ms": [], "direct_ms": [], "nats_messages": []}
    for i in range(DISPATCHES + 5):
        key = f"lo1:bench-dispatcher:n1:work:-:{i + 1}"
        request = DispatchRequest(node=node, step_id="work", action="work", channel="bench", params={"n": i},
                                  attempt=i + 1, idempotency_key=key, frame="-", timeout_ms=None,
                                  dispatch_mode="sync", run_id="bench-dispatcher", procedure_id="bench")
        sent = dispatcher._nc.stats["out_msgs"]
        t = time.perf_counter()
        assert await dispatcher.dispatch(request) == {"n": i}
        elapsed = (time.perf_counter() - t) * 1000
        messages = dispatcher._nc.stats["out_msgs"] - sent
        body = {"action": "work", "params": {"n": i}, "run_id": "bench-direct-d", "node_id": "n1", "step_id": "work",
                "attempt": i + 1, "idempotency_key": key + ":d", "deadline_at": None, "dispatch_mode": "tool",
                "callback": None}
        t = time.perf_counter()
        r = await http.post(f"{base_url}/execute", json=body, headers={"Idempotency-Key": key + ":d"})
        direct = (time.perf_counter() - t) * 1000
        assert r.status_code == 200, r.text
        if i >= 5:
            out["dispatch_ms"].append(elapsed)
            out["direct_ms"].append(direct)
            out["nats_messages"].append(messages)
    await asyncio.sleep(0.05)  # the last release lands before the servers stop
    return out


async def bench(nats_url: str, db: str, runs: int, profile: str | None) -> dict[str, Any]:
    agent = ScriptedAgent({"work": work})
    async with (serving(agent), platform_of(nats_url, db) as p, Completions(nats_url) as ends,
                httpx.AsyncClient(timeout=30) as http):
        settle()
        c = p.client
        r = await c.post("/api/agents", json={"name": "bench-agent", "channel": "bench", "base_url": agent.base_url,
                                              "capabilities": ["work"], "concurrency_limit": 4})
        assert r.status_code == 201, r.text
        doc = forty_steps()
        await import_procedure(c, doc)

        async def one_run() -> tuple[float, float, list[Any]]:
            t, cpu = time.perf_counter(), time.process_time()
            run_id = await start(c, doc["procedure_id"])
            await ends.wait(run_id, timeout=120)
            elapsed, cpu = (time.perf_counter() - t) * 1000, (time.process_time() - cpu) * 1000
            return elapsed, cpu, await run_events(nats_url, run_id)

        for i in range(2):  # warm-up: connections, caches, the compiled graph
            await one_run()
            await direct_posts(http, agent.base_url, f"warm-{i}")
        e2e: list[float] = []
        cpu_run: list[float] = []
        cpu_floor: list[float] = []
        per_step: list[float] = []
        floor: list[float] = []
        direct: list[float] = []
        n_events = 0
        gaps: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in GAPS}
        for i in range(runs):  # alternate, so that a platform run and its baseline see the same load
            elapsed, cpu, events = await one_run()
            assert sum(e.type == "step_completed" for e in events) == NODES, [e.type for e in events]
            e2e.append(elapsed)
            cpu_run.append(cpu)
            per_step.extend(step_ms(events))
            for name, values in gaps_ms([(e.type, e.occurred_at.timestamp()) for e in events]).items():
                gaps[name].extend(values)
            n_events = len(events)
            cpu = time.process_time()
            total, each = await direct_posts(http, agent.base_url, f"direct-{i}")
            cpu_floor.append((time.process_time() - cpu) * 1000)
            floor.append(total)
            direct.extend(each)
        alone = await dispatcher_alone(p.runtime_service.dispatcher, http, agent.base_url)
        if profile:
            profiler = cProfile.Profile(time.process_time)  # CPU time: other processes' load does not count
            profiler.enable()
            for _ in range(PROFILED_RUNS):
                await one_run()
            profiler.disable()
            profiler.dump_stats(profile)
        assert len(agent.executed) == len(set(agent.executed))  # no key executed twice
    e2e_s, floor_s, step_s, direct_s = stats(e2e), stats(floor), stats(per_step), stats(direct)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "procedure": f"{NODES} sequence nodes x 1 agent step; the agent answers after {AGENT_MS} ms",
        "runs": runs, "events_per_run": n_events,
        "run_end_to_end_ms": e2e_s,
        "baseline_40_direct_posts_ms": floor_s,
        "overhead_per_step_ms": round((e2e_s["median"] - floor_s["median"]) / NODES, 3),
        "goal_run_ms": NODES * (AGENT_MS + 5),
        "ratio_run_to_direct_posts": round(e2e_s["median"] / floor_s["median"], 2),
        "process_cpu_ms_per_run": stats(cpu_run),
        "baseline_process_cpu_ms_40_direct_posts": stats(cpu_floor),
        "step_started_to_completed_ms": step_s,
        "baseline_direct_post_ms": direct_s,
        "ratio_step_to_direct_post_median": round(step_s["median"] / direct_s["median"], 2),
        "ratio_step_to_direct_post_p90": round(step_s["p90"] / direct_s["p90"], 2),
        "goal_ratio_step_to_direct_post": 1.5,
        "dispatcher_alone": {
            "what": f"AgentDispatcher.dispatch of the same request {DISPATCHES} times (no run around it), "
                    "alternating with a direct POST",
            "dispatch_ms": stats(alone["dispatch_ms"]),
            "direct_post_ms": stats(alone["direct_ms"]),
            "ratio_median": round(stats(alone["dispatch_ms"])["median"] / stats(alone["direct_ms"])["median"], 2),
            "overhead_ms_median": round(stats(alone["dispatch_ms"])["median"] - stats(alone["direct_ms"])["median"],
                                        3),
            "nats_messages_per_dispatch": stats(alone["nats_messages"])["median"],
        },
        "event_gaps_median_ms": {name: round(stats(values)["median"], 3) for name, values in gaps.items() if values},
        "profile": profile,
        "note": "gateway, runtime, agent and the direct client share one process and event loop; run = POST "
                "/api/runs -> run_completed; step = step_started -> step_completed event timestamps",
    }


def serve_agent() -> None:
    """``--serve-agent``: the bench's agent in a process of its own; prints its base URL, serves until stdin ends."""
    async def serve() -> None:
        agent = ScriptedAgent({"work": work})
        async with serving(agent):
            print(agent.base_url, flush=True)
            await asyncio.get_running_loop().run_in_executor(None, sys.stdin.read)

    loops.run(serve())


async def ended_events(c: httpx.AsyncClient, run_id: str) -> list[dict[str, Any]]:
    """The run's events once it has ended and its ``run_completed`` is projected (polled every 50 ms: the run is
    timed by its events' timestamps, not by this loop)."""
    deadline = time.monotonic() + 120
    while True:
        r = await c.get(f"/api/runs/{run_id}/events", params={"limit": 500})
        events: list[dict[str, Any]] = r.json()["items"] if r.status_code == 200 else []
        if any(e["event_type"] == "run_completed" for e in events):
            return events
        assert not any(e["event_type"] in ("run_failed", "run_canceled") for e in events), events[-3:]
        assert time.monotonic() < deadline, f"run {run_id} did not complete"
        await asyncio.sleep(0.05)


def _at(event: dict[str, Any]) -> float:
    return datetime.fromisoformat(event["created_at"].replace("Z", "+00:00")).timestamp()


def bench_up(runs: int, nats_sync: str = "always") -> dict[str, Any]:
    """The runs through ``langorch up`` (gateway, worker and agent in three processes); see ``--up``."""
    tmp = Path(tempfile.mkdtemp(prefix="langorch-bench-agent-steps-"))
    port = free_port()
    up = Up(tmp / "state", port, ["--nats-sync", nats_sync])
    agent = subprocess.Popen([sys.executable, __file__, "--serve-agent"], cwd=ROOT, stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert agent.stdout is not None
        agent_url = agent.stdout.readline().strip()
        up.wait_up()
        measured = loops.run(measure_up(tmp / "state", port, agent_url, [up.proc.pid, agent.pid], runs))
    finally:
        up.stop()
        if agent.stdin is not None:
            agent.stdin.close()
        agent.wait(30)
        shutil.rmtree(tmp, ignore_errors=True)
    return {**measured, "nats_sync": nats_sync}


async def measure_up(state: Path, port: int, agent_url: str, pids: list[int], runs: int) -> dict[str, Any]:
    headers = {"X-API-Key": (state / "api-key").read_text().strip()}
    roots = [*pids, postmaster_pid(state / "postgres" / "pgdata")]
    async with (httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", headers=headers, timeout=60) as c,
                httpx.AsyncClient(timeout=30) as http):
        r = await c.post("/api/agents", json={"name": "bench-agent", "channel": "bench", "base_url": agent_url,
                                              "capabilities": ["work"], "concurrency_limit": 4})
        assert r.status_code == 201, r.text
        doc = forty_steps()
        r = await c.post("/api/procedures", json={"ckp_json": doc})
        assert r.status_code in (200, 201), r.text

        async def one_run() -> tuple[float, list[dict[str, Any]]]:
            sent = time.time()
            r = await c.post("/api/runs", json={"procedure_id": doc["procedure_id"], "procedure_version": "1"})
            assert r.status_code == 201, r.text
            events = await ended_events(c, r.json()["run_id"])
            ended = next(e for e in events if e["event_type"] == "run_completed")
            return (_at(ended) - sent) * 1000, events

        for i in range(2):  # warm-up
            await one_run()
            await direct_posts(http, agent_url, f"warm-{i}")
        e2e: list[float] = []
        floor: list[float] = []
        gaps: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in GAPS}
        cpu: dict[str, float] = {}
        for i in range(runs):  # alternate, so that a run and its baseline see the same load
            before = cpu_by_kind(roots)
            elapsed, events = await one_run()
            for kind, used in cpu_by_kind(roots).items():
                cpu[kind] = cpu.get(kind, 0.0) + used - before.get(kind, 0.0)
            e2e.append(elapsed)
            for name, values in gaps_ms([(e["event_type"], _at(e)) for e in events]).items():
                gaps[name].extend(values)
            floor.append((await direct_posts(http, agent_url, f"direct-{i}"))[0])
    e2e_s, floor_s = stats(e2e), stats(floor)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "procedure": f"{NODES} sequence nodes x 1 agent step; the agent answers after {AGENT_MS} ms",
        "through": "python -m langorch up (gateway process + worker process), the agent in a third process",
        "runs": runs,
        "run_end_to_end_ms": e2e_s,
        "baseline_40_direct_posts_ms": floor_s,
        "overhead_per_step_ms": round((e2e_s["median"] - floor_s["median"]) / NODES, 3),
        "goal_run_ms": NODES * (AGENT_MS + 5),
        "ratio_run_to_direct_posts": round(e2e_s["median"] / floor_s["median"], 2),
        "cpu_ms_per_run": {kind: round(used * 1000 / runs, 1) for kind, used in sorted(cpu.items())},
        "event_gaps_median_ms": {name: round(stats(values)["median"], 3) for name, values in gaps.items() if values},
        "note": "run = POST /api/runs sent -> run_completed's timestamp (one machine, one clock); the CPU of "
                "'API process (langorch up)' includes the agent's process; the bench's polling for the run's end "
                "(every 50 ms) is in it too",
    }


GC = {"settle": True}


def settle() -> None:
    """The garbage collector as in a served process once its services run (unless ``--gc-default``)."""
    if GC["settle"]:
        hosting.settle_heap()


async def main(runs: int, profile: str | None) -> dict[str, Any]:
    async with bench_servers("lo_bench_agent_steps") as (nats_url, db):
        return await bench(nats_url, db, runs, profile)


def delay_nats_requests(seconds: float) -> None:
    """Every ``nats.aio.client.Client.request`` of this process (JetStream publishes, KV and API calls go through
    it) waits ``seconds`` first."""
    from nats.aio.client import Client

    request = Client.request

    async def delayed(self: Client, *args: Any, **kwargs: Any) -> Any:
        await asyncio.sleep(seconds)
        return await request(self, *args, **kwargs)

    Client.request = delayed  # type: ignore[method-assign]


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of a few more runs to FILE")
    parser.add_argument("--nats-delay-ms", type=float, default=0.0,
                        help="add this much latency to every NATS request of this process")
    parser.add_argument("--up", action="store_true", help="through langorch up, the agent in a process of its own")
    parser.add_argument("--nats-sync", default="always",
                        help="with --up: langorch up's --nats-sync, 'always' (its default) or a duration such as 2m")
    parser.add_argument("--gc-default", action="store_true",
                        help="in process: keep Python's garbage collector settings instead of settling the heap once "
                             "the services run, as a served process does (langorch_infra.hosting.settle_heap)")
    parser.add_argument("--serve-agent", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_agent:
        serve_agent()
        sys.exit(0)
    if args.up:
        print(json.dumps({**bench_up(args.runs, args.nats_sync), "event_loop": loops.chosen()}, indent=2))
        sys.exit(0)
    if args.nats_delay_ms > 0:
        delay_nats_requests(args.nats_delay_ms / 1000)
    GC["settle"] = not args.gc_default
    print(json.dumps({**loops.run(main(args.runs, args.profile)), "nats_delay_ms": args.nats_delay_ms,
                      "gc": "python default" if args.gc_default else "settled",
                      "event_loop": loops.chosen()}, indent=2))
