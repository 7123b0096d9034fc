"""Cancellation that a library swallowed.

Python 3.11's ``asyncio.wait_for`` drops a cancellation that arrives when the awaited future is already done: it
returns the result, and the caller's task goes on (python/cpython#86296, fixed in 3.12). nats-py runs every request
through ``wait_for``, so a service loop cancelled at shutdown during a KV put or a fetch can miss it and run forever:
an approvals service whose leader-lock renewal caught its cancellation this way kept a test's shutdown waiting 60 s.

The task still knows it was asked to stop (``Task.cancelling()`` stays above zero, nobody called ``uncancel``), so
every loop that runs until cancelled calls :func:`stop_if_cancelled` once per round.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from typing import Any


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` when the current task was cancelled but the cancellation was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended; their outcomes (the CancelledError, or a last failure) are
    dropped: a component stopping its own background tasks. A cancellation of the caller itself while it waits is
    not dropped with them (awaiting each task inside ``suppress(BaseException)`` did: a bounded stop whose time was
    up then returned as if the tasks had ended)."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    if tasks:
        await asyncio.wait(tasks)  # raises only the caller's own cancellation
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: a last failure is dropped, not reported as never retrieved
