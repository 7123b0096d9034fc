"""Run creation: the runtime, the run aggregate's single writer, decides ``lo.cmd.run.create``.

Whoever wants a run — the gateway (``POST /api/runs``, rerun), a parent run's subflow node, later a trigger —
submits :class:`~ckp_core.commands.CreateRun`. The decision (:func:`decide_create`) is pure: the version must
exist in the procedure aggregate and be runnable (draft or active) and effective, and the inputs must validate
against the version's variables; it gives ``run_created`` (at expected position 0), or a refusal that
:class:`~langorch_infra.handling.CommandHandler` appends as ``command_rejected`` with the code the gateway
answers with (``procedure_not_runnable``/``procedure_not_effective`` 409, ``invalid_input_vars`` 422 with
``errors``). Once the run exists its ``lo.cmd.run.start`` is published with the creating command's id, so
``run_created`` and ``execution_started`` share one causation id as before.

Creations arrive on their own durable consumer (``runtime-create``, filter ``lo.cmd.run.create``), handled by
:class:`RunCreation` in milliseconds: the ``runtime`` consumer holds a slot per run until the run ends, so a
creation queued behind busy slots would wait for a run to finish. :class:`RunCreation` executes nothing (no
LangGraph, no PostgreSQL), so it also runs where runs are only submitted, not executed.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import logging
import os
import socket
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import Any, Generic, TypeVar

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import KeyNotFoundError, NotFoundError
from nats.js.kv import KeyValue
from prometheus_client import CollectorRegistry

from ckp_core import runs
from ckp_core.commands import CreateRun
from ckp_core.errors import CommandRefused, ConcurrencyError, InvalidInputVars
from ckp_core.events import RunCreated, format_time
from ckp_core.eventstore import EventStore, StoredEvent
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import ProcedureState, VersionState, evolve
from ckp_core.redaction import Redactor
from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, PROCEDURES_BUCKET, command_subject, procedure_key
from ckp_core.variables import validate_inputs
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import ACK, TERM, BusMetrics, Settle, consume, nak
from langorch_infra.handling import AggregateCache, AuditSink, CommandHandler, Handled
from langorch_infra.hosting import ServiceHost, bus_checks
from langorch_infra.jetstream import (
    JetStreamEventStore,
    connect,
    ensure_consumer,
    ensure_topology,
    narrow_consumer,
    publish_command,
)
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.deadlines import consume_outcome
from langorch_runtime.ownership import RunOwnership

log = logging.getLogger(__name__)

RUNNABLE = ("draft", "active")
CREATE_CONSUMER = "runtime-create"
RUN_CONSUMER = "runtime"
CREATE_SUBJECTS = (command_subject("run", "create"),)
"""What ``runtime-create`` takes."""
EXECUTE_SUBJECTS = tuple(command_subject("run", verb) for verb in ("start", "resume", "retry", "cancel", "delete"))
"""What the ``runtime`` consumer takes (it took ``lo.cmd.run.>`` before creations were commands)."""
IR_WAIT_DELIVERIES = 25
"""The compiler stores a version's IR right after its event: a creation that finds the version but not yet its
IR is redelivered (every ``IR_WAIT_S``) this many times before it is refused."""
IR_WAIT_S = 0.2


class IrNotStored(Exception):
    """The version exists but its compiled IR is not in ``lo_procedures`` yet: decide again shortly."""


def fold_run(run_id: str, events: Sequence[StoredEvent]) -> runs.RunState:
    """The run aggregate's state for the command handler."""
    return runs.fold((e.envelope for e in events), run_id)


def decide_create(run: runs.RunState, command: CreateRun, version: VersionState | None, ir: ProcedureIR | None,
                  now: datetime, *, effective_gate: bool = True) -> RunCreated | None:
    """``run_created`` for ``command``, or the refusal (pure).

    ``version`` is the procedure aggregate's state of ``command.procedure_version`` (None: it does not exist or
    was deleted) and ``ir`` its compiled IR. A run that already has events (created by another command) is left as
    it is: None, nothing to create. Without ``effective_gate`` a version not effective yet is created anyway: a
    child run of one fails at the start gate instead (ckp.md §7.2 (2)), and its parent sees why.
    """
    if run.seq > 0:
        return None
    # the problems the gateway's pre-check answers, word for word (no extension members)
    if version is None or version.status not in RUNNABLE:
        status = version.status if version is not None else "deleted"
        raise CommandRefused("procedure_not_runnable", f"version {command.procedure_version} is {status}")
    if ir is None:
        raise CommandRefused("procedure_not_runnable", f"procedure {command.procedure_id}@"
                             f"{command.procedure_version} is not available to the runtime")
    today = now.date().isoformat()
    if effective_gate and ir.effective_date and ir.effective_date > today:
        raise CommandRefused("procedure_not_effective", f"version {command.procedure_version} is effective from "
                             f"{ir.effective_date}")
    root = command.root_run_id or command.run_id
    builtins = {"run_id": command.run_id, "root_run_id": root, "parent_run_id": command.parent_run_id,
                "procedure_id": command.procedure_id, "procedure_version": command.procedure_version,
                "trigger_type": command.trigger_type, "triggered_by": command.triggered_by,
                "now": format_time(now), "today": today}
    try:
        values = validate_inputs(ir.variables, command.input_vars, builtins)
    except InvalidInputVars as exc:
        raise CommandRefused("invalid_input_vars", exc.message, errors=exc.errors) from exc
    extra: dict[str, Any] = {"call_chain": command.call_chain} if command.call_chain is not None else {}
    return RunCreated(procedure_id=command.procedure_id, procedure_version=command.procedure_version,
                      release_channel=command.release_channel, input_vars=values, trigger_type=command.trigger_type,
                      triggered_by=command.triggered_by, parent_run_id=command.parent_run_id,
                      parent_node_id=command.parent_node_id, root_run_id=root, rerun_of=command.rerun_of,
                      execution_mode=command.execution_mode or ir.global_config.execution_mode,
                      project_id=command.project_id, **extra)


def decrypt_outputs(ir: ProcedureIR) -> list[str]:
    """Variables that receive decrypted plaintext: redacted by key in every event (ckp.md §7.15)."""
    names: list[str] = []
    for node in ir.nodes.values():
        p = node.payload
        ops: list[Any] = [*getattr(p, "steps", []), *getattr(p, "operations", []),
                          *getattr(p, "cleanup_actions", []), *getattr(p, "error_actions", [])]
        names.extend(op.output_variable for op in ops if op.action == "decrypt" and op.output_variable)
    return names


def sensitive_variables(ir: ProcedureIR | None) -> list[str]:
    """Variables whose values are masked wherever they appear: the sensitive ones and those receiving
    decrypted plaintext."""
    if ir is None:
        return []
    return [*(n for n, s in ir.variables.items() if s.sensitive), *decrypt_outputs(ir)]


def run_redactor(ir: ProcedureIR | None, input_vars: Mapping[str, Any]) -> Redactor:
    """The redaction of one run's events and audit records: the sensitive variables (by key, and by their input
    values) and the version's ``redacted_fields``."""
    sensitive = sensitive_variables(ir)
    return Redactor(extra_keys=[*(ir.global_config.redacted_fields if ir else []), *sensitive],
                    values=[str(input_vars.get(n, "")) for n in sensitive])


def start_meta(created: Mapping[str, Any]) -> dict[str, Any]:
    """What the audit record of a run's start adds to its parameters: the procedure, the inputs (redacted by the
    caller like the run's events) and the trigger."""
    return {"procedure_id": created.get("procedure_id"), "procedure_version": created.get("procedure_version"),
            "input_vars": created.get("input_vars") or {}, "trigger_type": created.get("trigger_type")}


T = TypeVar("T")
CACHE_SIZE = 256
"""Procedures (and version IRs) whose state a runtime replica keeps."""


class Stamped(Generic[T]):
    """Values computed from something that changes (a procedure's events, a KV entry), each kept with the stamp it
    was computed at (a stream position, a revision) and given back only for that stamp; beyond ``size`` keys the
    least recently used is dropped."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.entries: OrderedDict[str, tuple[int | None, T]] = OrderedDict()

    def get(self, key: str, stamp: int | None) -> T | None:
        found = self.entries.get(key)
        if found is None or found[0] != stamp:
            return None
        self.entries.move_to_end(key)
        return found[1]

    def put(self, key: str, stamp: int | None, value: T) -> None:
        self.entries[key] = (stamp, value)
        self.entries.move_to_end(key)
        while len(self.entries) > self.size:
            self.entries.popitem(last=False)


class RunCreator:
    """Decides creations with the command handler and starts the runs it creates."""

    def __init__(self, store: EventStore, js: JetStreamContext, procedures: KeyValue,
                 audit: AuditSink | None) -> None:
        self.store = store
        self.js = js
        self.procedures = procedures
        self.handler: CommandHandler[runs.RunState] = CommandHandler(store, "run", fold_run, audit=audit)
        # every creation looks its version up: the procedure aggregate is read only from where the last look left
        # it (one head look-up when nothing changed), and an IR is parsed once per stored revision
        self.procedure_states: AggregateCache[ProcedureState] = AggregateCache(
            ProcedureState, lambda state, stored: evolve(state, stored.envelope, stored.position),
            max_aggregates=CACHE_SIZE)
        self.irs: Stamped[ProcedureIR] = Stamped(CACHE_SIZE)  # by KV key, at its revision

    async def version(self, procedure_id: str, version: str) -> VersionState | None:
        """The version as the procedure aggregate has it now (None: never imported, or deleted)."""
        def pick(state: ProcedureState) -> VersionState | None:
            # a copy of that version alone: evolve sets a version's fields anew (its document included, never
            # changed in place), so later events do not reach it; copying every version's document cost each creation
            found = state.versions.get(version)
            return copy.copy(found) if found is not None else None

        return await self.procedure_states.view(self.store, "procedure", procedure_id, pick)

    async def load_ir(self, procedure_id: str, version: str) -> ProcedureIR | None:
        """The version's IR as stored now (a draft's is replaced when its document is), parsed once per revision
        of its key; the creation only reads it."""
        key = procedure_key(procedure_id, version)
        try:
            entry = await self.procedures.get(key)
        except (KeyNotFoundError, NotFoundError):
            return None
        ir = self.irs.get(key, entry.revision)
        if ir is None:
            ir = ProcedureIR.model_validate_json(entry.value or b"{}")
            self.irs.put(key, entry.revision, ir)
        return ir

    async def _lookup(self, command: CreateRun, ir: ProcedureIR | None,
                      delivery: int) -> tuple[VersionState | None, ProcedureIR | None]:
        """The version and, unless given, its IR, read at once; :class:`IrNotStored` for a runnable version whose IR
        is not stored yet (for ``IR_WAIT_DELIVERIES`` deliveries)."""
        if ir is not None:
            return await self.version(command.procedure_id, command.procedure_version), ir
        version, ir = await asyncio.gather(self.version(command.procedure_id, command.procedure_version),
                                           self.load_ir(command.procedure_id, command.procedure_version))
        if version is None or version.status not in RUNNABLE:
            return version, None
        if ir is None and delivery < IR_WAIT_DELIVERIES:
            raise IrNotStored(f"{command.procedure_id}@{command.procedure_version}")
        return version, ir

    async def create(self, command: CreateRun, *, delivery: int = 1, ir: ProcedureIR | None = None,
                     start_msg_id: str | None = None, effective_gate: bool = True) -> Handled[runs.RunState]:
        """Decide ``command``; a run it created (now, or before this redelivery) and that has not started yet gets
        its start command (``Nats-Msg-Id`` ``start_msg_id``, by default the command id, so a republish is dropped).

        Raises :class:`IrNotStored` while the version's IR is not stored yet (for ``IR_WAIT_DELIVERIES``
        deliveries), :class:`ConcurrencyError` when the run kept changing.
        """
        # the version and its IR are read while the command handler reads the run's head: the three reads are
        # independent, and a creation waited for them one after the other (the IR is read before knowing whether
        # the version is runnable; a creation refused for that is rare, and its IR read is only wasted)
        lookup = asyncio.ensure_future(self._lookup(command, ir, delivery))
        lookup.add_done_callback(consume_outcome)  # unused when the run exists already (a redelivery)
        start = command.start()
        found_ir: list[ProcedureIR | None] = [ir]

        async def decide(run: runs.RunState) -> RunCreated | None:
            if run.seq > 0:
                return None  # created by another command: nothing to look up
            version, found_ir[0] = await lookup
            return decide_create(run, command, version, found_ir[0], now, effective_gate=effective_gate)

        async def audit_meta(handled: Handled[runs.RunState]) -> dict[str, Any]:
            """The start's record, as the execution would write it: redacted like the run's events (with the IR's
            sensitive variables: looked up here too when the run existed already, and the command decided again
            later while that IR is not stored, as before the reads overlapped)."""
            event = handled.event
            if event is None or event.type != "run_created":
                return {}
            if found_ir[0] is None:
                _, found_ir[0] = await lookup
            redactor = run_redactor(found_ir[0], event.data.get("input_vars") or {})
            return {"sensitive_keys": redactor.extra_keys, "sensitive_values": redactor.values,
                    "extra_meta": start_meta(event.data)}

        now = datetime.now(UTC)
        try:
            handled = await self.handler.handle(command.run_id, command, decide, command_type="create_run",
                                                correlation_id=command.run_id, audit_as=start, audit_meta=audit_meta)
        finally:
            lookup.cancel()  # a no-op once it is done
        event = handled.event
        if event is not None and event.type == "run_created" and (not handled.replayed or handled.state.seq == 1):
            await publish_command(self.js, start, msg_id=start_msg_id)
        return handled


class RunCreation:
    """The runtime's creation side: the ``runtime-create`` consumer and its :class:`RunCreator`."""

    def __init__(self, settings: RuntimeSettings, *, bus: BusMetrics | None = None) -> None:
        self.settings = settings
        self.bus = bus
        self.instance = settings.instance_id or f"{socket.gethostname()}-{os.getpid()}"
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.ownership: RunOwnership | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, f"langorch-runtime-create-{self.instance}", self.settings)
        self.js = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        store = JetStreamEventStore(self.js)
        self.creator = RunCreator(store, self.js, await self.js.key_value(PROCEDURES_BUCKET), AuditWriter(self.js))
        # a ``runtime`` consumer of an older version takes lo.cmd.run.>: narrowed first (LO_CMD is a work queue,
        # whose consumers may not overlap)
        await narrow_consumer(self.js, COMMAND_STREAM, RUN_CONSUMER, EXECUTE_SUBJECTS)
        await ensure_consumer(self.js, COMMAND_STREAM, ConsumerConfig(
            durable_name=CREATE_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
            filter_subjects=list(CREATE_SUBJECTS)))
        self.sub = await self.js.pull_subscribe_bind(CREATE_CONSUMER, stream=COMMAND_STREAM)
        # the creations in hand are listed like the runs an executing replica takes (langorch_runtime.ownership): a
        # replica lost with some has them sent back at once by the others, not after this consumer's 30 s ack wait
        self.ownership = RunOwnership(self.nc, self.js, f"{self.instance}-create")
        await self.ownership.start()

    async def run(self) -> None:
        await consume(self.sub, self._handle, self.bus, concurrently=True)  # creations of different runs

    async def stop(self) -> None:
        if self.ownership is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self.ownership.stop()
        if self.nc is not None:
            with contextlib.suppress(Exception):  # shutting down: nothing is left to do about a failed close
                await self.nc.close()

    def leader_of(self) -> list[str]:
        """Every replica takes creations from the same durable consumer: no leader lock."""
        return []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the command and event streams and the IR bucket present."""
        return await bus_checks(self.nc, self.js, (EVENT_STREAM, COMMAND_STREAM), (PROCEDURES_BUCKET,))

    async def _handle(self, msg: Msg) -> Settle:
        if msg.subject not in CREATE_SUBJECTS:
            log.error("unknown run creation command %s dropped", msg.subject)
            return TERM
        command = CreateRun.model_validate_json(msg.data)
        try:
            with self.ownership.taking(msg.reply) if self.ownership is not None else contextlib.nullcontext():
                await self.creator.create(command, delivery=msg.metadata.num_delivered or 1)
        except IrNotStored as missing:
            log.info("run %s: the IR of %s is not stored yet; decided again shortly", command.run_id, missing)
            return nak(IR_WAIT_S)
        except ConcurrencyError:
            return nak()  # the run aggregate kept changing: decide again on redelivery
        return ACK


def host(settings: RuntimeSettings) -> ServiceHost:
    """Run creation alone, as service ``creation``: a replica that decides ``lo.cmd.run.create`` and executes nothing
    (no LangGraph, no PostgreSQL). ``langorch up`` runs one in a process of its own, so that a start's decision
    does not wait for a turn on the event loop of a worker busy executing runs: under ``bench/load.py`` the
    median ``POST /api/runs`` went from 179-253 ms to 66-94 ms. Its bus metrics are the runtime's."""
    from importlib.metadata import version as package_version

    registry = CollectorRegistry()
    return ServiceHost("creation", package_version("langorch-runtime"), settings,
                       [RunCreation(settings, bus=BusMetrics(registry, "runtime"))], registry)
