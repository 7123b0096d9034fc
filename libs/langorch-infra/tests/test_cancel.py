"""A loop whose cancellation a library swallowed still stops at its next round (langorch_infra.cancel)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from langorch_infra.cancel import stop_if_cancelled

pytestmark = pytest.mark.unit


async def test_a_swallowed_cancellation_stops_the_loop_at_its_next_round() -> None:
    rounds = 0

    async def loop() -> None:
        nonlocal rounds
        while True:
            stop_if_cancelled()
            rounds += 1
            with contextlib.suppress(asyncio.CancelledError):  # what Python 3.11's wait_for may do
                await asyncio.sleep(0.01)

    task = asyncio.create_task(loop())
    await asyncio.sleep(0.05)
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=10)
    assert done
    assert task.cancelled()
    assert rounds >= 1


async def test_python_311_wait_for_can_drop_a_cancellation() -> None:
    """The reason: the inner future is done when the cancellation lands, so wait_for returns its result and the
    task goes on, though ``cancelling()`` still says it was asked to stop."""
    ready: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    outcome: list[object] = []

    async def requester() -> None:
        got = await asyncio.wait_for(ready, 5)
        outcome.append((got, asyncio.current_task().cancelling()))  # type: ignore[union-attr]

    task = asyncio.create_task(requester())
    await asyncio.sleep(0)  # the task now waits inside wait_for
    ready.set_result("reply")
    task.cancel()  # lands while wait_for's future is already done
    with contextlib.suppress(asyncio.CancelledError):
        await task
    if outcome:  # 3.11: the cancellation was dropped, and the task knows it was asked to stop
        assert outcome == [("reply", 1)]
    else:  # 3.12+: the cancellation is delivered
        assert task.cancelled()


def test_outside_a_cancelled_task_it_does_nothing() -> None:
    async def main() -> str:
        stop_if_cancelled()
        return "ran"

    assert asyncio.run(main()) == "ran"
