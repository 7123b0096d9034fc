"""``langorch serve``'s stop: a service that swallows its cancellations is canceled again and again within the
budget, and one still running after it is logged with the stack it is stuck at (to find out why a replica is slow
to stop), then left behind so that the process can exit."""

from __future__ import annotations

import asyncio
import logging

import pytest

from langorch.serving import stop_tasks

pytestmark = pytest.mark.unit


async def stubborn_service() -> None:
    while True:
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            continue  # a service that must not be written like this


async def polite_service() -> None:
    await asyncio.sleep(10)


async def test_a_service_that_does_not_stop_is_logged_with_its_stack(caplog: pytest.LogCaptureFixture) -> None:
    stubborn = asyncio.create_task(stubborn_service(), name="stubborn")
    polite = asyncio.create_task(polite_service(), name="polite")
    await asyncio.sleep(0)
    with caplog.at_level(logging.WARNING, logger="langorch.serving"):
        await stop_tasks([stubborn, polite], grace=0)
    assert polite.cancelled()
    [record] = [r for r in caplog.records if "did not stop" in r.getMessage()]
    assert record.getMessage().startswith("stubborn did not stop within its budget")
    assert "stubborn_service" in record.getMessage()  # where it is stuck
    assert not stubborn.done()
    stubborn.cancel()  # the test's own clean-up: one more cancellation it swallows, then its frame is dropped
    del stubborn
