"""Cron schedules, fire slots, the misfire rule and file-watch change detection of the triggers (api.md §10.4).

Pure functions over instants the caller supplies (no clock is read here), except :func:`observe_file`, the one
``os.stat`` the file watcher needs.

Cron
----
A schedule is a 5-field cron expression ``minute hour day month day_of_week`` evaluated in an IANA time zone
(default ``UTC``) by ``croniter``. Macros (``@hourly``), a seconds or years field and hashed values (``H``) are
refused. Names (``jan``, ``mon``) and croniter's ``L``/``#`` forms are accepted.

Daylight saving time is what croniter does with zone-aware times:

* a wall-clock time that does not exist (the hour skipped in spring, e.g. 02:30 in Europe/Berlin on the last
  Sunday of March) fires once, at the first instant after the gap (03:00 local);
* a wall-clock time that occurs twice (the hour repeated in autumn) fires twice, once for each UTC offset;
  each is its own slot (slots are UTC instants), so both fire and neither is a duplicate of the other.

Slots and misfires
------------------
A slot is one instant the schedule fires at; :func:`slot_id` names it stably (trigger + UTC minute), for the
``Nats-Msg-Id`` that makes a fire exactly-once across replicas and leader changes. :func:`plan_slots` says which
slots between the last check and now fire and which are skipped as misfires: a slot more than
:data:`MISFIRE_GRACE_S` (120 s) late is skipped, and skipped slots are never fired later (no backfill).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from croniter import croniter

MISFIRE_GRACE_S = 120
DEFAULT_MAX_MISSED = 100
FIELD_NAMES = ("minute", "hour", "day", "month", "day_of_week")
FIELD_RANGES = ("0-59", "0-23", "1-31", "1-12 or jan-dec", "0-7 or sun-sat (0 and 7 are Sunday)")
_FIELD_CHARS = re.compile(r"[A-Za-z0-9*/,\-?#]+")


class ScheduleError(ValueError):
    """An invalid schedule or time zone: ``field`` is ``schedule`` or ``timezone`` (the registration's field),
    ``message`` says precisely what is wrong."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(message)
        self.field = field
        self.message = message


def _aware(instant: datetime, name: str) -> datetime:
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError(f"{name} must be a time-zone-aware datetime")
    return instant


def validate_timezone(name: object) -> ZoneInfo:
    if not isinstance(name, str) or not name.strip():
        raise ScheduleError("timezone", "the time zone must be a non-empty IANA name such as 'Europe/Berlin'")
    if name.startswith("/") or ".." in name or name != name.strip():
        raise ScheduleError("timezone", f"'{name}' is not an IANA time zone name")
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        raise ScheduleError("timezone", f"unknown time zone '{name}' (expected an IANA name such as "
                            "'America/New_York' or 'UTC')") from None


def _croniter_accepts(expr: str) -> bool:
    try:
        croniter(expr)
    except (ValueError, KeyError, TypeError):  # croniter's errors are ValueErrors; odd input may raise others
        return False
    return True


def validate_cron(expr: object) -> str:
    """The expression, normalised to single spaces, or :class:`ScheduleError` naming the field at fault."""
    if not isinstance(expr, str):
        raise ScheduleError("schedule", "the schedule must be a string of 5 cron fields "
                            "(minute hour day month day_of_week)")
    text = expr.strip()
    if not text:
        raise ScheduleError("schedule", "the schedule is empty; expected 5 cron fields "
                            "(minute hour day month day_of_week)")
    if text.startswith("@"):
        raise ScheduleError("schedule", f"'{text}': macros such as @hourly are not accepted; write the 5 fields "
                            "(e.g. '0 * * * *')")
    fields = text.split()
    if len(fields) != 5:
        raise ScheduleError("schedule", f"'{text}' has {len(fields)} field(s); expected exactly 5 "
                            "(minute hour day month day_of_week), no seconds or years field")
    for index, value in enumerate(fields):
        where = f"field {index + 1} ({FIELD_NAMES[index]}) '{value}'"
        if not _FIELD_CHARS.fullmatch(value):
            raise ScheduleError("schedule", f"{where} has characters cron does not accept")
        probe = ["*"] * 5
        probe[index] = value
        if not _croniter_accepts(" ".join(probe)):
            raise ScheduleError("schedule", f"{where} is not valid: allowed values are {FIELD_RANGES[index]}, "
                                "with '*', ',', '-' and '/step'")
    normalised = " ".join(fields)
    if not _croniter_accepts(normalised):
        raise ScheduleError("schedule", f"'{normalised}' is not a valid cron expression")
    return normalised


@dataclass(frozen=True)
class Schedule:
    """A validated cron expression in a time zone; build it with :meth:`parse`."""

    expression: str
    timezone: str = "UTC"

    @classmethod
    def parse(cls, expression: object, timezone: object = "UTC") -> Schedule:
        """:class:`ScheduleError` for a bad expression, a bad zone, or an expression that never fires."""
        tz = "UTC" if timezone is None else timezone
        validate_timezone(tz)
        assert isinstance(tz, str)
        schedule = cls(validate_cron(expression), tz)
        try:
            schedule.next_after(datetime(2000, 1, 1, tzinfo=UTC))
        except ValueError:  # croniter's CroniterBadDateError: no match within its search horizon
            raise ScheduleError("schedule", f"'{schedule.expression}' never fires (no such date)") from None
        return schedule

    @property
    def zone(self) -> ZoneInfo:
        return ZoneInfo(self.timezone)

    def next_after(self, instant: datetime) -> datetime:
        """The first slot strictly after ``instant`` (aware), in UTC."""
        start = _aware(instant, "instant").astimezone(self.zone)
        result = croniter(self.expression, start).get_next(datetime)
        assert isinstance(result, datetime)
        return result.astimezone(UTC)

    def slots_between(self, after: datetime, until: datetime, *, limit: int | None = None) -> list[datetime]:
        """Slots ``s`` with ``after < s <= until`` in order (UTC), at most ``limit`` of them."""
        _aware(after, "after")
        _aware(until, "until")
        out: list[datetime] = []
        it = croniter(self.expression, after.astimezone(self.zone))
        while limit is None or len(out) < limit:
            nxt = it.get_next(datetime)
            assert isinstance(nxt, datetime)
            if nxt > until:
                break
            out.append(nxt.astimezone(UTC))
        return out


def slot_id(trigger_id: str, slot: datetime) -> str:
    """The stable identity of one fire slot of one trigger: ``schedule:<trigger_id>:<UTC YYYY-MM-DDTHH:MMZ>``.
    The same trigger and instant give the same string on every replica (use it as the ``Nats-Msg-Id``); the two
    fires of a repeated autumn hour differ, since their UTC instants do."""
    utc = _aware(slot, "slot").astimezone(UTC)
    return f"schedule:{trigger_id}:{utc:%Y-%m-%dT%H:%M}Z"


@dataclass(frozen=True)
class SlotPlan:
    due: list[datetime]
    """Slots to fire now (at most :data:`MISFIRE_GRACE_S` late), oldest first."""
    missed: list[datetime]
    """Slots skipped as ``misfire`` (more than the grace late), oldest first, at most ``max_missed`` of them."""
    missed_truncated: bool
    """More slots were missed than ``missed`` lists (a long outage); they are skipped all the same."""


def plan_slots(schedule: Schedule, last_checked: datetime, now: datetime, *, grace_s: float = MISFIRE_GRACE_S,
               max_missed: int = DEFAULT_MAX_MISSED) -> SlotPlan:
    """Which slots in ``(last_checked, now]`` fire and which are misfires. A slot ``s`` fires when
    ``now - s <= grace_s`` (exactly 120 s late still fires, 121 s does not), else it is missed; missed slots are
    never returned as due later, as the caller moves ``last_checked`` to ``now``. Work is bounded by the slots
    inside the grace window plus ``max_missed``, however long the gap."""
    _aware(last_checked, "last_checked")
    _aware(now, "now")
    if now <= last_checked:
        return SlotPlan([], [], False)
    cutoff = now - timedelta(seconds=grace_s)  # slots >= cutoff are due
    missed: list[datetime] = []
    truncated = False
    if last_checked < cutoff:
        candidates = schedule.slots_between(last_checked, cutoff, limit=max_missed + 1)
        missed = [s for s in candidates if s < cutoff]
        if len(missed) > max_missed:
            missed, truncated = missed[:max_missed], True
    # the due window starts just before the cutoff so that a slot exactly at the cutoff is due
    due_from = max(last_checked, cutoff - timedelta(microseconds=1))
    due = [s for s in schedule.slots_between(due_from, now) if s >= cutoff and s > last_checked]
    return SlotPlan(due, missed, truncated)


# --- file watch ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class FileState:
    """One look at a watched path: ``exists`` with its modification time, missing, or unreadable (``error``)."""

    exists: bool
    mtime_ns: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class FileChange:
    fire: bool
    reason: str
    """``baseline`` (first look), ``unchanged``, ``modified``, ``created``, ``missing`` or ``unreadable``."""
    state: FileState
    """The state to keep for the next look."""


def observe_file(path: str, stat: Callable[[str], os.stat_result] = os.stat) -> FileState:
    """Look at ``path`` (the scheduler replica's file system): a missing path (or a missing parent directory) is
    ``exists=False``; any other OS error (permission denied…) is recorded in ``error``."""
    try:
        st = stat(path)
    except (FileNotFoundError, NotADirectoryError):
        return FileState(exists=False)
    except OSError as exc:
        return FileState(exists=False, error=f"{type(exc).__name__}: {exc.strerror or exc}")
    return FileState(exists=True, mtime_ns=st.st_mtime_ns)


def detect_change(previous: FileState | None, current: FileState) -> FileChange:
    """The file-watch rule: the first look (``previous is None``) is a baseline and never fires; later, a changed
    modification time fires once, and so does a file appearing where there was none. A file that disappears does
    not fire (the next appearance will). A look that failed (``error``) neither fires nor moves the baseline."""
    if current.error is not None:
        return FileChange(False, "unreadable", previous if previous is not None else current)
    if previous is None or previous.error is not None:
        return FileChange(False, "baseline", current)
    if not current.exists:
        return FileChange(False, "missing", current)
    if not previous.exists:
        return FileChange(True, "created", current)
    if current.mtime_ns != previous.mtime_ns:
        return FileChange(True, "modified", current)
    return FileChange(False, "unchanged", current)


def file_watch_inputs(path: str, mtime_ns: int) -> dict[str, str]:
    """The run inputs of a file-watch fire: ``{file_watch_path, file_mtime}`` (RFC 3339 UTC, microseconds)."""
    seconds, nanos = divmod(mtime_ns, 1_000_000_000)  # integer arithmetic: a float loses the microseconds
    mtime = datetime.fromtimestamp(seconds, tz=UTC) + timedelta(microseconds=nanos // 1000)
    return {"file_watch_path": path, "file_mtime": mtime.isoformat(timespec="microseconds").replace("+00:00", "Z")}
