"""The runtime service: consumes ``lo.cmd.run.*`` and executes runs durably.

A start message is acknowledged only when its run is terminal; while the run works the replica signals
progress (``+WPI``) every third of the ack wait, so a replica that dies loses the message to another one,
which continues from the last LangGraph checkpoint and emits ``execution_recovered``. The replica executing a
run owns it (:mod:`langorch_runtime.ownership`): a command of a run that a live replica executes waits, and the
run of a dead one is taken over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import zlib
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any, cast

import psycopg
from langchain_core.runnables import RunnableConfig
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from langgraph.types import Command, StateSnapshot
from nats import errors as nats_errors
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from ckp_core import runs
from ckp_core.audit import Outcome, command_entry
from ckp_core.commands import CancelRun, DeleteRun, RequestApproval, ResumeRun, RetryRun, StartRun
from ckp_core.commands import Command as LoCommand
from ckp_core.errors import CommandRefused, ConcurrencyError
from ckp_core.events import (
    Actor,
    ErrorObject,
    EventData,
    ExecutionRecovered,
    ExecutionResumed,
    ExecutionStarted,
    RunCanceled,
    RunCancelRequested,
    RunCompleted,
    RunDeleted,
    RunFailed,
    RunRetryRequested,
    RunSuspended,
    format_time,
    utc_now,
)
from ckp_core.eventstore import AggregateHead, StoredEvent
from ckp_core.ir import ProcedureIR
from ckp_core.redaction import Redactor
from ckp_core.subjects import (
    COMMAND_STREAM,
    EVENT_STREAM,
    LOCKS_BUCKET,
    PROCEDURES_BUCKET,
    STEPS_BUCKET,
    aggregate_filter,
    event_subject,
)
from langorch_infra import logs
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import ACK, LEAVE, BusMetrics, Settle, fetch, handle_one, nak
from langorch_infra.callbacks import callback_key
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.handling import CommandHandler, Handled
from langorch_infra.hosting import ServiceHost, bus_checks, probe_check
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_consumer, ensure_topology, publish_command
from langorch_infra.kv import kv_keys
from langorch_infra.metrics import package_version, register_build_info
from langorch_infra.secret_providers import EventStoreRecords, SecretError, SecretResolver
from langorch_infra.secrets import grant_key, make_grant
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agent_dispatch import AgentDispatcher
from langorch_runtime.agents import CONSUMER as AGENTS_CONSUMER
from langorch_runtime.agents import AgentService
from langorch_runtime.artifacts import ObjectStoreArtifacts
from langorch_runtime.checkpoints import Barrier, GroupCommit, GroupCommitSaver
from langorch_runtime.children import JetStreamChildRuns, resume_parent
from langorch_runtime.creation import (
    EXECUTE_SUBJECTS,
    RUN_CONSUMER,
    RunCreation,
    RunCreator,
    fold_run,
    run_redactor,
    sensitive_variables,
    start_meta,
)
from langorch_runtime.errors import StepError
from langorch_runtime.executor import RunWriter, build_graph, retry_target
from langorch_runtime.frames import APPROVALS_KEY
from langorch_runtime.llm import LlmClient
from langorch_runtime.machine import WAIT_FIELDS, CallbackConfig, Machine, RunInfo
from langorch_runtime.metrics import RuntimeMetrics
from langorch_runtime.ownership import RunHeld, RunOwnership
from langorch_runtime.queries import RuntimeQueries
from langorch_runtime.ratelimit import ProcedureLimiter
from langorch_runtime.steps import BLIP_PATIENCE_S, StepStore
from langorch_runtime.timers import CallbackTimer
from langorch_runtime.webhooks import Webhooks

log = logging.getLogger(__name__)

CONSUMER = RUN_CONSUMER
QUEUE_POLL_S = 5.0
SETUP_POLL_S = 0.1  # a replica waiting for another's checkpoint migrations asks again this often
SAVER_LANES = 8  # checkpoint savers per replica (saver_for); the pool has 10 connections
DEFECT_DELIVERIES = 3  # a run command failing this often on a defect (not the infrastructure) fails its run
ACTOR = Actor.system("runtime")
VERSION = package_version("langorch-runtime")


async def _try_setup_lock(conn: psycopg.AsyncConnection[Any]) -> bool:
    row = await (await conn.execute("SELECT pg_try_advisory_lock(72022)")).fetchone()
    return bool(row and row[0])


async def open_checkpointer(database_url: str) -> tuple[AsyncConnectionPool[Any], AsyncPostgresSaver]:
    """Open the pool and the official PostgreSQL saver, creating its tables once (serialised by a lock)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        # polled, not waited for: a replica waiting in pg_advisory_lock is an open transaction, and the holder's
        # CREATE INDEX CONCURRENTLY waits for every open transaction (PostgreSQL then reports a deadlock)
        while not await _try_setup_lock(conn):
            await asyncio.sleep(SETUP_POLL_S)
        try:
            await AsyncPostgresSaver(conn).setup()  # type: ignore[arg-type]
        finally:
            await conn.execute("SELECT pg_advisory_unlock(72022)")
    pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
        database_url, min_size=1, max_size=10, open=False,
        kwargs={"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row},
    )
    await pool.open()
    return pool, AsyncPostgresSaver(pool)


def scaled_sleep(scale: float) -> Callable[[float], Awaitable[None]]:
    """The machine's sleep for the document's own pauses, shortened by ``LANGORCH_TIME_SCALE`` (tests only)."""
    if scale == 1:
        return asyncio.sleep

    async def sleep(seconds: float) -> None:
        await asyncio.sleep(seconds * scale)

    return sleep


class RunBusy(Exception):
    """A resume reached a run that is executing: settle it later."""


class RunIncomplete(Exception):
    """The run's graph stopped with neither an outcome nor a wait: nothing would ever continue the run, so the
    command is not acknowledged (a defect: redelivered, and the run fails with ``internal_error`` at last) instead
    of leaving the run ``running`` for ever."""


class RetryNotDue(Exception):
    """An automatic retry taken up before ``retry_delay_ms`` passed: redeliver it when it is due."""

    def __init__(self, seconds: float) -> None:
        super().__init__(f"retry due in {seconds:.3f} s")
        self.seconds = seconds


class RuntimeService:
    """One runtime replica."""

    def __init__(self, settings: RuntimeSettings) -> None:
        self.settings = settings
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.pool: AsyncConnectionPool[Any] | None = None
        self.saver: AsyncPostgresSaver | None = None
        self.savers: list[AsyncPostgresSaver] = []  # the runs' checkpoint lanes (saver_for)
        # the runs executing here: a checkpoint of one commits once the events it emitted before are stored
        self.barriers: dict[str, Barrier] = {}
        self.slots = asyncio.Semaphore(settings.max_concurrent_runs)
        self.tasks: set[asyncio.Task[None]] = set()
        self.metrics = RuntimeMetrics(node_labels=settings.metrics_node_labels)
        register_build_info(self.metrics.registry, "runtime", VERSION)
        self.bus = BusMetrics(self.metrics.registry, "runtime")
        self.dispatcher = AgentDispatcher(settings, instance_id=self.instance, metrics=self.metrics)
        self._queues: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, f"langorch-runtime-{self.instance}", self.settings)
        self.js = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.audit = AuditWriter(self.js)
        self.pool, self.saver = await open_checkpointer(self.settings.database_url)
        group = GroupCommit(self.pool)  # the checkpoints of concurrent runs are committed together
        self.savers = [GroupCommitSaver(self.pool, group, self.barriers) for _ in range(SAVER_LANES)]
        # a run's appends are tried again through a NATS blip, as its step records are (StepStore)
        self.store = JetStreamEventStore(self.js, patience_s=BLIP_PATIENCE_S)
        self.procedures = await self.js.key_value(PROCEDURES_BUCKET)
        self.steps_kv = await self.js.key_value(STEPS_BUCKET)
        self.runs = CommandHandler(self.store, "run", fold_run, audit=self.audit)
        # versions and IRs are read (and cached) by one creator, for child runs as for the start gate
        self.creator = RunCreator(self.store, self.js, self.procedures, self.audit)
        self.children = JetStreamChildRuns(self.creator, ACTOR)
        await self.dispatcher.start()
        self.limiter = await ProcedureLimiter.open(self.js, self.instance)
        self.artifacts = await ObjectStoreArtifacts.open(self.js)
        # secret metadata records are folded from the gateway's secret aggregate in LO_EVT (the runtime reads no
        # projection of the gateway), kept for the provider cache's TTL
        self.resolver = SecretResolver(self.settings, EventStoreRecords(self.store, self.settings.secret_cache_ttl_s))
        self.secrets = ProviderSecrets(grant_key(self.settings.auth_secret_key.get_secret_value()), self.resolver)
        self.dispatcher.secrets = self.resolver
        self.llm = LlmClient(self.settings, secrets=self.secrets.value, metrics=self.metrics)
        self.webhooks = Webhooks(self.settings, secrets=self.secrets.lookup)
        self.ownership = RunOwnership(self.nc, self.js, self.instance)  # one replica executes a run at a time
        await self.ownership.start()
        # the agent lease slots of a replica gone from NATS are taken over, not left taken until their TTL
        self.dispatcher.owner, self.dispatcher.holder_gone = self.ownership.owner_id, self.ownership.gone
        self.timer = CallbackTimer(self.js, self.instance, ACTOR, lock_ttl_s=self.settings.leader_lock_ttl_s)
        await self.timer.start()
        # every run command but creation (its own consumer, langorch_runtime.creation): a consumer declared by an
        # older version with lo.cmd.run.> is narrowed in place
        await ensure_consumer(self.js, COMMAND_STREAM, ConsumerConfig(
            durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=self.settings.ack_wait_s,
            filter_subjects=list(EXECUTE_SUBJECTS), max_ack_pending=1000))
        self.sub = await self.js.pull_subscribe_bind(CONSUMER, stream=COMMAND_STREAM)
        self._queues = asyncio.create_task(self._watch_queues(), name="runtime-queue-depth")

    async def _watch_queues(self) -> None:
        """``langorch_queue_depth``: messages not yet delivered of the run consumer (``run_queue``) and of the
        agent/lease command consumer (``control``), read every ``QUEUE_POLL_S``."""
        assert self.js is not None
        while True:
            stop_if_cancelled()
            for queue_type, durable in (("run_queue", CONSUMER), ("control", AGENTS_CONSUMER)):
                try:
                    info = await self.js.consumer_info(COMMAND_STREAM, durable)
                    self.metrics.state.queue_depth[queue_type] = int(info.num_pending or 0)
                except asyncio.CancelledError:
                    raise
                except (nats_errors.Error, OSError):  # the gauge keeps its last value until the next poll
                    log.debug("reading consumer %s failed", durable, exc_info=True)
            await asyncio.sleep(QUEUE_POLL_S)

    async def run(self) -> None:
        """Fetch start commands forever, executing up to ``max_concurrent_runs`` at once. A slot is taken before
        the fetch, so a replica only takes a command it can start at once (FastStream's concurrent pull subscriber
        fetches first and queues); a fetch's transient errors (a failover) are survived by ``fetch``."""
        while True:
            stop_if_cancelled()
            await self.slots.acquire()
            msgs = await fetch(self.sub, 1, 5.0)
            if not msgs:
                self.slots.release()
                continue
            for msg in msgs:
                task = asyncio.create_task(handle_one(msg, self._handle, self.bus))
                self.tasks.add(task)
                task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self.tasks.discard(task)
        self.slots.release()

    async def stop(self) -> None:
        if self._queues is not None:
            self._queues.cancel()
        for task in list(self.tasks):
            task.cancel()
        for task in list(self.tasks):
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await task
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.timer.stop()
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.ownership.stop()
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.llm.aclose()
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.webhooks.aclose()
        with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
            await self.dispatcher.stop()
        if self.pool is not None:
            await self.pool.close()
        if self.nc is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self.nc.close()

    def leader_of(self) -> list[str]:
        """The leader locks this replica holds now (its presence lists them)."""
        timer: CallbackTimer | None = getattr(self, "timer", None)
        return [timer.lock.name] if timer is not None and timer.lock.held else []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the streams and buckets runs need present, PostgreSQL (checkpoints) answering."""
        checks = await bus_checks(self.nc, self.js, (EVENT_STREAM, COMMAND_STREAM),
                                  (PROCEDURES_BUCKET, STEPS_BUCKET, LOCKS_BUCKET))
        pool = self.pool

        async def select_one() -> None:
            assert pool is not None
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")

        checks["postgres"] = await probe_check(select_one if pool is not None else None)
        return checks

    async def _handle(self, msg: Msg) -> Settle:
        heartbeat = asyncio.create_task(self._progress(msg))
        command: StartRun | ResumeRun | RetryRun | None = None
        try:
            if msg.subject.endswith(".cancel"):
                await self.cancel(CancelRun.model_validate_json(msg.data))
                return ACK
            if msg.subject.endswith(".delete"):
                await self.delete_run(DeleteRun.model_validate_json(msg.data))
                return ACK
            if msg.subject.endswith(".resume"):
                command = ResumeRun.model_validate_json(msg.data)
            elif msg.subject.endswith(".retry"):
                command = RetryRun.model_validate_json(msg.data)
            else:
                command = StartRun.model_validate_json(msg.data)
            with logs.fields(run_id=command.run_id, command_id=command.command_id):
                await self.ownership.acquire(command.run_id, msg.reply)
                try:
                    await self.execute(command, msg.metadata.num_delivered or 1)
                finally:
                    await self.ownership.release(command.run_id)
            return ACK
        except RunHeld as held:  # another command of the run executes it, here or on a live replica
            return nak(held.delay_s)
        except RunBusy:
            return nak(1.0)
        except RetryNotDue as exc:
            return nak(exc.seconds)
        except ConcurrencyError as exc:
            # another replica writes this run now; leave the message to JetStream's redelivery
            log.warning("run lost to another writer: %s", exc)
            return LEAVE
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a defect or an outage: redelivered, and a defect fails the run at last
            defect = not _infrastructure(exc)
            if defect and command is not None and (msg.metadata.num_delivered or 1) >= DEFECT_DELIVERIES:
                log.exception("run %s failed on a defect %d times: the run fails with internal_error",
                              command.run_id, DEFECT_DELIVERIES)
                try:
                    await self.fail_defect(command, exc)
                    return ACK
                except Exception:  # best effort: the command is redelivered and tried again
                    log.exception("failing run %s with internal_error failed", command.run_id)
            log.exception("run command failed; it will be redelivered")
            return nak(1.0 if defect else 5.0)
        finally:
            heartbeat.cancel()

    async def fail_defect(self, command: StartRun | ResumeRun | RetryRun, exc: Exception) -> None:
        """ckp.md §7.16 ``internal_error`` (retryable): a run whose command keeps failing on a defect in LangOrch
        fails instead of being redelivered for ever. The message names the exception type only (its text may
        carry run data)."""
        events = await self.store.read("run", command.run_id)
        if not events or run_status(events) in runs.TERMINAL_STATUSES:
            return
        head = AggregateHead(events[-1].envelope.seq, events[-1].position)
        writer = RunWriter(self.store, command.run_id, head, Redactor(), ACTOR, command.command_id)
        error = ErrorObject(code="internal_error", retryable=True, message=f"an internal error "
                            f"({type(exc).__name__}) stopped the run; the runtime log has the details",
                            details={"exception": type(exc).__name__, "deliveries": DEFECT_DELIVERIES})
        await writer.emit(RunFailed(error=error))
        if self.js is not None:
            created = events[0].envelope.data
            try:  # the version's resume_on_failure applies to this retryable error too (§7.12)
                ir = await self.load_ir(created["procedure_id"], created["procedure_version"])
            except Exception:  # the defect may be in loading the version: the run stays failed
                log.exception("run %s: no automatic retry, its version could not be loaded", command.run_id)
                ir = None
            if ir is not None:
                await retry_automatically(self.js, ir, error, events, command)
            await resume_parent(self.js, created, command.run_id,
                                {"status": "failed", "error": error.model_dump(mode="json")}, {}, ACTOR)
            await self.cancel_open_children(command.run_id, "parent failed")

    async def _progress(self, msg: Msg) -> None:
        interval = max(0.2, self.settings.ack_wait_s / 3)
        while True:
            await asyncio.sleep(interval)
            stop_if_cancelled()
            with contextlib.suppress(nats_errors.Error, OSError):  # a lost progress signal: the next one may land
                await msg.in_progress()

    async def invoke(self, run_id: str, graph: Any, value: Any, config: dict[str, Any], **kwargs: Any) -> Any:
        """Run the graph until it ends or suspends; returns ``CANCELED`` when the run is canceled meanwhile
        (``run_cancel_requested`` seen on its subject, whichever replica appended it)."""
        assert self.nc is not None
        requested = asyncio.Event()

        async def on_cancel(msg: Msg) -> None:
            requested.set()

        sub = await self.nc.subscribe(event_subject("run", run_id, "run_cancel_requested"), cb=on_cancel)
        task = asyncio.create_task(graph.ainvoke(value, config, **kwargs))
        waiter = asyncio.create_task(requested.wait())
        try:
            done, _ = await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
            if task in done:
                if task.exception() is not None:  # the events emitted before the failure are stored, as emitted
                    with contextlib.suppress(Exception):  # an append failure here is secondary to the graph's
                        await graph.machine.settle()
                return task.result()
            task.cancel()
            with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
                await task
            return CANCELED
        finally:
            waiter.cancel()
            if not task.done():
                task.cancel()
            with contextlib.suppress(nats_errors.Error, OSError):  # the connection may be closed or draining already
                await sub.unsubscribe()

    async def _audit(self, command: LoCommand, outcome: Outcome = "accepted", *, code: str | None = None,
                     detail: str | None = None, **kwargs: Any) -> None:
        """The command's one audit record (api.md §12); a redelivery publishes it again and is deduplicated."""
        await self.audit.write(command_entry(command, outcome, code=code, detail=detail, **kwargs))

    async def cancel(self, command: CancelRun) -> None:
        """Cancel a run (api.md §5.4): at once when nothing executes it, else through the executing replica.

        A refusal (an unknown or ended run) is only audited: a cancel was never a ``command_rejected`` event."""
        requested_by = command.actor.render()

        def decide(run: runs.RunState) -> EventData | None:
            if not run.exists:
                raise CommandRefused("not_found", f"run {command.run_id} not found")
            decision = runs.decide_cancel(run.status)
            if decision == "noop":
                return None
            if decision == "request":  # it runs: the executing replica stops it and appends run_canceled
                return RunCancelRequested(reason=command.reason, requested_by=requested_by)
            return RunCanceled(reason=command.reason, requested_by=requested_by)

        handled = await self.runs.handle(command.run_id, command, decide, command_type="cancel_run", actor=ACTOR,
                                         correlation_id=command.run_id, refusals="audit")
        event = handled.event
        if event is not None and event.type == "run_canceled" and self.js is not None:  # again on a redelivery
            events = await self.store.read("run", command.run_id)
            await resume_parent(self.js, events[0].envelope.data, command.run_id, {"status": "canceled"}, {}, ACTOR)
            await self.cancel_open_children(command.run_id, "parent canceled", events)

    async def cancel_open_children(self, run_id: str, reason: str, events: list[Any] | None = None,
                                   keep: set[str] | None = None) -> None:
        """A parent that ends — canceled, or completed/failed while a branch still waited on a child (a terminate
        from a sibling branch, a parallel ``any`` winner, ``branch_failure: fail``) — cancels every child run it
        started that has not finished (ckp.md §3.9 step 5), so no orphan keeps waiting or working. A suspended
        parent passes the children it still waits on as ``keep``: the others belong to frames canceled meanwhile."""
        if self.js is None:
            return
        if events is None:
            events = await self.store.read("run", run_id)
        children = {e.envelope.data["child_run_id"] for e in events if e.envelope.type == "subflow_started"}
        children -= {e.envelope.data["child_run_id"] for e in events
                     if e.envelope.type in ("subflow_completed", "subflow_failed")}
        children -= keep or set()
        for child in sorted(children):
            await publish_command(self.js, CancelRun(actor=ACTOR, run_id=child, reason=reason))

    async def start_gate(self, created: dict[str, Any], ir: ProcedureIR) -> ErrorObject | None:
        """§7.2 (2): a version archived or deleted since the run was created is ``procedure_not_runnable``, one whose
        ``effective_date`` is still ahead ``procedure_not_effective``; the run fails before it starts. A version
        deprecated meanwhile (a promotion) still runs the runs created before: only new runs are refused on it."""
        procedure_id, version = str(created["procedure_id"]), str(created["procedure_version"])
        found = await self.creator.version(procedure_id, version)
        if found is None or found.status == "archived":
            return ErrorObject(code="procedure_not_runnable", message=f"procedure {procedure_id}@{version} is "
                               f"{found.status if found else 'deleted'}", details={"status": found.status if found
                                                                                    else None})
        today = utc_now().date().isoformat()
        if ir.effective_date and ir.effective_date > today:
            return ErrorObject(code="procedure_not_effective", message=f"procedure {procedure_id}@{version} is "
                               f"effective from {ir.effective_date}", details={"effective_date": ir.effective_date})
        return None

    def saver_for(self, run_id: str) -> AsyncPostgresSaver:
        """The checkpoint saver of a run. The official saver passes every call through one lock, so the runs of
        this replica are spread over ``SAVER_LANES`` savers sharing the connection pool: checkpoints of different
        runs are written side by side, those of one run (always the same lane) one after the other."""
        assert self.savers, "the runtime is not started"
        return self.savers[zlib.crc32(run_id.encode()) % len(self.savers)]

    async def load_ir(self, procedure_id: str, version: str) -> ProcedureIR | None:
        """The version's IR from KV, parsed once per KV revision (see :meth:`RunCreator.load_ir`)."""
        return await self.creator.load_ir(procedure_id, version)

    async def execute(self, command: StartRun | ResumeRun | RetryRun, delivery: int) -> None:
        """Execute (or continue, resume, retry) one run until it is terminal or durably suspended."""
        try:
            await self._execute(command, delivery)
            stored = self.barriers.get(command.run_id)
            if stored is not None:  # whatever the run emitted is stored before its command is acknowledged
                await stored()
        finally:
            self.barriers.pop(command.run_id, None)

    async def _execute(self, command: StartRun | ResumeRun | RetryRun, delivery: int) -> None:
        run_id = command.run_id
        events = await self.store.read("run", run_id)
        if not events:
            log.error("command for unknown run %s dropped", run_id)
            return await self._audit(command, "rejected", code="not_found", detail=f"run {run_id} not found")
        created = events[0].envelope.data
        logs.bind(procedure_id=created.get("procedure_id"))
        status = run_status(events)
        if isinstance(command, RetryRun):
            try:
                runs.decide_retry(status)
            except CommandRefused as refusal:
                log.info("retry of run %s in status %s ignored", run_id, status)
                return await self._audit(command, "rejected", code=refusal.code, detail=refusal.message)
        retries = [i for i, e in enumerate(events) if e.envelope.type == "run_retry_requested"]
        current = events[retries[-1]:] if retries else events
        terminal = next((e for e in current if e.envelope.type in runs.ENDS), None)
        if terminal is not None and not isinstance(command, RetryRun):
            await self._audit(command, extra_meta={"noop": True})  # ended meanwhile: nothing to do
            if terminal.envelope.type in ("run_completed", "run_failed") and self.js is not None:
                status = runs.END_EVENTS[terminal.envelope.type]
                await resume_parent(self.js, created, run_id, {**terminal.envelope.data, "status": status}, {}, ACTOR)
            return
        head = AggregateHead(events[-1].envelope.seq, events[-1].position)
        ir = await self.load_ir(created["procedure_id"], created["procedure_version"])
        sensitive = sensitive_variables(ir)
        redactor = run_redactor(ir, created["input_vars"])
        writer = RunWriter(self.store, run_id, head, redactor, ACTOR, command.command_id)
        self.barriers[run_id] = writer.stored  # its checkpoints commit once its events are stored
        await self._audit(command, sensitive_keys=redactor.extra_keys, sensitive_values=redactor.values,
                          extra_meta=run_meta(command, created))
        if ir is None:
            unavailable = ErrorObject(code="procedure_not_runnable", message=f"procedure {created['procedure_id']}@"
                                      f"{created['procedure_version']} is not available to the runtime")
            await writer.emit(RunFailed(error=unavailable))
            if self.js is not None:  # a child run: its parent waits for it
                await resume_parent(self.js, created, run_id, {"status": "failed",
                                                               "error": unavailable.model_dump(mode="json")}, {}, ACTOR)
            return
        if status == "canceling":  # the replica that executed it died before finishing the cancel
            requested = next(e for e in reversed(events) if e.envelope.type == "run_cancel_requested")
            await writer.emit(RunCanceled(reason=requested.envelope.data.get("reason"),
                                          requested_by=requested.envelope.data.get("requested_by")))
            await resume_parent(self.js, created, run_id, {"status": "canceled"}, {}, ACTOR) if self.js else None
            await self.cancel_open_children(run_id, "parent canceled")
            return
        started = next((e for e in events if e.envelope.type == "execution_started"), None)
        if started is None and isinstance(command, StartRun):
            refused = await self.start_gate(created, ir)
            if refused is not None:  # §7.2 (2): the version was archived, deleted or is not effective yet
                await writer.emit(RunFailed(error=refused))
                if self.js is not None:
                    await resume_parent(self.js, created, run_id, {"status": "failed",
                                                                   "error": refused.model_dump(mode="json")},
                                        {}, ACTOR)
                return
        # the run's own mode when it is not the default (a dry-run parent's child), else the document's (§7.9)
        own = created.get("execution_mode")
        mode = own if own and own != "production" else ir.global_config.execution_mode
        if ir.global_config.execution_mode == "validation_only" or mode == "validation_only":
            if started is None:
                await writer.emit(ExecutionStarted(entry_node_id=ir.start_node, execution_mode="validation_only",
                                                   runtime_instance=self.instance))
            await writer.emit(RunCompleted(outputs={}, mode="validation_only", message=VALIDATION_ONLY_MESSAGE))
            if self.js is not None:  # a child run: its parent waits for it
                await resume_parent(self.js, created, run_id, {"status": "completed", "outputs": {}}, {}, ACTOR)
            return
        started_at = format_time(started.envelope.occurred_at if started else utc_now())
        writer.observer = self.metrics.observer(ir, created, started.envelope.occurred_at.timestamp()
                                                if started else None)
        js = self.js
        assert js is not None

        async def request_approval(body: dict[str, Any]) -> None:
            await publish_command(js, RequestApproval(actor=ACTOR, causation_id=command.command_id, **body),
                                  msg_id=f"approval-request-{body['approval_id']}")

        callbacks = CallbackConfig(key=callback_key(self.settings.auth_secret_key.get_secret_value()),
                                   public_url=self.settings.public_url, timeout_s=self.settings.callback_timeout_s)
        epoch = len(retries) + (1 if isinstance(command, RetryRun) else 0)
        steps = StepStore(self.steps_kv, run_id, fence=partial(self.ownership.fence, run_id))
        writer.before = steps.pending
        machine = Machine(ir=ir, run=RunInfo(run_id=run_id, run_created=created, started_at=started_at,
                                             retry_epoch=epoch),
                          emit=writer.emit_soon, settle=writer.flush, steps=steps, dispatcher=self.dispatcher,
                          on_approval=request_approval, callbacks=callbacks, children=self.children,
                          secrets=self.secrets, on_sensitive=lambda keys, values: redactor.add(keys, values),
                          limiter=self.limiter, llm=self.llm, artifacts=self.artifacts,
                          webhooks=self.webhooks.for_run(run_id, ir.procedure_id, redactor),
                          recovery_grace_ms=int(self.settings.recovery_grace_s * 1000),
                          sleep=scaled_sleep(self.settings.time_scale))
        graph = build_graph(machine, self.saver_for(run_id))
        config: dict[str, Any] = {"configurable": {"thread_id": run_id}, "recursion_limit": RECURSION_LIMIT}
        snapshot: Any  # the run's newest checkpoint (a StateSnapshot)
        if started is None and isinstance(command, StartRun):
            # execution_started is stored before a run's first checkpoint: a run without it has none to read
            snapshot = StateSnapshot(values={}, next=(), config=cast(RunnableConfig, config), metadata=None,
                                     created_at=None, parent_config=None, tasks=(), interrupts=())
        else:
            snapshot = await graph.aget_state(config)
        has_checkpoint = bool(snapshot.values)
        if has_checkpoint:  # values of sensitive variables known before a restart stay masked after it
            known = snapshot.values.get("vars") or {}
            redactor.add(values=[v if isinstance(v, str) else str(v) for n, v in known.items() if n in sensitive])
        suspended = tuple(snapshot.next) == ("suspend",)
        unfinished = _unfinished(snapshot)
        if isinstance(command, RetryRun):
            if command.automatic:  # resume_on_failure: one retry retry_delay_ms after the failure (ckp.md §7.12)
                ended = next((e.envelope.occurred_at for e in reversed(events) if e.envelope.type == "run_failed"),
                             None)
                due = (ended.timestamp() if ended else time.time()) + ir.global_config.retry_delay_ms / 1000
                if due > time.time():  # redelivered when due: no replica slot is held while waiting
                    raise RetryNotDue(due - time.time())
            target = await retry_target(graph, config)
            if target is None and not has_checkpoint:
                # canceled (or failed) before its first checkpoint: nothing ran, so it continues where it stopped,
                # at the start (api.md §5.5)
                await writer.emit(RunRetryRequested(retry_count=len(retries) + 1, automatic=command.automatic,
                                                    failure_node_id=None))
                await writer.emit(ExecutionResumed(entry_node_id=ir.start_node, resume_reason="retry",
                                                  runtime_instance=self.instance))
                initial = machine.initial_state(dict(created.get("input_vars", {})))
                final = await self.invoke(run_id, graph, initial, config, durability="sync")
            elif target is None:
                log.warning("run %s has no checkpoint to retry from", run_id)
                return
            else:
                # the failure point is recorded in the failed state (the target is the state before that node ran)
                point = (snapshot.values.get("failure_point") or target.values.get("failure_point") or {}).get(
                    "node_id")
                failed_at = point or next((e.envelope.data.get("node_id") for e in reversed(events)
                                           if e.envelope.type == "node_error"), None)
                await writer.emit(RunRetryRequested(retry_count=len(retries) + 1, automatic=command.automatic,
                                                    failure_node_id=failed_at))
                await writer.emit(ExecutionResumed(entry_node_id=failed_at, resume_reason="retry",
                                                  runtime_instance=self.instance))
                retry_config = target.config
                if any(w.get("kind") == "approval" for w in (target.values.get("waits") or {}).values()):
                    retry_config = await graph.aupdate_state(target.config, machine.renew_approvals(target.values),
                                                             as_node="advance")
                final = await self.invoke(run_id, graph, None, {**retry_config, "recursion_limit": RECURSION_LIMIT},
                                          durability="sync")
        elif isinstance(command, ResumeRun):
            if not suspended:
                if not unfinished:
                    return  # nothing to resume (terminal, or not started yet: the start command runs it)
                if not any(e.envelope.causation_id == command.command_id for e in events):
                    # not applied yet and the run is not suspended: another command executes it now (a decision
                    # while a parallel branch still runs). Taking it as a crash recovery would run the frames
                    # twice and lose this resume: redeliver it once the run suspends (a crashed run is recovered
                    # by its own redelivered command).
                    raise RunBusy(run_id)
                await writer.emit(ExecutionRecovered(delivery_count=delivery, checkpoint_id=_checkpoint_id(snapshot),
                                                      runtime_instance=self.instance))
                final = await self.invoke(run_id, graph, None, config, durability="sync")
            elif str(command.resolution.get("wait_id")) not in (snapshot.values.get("waits") or {}):
                # a wait the run no longer has (a child of a canceled branch ended): nothing resumes, and no
                # execution_resumed may move the suspended run back to running
                log.info("run %s: resume for unknown wait %s ignored", run_id, command.resolution.get("wait_id"))
                return
            else:
                resolution = dict(command.resolution)
                announced = machine.resume_event(snapshot.values, resolution)
                # both appended while the graph resumes: its next checkpoint commits once they are stored
                if announced is not None:  # the decision or callback first moves the run to queued (§7.1)
                    await writer.emit_soon(announced)
                    resolution["_announced"] = True
                wait = (snapshot.values.get("waits") or {}).get(str(command.resolution.get("wait_id"))) or {}
                await writer.emit_soon(ExecutionResumed(entry_node_id=wait.get("node_id"),  # the node that continues
                                                       resume_reason=command.resume_reason,
                                                       runtime_instance=self.instance))
                final = await self.invoke(run_id, graph, Command(resume=resolution), config, durability="sync")
        elif started is None:
            # appended while the graph starts: its first checkpoint commits once it is stored (the run's barrier)
            await writer.emit_soon(ExecutionStarted(entry_node_id=ir.start_node, execution_mode=mode,
                                                    runtime_instance=self.instance))
            initial = machine.initial_state(dict(created.get("input_vars", {})))
            steps.start_empty()  # no node ran before execution_started: the run has no step record yet
            final = await self.invoke(run_id, graph, initial, config, durability="sync")
        elif has_checkpoint and suspended:
            return  # durably suspended: a resume command continues it
        else:
            await writer.emit(ExecutionRecovered(delivery_count=delivery,
                                                 checkpoint_id=_checkpoint_id(snapshot) if has_checkpoint else None,
                                                 runtime_instance=self.instance))
            if has_checkpoint and unfinished:  # LangGraph applies the writes of the super-step's finished tasks
                final = await self.invoke(run_id, graph, None, config, durability="sync")
            elif has_checkpoint:  # the graph's last checkpoint (the replica died before appending the outcome)
                final = snapshot.values
            else:
                initial = machine.initial_state(dict(created.get("input_vars", {})))
                final = await self.invoke(run_id, graph, initial, config, durability="sync")
        if final is CANCELED:
            await writer.refresh()
            cancel = next((e.envelope.data for e in reversed(await self.store.read("run", run_id))
                           if e.envelope.type == "run_cancel_requested"), {})
            await writer.emit(RunCanceled(reason=cancel.get("reason"), requested_by=cancel.get("requested_by")))
            await resume_parent(js, created, run_id, {"status": "canceled"}, {}, ACTOR)
            await self.cancel_open_children(run_id, "parent canceled")
            return
        outcome = final.get("outcome")
        if outcome is None:
            waits = list((final.get("waits") or {}).values())
            if not waits:  # a defect: acknowledged, the run would stay running for ever
                raise RunIncomplete(f"run {run_id}: the graph stopped without an outcome or a wait "
                                    f"(checkpoint {_checkpoint_id(snapshot)}, next {tuple(snapshot.next)})")
            if isinstance(command, RetryRun) and waits:
                # a retry that resumed into waits announced before the cancel (an async callback, a child run)
                # appends no pausing event of its own: say the run is waiting again (api.md §5.2)
                await writer.emit(RunSuspended(status=runs.suspended_status(waits), waiting_on=[
                    {k: w.get(k) for k in WAIT_FIELDS} for w in waits]))
            if any(n.type == "subflow" for n in ir.nodes.values()):  # children of branches canceled meanwhile
                await self.cancel_open_children(run_id, "parent branch canceled",
                                                keep={str(w.get("id")) for w in waits if w.get("kind") == "child_run"})
            return  # suspended on a wait (interrupt): acknowledged; a resume command continues the run
        if outcome["status"] == "completed":
            await writer.emit(RunCompleted(outputs=outcome.get("outputs") or {},
                                           recovered_via=outcome.get("recovered_via")))
        else:
            recovery_error = outcome.get("recovery_error")
            error = ErrorObject.model_validate(outcome["error"])
            await writer.emit(RunFailed(
                error=error, outputs=outcome.get("outputs") or {}, recovered_via=outcome.get("recovered_via"),
                recovery_error=ErrorObject.model_validate(recovery_error) if recovery_error else None))
            await retry_automatically(js, ir, error, events, command)
        variables = {k: v for k, v in (final.get("vars") or {}).items() if k != APPROVALS_KEY}
        await resume_parent(js, created, run_id, outcome, redactor.redact(variables), ACTOR)
        if any(n.type == "subflow" for n in ir.nodes.values()):
            await self.cancel_open_children(run_id, f"parent {outcome['status']}")
        self.dispatcher.forget_run(run_id)

    async def delete_run(self, command: DeleteRun) -> None:
        """Delete a terminal run (api.md §5.6): ``run_deleted``, then its ``lo_steps`` keys, stored artifacts and
        child runs (one ``lo.cmd.run.delete`` each); a run that is not terminal gets ``command_rejected``."""
        events = await self.store.read("run", command.run_id)
        if not events:  # never a command_rejected on a run that does not exist: only audited
            return await self._audit(command, "rejected", code="not_found", detail=f"run {command.run_id} not found")
        procedure_id = events[0].envelope.data.get("procedure_id")

        def decide(run: runs.RunState) -> EventData | None:
            if run.deleted:
                return None  # deleted before: a no-op
            runs.decide_delete(run.status)
            return RunDeleted()

        def meta(handled: Handled[runs.RunState]) -> dict[str, Any]:
            deleted = handled.event is not None and handled.event.type == "run_deleted"
            return {"extra_meta": {"procedure_id": procedure_id}} if deleted else {}

        handled = await self.runs.handle(command.run_id, command, decide, command_type="delete_run", actor=ACTOR,
                                         correlation_id=command.run_id, audit_meta=meta)
        if handled.event is None or handled.event.type != "run_deleted":
            return  # refused, or a no-op
        deleted_at = handled.positions[0]  # the clean-up below is repeated on a redelivery: each step is idempotent
        if self.js is not None:  # the run's earlier events go; the run_deleted tombstone stays
            with contextlib.suppress(nats_errors.Error, OSError):  # best effort: a leftover is only storage
                await self.js.purge_stream(EVENT_STREAM, subject=aggregate_filter("run", command.run_id),
                                           seq=deleted_at)
        if self.saver is not None:
            with contextlib.suppress(psycopg.Error, OSError):  # best effort: a leftover is only storage
                await self.saver.adelete_thread(command.run_id)
        with contextlib.suppress(nats_errors.Error, OSError):  # best effort: a leftover is only storage
            for key in await kv_keys(self.js, STEPS_BUCKET, f"{command.run_id}.>") if self.js is not None else []:
                await self.steps_kv.purge(key)
        for stored in events:
            d = stored.envelope.data
            if stored.envelope.type == "artifact_created" and d.get("stored"):
                with contextlib.suppress(nats_errors.Error, OSError):  # best effort: a leftover is only storage
                    await self.artifacts.store.delete(str(d["artifact_id"]))
        children = sorted({str(e.envelope.data["child_run_id"]) for e in events
                           if e.envelope.type == "subflow_started" and e.envelope.data.get("child_run_id")})
        if self.js is not None:
            for child in children:
                await publish_command(self.js, DeleteRun(actor=command.actor, causation_id=command.command_id,
                                                         run_id=child, cleanup_id=command.cleanup_id))


CANCELED: dict[str, Any] = {"canceled": True}


def run_meta(command: StartRun | ResumeRun | RetryRun, created: dict[str, Any]) -> dict[str, Any]:
    """What the audit record of a run command adds to its parameters: the procedure, and for a start the
    inputs (redacted by the caller like the run's events: sensitive variables and redacted fields)."""
    if isinstance(command, StartRun):
        return start_meta(created)
    return {"procedure_id": created.get("procedure_id"), "procedure_version": created.get("procedure_version")}


def run_status(events: list[StoredEvent]) -> runs.RunStatus:
    """The run's status from its stored events (api.md §5.2), as the single writer sees it."""
    return runs.fold(e.envelope for e in events).status


class ProviderSecrets:
    """Secrets through the configured providers (:mod:`langorch_infra.secret_providers`) and HTTP-agent
    credential grants (ckp.md §7.14, api.md §15.3)."""

    def __init__(self, key: bytes, resolver: SecretResolver) -> None:
        self.key = key
        self.resolver = resolver

    async def value(self, name: str) -> str | None:
        try:
            return await self.resolver.value(name)
        except SecretError as exc:
            raise StepError(secret_error(exc)) from None

    async def lookup(self, name: str) -> str | None:
        """``value`` for code outside a step (webhook headers): a provider failure is a ``LookupError``."""
        try:
            return await self.resolver.value(name)
        except SecretError as exc:
            raise LookupError(exc.message) from None

    async def resolve(self, name: str, *, provider: str | None, url: str | None, field: str | None) -> str:
        try:
            return await self.resolver.resolve(name, provider=provider, url=url, field=field)
        except SecretError as exc:
            raise StepError(secret_error(exc)) from None

    def grant(self, *, run_id: str, secret_name: str, node_id: str, step_id: str, field: str | None,
              provider: str | None = None, url: str | None = None) -> str:
        return make_grant(self.key, run_id=run_id, secret_name=secret_name, node_id=node_id, step_id=step_id,
                          field=field, provider=provider, url=url)


def secret_error(exc: SecretError) -> ErrorObject:
    """A provider failure as the step's error (ckp.md §7.14): ``secret_unavailable`` is retryable."""
    return ErrorObject(code=exc.code, message=exc.message, retryable=exc.retryable,
                       details={"secret_name": exc.name, "provider": exc.provider, "reason": exc.reason})


VALIDATION_ONLY_MESSAGE = "Execution skipped (mode=validation_only). CKP compiled and validated successfully."
RECURSION_LIMIT = 1_000_000


async def retry_automatically(js: JetStreamContext, ir: ProcedureIR, error: ErrorObject, events: list[StoredEvent],
                              command: StartRun | ResumeRun | RetryRun) -> None:
    """``resume_on_failure`` (ckp.md §7.12): a run that just failed with a retryable error is retried once,
    ``retry_delay_ms`` after the failure, unless it was retried automatically before."""
    automatic = any(e.envelope.type == "run_retry_requested" and e.envelope.data.get("automatic") for e in events)
    if ir.global_config.resume_on_failure and error.retryable and not automatic and \
            not (isinstance(command, RetryRun) and command.automatic):
        await publish_command(js, RetryRun(actor=ACTOR, run_id=command.run_id, automatic=True),
                              msg_id=f"auto-retry-{command.run_id}")


def _infrastructure(exc: BaseException) -> bool:
    """An outage of NATS, PostgreSQL or the network (redelivered until it passes), not a defect."""
    return isinstance(exc, OSError | nats_errors.Error | psycopg.OperationalError | psycopg.InterfaceError)


def _unfinished(snapshot: Any) -> bool:
    """The checkpoint is not the graph's last: its super-step has tasks. A task that finished has its writes stored
    with the checkpoint (``aput_writes``) and is no longer in ``snapshot.next``; when the replica stopped before the
    next checkpoint was written, ``next`` is empty although the run goes on (``snapshot.tasks`` still lists it)."""
    return bool(snapshot.next or snapshot.tasks)


def _checkpoint_id(snapshot: Any) -> str | None:
    value = snapshot.config.get("configurable", {}).get("checkpoint_id")
    return str(value) if value is not None else None


def host(settings: RuntimeSettings, *, creation: bool = True) -> ServiceHost:
    """One runtime replica — runs and the agent/lease side, in one process — with its presence key and its
    /metrics, /health and /ready on ``metrics_port``. Without ``creation`` it decides no run creations: a process
    of their own does (:func:`langorch_runtime.creation.host`, ``langorch up``)."""
    service = RuntimeService(settings)
    creator = [RunCreation(settings, bus=service.bus)] if creation else []
    return ServiceHost("runtime", VERSION, settings,
                       [service, *creator,
                        AgentService(settings, bus=service.bus, followed=service.dispatcher), RuntimeQueries(settings)],
                       service.metrics.registry)


async def serve(settings: RuntimeSettings, *, metrics_port: int | None = None) -> None:
    """Run one runtime replica until cancelled (``metrics_port`` 0: no HTTP endpoint)."""
    await host(settings).serve(metrics_port)
