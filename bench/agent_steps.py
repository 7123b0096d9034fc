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

    uv run python bench/agent_steps.py [--runs 8] [--profile FILE] [--nats-delay-ms MS]

``--profile FILE``: after the measured runs, a few more runs under cProfile timed by this process's CPU time (the
whole process: gateway, runtime and agent share one event loop; waiting and other processes' load do not count),
stats written to FILE (``python -m pstats FILE``); their times are not reported.

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
import sys
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.runtime import Completions, run_events, start, stats
from bench.servers import bench_servers
from ckp_core.ir import NodeIR, SequencePayload
from langorch_infra import loops
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


def gaps_ms(events: list[Any]) -> dict[str, list[float]]:
    """The time between consecutive events of each kind in ``GAPS`` (a node's own events, then the next node's
    start): where a node's time goes."""
    out: dict[str, list[float]] = {f"{a}->{b}": [] for a, b in GAPS}
    for before, after in itertools.pairwise(events):
        if (before.type, after.type) in GAPS:
            out[f"{before.type}->{after.type}"].append((after.occurred_at - before.occurred_at).total_seconds() * 1000)
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
            for name, values in gaps_ms(events).items():
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
    import json

    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of a few more runs to FILE")
    parser.add_argument("--nats-delay-ms", type=float, default=0.0,
                        help="add this much latency to every NATS request of this process")
    args = parser.parse_args()
    if args.nats_delay_ms > 0:
        delay_nats_requests(args.nats_delay_ms / 1000)
    print(json.dumps({**loops.run(main(args.runs, args.profile)), "nats_delay_ms": args.nats_delay_ms,
                      "event_loop": loops.chosen()}, indent=2))
