"""Cron schedules with time zones, DST, slot identities, the misfire rule and file-watch change detection
(api.md §10.4)."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckp_core.schedules import (
    MISFIRE_GRACE_S,
    FileState,
    Schedule,
    ScheduleError,
    detect_change,
    file_watch_inputs,
    observe_file,
    plan_slots,
    slot_id,
    validate_cron,
)

pytestmark = pytest.mark.unit

BERLIN = ZoneInfo("Europe/Berlin")
NEW_YORK = ZoneInfo("America/New_York")


def utc(*args: int) -> datetime:
    return datetime(*args, tzinfo=UTC)


# --- validation -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("expr", ["* * * * *", "0 9 * * mon-fri", "*/15 8-18 * * 1-5", "0 0 1 jan *",
                                  "30 2 * * 7", "0 0 L * *", "5,10,15 * * * *"])
def test_valid_expressions(expr) -> None:
    assert Schedule.parse(expr).expression == expr


def test_expression_is_normalised_to_single_spaces() -> None:
    assert validate_cron("  0   9 * *\t* ") == "0 9 * * *"


@pytest.mark.parametrize(("expr", "message"), [
    ("", "the schedule is empty"),
    ("   ", "the schedule is empty"),
    (None, "must be a string of 5 cron fields"),
    (17, "must be a string of 5 cron fields"),
    ("* * * *", "has 4 field(s); expected exactly 5"),
    ("0 * * * * *", "has 6 field(s); expected exactly 5"),
    ("@hourly", "macros such as @hourly are not accepted"),
    ("60 * * * *", "field 1 (minute) '60' is not valid: allowed values are 0-59"),
    ("* 24 * * *", "field 2 (hour) '24' is not valid: allowed values are 0-23"),
    ("* * 0 * *", "field 3 (day) '0' is not valid: allowed values are 1-31"),
    ("* * * 13 *", "field 4 (month) '13' is not valid: allowed values are 1-12 or jan-dec"),
    ("* * * * 8", "field 5 (day_of_week) '8' is not valid: allowed values are 0-7 or sun-sat"),
    ("*/0 * * * *", "field 1 (minute) '*/0' is not valid"),
    ("1-70 * * * *", "field 1 (minute) '1-70' is not valid"),
    ("H * * * *", "field 1 (minute) 'H' is not valid"),
    ("* * * * mon;", "field 5 (day_of_week) 'mon;' has characters cron does not accept"),
    ("0 0 30 2 *", "'0 0 30 2 *' never fires"),
    ("0 0 31 4,6 *", "never fires"),
])
def test_invalid_expressions_say_what_is_wrong(expr, message) -> None:
    with pytest.raises(ScheduleError) as info:
        Schedule.parse(expr)
    assert info.value.field == "schedule"
    assert message in info.value.message


@pytest.mark.parametrize(("zone", "message"), [
    ("Mars/Olympus", "unknown time zone 'Mars/Olympus'"),
    ("", "non-empty IANA name"),
    (5, "non-empty IANA name"),
    ("../etc/passwd", "not an IANA time zone name"),
    ("/usr/share/zoneinfo/UTC", "not an IANA time zone name"),
])
def test_invalid_time_zones(zone, message) -> None:
    with pytest.raises(ScheduleError) as info:
        Schedule.parse("* * * * *", zone)
    assert info.value.field == "timezone"
    assert message in info.value.message


def test_timezone_defaults_to_utc() -> None:
    assert Schedule.parse("0 9 * * *").timezone == "UTC"
    assert Schedule.parse("0 9 * * *", None).timezone == "UTC"


# --- next fire --------------------------------------------------------------------------------------------------


def test_next_after_is_strictly_after_and_in_utc() -> None:
    every_minute = Schedule.parse("* * * * *")
    assert every_minute.next_after(utc(2026, 1, 1, 12, 0)) == utc(2026, 1, 1, 12, 1)
    assert every_minute.next_after(utc(2026, 1, 1, 12, 0, 30)) == utc(2026, 1, 1, 12, 1)
    nine_berlin = Schedule.parse("0 9 * * *", "Europe/Berlin")
    result = nine_berlin.next_after(utc(2026, 1, 15, 12, 0))
    assert result == utc(2026, 1, 16, 8, 0)  # 09:00 CET = 08:00 UTC in winter
    assert result.tzinfo is UTC
    assert nine_berlin.next_after(utc(2026, 7, 15, 12, 0)) == utc(2026, 7, 16, 7, 0)  # CEST
    with pytest.raises(ValueError, match="time-zone-aware"):
        every_minute.next_after(datetime(2026, 1, 1))  # noqa: DTZ001 - the naive input under test


def local_slots(schedule: Schedule, start: datetime, count: int, zone: ZoneInfo) -> list[str]:
    out, t = [], start
    for _ in range(count):
        t = schedule.next_after(t)
        out.append(t.astimezone(zone).isoformat())
    return out


def test_dst_spring_forward_berlin() -> None:
    # 2026-03-29: clocks go from 02:00 CET to 03:00 CEST; 02:30 does not exist that day
    daily = Schedule.parse("30 2 * * *", "Europe/Berlin")
    assert local_slots(daily, utc(2026, 3, 28, 12, 0), 3, BERLIN) == [
        "2026-03-29T03:00:00+02:00",  # the skipped time fires once, at the end of the gap
        "2026-03-30T02:30:00+02:00",
        "2026-03-31T02:30:00+02:00",
    ]
    hourly = Schedule.parse("0 * * * *", "Europe/Berlin")
    assert local_slots(hourly, datetime(2026, 3, 29, 0, 30, tzinfo=BERLIN), 3, BERLIN) == [
        "2026-03-29T01:00:00+01:00", "2026-03-29T03:00:00+02:00", "2026-03-29T04:00:00+02:00"]


def test_dst_fall_back_berlin() -> None:
    # 2026-10-25: clocks go from 03:00 CEST back to 02:00 CET; 02:30 happens twice
    daily = Schedule.parse("30 2 * * *", "Europe/Berlin")
    slots = local_slots(daily, utc(2026, 10, 24, 12, 0), 3, BERLIN)
    assert slots == ["2026-10-25T02:30:00+02:00", "2026-10-25T02:30:00+01:00", "2026-10-26T02:30:00+01:00"]
    first = daily.next_after(utc(2026, 10, 24, 12, 0))
    second = daily.next_after(first)
    assert (first, second) == (utc(2026, 10, 25, 0, 30), utc(2026, 10, 25, 1, 30))
    assert slot_id("p@1", first) != slot_id("p@1", second)  # two distinct slots, both fire


def test_dst_spring_forward_new_york() -> None:
    # 2026-03-08: 02:00 EST jumps to 03:00 EDT
    daily = Schedule.parse("30 2 * * *", "America/New_York")
    assert local_slots(daily, utc(2026, 3, 7, 12, 0), 2, NEW_YORK) == [
        "2026-03-08T03:00:00-04:00", "2026-03-09T02:30:00-04:00"]
    half_hourly = Schedule.parse("*/30 * * * *", "America/New_York")
    assert local_slots(half_hourly, datetime(2026, 3, 8, 1, 0, tzinfo=NEW_YORK), 3, NEW_YORK) == [
        "2026-03-08T01:30:00-05:00", "2026-03-08T03:00:00-04:00", "2026-03-08T03:30:00-04:00"]


def test_dst_fall_back_new_york() -> None:
    # 2026-11-01: 02:00 EDT goes back to 01:00 EST; 01:30 happens twice, 02:30 once
    at_0130 = Schedule.parse("30 1 * * *", "America/New_York")
    assert local_slots(at_0130, utc(2026, 10, 31, 12, 0), 3, NEW_YORK) == [
        "2026-11-01T01:30:00-04:00", "2026-11-01T01:30:00-05:00", "2026-11-02T01:30:00-05:00"]
    at_0230 = Schedule.parse("30 2 * * *", "America/New_York")
    assert local_slots(at_0230, utc(2026, 10, 31, 12, 0), 2, NEW_YORK) == [
        "2026-11-01T02:30:00-05:00", "2026-11-02T02:30:00-05:00"]


# --- slot identity ----------------------------------------------------------------------------------------------


def test_slot_id_is_stable_per_trigger_and_instant() -> None:
    slot = utc(2026, 5, 1, 6, 0)
    assert slot_id("orders@3", slot) == "schedule:orders@3:2026-05-01T06:00Z"
    same_instant_elsewhere = slot.astimezone(BERLIN)
    assert slot_id("orders@3", same_instant_elsewhere) == slot_id("orders@3", slot)
    assert slot_id("orders@4", slot) != slot_id("orders@3", slot)
    assert slot_id("orders@3", slot + timedelta(minutes=1)) != slot_id("orders@3", slot)


# --- misfires ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("late", "fires"), [(0, True), (1, True), (119, True), (120, True), (121, False),
                                         (3000, False)])
def test_misfire_boundary(late, fires) -> None:
    hourly = Schedule.parse("0 * * * *")
    slot = utc(2026, 2, 1, 10, 0)
    plan = plan_slots(hourly, slot - timedelta(minutes=5), slot + timedelta(seconds=late))
    assert plan.due == ([slot] if fires else [])
    assert plan.missed == ([] if fires else [slot])
    assert plan.missed_truncated is False


def test_misfire_fractional_seconds() -> None:
    hourly = Schedule.parse("0 * * * *")
    slot = utc(2026, 2, 1, 10, 0)
    last = slot - timedelta(minutes=1)
    assert plan_slots(hourly, last, slot + timedelta(seconds=120, microseconds=1)).missed == [slot]
    assert plan_slots(hourly, last, slot + timedelta(seconds=119, microseconds=999_999)).due == [slot]


def test_plan_fires_each_slot_once_across_consecutive_ticks() -> None:
    every_minute = Schedule.parse("* * * * *")
    start = utc(2026, 2, 1, 10, 0, 30)
    fired: list[datetime] = []
    last = start
    for step in range(1, 11):  # ticks every 20 s for 200 s
        now = start + timedelta(seconds=20 * step)
        plan = plan_slots(every_minute, last, now)
        assert plan.missed == []
        fired += plan.due
        last = now
    assert fired == [utc(2026, 2, 1, 10, 1), utc(2026, 2, 1, 10, 2), utc(2026, 2, 1, 10, 3)]


def test_no_backfill_after_an_outage() -> None:
    every_minute = Schedule.parse("* * * * *")
    last = utc(2026, 2, 1, 10, 0, 30)
    now = utc(2026, 2, 1, 10, 10, 30)  # down for ten minutes
    plan = plan_slots(every_minute, last, now)
    assert plan.due == [utc(2026, 2, 1, 10, 9), utc(2026, 2, 1, 10, 10)]  # 90 s and 30 s late
    assert plan.missed == [utc(2026, 2, 1, 10, m) for m in range(1, 9)]
    # the next tick does not bring the missed slots back
    assert plan_slots(every_minute, now, now + timedelta(seconds=10)) == type(plan)([], [], False)


def test_a_long_outage_is_bounded() -> None:
    every_minute = Schedule.parse("* * * * *")
    last = utc(2026, 1, 1)
    now = utc(2026, 3, 1)  # two months of minutes
    plan = plan_slots(every_minute, last, now, max_missed=5)
    assert plan.missed == [utc(2026, 1, 1, 0, m) for m in range(1, 6)]
    assert plan.missed_truncated is True
    assert plan.due == [now - timedelta(minutes=2), now - timedelta(minutes=1), now]


def test_plan_with_now_not_after_last_checked_is_empty() -> None:
    s = Schedule.parse("* * * * *")
    t = utc(2026, 1, 1, 0, 0)
    assert plan_slots(s, t, t).due == []
    assert plan_slots(s, t, t - timedelta(minutes=5)).missed == []


def test_grace_default_is_120_seconds() -> None:
    assert MISFIRE_GRACE_S == 120


# --- file watch -------------------------------------------------------------------------------------------------


def test_file_watch_first_look_is_baseline_then_each_modification_fires_once(tmp_path: Path) -> None:
    path = tmp_path / "drop.csv"
    path.write_text("a\n")
    os.utime(path, ns=(1_000_000_000_000, 1_000_000_000_000))
    first = detect_change(None, observe_file(str(path)))
    assert (first.fire, first.reason) == (False, "baseline")
    unchanged = detect_change(first.state, observe_file(str(path)))
    assert (unchanged.fire, unchanged.reason) == (False, "unchanged")
    os.utime(path, ns=(2_000_000_000_000, 2_000_000_000_000))
    modified = detect_change(unchanged.state, observe_file(str(path)))
    assert (modified.fire, modified.reason) == (True, "modified")
    assert modified.state.mtime_ns == 2_000_000_000_000
    again = detect_change(modified.state, observe_file(str(path)))
    assert (again.fire, again.reason) == (False, "unchanged")


def test_file_watch_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "later.txt"
    base = detect_change(None, observe_file(str(path)))
    assert (base.fire, base.reason, base.state.exists) == (False, "baseline", False)
    still = detect_change(base.state, observe_file(str(path)))
    assert (still.fire, still.reason) == (False, "missing")
    path.write_text("now")
    created = detect_change(still.state, observe_file(str(path)))
    assert (created.fire, created.reason) == (True, "created")
    path.unlink()
    gone = detect_change(created.state, observe_file(str(path)))
    assert (gone.fire, gone.reason) == (False, "missing")
    assert observe_file(str(tmp_path / "no-dir" / "x")) == FileState(exists=False)
    assert observe_file(str(path / "child")) == FileState(exists=False)  # parent is not a directory


def test_file_watch_unreadable_look_keeps_the_baseline() -> None:
    def denied(_: str) -> os.stat_result:
        raise PermissionError(13, "Permission denied")

    failed = observe_file("/watched", stat=denied)
    assert failed.error == "PermissionError: Permission denied"
    baseline = FileState(exists=True, mtime_ns=5)
    change = detect_change(baseline, failed)
    assert (change.fire, change.reason, change.state) == (False, "unreadable", baseline)
    # a failed first look is no baseline: the next good look is
    first = detect_change(None, failed)
    assert (first.fire, first.reason) == (False, "unreadable")
    after = detect_change(first.state, FileState(exists=True, mtime_ns=9))
    assert (after.fire, after.reason) == (False, "baseline")


def test_file_watch_inputs() -> None:
    assert file_watch_inputs("/data/in.csv", 1_767_225_600_123_456_000) == {
        "file_watch_path": "/data/in.csv", "file_mtime": "2026-01-01T00:00:00.123456Z"}
    assert file_watch_inputs("/x", 4_102_444_799_999_999_999)["file_mtime"] == "2099-12-31T23:59:59.999999Z"
    assert file_watch_inputs("/x", 0)["file_mtime"] == "1970-01-01T00:00:00.000000Z"


# --- properties -------------------------------------------------------------------------------------------------

EXPRESSIONS = ["* * * * *", "*/7 * * * *", "0 * * * *", "30 2 * * *", "15 1,2,3 * * 0"]
ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata"]


@settings(max_examples=150, deadline=None)
@given(expr=st.sampled_from(EXPRESSIONS), zone=st.sampled_from(ZONES),
       start=st.integers(min_value=0, max_value=400 * 24 * 3600), gap=st.integers(min_value=1, max_value=6 * 3600))
def test_property_every_slot_is_either_due_or_missed_exactly_once(expr, zone, start, gap) -> None:
    schedule = Schedule.parse(expr, zone)
    last = utc(2026, 1, 1) + timedelta(seconds=start)
    now = last + timedelta(seconds=gap)
    plan = plan_slots(schedule, last, now, max_missed=10_000)
    assert not plan.missed_truncated
    assert plan.missed + plan.due == schedule.slots_between(last, now)
    assert all((now - s).total_seconds() <= MISFIRE_GRACE_S for s in plan.due)
    assert all((now - s).total_seconds() > MISFIRE_GRACE_S for s in plan.missed)
