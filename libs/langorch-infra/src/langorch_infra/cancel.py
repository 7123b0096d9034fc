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
import contextlib
from collections.abc import Iterable
from typing import Any


def stop_if_cancelled() -> None:
    """Raise ``CancelledError`` when the current task was cancelled but the cancellation was lost on the way."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


async def cancel_and_wait(tasks: Iterable[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until each has ended; their outcomes (the CancelledError, or a last failure) are
    dropped: a component stopping its own background tasks."""
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):  # the cancelled task's CancelledError (or its last failure)
            await task
