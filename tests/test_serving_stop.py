"""``langorch serve``'s stop: a service that swallows its cancellations is canceled again and again within the
budget, and one still running after it is logged with the stack it is stuck at (to find out why a replica is slow
to stop), then left behind so that the process can exit; tasks left behind by the services are canceled, and a stuck
one is logged the same way. Each scenario runs on an event loop of its own, as ``langorch serve``'s (they cancel
every other task of their loop)."""

from __future__ import annotations

import asyncio
import logging

import pytest

from langorch.serving import stop_stragglers, stop_tasks

pytestmark = pytest.mark.unit


class Stubborn:
    """A service that must not be written like this: it swallows every cancellation until released."""

    def __init__(self) -> None:
        self.released = False

    async def serve(self) -> None:
        while not self.released:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                continue

    async def release(self, task: asyncio.Task[None]) -> None:
        self.released = True
        task.cancel()
        await asyncio.wait({task}, timeout=5)


async def polite_service() -> None:
    await asyncio.sleep(10)


def stuck_names(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage().split(" ", 1)[0] for r in caplog.records
            if "did not stop within its budget" in r.getMessage()]


def test_a_service_that_does_not_stop_is_logged_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    service = Stubborn()

    async def scenario() -> None:
        stubborn = asyncio.create_task(service.serve(), name="stubborn")
        polite = asyncio.create_task(polite_service(), name="polite")
        await asyncio.sleep(0)
        await stop_tasks([stubborn, polite], grace=0)
        assert polite.cancelled()
        assert not stubborn.done()
        await service.release(stubborn)

    with caplog.at_level(logging.WARNING, logger="langorch.serving"):
        asyncio.run(scenario())
    assert stuck_names(caplog) == ["stubborn"]
    assert any("in serve" in r.getMessage() for r in caplog.records)  # where it is stuck: Stubborn.serve


def test_tasks_left_behind_are_canceled_and_a_stuck_one_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    service = Stubborn()

    async def scenario() -> None:
        left = asyncio.create_task(polite_service(), name="left-behind")
        stuck = asyncio.create_task(service.serve(), name="stuck-behind")
        await asyncio.sleep(0)
        await stop_stragglers(grace=0.5)
        assert left.cancelled()
        assert not stuck.done()
        await service.release(stuck)

    with caplog.at_level(logging.WARNING, logger="langorch.serving"):
        asyncio.run(scenario())
    assert stuck_names(caplog) == ["stuck-behind"]
