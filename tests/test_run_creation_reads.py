"""A run creation reads the version, its IR and the run's head at once, and decides exactly as when it read them one
after the other: the IR's sensitive variables in the start's audit record (a redelivered creation's too), a version
whose IR is not stored yet sent back for later. Real NATS; the compiler imports the procedure."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import nats
import pytest

from ckp_core.audit import AuditEntry
from ckp_core.commands import CreateRun, ImportProcedure
from ckp_core.events import Actor
from ckp_core.ids import new_id
from ckp_core.subjects import PROCEDURES_BUCKET, procedure_key
from langorch_compiler.service import CompilerService
from langorch_infra.jetstream import JetStreamEventStore, publish_command
from langorch_infra.settings import CompilerSettings
from langorch_runtime.creation import IrNotStored, RunCreator
from tests.helpers import example

pytestmark = pytest.mark.integration

OPERATOR = Actor(kind="user", id="ops")


def procedure(procedure_id: str) -> dict[str, Any]:
    """The minimal greeting example with a sensitive input."""
    doc = example("minimal_greeting.ckp.json")
    doc["variables_schema"]["customer_code"] = {"type": "string", "sensitive": True, "default": "x"}
    return {**doc, "procedure_id": procedure_id, "version": "1"}


class Overlap:
    """Counts the reads in flight, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.most = 0

    def wrap(self, target: Any, name: str) -> None:
        real = getattr(target, name)

        async def counted(*args: Any, **kwargs: Any) -> Any:
            self.now += 1
            self.most = max(self.most, self.now)
            try:
                await asyncio.sleep(0.05)  # a read that takes a while, as on a busy server: the others start meanwhile
                return await real(*args, **kwargs)
            finally:
                self.now -= 1

        setattr(target, name, counted)


class Audits:
    def __init__(self) -> None:
        self.entries: list[AuditEntry] = []

    async def write(self, entry: AuditEntry) -> bool:
        self.entries.append(entry)
        return True


@contextlib.asynccontextmanager
async def imported(nats_url: str, procedure_id: str) -> AsyncIterator[nats.NATS]:
    """A connection, once the compiler has imported ``procedure_id`` and stored its IR."""
    compiler = CompilerService(CompilerSettings(nats_url=nats_url))
    await compiler.start()
    task = asyncio.create_task(compiler.run())
    nc = await nats.connect(nats_url)
    try:
        await publish_command(nc.jetstream(), ImportProcedure(actor=OPERATOR, ckp_json=procedure(procedure_id)))
        kv = await nc.jetstream().key_value(PROCEDURES_BUCKET)
        deadline = asyncio.get_running_loop().time() + 30
        while True:
            with contextlib.suppress(nats.js.errors.KeyNotFoundError):
                await kv.get(procedure_key(procedure_id, "1"))
                break
            assert asyncio.get_running_loop().time() < deadline, "the IR was never stored"
            await asyncio.sleep(0.05)
        yield nc
    finally:
        task.cancel()
        with contextlib.suppress(BaseException):
            await task
        await compiler.stop()
        await nc.close()


def command(procedure_id: str) -> CreateRun:
    return CreateRun(actor=OPERATOR, run_id=new_id(), procedure_id=procedure_id, procedure_version="1",
                     input_vars={"customer_code": "s3cret-value"})


async def test_the_three_reads_overlap_and_the_audit_record_is_redacted_on_a_redelivery_too(nats_url: str) -> None:
    async with imported(nats_url, "reads_overlap") as nc:
        js = nc.jetstream()
        store = JetStreamEventStore(js)
        kv = await js.key_value(PROCEDURES_BUCKET)
        audits = Audits()
        creator = RunCreator(store, js, kv, audits)
        overlap = Overlap()
        for name in ("read", "head"):  # the procedure's and the run's events
            overlap.wrap(store, name)
        overlap.wrap(kv, "get")  # the IR
        create = command("reads_overlap")

        handled = await creator.create(create)
        assert handled.event is not None
        assert handled.event.type == "run_created"
        assert overlap.most >= 3, overlap.most  # the version, the IR and the run's head were read at once

        again = await creator.create(create, delivery=2)  # a redelivery: the run exists, its record is written again
        assert again.replayed
        assert len(audits.entries) == 2
        for entry in audits.entries:
            text = entry.model_dump_json()
            assert "s3cret-value" not in text, text  # the IR's sensitive input is masked in both records


async def test_a_version_whose_ir_is_not_stored_yet_is_decided_later(nats_url: str) -> None:
    async with imported(nats_url, "ir_later") as nc:
        js = nc.jetstream()
        kv = await js.key_value(PROCEDURES_BUCKET)
        await kv.delete(procedure_key("ir_later", "1"))
        creator = RunCreator(JetStreamEventStore(js), js, kv, Audits())
        create = command("ir_later")
        with pytest.raises(IrNotStored):
            await creator.create(create)
        handled = await creator.create(create, delivery=25)  # the last delivery: refused, not waited for
        assert handled.event is not None
        assert handled.event.type == "command_rejected"
        assert handled.event.data["code"] == "procedure_not_runnable"
