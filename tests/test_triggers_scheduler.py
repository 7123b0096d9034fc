"""Schedules and file watches on the real stack (api.md §10.4): the scheduler replica fires each cron slot once
(the clock is a fake one the tests move, so a slot needs no real minute), skips a slot more than 120 s late as a
``misfire`` and moves on, applies a schedule change at once, never fires a disabled or dormant registration, and
a watched file fires once per modification."""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest

from ckp_core.schedules import MISFIRE_GRACE_S, Schedule
from ckp_core.triggers import trigger_id
from langorch_triggers.scheduler import Scheduler, baseline_key, slot_fire, slot_key
from tests.helpers import Platform, platform_of, procedure_doc, wait_status, wait_until

pytestmark = pytest.mark.integration

EVERY_MINUTE = "* * * * *"


class Clock:
    """The scheduler's ``now``: starts at the real time and only moves forward when a test moves it."""

    def __init__(self) -> None:
        self.at = datetime.now(UTC)

    def __call__(self) -> datetime:
        return self.at


@dataclass
class Env:
    platform: Platform
    clock: Clock

    @property
    def client(self) -> httpx.AsyncClient:
        return self.platform.client

    @property
    def scheduler(self) -> Scheduler:
        return self.platform.triggers_service.scheduler  # type: ignore[no-any-return]

    def move_to(self, at: datetime) -> None:
        """Set the clock (never backwards) and have the scheduler look at its heap now."""
        self.clock.at = max(self.clock.at, at)
        self.scheduler.wake()

    async def procedure(self, procedure_id: str, *, active: bool = True) -> str:
        r = await self.client.post("/api/procedures", json={"ckp_json": procedure_doc(procedure_id)})
        assert r.status_code == 201, r.text
        if active:
            r = await self.client.patch(f"/api/procedures/{procedure_id}/1.0.0/status", json={"status": "active"})
            assert r.status_code == 200, r.text
        return trigger_id(procedure_id, "1.0.0")

    async def register(self, procedure_id: str, body: dict[str, Any]) -> None:
        r = await self.client.post(f"/api/triggers/{procedure_id}/1.0.0", json=body)
        assert r.status_code in (200, 201), r.text

    async def events(self, tid: str) -> list[dict[str, Any]]:
        """The trigger aggregate's events, ``type`` merged into the data."""
        stored = await self.platform.triggers_service.store.read("trigger", tid)
        return [{"type": e.envelope.type, **e.envelope.data} for e in stored]

    async def outcomes(self, tid: str, count: int) -> list[dict[str, Any]]:
        """Wait until ``count`` fire outcomes (fired or skipped) are recorded; returns them in order."""
        found = await wait_until(lambda: self.events(tid), lambda evs: len(fire_outcomes(evs)) >= count, timeout=60)
        return fire_outcomes(found)

    async def planned(self, tid: str, expression: str | None = EVERY_MINUTE) -> None:
        """Wait until the scheduler has planned (or, with None, dropped) the registration."""
        def seen() -> bool:
            plan = self.scheduler.plans.get(tid)
            return plan is None if expression is None else plan is not None and plan.schedule.expression == expression

        await wait_until(seen, timeout=30)

    async def gone(self, procedure_id: str) -> None:
        """Delete the registration and wait until the scheduler dropped it (the clock moves for other tests)."""
        r = await self.client.delete(f"/api/triggers/{procedure_id}/1.0.0")
        assert r.status_code == 204, r.text
        await self.planned(trigger_id(procedure_id, "1.0.0"), None)


def fire_outcomes(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["type"] in ("trigger_fired", "trigger_fire_skipped")]


def next_minute(at: datetime) -> datetime:
    return at.replace(second=0, microsecond=0) + timedelta(minutes=1)


@pytest.fixture(scope="module")
async def env(module_nats_url: str, module_database_url: str) -> AsyncIterator[Env]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, agents=False, triggers=True,
                           triggers_settings={"file_watch_interval_s": 0.2}) as p:
        clock = Clock()
        scheduler: Scheduler = p.triggers_service.scheduler
        scheduler.now = clock
        await wait_until(lambda: scheduler.leading, timeout=30)  # the only replica: it takes the lock at once
        yield Env(p, clock)


async def test_every_minute_fires_once_per_slot_and_each_fire_starts_its_run(env: Env) -> None:
    tid = await env.procedure("sched_minutely")
    await env.register("sched_minutely", {"trigger_type": "scheduled", "schedule": EVERY_MINUTE,
                                          "input_vars": {"greeting": "on schedule"}})
    await env.planned(tid)
    first = next_minute(env.clock())
    assert env.scheduler.next_slot(tid) == first
    shown = (await env.client.get("/api/triggers/sched_minutely/1.0.0")).json()["next_fire_at"]
    at = datetime.fromisoformat(shown.replace("Z", "+00:00"))  # the gateway's own (real) clock
    assert (at.second, at.microsecond) == (0, 0)
    assert timedelta(0) < at - datetime.now(UTC) <= timedelta(minutes=1)

    env.move_to(first + timedelta(seconds=1))
    [fired] = await env.outcomes(tid, 1)
    assert fired["type"] == "trigger_fired", fired
    assert (fired["trigger_type"], fired["triggered_by"]) == ("scheduled", EVERY_MINUTE)
    assert fired["source_detail"]["slot"] == first.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    assert fired["source_detail"]["lag_ms"] == 1000
    run = await wait_status(env.client, fired["run_id"], timeout=60)
    assert run["status"] == "completed", run
    assert (run["trigger_type"], run["triggered_by"], run["input_vars"]["greeting"]) == (
        "scheduled", EVERY_MINUTE, "on schedule")

    # later in the same minute: nothing more is due, the next slot is the next minute
    env.move_to(first + timedelta(seconds=40))
    await wait_until(lambda: env.scheduler.next_slot(tid), lambda s: s == first + timedelta(minutes=1))

    # the same slot published again (a second leader, a new leader re-planning) is the same fire
    state = env.scheduler.plans[tid].state
    again = slot_fire(state, Schedule(EVERY_MINUTE), first, env.clock(), None)
    assert again.run_id == fired["run_id"]
    js = env.platform.triggers_service.js
    ack = await js.publish("lo.cmd.trigger.fire", again.model_dump_json().encode(),
                           headers={"Nats-Msg-Id": slot_key(tid, first)})
    assert ack.duplicate
    replayed = await env.platform.triggers_service.fire(again)  # past the duplicate window: the recorded outcome
    assert replayed is not None
    assert replayed.data["run_id"] == fired["run_id"]

    second = first + timedelta(minutes=1)
    env.move_to(second + timedelta(seconds=2))
    outcomes = await env.outcomes(tid, 2)
    assert [o["type"] for o in outcomes] == ["trigger_fired", "trigger_fired"]
    assert outcomes[1]["source_detail"]["slot"] == second.strftime("%Y-%m-%dT%H:%M:%S.000000Z")
    assert len({o["run_id"] for o in outcomes}) == 2
    fires = (await env.client.get("/api/triggers/sched_minutely/1.0.0/fires")).json()
    assert fires["total"] == 2
    assert {(f["outcome"], f["trigger_type"]) for f in fires["items"]} == {("started", "scheduled")}
    registry = env.platform.triggers_service.metrics.registry
    assert (registry.get_sample_value("langorch_trigger_scheduler_lag_seconds_count") or 0) >= 2
    await env.gone("sched_minutely")


async def test_a_slot_more_than_120_s_late_is_skipped_as_a_misfire_and_not_backfilled(env: Env) -> None:
    tid = await env.procedure("sched_hourly")
    await env.register("sched_hourly", {"trigger_type": "scheduled", "schedule": "0 * * * *",
                                        "timezone": "Asia/Kolkata"})  # a half-hour offset: the UTC slot is :30
    await env.planned(tid, "0 * * * *")
    slot = env.scheduler.next_slot(tid)
    assert slot is not None
    assert slot.minute == 30

    env.move_to(slot + timedelta(seconds=MISFIRE_GRACE_S + 1))
    [skipped] = await env.outcomes(tid, 1)
    assert (skipped["type"], skipped["outcome"], skipped["reason"]) == ("trigger_fire_skipped", "skipped", "misfire")
    assert skipped["source_detail"]["scheduled_for"].endswith("+05:30")
    assert skipped["source_detail"]["lag_ms"] == (MISFIRE_GRACE_S + 1) * 1000
    # no backfill: the next slot is the next future one
    await wait_until(lambda: env.scheduler.next_slot(tid), lambda s: s == slot + timedelta(hours=1))
    fires = (await env.client.get("/api/triggers/sched_hourly/1.0.0/fires")).json()
    assert [(f["outcome"], f["reason"], f["run_id"]) for f in fires["items"]] == [("skipped", "misfire", None)]

    # exactly 120 s late still fires
    nxt = slot + timedelta(hours=1)
    env.move_to(nxt + timedelta(seconds=MISFIRE_GRACE_S))
    outcomes = await env.outcomes(tid, 2)
    assert [o["type"] for o in outcomes] == ["trigger_fire_skipped", "trigger_fired"]
    await env.gone("sched_hourly")


async def test_a_schedule_change_applies_at_once(env: Env) -> None:
    tid = await env.procedure("sched_changed")
    await env.register("sched_changed", {"trigger_type": "scheduled", "schedule": "0 0 1 1 *"})
    await env.planned(tid, "0 0 1 1 *")
    yearly = env.scheduler.next_slot(tid)
    assert yearly is not None
    assert (yearly.month, yearly.day) == (1, 1)

    await env.register("sched_changed", {"trigger_type": "scheduled", "schedule": "*/2 * * * *"})
    await env.planned(tid, "*/2 * * * *")
    slot = env.scheduler.next_slot(tid)
    assert slot is not None
    assert slot.minute % 2 == 0
    assert slot - env.clock() <= timedelta(minutes=2)
    env.move_to(slot)
    [fired] = await env.outcomes(tid, 1)
    assert (fired["type"], fired["triggered_by"], fired["source_detail"]["lag_ms"]) == (
        "trigger_fired", "*/2 * * * *", 0)
    await env.gone("sched_changed")


async def test_disabled_and_dormant_registrations_never_fire(env: Env) -> None:
    control = await env.procedure("sched_control")
    disabled = await env.procedure("sched_disabled")
    dormant = await env.procedure("sched_dormant", active=False)
    deprecated = await env.procedure("sched_deprecated")
    for pid in ("sched_control", "sched_disabled", "sched_dormant", "sched_deprecated"):
        await env.register(pid, {"trigger_type": "scheduled", "schedule": EVERY_MINUTE})
    for tid in (control, disabled, deprecated):
        await env.planned(tid)
    assert (await env.client.post("/api/triggers/sched_disabled/1.0.0/disable")).status_code == 200
    r = await env.client.patch("/api/procedures/sched_deprecated/1.0.0/status", json={"status": "deprecated"})
    assert r.status_code == 200, r.text
    for tid in (disabled, deprecated):
        await env.planned(tid, None)
    assert dormant not in env.scheduler.plans
    for pid in ("sched_disabled", "sched_dormant", "sched_deprecated"):
        assert (await env.client.get(f"/api/triggers/{pid}/1.0.0")).json()["next_fire_at"] is None, pid

    slot = next_minute(env.clock())
    env.move_to(slot + timedelta(seconds=1))
    [fired] = await env.outcomes(control, 1)  # the round that fired the control looked at every due slot
    assert fired["type"] == "trigger_fired"
    for tid in (disabled, dormant, deprecated):
        assert fire_outcomes(await env.events(tid)) == [], tid
    for pid in ("sched_control", "sched_disabled", "sched_dormant", "sched_deprecated"):
        await env.gone(pid)


async def test_a_watched_file_fires_once_per_modification(env: Env, tmp_path: Path) -> None:
    watched, other = tmp_path / "in.csv", tmp_path / "other.csv"
    watched.write_text("a,b\n")
    other.write_text("x\n")
    tid = await env.procedure("watch_in")
    control = await env.procedure("watch_other")
    await env.register("watch_in", {"trigger_type": "file_watch", "event_source": str(watched),
                                    "input_vars": {"greeting": "file"}})
    locks = env.platform.triggers_service.locks
    await wait_until(lambda: _has_key(locks, baseline_key(tid)), timeout=30)  # the first look: a baseline
    assert fire_outcomes(await env.events(tid)) == []

    mtime = watched.stat().st_mtime_ns + 1_000_000_000
    os.utime(watched, ns=(mtime, mtime))
    [fired] = await env.outcomes(tid, 1)
    assert (fired["type"], fired["trigger_type"], fired["triggered_by"]) == ("trigger_fired", "file_watch",
                                                                              str(watched))
    run = await wait_status(env.client, fired["run_id"], timeout=60)
    assert run["status"] == "completed", run
    assert run["input_vars"]["file_watch_path"] == str(watched)
    assert run["input_vars"]["file_mtime"].endswith("Z")
    assert run["input_vars"]["greeting"] == "file"

    # another watch registered after that fire, baselined, then touched: the rounds between looked at the first
    # file again, unchanged, and fired nothing
    await env.register("watch_other", {"trigger_type": "file_watch", "event_source": str(other)})
    await wait_until(lambda: _has_key(locks, baseline_key(control)), timeout=30)
    later = other.stat().st_mtime_ns + 1_000_000_000
    os.utime(other, ns=(later, later))
    await env.outcomes(control, 1)
    assert len(fire_outcomes(await env.events(tid))) == 1
    for pid in ("watch_in", "watch_other"):
        r = await env.client.delete(f"/api/triggers/{pid}/1.0.0")
        assert r.status_code == 204, r.text


async def test_a_missing_file_is_a_baseline_and_its_appearance_fires(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "later.csv"
    tid = await env.procedure("watch_missing")
    await env.register("watch_missing", {"trigger_type": "file_watch", "event_source": str(path)})
    locks = env.platform.triggers_service.locks
    await wait_until(lambda: _has_key(locks, baseline_key(tid)), timeout=30)
    path.write_text("now here\n")
    [fired] = await env.outcomes(tid, 1)
    assert fired["type"] == "trigger_fired"
    assert fired["source_detail"]["change"] == "created"
    r = await env.client.delete("/api/triggers/watch_missing/1.0.0")
    assert r.status_code == 204, r.text


async def _has_key(locks: Any, key: str) -> bool:
    try:
        await locks.get(key)
    except Exception:  # not there yet
        return False
    return True


async def test_a_watch_registered_again_starts_with_a_baseline(env: Env, tmp_path: Path) -> None:
    path = tmp_path / "again.csv"
    path.write_text("1\n")
    tid = await env.procedure("watch_again")
    body = {"trigger_type": "file_watch", "event_source": str(path)}
    await env.register("watch_again", body)
    locks = env.platform.triggers_service.locks
    first = await wait_until(lambda: _look(locks, baseline_key(tid)), timeout=30)
    r = await env.client.delete("/api/triggers/watch_again/1.0.0")
    assert r.status_code == 204, r.text
    await wait_until(lambda: _look(locks, baseline_key(tid)), lambda look: look is None, timeout=30)

    later = path.stat().st_mtime_ns + 1_000_000_000  # changed while no registration watched it
    os.utime(path, ns=(later, later))
    await env.register("watch_again", body)
    again = await wait_until(lambda: _look(locks, baseline_key(tid)), timeout=30)
    assert again["registered_at"] != first["registered_at"]
    assert again["mtime_ns"] == later
    newest = later + 1_000_000_000  # the first change after the new baseline: its only fire
    os.utime(path, ns=(newest, newest))

    def since_registered(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
        start = max(i for i, e in enumerate(events) if e["type"] == "trigger_registered")
        return fire_outcomes(events[start:])

    fired = await wait_until(lambda: env.events(tid), lambda evs: any(
        f["source_detail"].get("mtime_ns") == newest for f in since_registered(evs)), timeout=60)
    assert [f["source_detail"]["mtime_ns"] for f in since_registered(fired)] == [newest]
    r = await env.client.delete("/api/triggers/watch_again/1.0.0")
    assert r.status_code == 204, r.text


async def _look(locks: Any, key: str) -> dict[str, Any] | None:
    try:
        entry = await locks.get(key)
    except Exception:  # not there (yet), or deleted
        return None
    return json.loads(entry.value) if entry.value else None
