"""The gateway projector's lag behind ``LO_EVT`` at a steady event rate, with a bare JetStream consumer as baseline.

    uv run python bench/projection.py [--rate 1000] [--seconds 10] [--lanes 50] [--profile FILE] [--gather-ms MS]

Process model: this process runs the gateway's :class:`~langorch_gateway.projector.Projector` alone (no API, no
other service) on its own event loop, against a fresh database. The events come from a separate writer process
(``--write``, this same file), as the runtime appends them in production: it appends run events with the JetStream
event store (``JetStreamEventStore.append``, one event at a time, each with its expected aggregate position) at a
steady rate paced on absolute ticks, round-robin over ``--lanes`` concurrent runs (at different stages: the first
run of lane ``k`` stops after ``k`` events, as if still running). Each run is the event mix of a small real run
(the ``internal_variables`` example, plus a checkpoint and an LLM call): ``run_created``, ``execution_started``,
node and step starts and completions, a ``log``, ``checkpoint_saved``, ``llm_usage`` and ``run_completed``, built
from the real event classes with ``make_event``, so every projection does its real work.
The first ``--warmup`` events are not counted.

Measured, for each counted event: the time from its append (before the publish) until

* the projector reports its stream position applied (``Projector.wait`` of a watcher that always waits for the
  next position: it wakes when a batch's transaction has committed), and
* **baseline**: a bare ordered JetStream consumer of the same subjects, in a process of its own (``--baseline``),
  receives it. It does no work at all, so its lag is what delivery to a process alone costs on this machine at this
  moment; measured on the same messages at the same time, it makes runs on a busy shared machine comparable (the
  projector's own cost is the difference). A bare ``executemany`` of equal row counts would leave out the decoding
  and the delivery, and would not see the machine's load at the moments the projector does.

``--profile FILE`` writes the cProfile statistics of this process (the projector's side) during the measured
phase; profiling slows the projector, so its lag figures are then not the projector's.

Prints one JSON object. Starts its own embedded NATS and PostgreSQL unless LANGORCH_TEST_NATS_URL /
LANGORCH_TEST_DATABASE_URL are set (on a shared NATS the projector starts at the stream's current head).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import json
import os
import signal
import sys
import time
from bisect import bisect_left
from pathlib import Path
from typing import Any

import asyncpg
import nats
from nats.js.api import ConsumerConfig, DeliverPolicy

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.servers

from bench.servers import bench_servers
from ckp_core.events import (
    Actor,
    CheckpointSaved,
    EventData,
    EventEnvelope,
    ExecutionStarted,
    LlmUsage,
    Log,
    NodeCompleted,
    NodeStarted,
    RunCompleted,
    RunCreated,
    StepCompleted,
    StepStarted,
    make_event,
)
from ckp_core.ids import new_id
from ckp_core.subjects import EVENT_STREAM
from langorch_gateway import projector as projector_module
from langorch_gateway.projector import Projector, ensure_schema
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, stream_last_position

RUNTIME = Actor.system("runtime")
DATABASE = "lo_bench_projection"


def pct(values: list[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    return {"p50": round(pct(values, 50), 2), "p90": round(pct(values, 90), 2), "p99": round(pct(values, 99), 2),
            "max": round(max(values), 2)}


# -- the writer (child process) -----------------------------------------------------------------------------


def run_events(run_id: str) -> list[EventEnvelope]:
    """The events of one run, in order: a three-node run with two internal steps, a log line, a checkpoint and an
    LLM call (what ``internal_variables`` emits, plus the last two)."""
    n1, n2, n3 = "prepare", "summarise", "finish"
    step = {"node_id": n1, "frame": "-", "attempt": 1, "action": "set_variable"}
    payloads: list[EventData] = [
        RunCreated(procedure_id="internal-variables", procedure_version="1.0.0", root_run_id=run_id,
                   input_vars={"post_id": 7, "api_base_url": "http://127.0.0.1:9"}),
        ExecutionStarted(entry_node_id=n1, execution_mode="production", runtime_instance="bench"),
        NodeStarted(node_id=n1, node_type="sequence", node_name="Prepare the variables", visit=1),
        StepStarted(**step, step_id="s1", binding_kind="internal", idempotency_key=f"lo1:{run_id}:{n1}:s1:-:1",
                    params={"name": "greeting", "value": "hello {{name}}"}),
        StepCompleted(**step, step_id="s1", output_variable="greeting", duration_ms=3),
        StepStarted(**step, step_id="s2", binding_kind="internal", idempotency_key=f"lo1:{run_id}:{n1}:s2:-:1",
                    params={"name": "count", "value": 3}),
        Log(node_id=n1, step_id="s2", level="info", message="count set to 3"),
        StepCompleted(**step, step_id="s2", output_variable="count", duration_ms=2),
        NodeCompleted(node_id=n1, node_type="sequence", next_node=n2, duration_ms=6),
        CheckpointSaved(node_id=n1, reason="node_completed", checkpoint_id=new_id()),
        NodeStarted(node_id=n2, node_type="llm_action", node_name="Summarise", visit=1),
        LlmUsage(node_id=n2, model="gpt-4o-mini", prompt_tokens=412, completion_tokens=96, total_tokens=508,
                 estimated_cost_usd=0.000119, latency_ms=640),
        NodeCompleted(node_id=n2, node_type="llm_action", next_node=n3, duration_ms=652),
        NodeStarted(node_id=n3, node_type="terminate", node_name="Done", visit=1),
        NodeCompleted(node_id=n3, node_type="terminate", next_node=None, duration_ms=0),
        RunCompleted(outputs={"greeting": "hello world", "count": 3, "summary": "A short summary."}),
    ]
    cause = new_id()
    return [make_event(data, aggregate_id=run_id, seq=i, actor=RUNTIME, causation_id=cause, correlation_id=run_id)
            for i, data in enumerate(payloads, start=1)]


async def write(nats_url: str, rate: float, count: int, lanes: int) -> list[tuple[int, float, float]]:
    """Append ``count`` events at ``rate`` per second, event ``i`` at tick ``i / rate`` by lane ``i % lanes`` (each
    lane appends its runs' events in order, each after the previous one's ack); (position, sent, acked) of each."""
    nc = await nats.connect(nats_url)
    store = JetStreamEventStore(nc.jetstream())
    out: list[tuple[int, float, float]] = []
    started = time.perf_counter() + 0.05

    async def lane(k: int) -> None:
        # the lanes' runs are at different stages, as concurrent runs are: lane k's first run stops after k events
        per_run = len(run_events("-"))
        pending, position = run_events(new_id())[:k % per_run or per_run], 0
        for i in range(k, count, lanes):
            if not pending:
                pending, position = run_events(new_id()), 0
            event = pending.pop(0)
            delay = started + i / rate - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            sent = time.perf_counter()
            [position] = await store.append([event], expected_position=position)
            out.append((position, sent, time.perf_counter()))

    await asyncio.gather(*(lane(k) for k in range(lanes)))
    await nc.close()
    return out


# -- the projector (this process) and the baseline consumer (a child process) -------------------------------


class Applied:
    """When the projector reported each position applied: a watcher that always waits for the next position."""

    def __init__(self, projector: Projector) -> None:
        self.projector = projector
        self.times: list[float] = []
        self.positions: list[int] = []

    async def watch(self) -> None:
        while True:
            # not a request's read-your-writes wait: the projector gathers its batches as it does with none pending
            if await self.projector.wait(self.projector.position + 1, 3600, hurry=False):
                self.times.append(time.perf_counter())
                self.positions.append(self.projector.position)

    def at(self, position: int) -> float:
        return self.times[bisect_left(self.positions, position)]


async def bare_consumer(nats_url: str, start: int, count: int) -> dict[int, float]:
    """An ordered consumer of ``lo.evt.>`` from ``start`` that only notes when each of ``count`` messages arrives."""
    nc = await nats.connect(nats_url)
    arrived: dict[int, float] = {}
    done = asyncio.Event()

    async def on(msg: Any) -> None:
        arrived[msg.metadata.sequence.stream] = time.perf_counter()
        if len(arrived) >= count:
            done.set()

    cfg = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start)
    await nc.jetstream().subscribe("lo.evt.>", ordered_consumer=True, config=cfg, stream=EVENT_STREAM, cb=on,
                                   pending_msgs_limit=100_000)
    print("ready", flush=True)
    await asyncio.wait_for(done.wait(), 3600)
    await nc.close()
    return arrived


async def measure(nats_url: str, db_url: str, args: argparse.Namespace) -> dict[str, Any]:
    pool = await asyncpg.create_pool(db_url, min_size=1, max_size=10)  # as the gateway creates it
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_topology(js)
    await ensure_schema(pool)
    head = await stream_last_position(js)
    await pool.execute("INSERT INTO projection_positions (name, position) VALUES ('core', $1)", head)
    projector = Projector(pool, js)
    projector.start()
    applied = Applied(projector)
    watcher = asyncio.create_task(applied.watch())
    total = args.warmup + int(args.rate * args.seconds)
    bare = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--baseline", nats_url, "--start", str(head + 1), "--count", str(total),
        stdout=asyncio.subprocess.PIPE)
    assert bare.stdout is not None
    await bare.stdout.readline()  # subscribed
    load_before = os.getloadavg()[0]
    writer = await asyncio.create_subprocess_exec(
        sys.executable, __file__, "--write", nats_url, "--rate", str(args.rate), "--count", str(total),
        "--lanes", str(args.lanes), stdout=asyncio.subprocess.PIPE)
    cpu_before, wall_before = time.process_time(), time.perf_counter()
    profile = cProfile.Profile() if args.profile else None
    if profile is not None:
        profile.enable()
    out, _ = await writer.communicate()
    if writer.returncode != 0:
        raise RuntimeError(f"the writer failed ({writer.returncode})")
    appended = sorted(json.loads(out), key=lambda e: e[1])
    last = max(p for p, _, _ in appended)
    await projector.wait(last, 120)
    while not applied.positions or applied.positions[-1] < last:  # the watcher's own wake-up
        await asyncio.sleep(0.001)
    if profile is not None:
        profile.disable()
        profile.dump_stats(args.profile)
    arrived = {int(k): v for k, v in json.loads((await bare.communicate())[0]).items()}
    watcher.cancel()
    await projector.stop()
    await nc.close()
    cpu = (time.process_time() - cpu_before) / (time.perf_counter() - wall_before)
    load_after = os.getloadavg()[0]
    rows = await pool.fetchval("SELECT count(*) FROM run_events")
    await pool.close()
    counted = appended[args.warmup:]
    lag = [(applied.at(p) - sent) * 1000 for p, sent, _ in counted]
    lag_ack = [(applied.at(p) - acked) * 1000 for p, _, acked in counted]
    base = [(arrived[p] - sent) * 1000 for p, sent, _ in counted if p in arrived]
    seconds = counted[-1][1] - counted[0][1]
    return {
        "setup": {"cpus": os.cpu_count(), "lanes": args.lanes, "events_per_run": len(run_events("x")),
                  "warmup_events": args.warmup, "profiled": bool(args.profile),
                  "load_average_1min": [round(load_before, 2), round(load_after, 2)],
                  "projector": "gateway Projector alone in this process",
                  "children": "the writer, the baseline consumer"},
        "events": len(counted), "target_rate_per_s": args.rate,
        "achieved_rate_per_s": round((len(counted) - 1) / seconds, 1),
        "lag_from_append_ms": summary(lag),
        "lag_from_puback_ms": summary(lag_ack),
        "baseline_bare_consumer_lag_from_append_ms": summary(base),
        "projector_minus_baseline_p99_ms": round(pct(lag, 99) - pct(base, 99), 2),
        "projector_process_cpu_share": round(cpu, 3),
        "reports": len(applied.times), "events_per_report": round(len(appended) / max(1, len(applied.times)), 1),
        "run_events_rows": rows, "gather_ms": projector_module.GATHER_S * 1000,
    }


async def main(args: argparse.Namespace) -> dict[str, Any]:
    if args.gather_ms is not None:
        projector_module.GATHER_S = args.gather_ms / 1000
    async with bench_servers(DATABASE) as (nats_url, db):
        return await measure(nats_url, db, args)


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser()
    parser.add_argument("--rate", type=float, default=1000, help="events per second")
    parser.add_argument("--seconds", type=float, default=10, help="measured seconds (after the warm-up)")
    parser.add_argument("--lanes", type=int, default=50, help="runs appended concurrently")
    parser.add_argument("--warmup", type=int, default=500, help="events appended first and not counted")
    parser.add_argument("--profile", help="write cProfile statistics of the projector's process to this file")
    parser.add_argument("--gather-ms", type=float, help="how long a small batch waits for more messages "
                        "(projector.GATHER_S; 0: applied as soon as received)")
    parser.add_argument("--write", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--baseline", help=argparse.SUPPRESS)
    parser.add_argument("--start", type=int, help=argparse.SUPPRESS)
    ns = parser.parse_args()
    if ns.baseline:
        print(json.dumps(asyncio.run(bare_consumer(ns.baseline, ns.start, ns.count))))
    elif ns.write:
        print(json.dumps(asyncio.run(write(ns.write, ns.rate, ns.count, ns.lanes))))
    else:
        print(json.dumps(asyncio.run(main(ns)), indent=2))
