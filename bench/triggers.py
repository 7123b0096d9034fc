"""Trigger latency (api.md §10): how fast a signed webhook and an external NATS event become a run, how fast the
scheduler starts with 10,000 registrations, and how close cron fires come to their slots.

Starts the platform in this process with the triggers service (as the tests do; embedded NATS and PostgreSQL
unless ``LANGORCH_TEST_NATS_URL`` / ``LANGORCH_TEST_DATABASE_URL`` are set), then, one request or message at a
time after a warm-up:

* **webhook**: a signed ``POST /api/triggers/webhook/{procedure_id}`` (``timestamped`` scheme, a fresh body each
  time) → the run's ``run_created`` and its first ``node_started``, as seen by a subscriber on ``lo.evt.run.>``,
  and the 202 itself; the baseline is ``GET /api/health`` on the same gateway in the same run;
* **event**: a JetStream publish to ``lo.ext.bench.orders.created`` (with a ``Nats-Msg-Id``) → the same two
  events of the run it starts; the baseline is the publish's own acknowledgement;
* **cron**: ``--cron-triggers`` registrations on ``* * * * *``, observed for ``--cron-slots`` minute slots: slot →
  the scheduler publishing the fire (``lag_ms`` of the fire) and slot → ``run_created``;
* **scheduler start**: on a NATS server of its own, 10,000 ``procedure_imported`` (active) and
  ``trigger_registered`` (scheduled, assorted cron expressions and zones) events appended to ``LO_EVT``; then a
  triggers replica starts: start → registry caught up (``start()`` returned) → the scheduler's plans hold every
  registration (its lock taken and its first round done).

Every service runs in this one process and event loop, so the timestamps include its scheduling.

    python3 -m uv run python bench/triggers.py [--requests 200] [--registrations 10000] [--cron-slots 2]

Prints JSON with p50/p99 (ms), the ratios against the baselines and the goals of the triggers issue.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import tempfile
import time
import uuid
from collections import defaultdict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import nats
from nats.aio.msg import Msg
from nats.js import JetStreamContext

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # the tests package provides the fixtures

from bench.servers import BENCH_NATS_SYNC, bench_servers
from ckp_core.events import Actor, ProcedureImported, TriggerRegistered, make_event
from ckp_core.subjects import event_subject, procedure_key
from ckp_core.triggers import trigger_id
from ckp_core.webhook_signing import signature_headers
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.jetstream import encode_envelope, ensure_topology
from langorch_infra.settings import TriggersSettings
from langorch_triggers.service import TriggersService
from tests.helpers import platform_of, procedure_doc

WARMUP = 20
SECRET_NAME = "bench_webhook_key"
SECRET = "bench-webhook-signing-secret-0123456789"
EVENT_SUBJECT = "lo.ext.bench.orders.created"
WAIT_S = 30.0
GOALS = {"webhook_and_event_p50_ms": 30, "webhook_and_event_p99_ms": 100, "scheduler_10k_start_s": 2.0,
         "cron_fire_within_slot_p99_s": 1.0}
SCHEDULES = ("30 6 * * MON-FRI", "0 0 1 * *", "15 3 * * *", "45 22 * * SUN", "5 12 1,15 * *")
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Tokyo")


def pct(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[max(0, min(len(ordered) - 1, round(p / 100 * len(ordered) + 0.5) - 1))]


def summary(values: list[float]) -> dict[str, float]:
    """p50/p99 (and the p50 of the first and last quarter, which shows a drift over the run)."""
    quarter = max(1, len(values) // 4)
    return {"p50_ms": round(pct(values, 50), 2), "p99_ms": round(pct(values, 99), 2),
            "max_ms": round(max(values), 2), "n": len(values),
            "p50_first_quarter_ms": round(pct(values[:quarter], 50), 2),
            "p50_last_quarter_ms": round(pct(values[-quarter:], 50), 2)}


class RunTimeline:
    """When this process saw each run's ``run_created`` and first ``node_started`` (``perf_counter``), and the
    runs created per procedure in order."""

    def __init__(self) -> None:
        self.created: dict[str, float] = {}
        self.created_at: dict[str, datetime] = {}
        self.started: dict[str, float] = {}
        self.by_procedure: dict[str, list[str]] = defaultdict(list)
        self.changed = asyncio.Event()

    async def on_message(self, msg: Msg) -> None:
        seen = time.perf_counter()
        event = json.loads(msg.data)
        run_id = str(event["aggregate_id"])
        if event["type"] == "run_created" and run_id not in self.created:
            self.created[run_id] = seen
            self.created_at[run_id] = datetime.fromisoformat(event["occurred_at"].replace("Z", "+00:00"))
            self.by_procedure[str(event["data"]["procedure_id"])].append(run_id)
        elif event["type"] == "node_started" and run_id not in self.started:
            self.started[run_id] = seen
        self.changed.set()

    async def until(self, done: Callable[[], Any]) -> Any:
        async with asyncio.timeout(WAIT_S):
            while not (found := done()):
                self.changed.clear()
                await self.changed.wait()
        return found


async def activated(client: httpx.AsyncClient, pid: str, registration: dict[str, Any]) -> None:
    """Import a greeting procedure, activate it and register ``registration`` on it."""
    r = await client.post("/api/procedures", json={"ckp_json": procedure_doc(pid, "1")})
    assert r.status_code == 201, r.text
    r = await client.patch(f"/api/procedures/{pid}/1/status", json={"status": "active"})
    assert r.status_code == 200, r.text
    r = await client.post(f"/api/triggers/{pid}/1", json=registration)
    assert r.status_code == 201, r.text


async def live(service: TriggersService, pid: str) -> None:
    async with asyncio.timeout(WAIT_S):
        while not service.registry.is_live(trigger_id(pid, "1")):
            await asyncio.sleep(0.01)


async def measured(requests: int, one: Callable[[int], Awaitable[tuple[float, ...]]]) -> list[tuple[float, ...]]:
    samples = []
    for i in range(WARMUP + requests):
        sample = await one(i)
        if i >= WARMUP:
            samples.append(sample)
    return samples


async def webhook(client: httpx.AsyncClient, timeline: RunTimeline, requests: int) -> dict[str, Any]:
    async def one(i: int) -> tuple[float, ...]:
        body = json.dumps({"greeting": f"webhook {i}", "nonce": uuid.uuid4().hex}).encode()
        headers = {"Content-Type": "application/json", **signature_headers(SECRET, body)}
        sent = time.perf_counter()
        r = await client.post("/api/triggers/webhook/bench_webhook", content=body, headers=headers)
        answered = time.perf_counter()
        assert r.status_code == 202, r.text
        run_id = r.json()["run_id"]
        await timeline.until(lambda: run_id in timeline.started)
        return ((timeline.created[run_id] - sent) * 1000, (timeline.started[run_id] - sent) * 1000,
                (answered - sent) * 1000)

    async def health(_: int) -> tuple[float, ...]:
        sent = time.perf_counter()
        r = await client.get("/api/health")
        assert r.status_code == 200, r.text
        return ((time.perf_counter() - sent) * 1000,)

    samples = await measured(requests, one)
    baseline = await measured(requests, health)
    created, started, answered = (summary([s[k] for s in samples]) for k in range(3))
    health_ms = summary([s[0] for s in baseline])
    return {"post_to_run_created": created, "post_to_first_node_started": started, "post_to_202": answered,
            "baseline_get_health": health_ms,
            "ratio_to_health": {"run_created_p50": round(created["p50_ms"] / health_ms["p50_ms"], 1),
                                "run_created_p99": round(created["p99_ms"] / health_ms["p99_ms"], 1),
                                "first_node_p50": round(started["p50_ms"] / health_ms["p50_ms"], 1),
                                "first_node_p99": round(started["p99_ms"] / health_ms["p99_ms"], 1)}}


async def event(js: JetStreamContext, timeline: RunTimeline, requests: int) -> dict[str, Any]:
    runs = timeline.by_procedure["bench_event"]
    acks: list[float] = []

    async def one(i: int) -> tuple[float, ...]:
        before = len(runs)
        sent = time.perf_counter()
        await js.publish(EVENT_SUBJECT, json.dumps({"order": i}).encode(),
                         headers={"Nats-Msg-Id": f"bench-{i}-{uuid.uuid4().hex}"})
        acks.append((time.perf_counter() - sent) * 1000)
        run_id = await timeline.until(lambda: len(runs) > before and runs[before])
        await timeline.until(lambda: run_id in timeline.started)
        return (timeline.created[run_id] - sent) * 1000, (timeline.started[run_id] - sent) * 1000

    samples = await measured(requests, one)
    created, started = (summary([s[k] for s in samples]) for k in range(2))
    ack = summary(acks[WARMUP:])
    return {"publish_to_run_created": created, "publish_to_first_node_started": started,
            "baseline_publish_ack": ack,
            "ratio_to_publish_ack": {"run_created_p50": round(created["p50_ms"] / ack["p50_ms"], 1),
                                     "run_created_p99": round(created["p99_ms"] / ack["p99_ms"], 1)}}


async def cron(client: httpx.AsyncClient, nc: Any, timeline: RunTimeline, count: int, slots: int) -> dict[str, Any]:
    """``count`` registrations on ``* * * * *`` for ``slots`` minute slots."""
    fired: list[dict[str, Any]] = []

    async def on_fired(msg: Msg) -> None:
        data = json.loads(msg.data)["data"]
        if data.get("trigger_type") == "scheduled":
            fired.append(data)

    sub = await nc.subscribe("lo.evt.trigger.*.trigger_fired", cb=on_fired)
    for n in range(count):
        await activated(client, f"bench_cron_{n}", {"trigger_type": "scheduled", "schedule": "* * * * *"})
    wanted = count * slots
    deadline = time.monotonic() + 60 * slots + 120
    while (len(fired) < wanted or not all(f["run_id"] in timeline.created for f in fired[:wanted])) \
            and time.monotonic() < deadline:
        await asyncio.sleep(0.5)
    await sub.unsubscribe()
    for n in range(count):  # no more fires while the rest runs
        await client.post(f"/api/triggers/bench_cron_{n}/1/disable")
    published, created = [], []
    for f in fired[:wanted]:
        slot = datetime.fromisoformat(f["source_detail"]["slot"].replace("Z", "+00:00"))
        published.append(float(f["source_detail"]["lag_ms"]))
        if f["run_id"] in timeline.created_at:
            created.append((timeline.created_at[f["run_id"]] - slot).total_seconds() * 1000)
    return {"registrations": count, "slots": slots, "fires_seen": len(fired),
            "slot_to_fire_published": summary(published) if published else None,
            "slot_to_run_created": summary(created) if created else None}


async def scheduler_start(registrations: int, database_url: str) -> dict[str, Any]:
    """A triggers replica starting on a stream that holds ``registrations`` live scheduled registrations."""
    server = EmbeddedNats(Path(tempfile.mkdtemp()) / "nats", sync=BENCH_NATS_SYNC).start()
    try:
        nc = await nats.connect(server.url)
        js = nc.jetstream()
        await ensure_topology(js)
        actor = Actor.system("bench")
        events = []
        for n in range(registrations):
            pid = f"bench_sched_{n}"
            events.append(make_event(ProcedureImported(
                procedure_id=pid, version="1", name=None, description=None, status="active",
                content_hash="0" * 64, compiler_version="bench", ir_key=procedure_key(pid, "1"), ckp_json={},
                variables_schema={}), aggregate_id=pid, seq=1, actor=actor, aggregate="procedure"))
            events.append(make_event(TriggerRegistered(
                procedure_id=pid, version="1", trigger_type="scheduled", schedule=SCHEDULES[n % len(SCHEDULES)],
                timezone=ZONES[n % len(ZONES)]), aggregate_id=trigger_id(pid, "1"), seq=1, actor=actor,
                aggregate="trigger"))
        appended = time.perf_counter()
        for chunk in range(0, len(events), 1000):
            await asyncio.gather(*(js.publish(event_subject(e.aggregate, e.aggregate_id, e.type), encode_envelope(e),
                                              headers={"Nats-Msg-Id": e.event_id})
                                   for e in events[chunk:chunk + 1000]))
        append_s = time.perf_counter() - appended
        await nc.close()

        service = TriggersService(TriggersSettings(nats_url=server.url, database_url=database_url,
                                                   instance_id="bench-scheduler"))
        started = time.perf_counter()
        await service.start()
        caught_up = time.perf_counter()
        task = asyncio.create_task(service.run())
        try:
            async with asyncio.timeout(120):
                while len(service.scheduler.plans) < registrations:
                    await asyncio.sleep(0.005)
            planned = time.perf_counter()
            live_count = len(service.registry.live("scheduled"))
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await service.stop()
    finally:
        server.stop()
    return {"registrations": registrations, "live_in_registry": live_count, "events_appended": len(events),
            "append_s": round(append_s, 2), "start_to_registry_caught_up_s": round(caught_up - started, 3),
            "start_to_all_planned_s": round(planned - started, 3),
            "note": "planned = the scheduler holds its lock and its first round built the heap (its rounds are at "
                    "most 1 s apart, so up to 1 s of the total is the wait for that round)"}


async def main(requests: int, registrations: int, cron_triggers: int, cron_slots: int) -> dict[str, Any]:
    os.environ[f"LANGORCH_SECRET_{SECRET_NAME.upper()}"] = SECRET  # the env secret provider resolves it
    result: dict[str, Any] = {"requests": requests, "warmup": WARMUP, "goals": GOALS}
    async with bench_servers("lo_bench_triggers") as (nats_url, db):
        async with platform_of(nats_url, db, agents=False, approvals=False, triggers=True) as p:
            timeline = RunTimeline()
            nc = await nats.connect(nats_url)
            try:
                await nc.subscribe("lo.evt.run.*.run_created", cb=timeline.on_message)
                await nc.subscribe("lo.evt.run.*.node_started", cb=timeline.on_message)
                await activated(p.client, "bench_webhook", {"trigger_type": "webhook", "webhook_secret": SECRET_NAME})
                await activated(p.client, "bench_event", {"trigger_type": "event",
                                                          "event_source": f"nats://{EVENT_SUBJECT}"})
                await live(p.triggers_service, "bench_webhook")
                await live(p.triggers_service, "bench_event")
                result["webhook"] = await webhook(p.client, timeline, requests)
                result["event"] = await event(nc.jetstream(), timeline, requests)
                if cron_slots > 0:
                    result["cron"] = await cron(p.client, nc, timeline, cron_triggers, cron_slots)
            finally:
                await nc.close()
        if registrations > 0:
            result["scheduler_start"] = await scheduler_start(registrations, db)
    result["measured_at"] = datetime.now(UTC).isoformat()
    return result


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--registrations", type=int, default=10_000)
    parser.add_argument("--cron-triggers", type=int, default=20)
    parser.add_argument("--cron-slots", type=int, default=2)
    args = parser.parse_args()
    print(json.dumps(asyncio.run(main(args.requests, args.registrations, args.cron_triggers, args.cron_slots)),
                     indent=2))
