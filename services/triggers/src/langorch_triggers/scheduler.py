"""The scheduler replica (api.md §10.4): cron schedules and file watches, run by the one triggers replica holding
``leader.scheduler`` in KV ``lo_locks`` (:class:`~langorch_infra.kv.LeaderLock`, renewed every third of
``scheduler_lock_ttl_s``; a dead holder's key expires and another replica takes over).

Schedules
---------
A heap of ``(next slot, trigger id)`` over the live ``scheduled`` registrations of the :class:`Registry`, built
when leadership is taken and re-planned for one registration when the registry reports it changed. At a due slot
the leader publishes a ``FireTrigger`` on ``LO_CMD`` whose identity is the slot: ``Nats-Msg-Id``
``fire:sched:<trigger id>:<slot>``, and a command id and run id derived from the same string. The leader records
how far it has got (``scheduler.checked_at`` in ``lo_locks``, every few seconds) and a new leader continues from
there. A slot published twice (a new leader re-publishing the last seconds of its predecessor, or two leaders for a
moment) is dropped by the stream's duplicate window (600 s, longer than the grace plus a takeover), and past it the
command handler finds the command's outcome already recorded; either way the slot fires once. Registrations sharing
a schedule share the slot computations of a round, and a round's fires are published concurrently in batches.

A slot more than :data:`~ckp_core.schedules.MISFIRE_GRACE_S` late (no leader ran, the loop stalled, the clock
jumped) starts no run: the leader records ``trigger_fire_skipped {outcome: skipped, reason: misfire}`` under the
same command id, so it is one event per slot whoever records it, and the schedule moves on to its next future slot
(no backfill).

File watches
------------
Every ``file_watch_interval_s`` the leader looks at the path of each live ``file_watch`` registration
(:func:`~ckp_core.schedules.observe_file`, on this replica's host). What it saw last is kept in ``lo_locks`` under
``filewatch.<trigger>`` (with the path and the registration's creation time, and deleted with the registration),
so a new leader neither fires again nor loses the baseline. The first look at a path by a registration is the
baseline; a later different modification time fires once (``Nats-Msg-Id``
``fire:file:<trigger>:<mtime_ns>``) with the inputs ``{file_watch_path, file_mtime}``. A missing file does not fire
and becomes the baseline: the file appearing later fires (as a modification would).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import json
import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING

from nats.errors import Error as NatsError
from nats.js.errors import KeyNotFoundError

from ckp_core.commands import FireTrigger
from ckp_core.errors import CommandRefused
from ckp_core.events import Actor, EventData, TriggerFireSkipped, format_time
from ckp_core.schedules import (
    MISFIRE_GRACE_S,
    FileState,
    Schedule,
    SlotPlan,
    detect_change,
    file_watch_inputs,
    observe_file,
    plan_slots,
)
from ckp_core.subjects import kv_token
from ckp_core.triggers import TriggerState
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import publish_command
from langorch_infra.kv import LeaderLock

if TYPE_CHECKING:
    from langorch_triggers.service import TriggersService

log = logging.getLogger(__name__)

LOCK_NAME = "scheduler"
ACTOR = Actor.system("triggers")
MAX_SLEEP_S = 1.0
"""Longest wait between two looks at the heap: bounds how late a leadership change or a clock jump is noticed."""
CHECKPOINT_KEY = "scheduler.checked_at"
"""``lo_locks`` key of the instant up to which the leader has handled every slot: where a new leader starts."""
CHECKPOINT_S = 5.0
"""How often the leader writes it (at most): a new leader re-publishes at most these last seconds' fires."""
MAX_MISSED = 10
"""Misfires recorded per registration and round; older missed slots of a long outage are skipped without a row."""
PUBLISH_BATCH = 256
"""Fires published at once (one schedule shared by thousands of registrations fires them all in the same second)."""
FOLLOWER_POLL_S = 0.1
"""How often a replica without the lock looks whether it has it now (a local check): a new leader starts at once."""
_IDS = uuid.UUID("0f6f1d2c-58a4-4b8e-9c53-2d7a61e4b3f1")
"""Namespace of the ids derived from a fire's identity (UUIDv5)."""


def _utcnow() -> datetime:
    return datetime.now(UTC)


def slot_key(tid: str, slot: datetime) -> str:
    """A scheduled fire's identity and ``Nats-Msg-Id``: ``fire:sched:<trigger id>:<slot, ISO UTC>``."""
    return f"fire:sched:{tid}:{format_time(slot.astimezone(UTC))}"


def file_key(tid: str, mtime_ns: int) -> str:
    """A file-watch fire's identity and ``Nats-Msg-Id``: ``fire:file:<trigger id>:<mtime_ns>``."""
    return f"fire:file:{tid}:{mtime_ns}"


def derived_ids(key: str) -> tuple[str, str]:
    """The command id and run id of the fire ``key``: the same on every replica and every attempt."""
    return str(uuid.uuid5(_IDS, f"command:{key}")), str(uuid.uuid5(_IDS, f"run:{key}"))


def baseline_key(tid: str) -> str:
    """``lo_locks`` key of a file watch's last look: ``filewatch.<trigger>``."""
    return f"filewatch.{kv_token(tid)}"


def _minute(at: datetime) -> datetime:
    """``at`` to the minute: cron slots are whole minutes, so the slots after ``at`` are the slots after this."""
    return at.replace(second=0, microsecond=0)


def _first_slot(schedule: Schedule, after: datetime) -> datetime | None:
    """The schedule's first slot after ``after``; None (logged) for a schedule that cannot be evaluated, so one
    bad registration (a time zone this host lacks) does not stop the others."""
    try:
        return schedule.next_after(after)
    except (ValueError, KeyError, OSError) as exc:  # croniter's errors are ValueErrors; a missing zone a KeyError
        log.warning("scheduler: schedule %r in %s cannot be evaluated (%s); it does not fire",
                    schedule.expression, schedule.timezone, exc)
        return None


def _parse_time(value: str | None) -> datetime | None:
    if not value:
        return None
    with contextlib.suppress(ValueError):
        return datetime.fromisoformat(value.replace("Z", "+00:00"))
    return None


def slot_fire(state: TriggerState, schedule: Schedule, slot: datetime, now: datetime,
              project_id: str | None) -> FireTrigger:
    """The fire of one slot of a registration, ``now`` being when it is published; its ids are the slot's."""
    command_id, run_id = derived_ids(slot_key(state.trigger_id, slot))
    return FireTrigger(
        command_id=command_id, actor=ACTOR, procedure_id=state.procedure_id or "", version=state.version or "",
        run_id=run_id, trigger_type="scheduled", triggered_by=schedule.expression, project_id=project_id,
        source_detail={"slot": format_time(slot), "scheduled_for": slot.astimezone(schedule.zone).isoformat(),
                       "timezone": schedule.timezone, "lag_ms": int((now - slot).total_seconds() * 1000)})


@dataclass
class Plan:
    """One live ``scheduled`` registration as the heap sees it: slots after ``last_checked`` are still to come."""

    state: TriggerState
    schedule: Schedule
    last_checked: datetime
    generation: int


class Scheduler:
    """The schedules and file watches of one replica, active while it holds the scheduler lock.

    ``now`` is the clock the slots are compared with (tests advance a fake one and call :meth:`wake`)."""

    def __init__(self, service: TriggersService, *, now: Callable[[], datetime] = _utcnow) -> None:
        self.service = service
        self.registry = service.registry
        self.now = now
        self.lock = LeaderLock(service.js, LOCK_NAME, service.instance, service.settings.scheduler_lock_ttl_s)
        self.plans: dict[str, Plan] = {}
        self.heap: list[tuple[datetime, int, str]] = []
        self.leading = False
        self.baselines: dict[str, tuple[tuple[str, str], FileState]] = {}  # (path, registered at), last look
        self._changed: set[str] = set()
        self._deleted: set[str] = set()  # registrations deleted since: their file-watch baselines go
        self._generation = 0
        self._checkpointed = 0.0  # monotonic time of the last checkpoint written
        self._wake = asyncio.Event()
        self.registry.listeners.append(self._on_change)

    def leader_of(self) -> list[str]:
        return [LOCK_NAME] if self.lock.held else []

    def wake(self) -> None:
        """Look at the heap now (the clock moved or a registration changed)."""
        self._wake.set()

    async def run(self) -> None:
        """Hold or wait for the lock, schedule and watch — until cancelled."""
        tasks = [asyncio.create_task(c) for c in (self.lock.keep(), self._schedule_forever(), self._watch_forever())]
        try:
            await asyncio.gather(*tasks)
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                    await t

    async def stop(self) -> None:
        with contextlib.suppress(NatsError, OSError):  # the lock expires by its TTL anyway
            await self.lock.release()

    # -- schedules ------------------------------------------------------------------------------------------------

    def _on_change(self, tid: str) -> None:
        self._changed.add(tid)
        state = self.registry.triggers.get(tid)
        if state is not None and not state.exists:
            self._deleted.add(tid)
        self._wake.set()

    async def _schedule_forever(self) -> None:
        while True:
            stop_if_cancelled()
            try:
                delay = await self.tick()
            except asyncio.CancelledError:
                raise
            except Exception:  # the scheduler must outlive any failure: the next round tries again
                log.exception("scheduler round failed")
                delay = MAX_SLEEP_S
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()
            self._wake.clear()

    async def tick(self) -> float:
        """One round: follow leadership, re-plan what changed, fire (or skip) the due slots. Returns how long to
        wait before the next round (at most :data:`MAX_SLEEP_S`)."""
        if not self.lock.held:
            if self.leading:
                log.info("scheduler: %s no longer leads; its schedules stop here", self.service.instance)
                self.leading, self.plans, self.heap, self.baselines = False, {}, [], {}
                self._checkpointed = 0.0
            return FOLLOWER_POLL_S
        now = self.now()
        if not self.leading:
            self._take_over(now, await self._checkpoint())
        changed, self._changed = self._changed, set()
        for tid in changed:
            self._replan(tid, now)
        # registrations sharing a schedule share their slots: each distinct plan is computed once per round
        slots: dict[tuple[str, str, datetime], SlotPlan] = {}
        nexts: dict[tuple[str, str], datetime | None] = {}
        jobs: list[tuple[tuple[datetime, int, str], Plan, SlotPlan]] = []
        while self.heap and self.heap[0][0] <= now:
            entry = heapq.heappop(self.heap)
            plan = self.plans.get(entry[2])
            if plan is None or plan.generation != entry[1]:
                continue  # re-planned or gone since this entry was pushed
            key = (plan.schedule.expression, plan.schedule.timezone, _minute(plan.last_checked))
            if key not in slots:
                slots[key] = plan_slots(plan.schedule, key[2], now, max_missed=MAX_MISSED)
            jobs.append((entry, plan, slots[key]))
        retry = False
        for batch in range(0, len(jobs), PUBLISH_BATCH):
            chunk = jobs[batch:batch + PUBLISH_BATCH]
            done = await asyncio.gather(*(self._run_due(plan, due, now) for _, plan, due in chunk))
            for (entry, plan, _), ok in zip(chunk, done, strict=True):
                if not ok:  # the next round tries these slots again (a repeat is dropped)
                    heapq.heappush(self.heap, entry)
                    retry = True
                    continue
                plan.last_checked = now
                key2 = (plan.schedule.expression, plan.schedule.timezone)
                if key2 not in nexts:
                    nexts[key2] = _first_slot(plan.schedule, now)
                following = nexts[key2]
                if following is not None:
                    self._push(plan, following)
        if retry:
            return MAX_SLEEP_S  # no checkpoint past a slot that is still to be fired
        await self._keep_checkpoint(now)
        if not self.heap:
            return MAX_SLEEP_S
        return max(0.0, min(MAX_SLEEP_S, (self.heap[0][0] - self.now()).total_seconds()))

    async def _run_due(self, plan: Plan, due: SlotPlan, now: datetime) -> bool:
        """Skip the missed slots and fire the due ones of one registration; False when that failed."""
        try:
            for slot in due.due:
                await self._fire(plan, slot, now)
            for slot in due.missed:
                await self._misfire(plan, slot, now)
        except Exception:  # NATS unreachable…: logged, tried again next round
            log.exception("scheduler: the fire of %s failed; it is tried again", plan.state.trigger_id)
            return False
        return True

    def _take_over(self, now: datetime, checkpoint: datetime | None) -> None:
        """Plan every live schedule from the previous leader's checkpoint (or, without one, from ``now - grace``):
        a slot it had not handled when it died still fires, or is a misfire when it is now too late; the few it
        fired after its last checkpoint are published again and dropped as duplicates. A registration changed
        since is planned from its change. The next slot of each (schedule, time zone, minute to start from) is
        computed once, so thousands of registrations sharing a few schedules load fast."""
        self.leading, self.plans, self.heap, self._changed = True, {}, [], set()
        since = min(checkpoint, now) if checkpoint is not None else now - timedelta(seconds=MISFIRE_GRACE_S)
        nexts: dict[tuple[str, str, datetime], datetime | None] = {}
        for state in self.registry.live("scheduled"):
            schedule = self._schedule_of(state)
            if schedule is None:
                continue
            changed_at = _parse_time(state.updated_at)
            start = max(since, changed_at) if changed_at is not None and changed_at < now else since
            key = (schedule.expression, schedule.timezone, _minute(start))
            if key not in nexts:
                nexts[key] = _first_slot(schedule, key[2])
            first = nexts[key]
            if first is not None:
                self._push(self._plan(state, schedule, start), first)
        log.info("scheduler: %s leads; %d schedule(s) planned", self.service.instance, len(self.plans))

    async def _checkpoint(self) -> datetime | None:
        """The instant the last leader had handled every slot up to (None: no leader ever wrote one)."""
        try:
            entry = await self.service.locks.get(CHECKPOINT_KEY)
        except KeyNotFoundError:
            return None
        return _parse_time((entry.value or b"").decode())

    async def _keep_checkpoint(self, now: datetime) -> None:
        """Record that every slot up to ``now`` is handled (every :data:`CHECKPOINT_S` at most)."""
        if time.monotonic() - self._checkpointed < CHECKPOINT_S:
            return
        try:
            await self.service.locks.put(CHECKPOINT_KEY, format_time(now).encode())
        except (NatsError, OSError):  # the next round writes it; a new leader meanwhile re-publishes a few more
            log.warning("scheduler: checkpoint not written", exc_info=True)
            return
        self._checkpointed = time.monotonic()

    def _replan(self, tid: str, now: datetime) -> None:
        """A registration changed: drop its plan unless it is a live schedule; a new or changed schedule is
        planned from ``now`` (its change applies to the slots after it)."""
        state = self.registry.triggers.get(tid)
        schedule = self._schedule_of(state) if state is not None and self.registry.is_live(tid) else None
        current = self.plans.get(tid)
        if schedule is None or state is None:
            self.plans.pop(tid, None)
            return
        if current is not None and current.schedule == schedule:
            current.state = state  # same slots; inputs and the like are read at the fire
            return
        self.plans.pop(tid, None)
        first = _first_slot(schedule, now)
        if first is not None:
            self._push(self._plan(state, schedule, now), first)

    @staticmethod
    def _schedule_of(state: TriggerState) -> Schedule | None:
        if state.config.get("trigger_type") != "scheduled" or not state.config.get("schedule"):
            return None
        # validated at registration; Schedule.parse would validate again, ten times slower
        return Schedule(str(state.config["schedule"]), str(state.config.get("timezone") or "UTC"))

    def _plan(self, state: TriggerState, schedule: Schedule, last_checked: datetime) -> Plan:
        self._generation += 1
        plan = self.plans[state.trigger_id] = Plan(state, schedule, last_checked, self._generation)
        return plan

    def _push(self, plan: Plan, slot: datetime) -> None:
        heapq.heappush(self.heap, (slot, plan.generation, plan.state.trigger_id))

    def next_slot(self, tid: str) -> datetime | None:
        """The next slot planned for a registration (None: no plan here — not leading, not a live schedule)."""
        plan = self.plans.get(tid)
        if plan is None:
            return None
        return min((slot for slot, generation, _ in self.heap if generation == plan.generation), default=None)

    def _project_of(self, state: TriggerState) -> str | None:
        return self.registry.project_of(state.procedure_id or "", state.version or "")

    async def _fire(self, plan: Plan, slot: datetime, now: datetime) -> None:
        cmd = slot_fire(plan.state, plan.schedule, slot, now, self._project_of(plan.state))
        await publish_command(self.service.js, cmd, msg_id=slot_key(plan.state.trigger_id, slot))
        self.service.metrics.scheduler_lag.observe(max(0.0, (self.now() - slot).total_seconds()))

    async def _misfire(self, plan: Plan, slot: datetime, now: datetime) -> None:
        """Record the slot as skipped (``misfire``) under the fire's own command id: one event per slot."""
        cmd = slot_fire(plan.state, plan.schedule, slot, now, self._project_of(plan.state))
        tid = plan.state.trigger_id
        late_s = (now - slot).total_seconds()

        def decide(state: TriggerState) -> EventData:
            if not state.exists:
                raise CommandRefused("not_found", f"no trigger is registered for {tid}", resource="trigger")
            return TriggerFireSkipped(
                procedure_id=cmd.procedure_id, version=cmd.version, fire_id=cmd.command_id, outcome="skipped",
                reason="misfire", trigger_type="scheduled", triggered_by=cmd.triggered_by,
                source_detail=cmd.source_detail,
                detail=f"the slot {format_time(slot)} came {late_s:.0f} s late; a schedule's fire more than "
                       f"{MISFIRE_GRACE_S} s late is skipped")

        await self.service.handler.handle(tid, cmd, decide, command_type="fire_trigger")

    # -- file watches ---------------------------------------------------------------------------------------------

    async def _watch_forever(self) -> None:
        while True:
            stop_if_cancelled()
            if self.lock.held:
                try:
                    await self.watch_once()
                except asyncio.CancelledError:
                    raise
                except Exception:  # the watcher must outlive any failure: the next round tries again
                    log.exception("file watch round failed")
            await asyncio.sleep(self.service.settings.file_watch_interval_s)

    async def watch_once(self) -> int:
        """Look at every live file watch once (leader only); returns how many fired."""
        await self._forget_deleted()
        watches = [(state, str(state.config.get("event_source") or "")) for state in self.registry.live("file_watch")]
        watches = [(state, path) for state, path in watches if path]
        # in a worker thread: a path on a slow or hung file system must not stall the schedules
        looks = await asyncio.to_thread(lambda: [observe_file(path) for _, path in watches])
        fired = 0
        for (state, path), current in zip(watches, looks, strict=True):
            tid = state.trigger_id
            previous = await self._baseline(state, path)
            change = detect_change(previous, current)
            if change.reason == "missing" or change.reason == "unreadable":
                log.debug("file watch %s: %s is %s (%s)", tid, path, change.reason, current.error or "no file")
            if change.fire and change.state.mtime_ns is not None:
                await self._fire_file(state, path, change.state.mtime_ns, change.reason)
                fired += 1
            if change.state != previous:
                await self._keep_baseline(state, path, change.state)
        return fired

    async def _forget_deleted(self) -> None:
        """Drop the stored looks of deleted registrations (a registration made again starts with a baseline
        anyway: a look is kept with the registration's creation time)."""
        deleted, self._deleted = self._deleted, set()
        for tid in deleted:
            self.baselines.pop(tid, None)
            state = self.registry.triggers.get(tid)
            if state is not None and state.exists:
                continue  # registered again meanwhile
            with contextlib.suppress(KeyNotFoundError):
                await self.service.locks.get(baseline_key(tid))  # most deleted registrations watched nothing
                await self.service.locks.delete(baseline_key(tid))

    async def _baseline(self, state: TriggerState, path: str) -> FileState | None:
        """The last look at ``path`` for this registration (None: never looked, it watched another path, or it
        is a registration made again since)."""
        tid = state.trigger_id
        cached = self.baselines.get(tid)
        if cached is None:
            try:
                entry = await self.service.locks.get(baseline_key(tid))
                raw = json.loads(entry.value or b"{}")
            except (KeyNotFoundError, ValueError):
                return None
            cached = self.baselines[tid] = (
                (str(raw.get("path")), str(raw.get("registered_at"))),
                FileState(bool(raw.get("exists")), raw.get("mtime_ns"), raw.get("error")))
        return cached[1] if cached[0] == (path, str(state.created_at)) else None

    async def _keep_baseline(self, state: TriggerState, path: str, look: FileState) -> None:
        value = {"path": path, "registered_at": state.created_at, "exists": look.exists, "mtime_ns": look.mtime_ns,
                 "error": look.error}
        await self.service.locks.put(baseline_key(state.trigger_id), json.dumps(value).encode())
        self.baselines[state.trigger_id] = ((path, str(state.created_at)), look)

    async def _fire_file(self, state: TriggerState, path: str, mtime_ns: int, reason: str) -> None:
        key = file_key(state.trigger_id, mtime_ns)
        command_id, run_id = derived_ids(key)
        cmd = FireTrigger(
            command_id=command_id, actor=ACTOR, procedure_id=state.procedure_id or "", version=state.version or "",
            run_id=run_id, trigger_type="file_watch", triggered_by=path, input_vars=file_watch_inputs(path, mtime_ns),
            project_id=self._project_of(state),
            source_detail={"file_watch_path": path, "mtime_ns": mtime_ns, "change": reason})
        await publish_command(self.service.js, cmd, msg_id=key)
