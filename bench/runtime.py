"""Runtime overhead, with its baselines measured in the same run on the same servers.

(a) A generated 10-node internal procedure (8 `sequence` nodes of set_variable/calculate/log steps, a `logic` node,
    a `terminate`) run N times through the real platform (gateway, compiler, runtime in this process; NATS
    JetStream and PostgreSQL), one run at a time and then N runs at once; against a bare LangGraph `StateGraph`
    of 10 trivial async nodes on the same `AsyncPostgresSaver` (same database, `durability="sync"`).
(b) Agent dispatch: steps dispatched by the runtime to a local HTTP agent (tests/scripted_agent.py), timed from
    `step_started` to `step_completed`, against direct httpx POSTs to the same agent's /execute.
(c) Parallel branches by wall-clock time: a `parallel` node of a slow branch (one agent call answered after
    SLOW_MS) and a quick branch (4 internal nodes), under `wait_strategy: all` and `any`; the run's time in the
    runtime against the slow call alone and against the quick branch run on its own.

    uv run python bench/runtime.py [--runs 20] [--calls 50] [--profile FILE]

``--profile FILE``: after the measurements, 20 more sequential runs of (a) under cProfile timed by this process's CPU
time (gateway, compiler and runtime share its event loop; waiting and other processes' load do not count), stats
written to FILE (``python -m pstats FILE``); their times are not reported.

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import signal
import statistics
import sys
import time
import uuid
from pathlib import Path
from typing import Any, TypedDict

import httpx
import nats
from langgraph.graph import END, START, StateGraph

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.load import cpu_by_kind
from bench.servers import SERVER_PIDS, bench_servers
from ckp_core.subjects import event_subject
from langorch_infra import hosting, loops
from langorch_infra.jetstream import JetStreamEventStore
from langorch_runtime.service import open_checkpointer
from tests.conftest import platform_of
from tests.helpers import import_procedure
from tests.scripted_agent import ScriptedAgent, serving

NODES = 10


def ten_node_procedure(strategy: str = "every_node") -> dict[str, Any]:
    """8 sequence nodes (3 internal steps each), a logic node and a terminate: 10 nodes, all executed, under the
    given ``checkpoint_strategy``."""
    nodes: dict[str, Any] = {}
    for i in range(1, 9):
        nodes[f"s{i}"] = {"type": "sequence", "next_node": f"s{i + 1}" if i < 8 else "route", "steps": [
            {"step_id": "set", "action": "set_variable", "variable": f"v{i}", "value": i},
            {"step_id": "calc", "action": "calculate", "expression": f"total + v{i}", "output_variable": "total"},
            {"step_id": "note", "action": "log", "message": f"node {i}: total={{{{total}}}}"},
        ]}
    nodes["route"] = {"type": "logic", "rules": [{"condition": "total == 36", "next_node": "done"}],
                      "default_next_node": "done"}
    nodes["done"] = {"type": "terminate", "outputs": {"total": "{{total}}"}}
    return {"procedure_id": f"bench_ten_nodes_{strategy}", "version": "1",
            "global_config": {"checkpoint_strategy": strategy},
            "variables_schema": {"total": {"type": "number", "default": 0}},
            "workflow_graph": {"start_node": "s1", "nodes": nodes}}


def agent_procedure(calls: int) -> dict[str, Any]:
    return {"procedure_id": "bench_agent_calls", "version": "1",
            "workflow_graph": {"start_node": "each", "nodes": {
                "each": {"type": "loop", "iterator": json.dumps(list(range(calls))), "iterator_variable": "n",
                         "body_node": "call", "next_node": "done"},
                "call": {"type": "sequence", "agent": "BENCH", "steps": [
                    {"step_id": "echo", "action": "echo", "n": "{{n}}", "output_variable": "r"}]},
                "done": {"type": "terminate", "outputs": {"r": "{{r}}"}}}}}


SLOW_MS = 300


def race_procedure(wait_strategy: str) -> dict[str, Any]:
    quick = {f"q{i}": {"type": "sequence", "next_node": f"q{i + 1}" if i < 4 else "join", "steps": [
        {"step_id": "set", "action": "set_variable", "variable": "q", "value": i}]} for i in range(1, 5)}
    return {"procedure_id": f"bench_race_{wait_strategy}", "version": "1",
            "workflow_graph": {"start_node": "fan", "nodes": {
                "fan": {"type": "parallel", "wait_strategy": wait_strategy, "next_node": "join", "branches": [
                    {"branch_id": "slow", "start_node": "call"}, {"branch_id": "quick", "start_node": "q1"}]},
                "call": {"type": "sequence", "agent": "RACE", "next_node": "join", "steps": [
                    {"step_id": "slow", "action": "slow", "output_variable": "s"}]},
                **quick,
                "join": {"type": "terminate", "outputs": {"q": "{{q}}"}}}}}


def quick_alone_procedure() -> dict[str, Any]:
    doc = race_procedure("all")
    nodes = doc["workflow_graph"]["nodes"]
    del nodes["fan"], nodes["call"]
    return {**doc, "procedure_id": "bench_race_quick_alone", "workflow_graph": {"start_node": "q1", "nodes": nodes}}


def stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {"median": round(statistics.median(ordered), 3),
            "p90": round(ordered[max(0, int(0.9 * len(ordered) + 0.5) - 1)], 3),
            "min": round(ordered[0], 3), "n": len(ordered)}


async def run_events(nats_url: str, run_id: str) -> list[Any]:
    nc = await nats.connect(nats_url)
    try:
        return [e.envelope for e in await JetStreamEventStore(nc.jetstream()).read("run", run_id)]
    finally:
        await nc.close()


class Completions:
    """Terminal run events as the runtime appends them (core NATS subscription on the event subjects), so waiting
    for a run costs nothing on the gateway's event loop (polling it would slow the runtime sharing the process)."""

    def __init__(self, nats_url: str) -> None:
        self.nats_url = nats_url
        self.done: dict[str, str] = {}
        self.changed = asyncio.Event()

    async def __aenter__(self) -> Completions:
        self.nc = await nats.connect(self.nats_url)
        for kind in ("run_completed", "run_failed", "run_canceled"):
            await self.nc.subscribe(f"lo.evt.run.*.{kind}", cb=self._on)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.nc.close()

    async def _on(self, msg: Any) -> None:
        _, _, _, token, kind = msg.subject.split(".")
        self.done[token] = kind
        self.changed.set()

    async def wait(self, run_id: str, timeout: float = 60) -> None:
        token = event_subject("run", run_id, "x").split(".")[3]
        deadline = time.perf_counter() + timeout
        while token not in self.done:
            self.changed.clear()
            await asyncio.wait_for(self.changed.wait(), max(0.001, deadline - time.perf_counter()))
        assert self.done[token] == "run_completed", (run_id, self.done[token])


async def start(c: httpx.AsyncClient, procedure_id: str) -> str:
    r = await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
    assert r.status_code == 201, r.text
    return str(r.json()["run_id"])


def executing_ms(events: list[Any]) -> float:
    """Runtime time of a run: ``execution_started`` → ``run_completed`` (event timestamps)."""
    started = next(e.occurred_at for e in events if e.type == "execution_started")
    ended = next(e.occurred_at for e in events if e.type == "run_completed")
    return float((ended - started).total_seconds() * 1000)


def cpu_now() -> dict[str, float]:
    """CPU seconds used so far by this process (gateway, runtime, the benchmark's client), nats-server and
    PostgreSQL (postmaster and backends) when they are the embedded servers of this benchmark."""
    by_kind = cpu_by_kind([os.getpid(), *SERVER_PIDS])
    return {("this process" if kind == "API process (langorch up)" else kind): cpu for kind, cpu in by_kind.items()}


def cpu_ms_per_run(before: dict[str, float], after: dict[str, float], runs: int) -> dict[str, float]:
    """CPU milliseconds per run by process between two :func:`cpu_now` readings, and their total."""
    out = {kind: round((after[kind] - before.get(kind, 0.0)) * 1000 / runs, 2) for kind in sorted(after)}
    out["total"] = round(sum(out.values()), 2)
    return out


async def platform_bench(p: Any, nats_url: str, runs: int, ends: Completions,
                         strategy: str = "every_node") -> dict[str, Any]:
    c = p.client
    doc = ten_node_procedure(strategy)
    await import_procedure(c, doc)
    for _ in range(3):  # warm-up
        await ends.wait(await start(c, doc["procedure_id"]))
    e2e: list[float] = []
    in_runtime: list[float] = []
    group = p.runtime_service.savers[0].group  # the replica's group commit, shared by its savers
    groups_before = group.groups
    cpu_before = cpu_now()
    for _ in range(runs):
        t = time.perf_counter()
        run_id = await start(c, doc["procedure_id"])
        await ends.wait(run_id)
        e2e.append((time.perf_counter() - t) * 1000)
        events = await run_events(nats_url, run_id)
        assert events[-1].data["outputs"] == {"total": 36}, events[-1].data
        in_runtime.append(executing_ms(events))
    sequential_cpu = cpu_ms_per_run(cpu_before, cpu_now(), runs)  # each run's events read back included
    transactions_per_node = (group.groups - groups_before) / (runs * NODES)
    n_events = len(events)
    # throughput: N runs started together
    cpu_before = cpu_now()
    t = time.perf_counter()
    ids = await asyncio.gather(*(start(c, doc["procedure_id"]) for _ in range(runs)))
    await asyncio.gather(*(ends.wait(r, timeout=300) for r in ids))
    concurrent_s = time.perf_counter() - t
    return {"e2e_ms": e2e, "runtime_ms": in_runtime, "events_per_run": n_events,
            "concurrent_runs_per_s": runs / concurrent_s, "sequential_cpu": sequential_cpu,
            "checkpoint_transactions_per_node": round(transactions_per_node, 2),
            "concurrent_cpu": cpu_ms_per_run(cpu_before, cpu_now(), runs)}


class BareState(TypedDict):
    n: int


async def langgraph_baseline(database_url: str, runs: int) -> dict[str, Any]:
    """A bare StateGraph of 10 trivial async nodes on the same AsyncPostgresSaver and database."""
    pool, saver = await open_checkpointer(database_url)
    try:
        graph: StateGraph[BareState] = StateGraph(BareState)

        async def step(state: BareState) -> BareState:
            return {"n": state["n"] + 1}

        for i in range(NODES):
            graph.add_node(f"n{i}", step)
            graph.add_edge(START if i == 0 else f"n{i - 1}", f"n{i}")
        graph.add_edge(f"n{NODES - 1}", END)
        app = graph.compile(checkpointer=saver)

        async def one() -> float:
            t = time.perf_counter()
            out = await app.ainvoke({"n": 0}, {"configurable": {"thread_id": f"bench-{uuid.uuid4()}"}},
                                    durability="sync")
            assert out["n"] == NODES
            return (time.perf_counter() - t) * 1000

        for _ in range(3):
            await one()
        cpu_before = cpu_now()
        times = [await one() for _ in range(runs)]
        sequential_cpu = cpu_ms_per_run(cpu_before, cpu_now(), runs)
        cpu_before = cpu_now()
        t = time.perf_counter()
        await asyncio.gather(*(one() for _ in range(runs)))
        concurrent_s = time.perf_counter() - t
        concurrent_cpu = cpu_ms_per_run(cpu_before, cpu_now(), runs)
    finally:
        await pool.close()
    return {"ms": times, "concurrent_runs_per_s": runs / concurrent_s, "sequential_cpu": sequential_cpu,
            "concurrent_cpu": concurrent_cpu}


async def dispatch_bench(p: Any, nats_url: str, calls: int, ends: Completions) -> dict[str, Any]:
    c = p.client
    agent = ScriptedAgent({"echo": lambda b: {"n": b["params"]["n"]}})
    async with serving(agent):
        r = await c.post("/api/agents", json={"name": "bench-agent", "channel": "bench", "base_url": agent.base_url,
                                              "capabilities": ["echo"], "concurrency_limit": 4})
        assert r.status_code == 201, r.text
        for _ in range(200):
            items = (await c.get("/api/agents", params={"channel": "bench"})).json()["items"]
            if items:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        doc = agent_procedure(calls + 3)
        await import_procedure(c, doc)
        run_id = await start(c, doc["procedure_id"])
        await ends.wait(run_id, timeout=300)
        events = await run_events(nats_url, run_id)
        started = {e.data["frame"]: e.occurred_at for e in events if e.type == "step_started"}
        through_runtime = [(e.occurred_at - started[e.data["frame"]]).total_seconds() * 1000
                           for e in events if e.type == "step_completed"][3:]  # first 3: warm-up
        assert len(through_runtime) == calls
        assert len(agent.executed) == calls + 3
        # the same agent, the same kind of request, straight from an httpx client
        direct: list[float] = []
        async with httpx.AsyncClient(timeout=30) as http:
            for i in range(calls + 3):
                key = f"lo1:bench-direct:call:echo:each[{i}]:1"
                body = {"action": "echo", "params": {"n": i}, "run_id": "bench-direct", "node_id": "call",
                        "step_id": "echo", "attempt": 1, "idempotency_key": key, "deadline_at": None,
                        "dispatch_mode": "tool", "callback": None}
                t = time.perf_counter()
                resp = await http.post(f"{agent.base_url}/execute", json=body, headers={"Idempotency-Key": key})
                direct.append((time.perf_counter() - t) * 1000)
                assert resp.json() == {"status": "success", "result": {"n": i}}
        direct = direct[3:]
    return {"runtime_ms": through_runtime, "direct_ms": direct}


async def race_bench(p: Any, nats_url: str, runs: int, ends: Completions) -> dict[str, Any]:
    c = p.client

    async def slow(body: dict[str, Any]) -> str:
        await asyncio.sleep(SLOW_MS / 1000)
        return "slow"

    agent = ScriptedAgent({"slow": slow})
    out: dict[str, list[float]] = {}
    async with serving(agent):
        r = await c.post("/api/agents", json={"name": "race-agent", "channel": "race", "base_url": agent.base_url,
                                              "capabilities": ["slow"], "concurrency_limit": 8})
        assert r.status_code == 201, r.text
        for _ in range(200):
            if (await c.get("/api/agents", params={"channel": "race"})).json()["items"]:
                break
            await asyncio.sleep(0.05)
        await asyncio.sleep(0.3)
        for name, doc in (("all", race_procedure("all")), ("any", race_procedure("any")),
                          ("quick_alone", quick_alone_procedure())):
            await import_procedure(c, doc)
            times: list[float] = []
            for i in range(runs + 1):  # the first run warms up
                run_id = await start(c, doc["procedure_id"])
                await ends.wait(run_id)
                events = await run_events(nats_url, run_id)
                assert events[-1].data["outputs"] == {"q": 4}, events[-1].data
                if name == "any":
                    winner = next(e for e in events if e.type == "parallel_completed").data.get("winner")
                    assert winner == "quick", winner
                if i:
                    times.append(executing_ms(events))
            out[name] = times
    return out


async def profile_runs(p: Any, ends: Completions, path: str, runs: int = 20) -> None:
    doc = ten_node_procedure()
    profiler = cProfile.Profile(time.process_time)  # CPU time: other processes' load does not count
    profiler.enable()
    for _ in range(runs):
        await ends.wait(await start(p.client, doc["procedure_id"]))
    profiler.disable()
    profiler.dump_stats(path)


GC = {"settle": True}


def settle() -> None:
    """The garbage collector as in a served process once its services run (unless ``--gc-default``)."""
    if GC["settle"]:
        hosting.settle_heap()


async def main(runs: int, calls: int, profile: str | None = None) -> dict[str, Any]:
    async with bench_servers("lo_bench_runtime") as (nats_url, db):
        async with platform_of(nats_url, db) as p, Completions(nats_url) as ends:
            settle()
            platform = await platform_bench(p, nats_url, runs, ends)
            if profile:
                await profile_runs(p, ends, profile)
            unpersisted = await platform_bench(p, nats_url, runs, ends, "disabled")
            dispatch = await dispatch_bench(p, nats_url, calls, ends)
            race = await race_bench(p, nats_url, max(3, runs // 2), ends)
        bare = await langgraph_baseline(db, runs)
    e2e, rt, lg = stats(platform["e2e_ms"]), stats(platform["runtime_ms"]), stats(bare["ms"])
    through, direct = stats(dispatch["runtime_ms"]), stats(dispatch["direct_ms"])
    off_e2e, off_rt = stats(unpersisted["e2e_ms"]), stats(unpersisted["runtime_ms"])
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0]},
        "a_ten_node_internal_procedure": {
            "procedure": "8 sequence nodes x (set_variable, calculate, log) + logic + terminate; 10 nodes executed",
            "runs": runs, "events_per_run": platform["events_per_run"],
            "platform_run_end_to_end_ms": e2e,
            "platform_run_in_runtime_ms": rt,
            "platform_runs_per_s_sequential": round(1000 / e2e["median"], 2),
            "platform_runs_per_s_concurrent": round(platform["concurrent_runs_per_s"], 2),
            "platform_per_node_ms_in_runtime": round(rt["median"] / NODES, 3),
            "platform_per_node_ms_end_to_end": round(e2e["median"] / NODES, 3),
            "baseline_langgraph_10_nodes_postgres_sync_ms": lg,
            "baseline_runs_per_s_sequential": round(1000 / lg["median"], 2),
            "baseline_runs_per_s_concurrent": round(bare["concurrent_runs_per_s"], 2),
            "baseline_per_node_ms": round(lg["median"] / NODES, 3),
            "ratio_in_runtime_to_baseline": round(rt["median"] / lg["median"], 2),
            "ratio_end_to_end_to_baseline": round(e2e["median"] / lg["median"], 2),
            "ratio_concurrent_throughput_baseline_to_platform": round(
                bare["concurrent_runs_per_s"] / platform["concurrent_runs_per_s"], 2),
            "checkpoint_transactions_per_node_sequential": platform["checkpoint_transactions_per_node"],
            "cpu_ms_per_run_sequential": platform["sequential_cpu"],
            "cpu_ms_per_run_concurrent": platform["concurrent_cpu"],
            "baseline_cpu_ms_per_run_sequential": bare["sequential_cpu"],
            "baseline_cpu_ms_per_run_concurrent": bare["concurrent_cpu"],
            "ratio_cpu_per_run_to_baseline_sequential": round(
                platform["sequential_cpu"]["total"] / bare["sequential_cpu"]["total"], 2),
            "ratio_cpu_per_run_to_baseline_concurrent": round(
                platform["concurrent_cpu"]["total"] / bare["concurrent_cpu"]["total"], 2),
        },
        "a2_ten_node_checkpoint_strategy_disabled": {
            "procedure": "the same 10 nodes with checkpoint_strategy: disabled (persisted at the end only)",
            "platform_run_end_to_end_ms": off_e2e,
            "platform_run_in_runtime_ms": off_rt,
            "platform_runs_per_s_concurrent": round(unpersisted["concurrent_runs_per_s"], 2),
            "ratio_in_runtime_every_node_to_disabled": round(rt["median"] / off_rt["median"], 2),
            "ratio_end_to_end_every_node_to_disabled": round(e2e["median"] / off_e2e["median"], 2),
            "ratio_in_runtime_disabled_to_baseline": round(off_rt["median"] / lg["median"], 2),
        },
        "c_parallel_wall_clock": {
            "procedure": f"parallel of a slow branch (one agent call answered after {SLOW_MS} ms) and a quick branch "
                         "(4 internal nodes); run time in the runtime",
            "slow_call_ms": SLOW_MS,
            "quick_branch_alone_ms": stats(race["quick_alone"]),
            "wait_all_ms": stats(race["all"]),
            "wait_any_ms": stats(race["any"]),
            "ratio_all_to_slow_call": round(stats(race["all"])["median"] / SLOW_MS, 2),
            "ratio_any_to_quick_branch_alone": round(stats(race["any"])["median"] /
                                                     stats(race["quick_alone"])["median"], 2),
            "ratio_any_to_slow_call": round(stats(race["any"])["median"] / SLOW_MS, 2),
        },
        "b_agent_dispatch": {
            "calls": calls,
            "through_runtime_ms": through,
            "direct_httpx_post_ms": direct,
            "overhead_ms_median": round(through["median"] - direct["median"], 3),
            "ratio_median": round(through["median"] / direct["median"], 2),
            "ratio_p90": round(through["p90"] / direct["p90"], 2),
            "note": "through_runtime = step_started -> step_completed event timestamps (candidate selection, "
                    "lease create/release in KV, the HTTP call, step store write); agent, gateway and runtime share "
                    "one process and event loop, as does the direct client",
        },
    }


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--profile", metavar="FILE", help="write cProfile stats of 20 more sequential runs to FILE")
    parser.add_argument("--gc-default", action="store_true",
                        help="keep Python's garbage collector settings instead of settling the heap once the services "
                             "run, as a served process does (langorch_infra.hosting.settle_heap)")
    args = parser.parse_args()
    GC["settle"] = not args.gc_default
    print(json.dumps({**loops.run(main(args.runs, args.calls, args.profile)), "event_loop": loops.chosen(),
                      "gc": "python default" if args.gc_default else "settled"},
                     indent=2))
