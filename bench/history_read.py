"""Reading an aggregate's history (``JetStreamEventStore.read``): the batch direct get against an ordered consumer
created and deleted per read (the way reads went before, and still the fallback), on the same stream in the same
run.

    uv run python bench/history_read.py [--events 80] [--reads 300] [--nodes 1|3]

``--events`` is the history's length (80: about a 10-node run with agent steps), ``--reads`` how many reads each
way, one after another (as a command handler does them). ``--nodes 3`` reads from a 3-node JetStream cluster with
the stream at R3 (consumers are then created through the cluster's meta leader); the default is one embedded NATS
server. Prints one JSON object with the median and p95 per read, and the ratio consumer/direct.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.servers import BENCH_NATS_SYNC
from ckp_core.events import Actor, Log, RunCreated, make_event
from ckp_core.ids import new_id
from ckp_core.subjects import aggregate_filter
from langorch_infra.embedded import EmbeddedNats, EmbeddedNatsCluster
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_topology, follow

ACTOR = Actor.system("bench")


async def through_consumer(js: Any, run_id: str, head: int) -> int:
    """A read as before: an ordered consumer from the start, closed (and deleted) once the head is reached."""
    n = 0
    async with contextlib.aclosing(follow(js, aggregate_filter("run", run_id))) as events:
        async for stored in events:
            n += 1
            if stored.position >= head:
                break
    return n


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {"median_ms": round(statistics.median(ordered) * 1000, 3),
            "p95_ms": round(ordered[int(len(ordered) * 0.95) - 1] * 1000, 3)}


async def measure(url: str, events: int, reads: int, replicas: int) -> dict[str, Any]:
    nc = await connect(url, "bench-history-read")
    try:
        js = nc.jetstream()
        await ensure_topology(js, replicas=replicas)
        store = JetStreamEventStore(js)
        run_id = new_id()
        [position] = await store.append([make_event(RunCreated(procedure_id="p", procedure_version="1",
                                                                root_run_id=run_id),
                                                     aggregate_id=run_id, seq=1, actor=ACTOR)], expected_position=0)
        for seq in range(2, events + 1):
            [position] = await store.append([make_event(Log(level="INFO", message=f"event {seq}"),
                                                        aggregate_id=run_id, seq=seq, actor=ACTOR)],
                                            expected_position=position)
        direct, consumer = [], []
        for _ in range(reads):  # interleaved: both ways see the same moments of a busy machine
            began = time.perf_counter()
            assert len(await store.read("run", run_id)) == events
            direct.append(time.perf_counter() - began)
            began = time.perf_counter()
            head = await store.head("run", run_id)
            assert head is not None
            assert await through_consumer(js, run_id, head.position) == events
            consumer.append(time.perf_counter() - began)
        d, c = summary(direct), summary(consumer)
        return {"direct_get": d, "baseline_ordered_consumer": c,
                "ratio_consumer_over_direct": round(c["median_ms"] / d["median_ms"], 2)}
    finally:
        await nc.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--events", type=int, default=80)
    parser.add_argument("--reads", type=int, default=300)
    parser.add_argument("--nodes", type=int, choices=(1, 3), default=1)
    args = parser.parse_args()
    tmp = Path(tempfile.mkdtemp())
    if args.nodes == 3:
        cluster = EmbeddedNatsCluster(tmp, n=3).start(timeout=90)
        url, stop = cluster.url, cluster.stop
    else:
        server = EmbeddedNats(tmp / "nats", sync=BENCH_NATS_SYNC).start()
        url, stop = server.url, server.stop
    try:
        result = asyncio.run(measure(url, args.events, args.reads, args.nodes))
    finally:
        stop()
    print(json.dumps({"bench": "history_read", "events": args.events, "reads": args.reads, "nodes": args.nodes,
                      **result}))


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    main()
