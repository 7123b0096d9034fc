"""A FastStream command consumer survives its NATS server going away and coming back (a failover as a client sees
it: fetches fail with a closed or reconnecting connection, then with ``ServiceUnavailableError`` while the server
answers without JetStream). The compiler keeps its durable consumer: a command published after the restart is
decided. Real NATS (its own server, restarted on the same port and store directory); no PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
from pathlib import Path
from typing import Any

import nats
import pytest

from ckp_core.commands import ImportProcedure
from ckp_core.events import Actor
from langorch_compiler.service import CompilerService
from langorch_infra.embedded import EmbeddedNats, nats_server_binary
from langorch_infra.jetstream import JetStreamEventStore, publish_command
from langorch_infra.settings import CompilerSettings
from tests.helpers import example

pytestmark = pytest.mark.integration

OPERATOR = Actor(kind="user", id="ops")


def procedure_doc(procedure_id: str, version: str) -> dict[str, Any]:
    """The minimal greeting example under another identity."""
    return {**example("minimal_greeting.ckp.json"), "procedure_id": procedure_id, "version": version}


async def imported(url: str, procedure_id: str, timeout: float = 30) -> list[str]:
    """The event types of ``procedure_id`` once it has one (read with a connection of the test's own)."""
    deadline = asyncio.get_running_loop().time() + timeout
    while True:
        with contextlib.suppress(OSError, nats.errors.Error):
            nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
            try:
                types = [e.envelope.type for e in await JetStreamEventStore(nc.jetstream()).read("procedure",
                                                                                               procedure_id)]
            finally:
                await nc.close()
            if types:
                return types
        assert asyncio.get_running_loop().time() < deadline, f"{procedure_id} was never decided"
        await asyncio.sleep(0.2)


async def publish(url: str, command: ImportProcedure) -> None:
    nc = await nats.connect(url)
    try:
        await publish_command(nc.jetstream(), command)
    finally:
        await nc.close()


async def test_the_compiler_consumes_again_after_nats_restarts(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    service = CompilerService(CompilerSettings(nats_url=server.url))
    task: asyncio.Task[None] | None = None
    try:
        await service.start()
        task = asyncio.create_task(service.run())
        await publish(server.url, ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("before", "1")))
        assert await imported(server.url, "before") == ["procedure_imported"]

        server.kill()  # no graceful shutdown: the consumer's fetches fail while it is gone
        await asyncio.sleep(2)
        assert not task.done()
        # back without JetStream for a while (no stream leader yet): a fetch is answered 503, which nats-py
        # raises as ServiceUnavailableError
        plain = subprocess.Popen([nats_server_binary(), "-a", "127.0.0.1", "-p", str(server.port)],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            await asyncio.sleep(4)
            assert not task.done()
        finally:
            plain.kill()
            plain.wait()
        server.start()  # same port, same store: the stream and the durable consumer are still there

        await publish(server.url, ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("after", "1")))
        assert await imported(server.url, "after") == ["procedure_imported"]
        assert not task.done()
        deadline = asyncio.get_running_loop().time() + 10
        while True:  # counted once settled (an ack right after the restart may time out: then it is redelivered)
            handled = {s.labels["outcome"]: s.value for f in service.metrics.registry.collect() for s in f.samples
                       if s.name == "langorch_bus_messages_total"}
            if sum(handled.values()) >= 2 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert set(handled) == {"ack"}
        assert handled["ack"] >= 2
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        await service.stop()
        server.stop()


async def test_an_ir_write_that_times_out_is_tried_again_within_the_command(tmp_path: Path) -> None:
    """The IR's KV put times out once (as right after a restart, while the bucket's stream is not answering yet):
    the compiler writes it again at once instead of failing the command and waiting for its redelivery."""
    server = EmbeddedNats(tmp_path / "nats").start()
    service = CompilerService(CompilerSettings(nats_url=server.url))
    task: asyncio.Task[None] | None = None
    try:
        await service.start()
        real_put = service.kv.put
        tries: list[str] = []

        async def timing_out_once(key: str, value: bytes, *args: Any, **kwargs: Any) -> int:
            tries.append(key)
            if len(tries) == 1:
                raise nats.errors.TimeoutError
            return int(await real_put(key, value, *args, **kwargs))

        service.kv.put = timing_out_once  # type: ignore[method-assign]
        task = asyncio.create_task(service.run())
        await publish(server.url, ImportProcedure(actor=OPERATOR, ckp_json=procedure_doc("blip", "1")))
        assert await imported(server.url, "blip") == ["procedure_imported"]
        deadline = asyncio.get_running_loop().time() + 10
        while True:
            handled = {s.labels["outcome"]: s.value for f in service.metrics.registry.collect() for s in f.samples
                       if s.name == "langorch_bus_messages_total"}
            if sum(handled.values()) >= 1 or asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(0.1)
        assert handled == {"ack": 1.0}
        assert len(tries) == 2
        assert (await real_put.__self__.get(tries[0])).value  # type: ignore[attr-defined]
    finally:
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        await service.stop()
        server.stop()
