"""A step's deadline holds even when the call it bounds does not stop on cancellation (deadlines.within)."""

from __future__ import annotations

import asyncio
import contextlib

import pytest

from langorch_runtime.deadlines import CANCEL_GRACE_S, within

pytestmark = pytest.mark.unit


async def stubborn(release: asyncio.Event) -> str:
    """A call that absorbs its first cancellation and goes on until ``release`` is set, as an httpx request can
    when the cancellation lands inside one of its anyio cancel scopes."""
    with contextlib.suppress(asyncio.CancelledError):
        await asyncio.sleep(3600)
    await release.wait()
    return "too late"


async def test_a_call_that_absorbs_its_cancellation_still_times_out_at_its_deadline() -> None:
    release = asyncio.Event()
    task = asyncio.ensure_future(stubborn(release))
    with pytest.raises(TimeoutError):
        await within(task, 0.05, "stubborn call")
    assert not task.done()  # the caller got its answer while the call still runs: it did not wait for it
    release.set()
    assert await task == "too late"


async def test_asyncio_wait_for_would_hang_on_the_same_call() -> None:
    """The reason within() exists: wait_for waits for the cancelled call to end."""
    release = asyncio.Event()
    waiting = asyncio.ensure_future(asyncio.wait_for(stubborn(release), 0.05))
    await asyncio.sleep(CANCEL_GRACE_S + 0.5)
    assert not waiting.done()
    release.set()
    assert await waiting == "too late"


async def test_answers_and_failures_pass_through() -> None:
    async def answer() -> int:
        await asyncio.sleep(0)
        return 42

    async def fail() -> None:
        raise ValueError("boom")

    assert await within(answer(), 5) == 42
    with pytest.raises(ValueError, match="boom"):
        await within(fail(), 5)


async def test_a_call_that_fails_while_cancelled_is_a_timeout() -> None:
    """httpx may turn a cancellation into another error (a ConnectError): that is still the deadline passing."""

    async def converts() -> None:
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            raise ConnectionError("cancelled while connecting") from None

    with pytest.raises(TimeoutError):
        await within(converts(), 0.05)


async def test_cancelling_the_caller_cancels_the_call() -> None:
    started = asyncio.Event()
    cancelled = asyncio.Event()

    async def long() -> None:
        started.set()
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    caller = asyncio.ensure_future(within(long(), 3600))
    await started.wait()
    caller.cancel()
    with pytest.raises(asyncio.CancelledError):
        await caller
    await asyncio.wait_for(cancelled.wait(), 5)
