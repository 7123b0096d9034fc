"""The scheduler's planning without servers: a takeover plans 10,000 registrations well within 2 s, each slot's
fire has the slot's identity, a failed publish is tried again next round without holding the others up, and a
registration change re-plans only what it changes. Publishing is replaced by a recorder (the real stack is in
tests/test_triggers_scheduler.py)."""

from __future__ import annotations

import time
import types
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from nats.js.errors import KeyNotFoundError

from ckp_core.commands import FireTrigger
from ckp_core.events import format_time
from ckp_core.schedules import Schedule
from ckp_core.triggers import TriggerState
from langorch_triggers import scheduler as scheduler_module
from langorch_triggers.metrics import TriggersMetrics
from langorch_triggers.registry import Registry
from langorch_triggers.scheduler import CHECKPOINT_KEY, MAX_MISSED, Scheduler, derived_ids, slot_fire, slot_key

pytestmark = pytest.mark.unit

SCHEDULES = ("* * * * *", "*/5 * * * *", "0 * * * *", "15 3 * * 1-5", "30 9 1 * *", "0 0 * * 0", "*/15 8-18 * * *")
ZONES = ("UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Sydney")
START = datetime(2026, 3, 29, 0, 30, 10, tzinfo=UTC)  # Berlin's spring gap is at 01:00 UTC that day


def registry_of(count: int, changed_at: datetime, *, schedule: str | None = None) -> Registry:
    registry = Registry(None)  # type: ignore[arg-type]  # never started: filled by hand
    for n in range(count):
        tid = f"plan_{n}@1"
        registry.triggers[tid] = TriggerState(
            tid, exists=True, procedure_id=f"plan_{n}", version="1", updated_at=format_time(changed_at),
            config={"trigger_type": "scheduled", "schedule": schedule or SCHEDULES[n % len(SCHEDULES)],
                    "timezone": ZONES[n % len(ZONES)], "enabled": True})
        registry.statuses[(f"plan_{n}", "1")] = "active"
    return registry


class Clock:
    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


class Locks:
    """The few ``lo_locks`` calls the scheduler makes, in memory."""

    def __init__(self, values: dict[str, bytes] | None = None) -> None:
        self.values = dict(values or {})

    async def get(self, key: str) -> Any:
        if key not in self.values:
            raise KeyNotFoundError
        return types.SimpleNamespace(value=self.values[key])

    async def put(self, key: str, value: bytes) -> int:
        self.values[key] = value
        return len(self.values)


def leading(registry: Registry, clock: Clock, locks: Locks | None = None) -> Scheduler:
    """A scheduler on ``registry`` that holds its lock (without NATS)."""
    service = types.SimpleNamespace(registry=registry, js=None, instance="plan-test", metrics=TriggersMetrics(),
                                    settings=types.SimpleNamespace(scheduler_lock_ttl_s=60), locks=locks or Locks())
    s = Scheduler(service, now=clock)  # type: ignore[arg-type]
    s.lock.revision, s.lock.renewed_at = 1, time.monotonic()
    return s


@pytest.fixture
def published(monkeypatch: pytest.MonkeyPatch) -> list[tuple[FireTrigger, str]]:
    sent: list[tuple[FireTrigger, str]] = []

    async def record(js: Any, command: FireTrigger, *, msg_id: str) -> int:
        sent.append((command, msg_id))
        return len(sent)

    monkeypatch.setattr(scheduler_module, "publish_command", record)
    return sent


async def test_a_takeover_plans_ten_thousand_registrations_in_one_round(
        published: list[tuple[FireTrigger, str]]) -> None:
    """How long that takes is measured by bench/triggers.py (scheduler_start), not asserted here."""
    clock = Clock(START)
    s = leading(registry_of(10_000, START - timedelta(hours=1)), clock)
    await s.tick()
    assert len(s.plans) == len(s.heap) == 10_000
    assert s.next_slot("plan_0@1") == START.replace(second=0) + timedelta(minutes=1)  # * * * * * in UTC
    # 0 * * * * in Asia/Kolkata (+05:30): the next local full hour, 07:00, is 01:30 UTC
    assert s.next_slot("plan_23@1") == datetime(2026, 3, 29, 1, 30, tzinfo=UTC)


async def test_each_slot_fires_once_with_the_slots_identity(published: list[tuple[FireTrigger, str]]) -> None:
    clock = Clock(START)
    s = leading(registry_of(1, START - timedelta(hours=1), schedule="* * * * *"), clock)
    await s.tick()
    # a takeover re-plans from 120 s back: the two slots the previous leader may have missed are published again
    slots = [START.replace(second=0) - timedelta(minutes=1), START.replace(second=0)]
    assert [msg_id for _, msg_id in published] == [slot_key("plan_0@1", slot) for slot in slots]
    clock.at = START + timedelta(seconds=45)
    await s.tick()
    assert len(published) == 2
    clock.at = START + timedelta(seconds=51)  # 00:31:01
    await s.tick()
    command, msg_id = published[-1]
    assert msg_id == "fire:sched:plan_0@1:2026-03-29T00:31:00.000000Z"
    assert (command.command_id, command.run_id) == derived_ids(msg_id)
    assert (command.trigger_type, command.triggered_by, command.actor.render()) == (
        "scheduled", "* * * * *", "system:triggers")
    assert command.source_detail == {"slot": "2026-03-29T00:31:00.000000Z",
                                     "scheduled_for": "2026-03-29T00:31:00+00:00", "timezone": "UTC",
                                     "lag_ms": 1000}
    lag = s.service.metrics.registry.get_sample_value("langorch_trigger_scheduler_lag_seconds_count")
    assert lag == 3


def test_the_same_slot_is_the_same_fire_on_every_replica() -> None:
    state = TriggerState("p@1", exists=True, procedure_id="p", version="1")
    slot = datetime(2026, 10, 25, 0, 30, tzinfo=UTC)  # 02:30 Berlin summer time; an hour later it is 02:30 again
    one = slot_fire(state, Schedule("30 2 * * *", "Europe/Berlin"), slot, slot + timedelta(seconds=1), None)
    two = slot_fire(state, Schedule("30 2 * * *", "Europe/Berlin"), slot, slot + timedelta(seconds=9), "proj")
    assert (one.command_id, one.run_id) == (two.command_id, two.run_id)
    later = slot_fire(state, Schedule("30 2 * * *", "Europe/Berlin"), slot + timedelta(hours=1),
                      slot + timedelta(hours=1), None)
    assert later.command_id != one.command_id  # the repeated wall-clock hour is another slot
    assert (one.source_detail["scheduled_for"], later.source_detail["scheduled_for"]) == (
        "2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00")


async def test_a_failed_publish_is_tried_again_without_holding_up_the_others(
        monkeypatch: pytest.MonkeyPatch) -> None:
    sent: list[str] = []
    failing = {"fire:sched:plan_0@1:2026-03-29T00:31:00.000000Z"}

    async def flaky(js: Any, command: FireTrigger, *, msg_id: str) -> int:
        if msg_id in failing:
            failing.discard(msg_id)
            raise ConnectionError("NATS went away")
        sent.append(msg_id)
        return len(sent)

    monkeypatch.setattr(scheduler_module, "publish_command", flaky)
    clock = Clock(START + timedelta(seconds=45))  # 00:30:55: 00:31:00 is the next slot of both
    s = leading(registry_of(2, START - timedelta(hours=1), schedule="* * * * *"), clock)
    await s.tick()
    sent.clear()
    clock.at = START + timedelta(seconds=51)
    assert await s.tick() == scheduler_module.MAX_SLEEP_S
    assert sent == ["fire:sched:plan_1@1:2026-03-29T00:31:00.000000Z"]
    await s.tick()
    assert sent[1:] == ["fire:sched:plan_0@1:2026-03-29T00:31:00.000000Z"]
    assert s.next_slot("plan_0@1") == s.next_slot("plan_1@1") == datetime(2026, 3, 29, 0, 32, tzinfo=UTC)


async def test_a_change_re_plans_only_that_registration(published: list[tuple[FireTrigger, str]]) -> None:
    clock = Clock(START)
    registry = registry_of(2, START - timedelta(hours=1), schedule="0 0 1 1 *")
    s = leading(registry, clock)
    await s.tick()
    untouched = s.plans["plan_1@1"]
    registry.triggers["plan_0@1"].config["schedule"] = "*/10 * * * *"
    s._on_change("plan_0@1")
    s._on_change("plan_1@1")  # a fire outcome of plan_1: same schedule, same plan
    await s.tick()
    assert s.plans["plan_1@1"] is untouched
    assert s.next_slot("plan_0@1") == datetime(2026, 3, 29, 0, 40, tzinfo=UTC)
    registry.statuses[("plan_0", "1")] = "deprecated"  # dormant: no plan
    registry.triggers["plan_1@1"].config["enabled"] = False
    for tid in ("plan_0@1", "plan_1@1"):
        s._on_change(tid)
    await s.tick()
    assert s.plans == {}
    clock.at = START + timedelta(minutes=20)
    await s.tick()
    assert published == []


async def test_a_schedule_that_cannot_be_evaluated_does_not_stop_the_others(
        published: list[tuple[FireTrigger, str]]) -> None:
    clock = Clock(START + timedelta(seconds=45))
    registry = registry_of(3, START - timedelta(hours=1), schedule="* * * * *")
    registry.triggers["plan_0@1"].config["schedule"] = "0 0 31 2 *"  # 31 February: never
    registry.triggers["plan_1@1"].config["timezone"] = "Mars/Olympus_Mons"
    s = leading(registry, clock)
    await s.tick()
    assert sorted(s.plans) == ["plan_2@1"]
    published.clear()
    clock.at = START + timedelta(seconds=51)
    await s.tick()
    assert [msg_id for _, msg_id in published] == ["fire:sched:plan_2@1:2026-03-29T00:31:00.000000Z"]


async def test_a_new_leader_continues_from_the_last_checkpoint(monkeypatch: pytest.MonkeyPatch) -> None:
    recorded: list[tuple[str, str]] = []

    async def record(js: Any, command: FireTrigger, *, msg_id: str) -> int:
        recorded.append(("fired", command.source_detail["slot"]))
        return len(recorded)

    async def misfire(self: Scheduler, plan: Any, slot: datetime, now: datetime) -> None:
        recorded.append(("misfire", format_time(slot)))

    monkeypatch.setattr(scheduler_module, "publish_command", record)
    monkeypatch.setattr(Scheduler, "_misfire", misfire)
    # the last leader had handled every slot up to 00:20:10 (then it died); now is 00:30:10
    locks = Locks({CHECKPOINT_KEY: format_time(START - timedelta(minutes=10)).encode()})
    clock = Clock(START)
    s = leading(registry_of(1, START - timedelta(hours=1), schedule="* * * * *"), clock, locks)
    await s.tick()
    # 00:21 … 00:28 are more than 120 s late: misfires; 00:29 and 00:30 still fire
    assert recorded == [("fired", "2026-03-29T00:29:00.000000Z"), ("fired", "2026-03-29T00:30:00.000000Z"),
                        *(("misfire", f"2026-03-29T00:{m}:00.000000Z") for m in range(21, 29))]
    assert locks.values[CHECKPOINT_KEY] == format_time(START).encode()

    # a long outage records at most MAX_MISSED misfires per registration
    recorded.clear()
    locks.values[CHECKPOINT_KEY] = format_time(START - timedelta(days=1)).encode()
    await leading(registry_of(1, START - timedelta(days=2), schedule="* * * * *"), clock, locks).tick()
    assert [kind for kind, _ in recorded].count("misfire") == MAX_MISSED
