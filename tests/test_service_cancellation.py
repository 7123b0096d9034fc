"""A service task canceled while it starts consuming stops.

FastStream's subscriber start can swallow the cancellation: it then returned normally, and the service waited for
ever on its inner tasks, hanging the platform's stop for 60 s in CI. The approvals service and the compiler are
canceled at several moments of their start, on real NATS JetStream; the runtime's agent side and the triggers
start their consumers the same way, through ``messaging.start_consuming``."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from langorch_approvals.service import ApprovalsService
from langorch_compiler.service import CompilerService
from langorch_infra.settings import ApprovalsSettings, CompilerSettings

pytestmark = pytest.mark.integration

DELAYS_MS = (0, 1, 2, 3, 5, 10, 30)


SERVICES = {"approvals": lambda env: ApprovalsService(ApprovalsSettings(**env)),
            "compiler": lambda env: CompilerService(CompilerSettings(**env))}


@pytest.mark.parametrize("delay_ms", DELAYS_MS)
@pytest.mark.parametrize("name", sorted(SERVICES))
async def test_a_service_canceled_while_it_starts_consuming_stops(nats_url: str, database_url: str, name: str,
                                                                  delay_ms: int) -> None:
    service = SERVICES[name]({"nats_url": nats_url, "database_url": database_url})
    await service.start()
    try:
        task = asyncio.create_task(service.run())
        await asyncio.sleep(delay_ms / 1000)
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=15)
        assert done, f"run() canceled after {delay_ms} ms did not stop within 15 s: {task}"
        with contextlib.suppress(asyncio.CancelledError):
            task.result()
    finally:
        await service.stop()
