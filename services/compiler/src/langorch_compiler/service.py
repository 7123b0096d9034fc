"""The compiler service: ``lo.cmd.procedure.import`` → ``procedure_imported`` | ``command_rejected``.

The compiler is the authority on procedure versions: it compiles again (the gateway's compile is a fast
pre-check), refuses a version that exists, stores the IR in KV ``lo_procedures`` and appends the event with
the procedure aggregate's expected position, so two racing imports give one success and one rejection.
"""

from __future__ import annotations

import contextlib
import logging

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from ckp_core.commands import ImportProcedure
from ckp_core.compiler import compile_document
from ckp_core.errors import ConcurrencyError
from ckp_core.events import CommandRejected, EventData, ProcedureImported, make_event
from ckp_core.subjects import COMMAND_STREAM, PROCEDURES_BUCKET, procedure_key
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_topology
from langorch_infra.settings import CompilerSettings

log = logging.getLogger(__name__)

CONSUMER = "compiler"


class CompilerService:
    """One compiler replica."""

    def __init__(self, settings: CompilerSettings) -> None:
        self.settings = settings
        self.nc: NATS | None = None
        self.js: JetStreamContext | None = None

    async def start(self) -> None:
        self.nc = await connect(self.settings.nats_url, "langorch-compiler")
        self.js = self.nc.jetstream()
        await ensure_topology(self.js)
        self.store = JetStreamEventStore(self.js)
        self.kv = await self.js.key_value(PROCEDURES_BUCKET)
        cfg = ConsumerConfig(durable_name=CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=30,
                             filter_subject="lo.cmd.procedure.>")
        with contextlib.suppress(Exception):
            await self.js.add_consumer(COMMAND_STREAM, cfg)
        self.sub = await self.js.pull_subscribe_bind(CONSUMER, stream=COMMAND_STREAM)

    async def run(self) -> None:
        while True:
            try:
                msgs = await self.sub.fetch(10, timeout=5)
            except TimeoutError:
                continue
            for msg in msgs:
                await self._handle(msg)

    async def stop(self) -> None:
        if self.nc is not None:
            with contextlib.suppress(Exception):
                await self.nc.close()

    async def _handle(self, msg: Msg) -> None:
        try:
            if msg.subject.endswith(".import"):
                await self.on_import(ImportProcedure.model_validate_json(msg.data))
            else:
                log.error("unknown procedure command %s dropped", msg.subject)
            await msg.ack_sync()
        except ConcurrencyError:
            await msg.nak()  # another import of this procedure landed first: decide again on redelivery
        except Exception:
            log.exception("procedure command failed; it will be redelivered")
            await msg.nak(delay=2)

    async def on_import(self, cmd: ImportProcedure) -> None:
        """Compile and store one version, or reject the command with a stable code.

        The event decides (the stream is the truth); the IR is written to KV after it, and a redelivered
        command whose event already landed only repairs the KV entry.
        """
        result = compile_document(cmd.ckp_json)
        pid = result.procedure_id or str(cmd.ckp_json.get("procedure_id", "unknown"))
        history = await self.store.read("procedure", pid)
        head_seq = history[-1].envelope.seq if history else 0
        head_pos = history[-1].position if history else 0
        ir = result.ir
        for stored in history:
            ev = stored.envelope
            if ev.causation_id == cmd.command_id:
                if ev.type == "procedure_imported" and ir is not None:
                    await self.kv.put(ev.data["ir_key"], ir.model_dump_json(by_alias=True).encode())
                return
        rejection: CommandRejected | None = None
        if ir is None:
            rejection = CommandRejected(
                command_id=cmd.command_id, command_type="import_procedure", code="compile_failed",
                detail=f"{len(result.errors)} compile errors",
                extra={"diagnostics": [d.model_dump(mode="json") for d in result.diagnostics]},
            )
        else:
            existing = next((e.envelope.data["content_hash"] for e in history
                             if e.envelope.type == "procedure_imported"
                             and e.envelope.data.get("version") == ir.version), None)
            if existing is not None:
                rejection = CommandRejected(
                    command_id=cmd.command_id, command_type="import_procedure",
                    code="procedure_version_exists",
                    detail=f"procedure {ir.procedure_id} version {ir.version} already exists",
                    extra={"existing_content_hash": existing, "identical": existing == ir.content_hash},
                )
        data: EventData
        if rejection is not None:
            data = rejection
        else:
            assert ir is not None
            trigger = cmd.ckp_json.get("trigger")
            data = ProcedureImported(
                procedure_id=ir.procedure_id, version=ir.version, name=ir.name, description=ir.description,
                project_id=cmd.project_id, tags=ir.tags, content_hash=ir.content_hash,
                compiler_version=ir.compiler_version, ir_key=procedure_key(ir.procedure_id, ir.version),
                ckp_json=cmd.ckp_json, variables_schema=ir.variables_schema(),
                trigger=trigger if isinstance(trigger, dict) else None, effective_date=ir.effective_date,
                diagnostics=[d.model_dump(mode="json") for d in result.diagnostics],
            )
        event = make_event(data, aggregate_id=pid, seq=head_seq + 1, actor=cmd.actor,
                           causation_id=cmd.command_id, aggregate="procedure")
        await self.store.append([event], expected_position=head_pos)
        if ir is not None and rejection is None:
            await self.kv.put(procedure_key(ir.procedure_id, ir.version),
                              ir.model_dump_json(by_alias=True).encode())


async def serve(settings: CompilerSettings) -> None:
    service = CompilerService(settings)
    await service.start()
    try:
        await service.run()
    finally:
        await service.stop()
