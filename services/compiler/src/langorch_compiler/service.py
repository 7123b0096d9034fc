"""The compiler service: owner of the procedure aggregate. ``lo.cmd.procedure.{import,replace,delete,set_status,
promote,rollback}`` → ``procedure_*`` events | ``command_rejected``.

The compiler is the authority on procedure versions: it compiles again (the gateway's compile is a fast
pre-check), refuses a version that exists, stores the IR in KV ``lo_procedures`` and appends the event with
the procedure aggregate's expected position, so two racing imports give one success and one rejection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from datetime import date
from functools import partial
from typing import Any

from nats.aio.client import Client as NATS
from nats.js import JetStreamContext
from nats.js.errors import KeyNotFoundError, NotFoundError

from ckp_core.commands import (
    DeleteProcedureVersion,
    ImportProcedure,
    PromoteProcedure,
    ReplaceProcedure,
    RollbackProcedure,
    SetProcedureStatus,
)
from ckp_core.errors import CommandRefused
from ckp_core.events import (
    ProcedureImported,
    ProcedurePromoted,
    ProcedureReplaced,
    ProcedureRolledBack,
    ProcedureStatusChanged,
    ProcedureVersionDeleted,
)
from ckp_core.eventstore import StoredEvent
from ckp_core.ids import new_id
from ckp_core.ir import ProcedureIR
from ckp_core.procedure_lifecycle import (
    ProcedureState,
    VersionState,
    decide_delete,
    decide_promote,
    decide_replace,
    decide_rollback,
    decide_status,
    fold,
)
from ckp_core.subjects import COMMAND_STREAM, EVENT_STREAM, PROCEDURES_BUCKET, procedure_key
from langorch_compiler.metrics import VERSION, CompilerMetrics
from langorch_infra import messaging
from langorch_infra.audit import AuditWriter
from langorch_infra.bus import BusMetrics
from langorch_infra.handling import CommandHandler
from langorch_infra.hosting import ServiceHost, bus_checks
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, through_blips
from langorch_infra.settings import CompilerSettings

log = logging.getLogger(__name__)

CONSUMER = messaging.PROCEDURE_COMMANDS.durable
IR_WRITE_PATIENCE_S = 10.0
"""How long a version's IR write is tried again through a NATS blip before the command fails (and is redelivered)."""


class CompilerService:
    """One compiler replica."""

    def __init__(self, settings: CompilerSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None
        self.metrics = CompilerMetrics()
        self.bus = BusMetrics(self.metrics.registry, "compiler")
        self.broker = messaging.broker(settings.nats_url, "langorch-compiler", self.bus, settings)
        self.commands = messaging.Subscription(self.broker, messaging.PROCEDURE_COMMANDS).handle(self.handlers)

    async def start(self) -> None:
        self.nc = await messaging.connect(self.broker)
        self.js = self.nc.jetstream()
        await ensure_topology(self.js, audit_retention_days=self.settings.audit_retention_days,
                              replicas=self.settings.nats_replicas)
        self.store = JetStreamEventStore(self.js)
        self.audit = AuditWriter(self.js)
        self.kv = await self.js.key_value(PROCEDURES_BUCKET)

    async def run(self) -> None:
        """Consume the procedure commands (FastStream's pull subscriber on the durable consumer) until cancelled."""
        await messaging.start_consuming(self.broker)
        try:
            await asyncio.Event().wait()
        finally:
            await messaging.stop_consuming(self.broker)

    async def stop(self) -> None:
        with contextlib.suppress(Exception):  # shutdown: a lost connection has nothing left to close
            await messaging.close(self.broker, self.nc)

    def leader_of(self) -> list[str]:
        """The compiler holds no leader lock: every replica consumes the same durable consumer."""
        return []

    async def ready_checks(self) -> dict[str, str]:
        """NATS connected, the command and event streams and the IR bucket present (api.md §3)."""
        return await bus_checks(self.nc, self.js, (EVENT_STREAM, COMMAND_STREAM), (PROCEDURES_BUCKET,))

    @property
    def handlers(self) -> dict[str, messaging.Handler]:
        """The function of each procedure command subject."""
        return {messaging.command_subject_of(t): f for t, f in (
            (ImportProcedure, self.on_import), (ReplaceProcedure, self.on_replace),
            (DeleteProcedureVersion, self.on_delete), (SetProcedureStatus, self.on_set_status),
            (PromoteProcedure, self.on_promote), (RollbackProcedure, self.on_rollback))}

    @property
    def handler(self) -> CommandHandler[ProcedureState]:
        """Load → decide → append → audit on the procedure aggregate (one outcome event per command)."""
        return CommandHandler(self.store, "procedure", _fold, audit=self.audit)

    async def _put_ir(self, ir: ProcedureIR) -> None:
        """Write the IR, tried again for :data:`IR_WRITE_PATIENCE_S` while JetStream is briefly unavailable (a put
        is safe to repeat): right after a NATS restart the bucket's stream can answer later than the event stream,
        and the command would otherwise fail and wait for its redelivery."""
        key, value = procedure_key(ir.procedure_id, ir.version), ir.model_dump_json(by_alias=True).encode()
        await through_blips(f"IR {key}", partial(self.kv.put, key, value), IR_WRITE_PATIENCE_S)

    async def on_import(self, cmd: ImportProcedure) -> None:
        """Compile and store one version, or reject the command with a stable code.

        The event decides (the stream is the truth); the IR is written to KV after it, and a redelivered
        command whose event already landed only repairs the KV entry.
        """
        result = self.metrics.compile(cmd.ckp_json)
        pid = result.procedure_id or str(cmd.ckp_json.get("procedure_id", "unknown"))
        ir = result.ir

        def decide(state: ProcedureState) -> ProcedureImported:
            if ir is None:
                raise CommandRefused("compile_failed", f"{len(result.errors)} compile errors",
                                     diagnostics=[d.model_dump(mode="json") for d in result.diagnostics])
            existing = state.versions.get(ir.version)
            if existing is not None:
                raise CommandRefused(
                    "procedure_version_exists", f"procedure {ir.procedure_id} version {ir.version} already exists",
                    existing_content_hash=existing.content_hash, identical=existing.content_hash == ir.content_hash)
            trigger = cmd.ckp_json.get("trigger")
            return ProcedureImported(
                procedure_id=ir.procedure_id, version=ir.version, name=ir.name, description=ir.description,
                project_id=cmd.project_id, tags=ir.tags, content_hash=ir.content_hash,
                compiler_version=ir.compiler_version, ir_key=procedure_key(ir.procedure_id, ir.version),
                ckp_json=cmd.ckp_json, variables_schema=ir.variables_schema(),
                trigger=trigger if isinstance(trigger, dict) else None, effective_date=ir.effective_date,
                diagnostics=[d.model_dump(mode="json") for d in result.diagnostics])

        handled = await self.handler.handle(pid, cmd, decide, command_type="import_procedure")
        if ir is None or handled.rejected:
            return
        if handled.replayed and not (handled.event is not None and handled.event.type == "procedure_imported"
                                     and ir.version in handled.state.versions):
            return
        await self._put_ir(ir)

    async def on_replace(self, cmd: ReplaceProcedure) -> None:
        """Replace a draft's document, compiled like an import (api.md §4.3)."""
        result = self.metrics.compile(cmd.ckp_json)

        def decide(state: ProcedureState) -> ProcedureReplaced:
            decide_replace(state, cmd.version, cmd.expected_revision)
            ir = result.ir
            if ir is None:
                raise CommandRefused("compile_failed", f"{len(result.errors)} compile errors",
                                     diagnostics=[d.model_dump(mode="json") for d in result.diagnostics])
            if (ir.procedure_id, ir.version) != (cmd.procedure_id, cmd.version):
                raise CommandRefused("validation_failed", "procedure_id and version inside the document must "
                                     "match the path", errors={"ckp_json.version": ["Must match the path"]})
            trigger = cmd.ckp_json.get("trigger")
            return ProcedureReplaced(
                procedure_id=ir.procedure_id, version=ir.version, name=ir.name, description=ir.description,
                tags=ir.tags, content_hash=ir.content_hash, compiler_version=ir.compiler_version,
                ir_key=procedure_key(ir.procedure_id, ir.version), ckp_json=cmd.ckp_json,
                variables_schema=ir.variables_schema(), trigger=trigger if isinstance(trigger, dict) else None,
                effective_date=ir.effective_date, diagnostics=[d.model_dump(mode="json") for d in result.diagnostics])

        handled = await self.handler.handle(cmd.procedure_id, cmd, decide, command_type="replace_procedure")
        if result.ir is not None and handled.event is not None and handled.event.type == "procedure_replaced":
            await self._put_ir(result.ir)  # a redelivery repairs the KV entry

    async def on_delete(self, cmd: DeleteProcedureVersion) -> None:
        """Delete a version that is not active; its IR key goes after the event."""

        def decide(state: ProcedureState) -> ProcedureVersionDeleted:
            v = decide_delete(state, cmd.version, cmd.expected_revision)
            return ProcedureVersionDeleted(procedure_id=cmd.procedure_id, version=v.version, ir_key=v.ir_key)

        handled = await self.handler.handle(cmd.procedure_id, cmd, decide, command_type="delete_procedure_version")
        if handled.event is not None and handled.event.type == "procedure_version_deleted":
            await self._delete_ir(handled.event.data["ir_key"])  # a redelivery deletes it again

    async def _delete_ir(self, key: str) -> None:
        with contextlib.suppress(KeyNotFoundError, NotFoundError):
            await self.kv.delete(key)

    def _recompile(self, v: VersionState, code: str) -> tuple[ProcedureIR, list[dict[str, Any]]]:
        """Compile a stored document again with the current compiler; errors refuse the command."""
        result = self.metrics.compile(v.ckp_json)
        diagnostics = [d.model_dump(mode="json") for d in result.diagnostics]
        if result.ir is None:
            raise CommandRefused(code, f"version {v.version} no longer compiles: {len(result.errors)} errors",
                                 diagnostics=diagnostics)
        return result.ir, diagnostics

    async def on_set_status(self, cmd: SetProcedureStatus) -> None:
        """Move a version through §4.4; activation re-compiles and deprecates the channel's active version."""
        compiled: list[ProcedureIR] = []

        def decide(state: ProcedureState) -> ProcedureStatusChanged | None:
            decision = decide_status(state, cmd.version, cmd.status)
            if decision is None:
                return None  # a no-op appends nothing
            v, displaced = decision
            ir, diagnostics = self._recompile(v, "compile_failed") if cmd.status == "active" else (None, None)
            compiled[:] = [ir] if ir is not None else []
            return ProcedureStatusChanged(
                procedure_id=cmd.procedure_id, version=v.version, from_status=v.status, status=cmd.status,
                release_channel=v.release_channel, reason=cmd.reason, displaced_version=displaced,
                compiler_version=ir.compiler_version if ir else None, diagnostics=diagnostics)

        handled = await self.handler.handle(cmd.procedure_id, cmd, decide, command_type="set_procedure_status")
        if not handled.replayed and handled.accepted and compiled:
            await self._put_ir(compiled[0])

    async def on_promote(self, cmd: PromoteProcedure) -> None:
        """Validate and activate a version in a channel (api.md §4.5)."""
        compiled: list[ProcedureIR] = []

        async def decide(state: ProcedureState) -> ProcedurePromoted | None:
            decision = decide_promote(state, cmd.version, cmd.target_channel)
            if decision is None:
                return None
            v, displaced = decision
            ir, diagnostics = await self._promotion_checks(state, v)
            compiled[:] = [ir]
            return ProcedurePromoted(
                procedure_id=cmd.procedure_id, version=v.version, deployment_id=new_id(),
                from_channel=v.release_channel, from_status=v.status, target_channel=cmd.target_channel,
                displaced_version=displaced, reason=cmd.reason, compiler_version=ir.compiler_version,
                diagnostics=diagnostics)

        handled = await self.handler.handle(cmd.procedure_id, cmd, decide, command_type="promote_procedure")
        if not handled.replayed and handled.accepted and compiled:
            await self._put_ir(compiled[0])

    async def _promotion_checks(self, state: ProcedureState,
                                v: VersionState) -> tuple[ProcedureIR, list[dict[str, Any]]]:
        """Every promotion check at once: re-compile, subflow targets runnable, effective date well-formed."""
        result = self.metrics.compile(v.ckp_json)
        diagnostics = [d.model_dump(mode="json") for d in result.diagnostics]
        problems = [d for d in diagnostics if d.get("severity") == "error"]
        eff = v.ckp_json.get("effective_date")
        if eff is not None:
            try:
                date.fromisoformat(str(eff))
            except ValueError:
                problems.append(_diagnostic("invalid_effective_date", f"effective_date {eff!r} is not YYYY-MM-DD",
                                            "/effective_date"))
        for ref in getattr(result.ir, "subflow_refs", None) or []:
            pid, version = _ref_identity(ref)
            if pid is None:
                continue
            target = state if pid == state.procedure_id else _fold(pid, await self.store.read("procedure", pid))
            if not _runnable(target, version):
                problems.append(_diagnostic("subflow_not_found", f"subflow target {pid}@{version or 'active'} "
                                            "has no runnable version", _ref_path(ref)))
        if problems or result.ir is None:
            raise CommandRefused("promotion_validation_failed", f"{len(problems)} promotion checks failed",
                                 diagnostics=problems + [d for d in diagnostics if d not in problems])
        return result.ir, diagnostics

    async def on_rollback(self, cmd: RollbackProcedure) -> None:
        """Deprecate the channel's active version and re-activate an earlier one (api.md §4.5)."""

        def decide(state: ProcedureState) -> ProcedureRolledBack:
            target = decide_rollback(state, cmd.version, cmd.target_channel, cmd.rollback_to_version)
            return ProcedureRolledBack(
                procedure_id=cmd.procedure_id, version=cmd.version, deployment_id=new_id(),
                target_channel=cmd.target_channel, restored_version=target.version, reason=cmd.reason)

        await self.handler.handle(cmd.procedure_id, cmd, decide, command_type="rollback_procedure")


def _fold(procedure_id: str, history: Sequence[StoredEvent]) -> ProcedureState:
    return fold(procedure_id, ((e.envelope, e.position) for e in history))


def _diagnostic(code: str, message: str, path: str) -> dict[str, Any]:
    return {"severity": "error", "code": code, "message": message, "path": path, "node_id": None,
            "step_id": None, "hint": None}


def _ref_identity(ref: Any) -> tuple[str | None, str | None]:
    """(procedure_id, version) of a subflow reference, whatever its exact shape (IR model or dict)."""
    get = ref.get if isinstance(ref, dict) else lambda k, default=None: getattr(ref, k, default)
    pid = get("procedure_id")
    version = get("version")
    return (str(pid) if pid else None), (str(version) if version not in (None, "latest") else None)


def _ref_path(ref: Any) -> str:
    node = ref.get("node_id") if isinstance(ref, dict) else getattr(ref, "node_id", None)
    return f"/workflow_graph/nodes/{node}" if node else "/workflow_graph"


def _runnable(state: ProcedureState, version: str | None) -> bool:
    if version is not None:
        v = state.versions.get(version)
        return v is not None and v.status in ("draft", "active")
    return any(v.status == "active" for v in state.versions.values())


def host(settings: CompilerSettings) -> ServiceHost:
    """One compiler replica with its presence key and its /metrics, /health and /ready."""
    service = CompilerService(settings)
    return ServiceHost("compiler", VERSION, settings, [service], service.metrics.registry)


async def serve(settings: CompilerSettings, *, metrics_port: int | None = None) -> None:
    """Run one compiler replica until cancelled (``metrics_port`` 0: no HTTP endpoint)."""
    await host(settings).serve(metrics_port)
