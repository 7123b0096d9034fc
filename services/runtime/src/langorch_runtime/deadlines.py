"""A hard deadline for calls into network libraries.

``asyncio.wait_for`` cancels the awaited call when its time is up and then *waits for the call to end*. A library
that does not end promptly on cancellation turns that into a hang: httpx runs its I/O inside anyio cancel scopes,
and a native cancellation delivered at an unlucky moment can be absorbed there, so the request goes on reading a
body that trickles for a minute. The step then overstays its timeout by that minute (seen on a loaded machine).

:func:`within` gives the caller its answer at the deadline whatever the call does with the cancellation: the call
is cancelled, given :data:`CANCEL_GRACE_S` to end, and otherwise left to end in the background, with a warning.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable
from typing import Any, TypeVar

log = logging.getLogger(__name__)

T = TypeVar("T")

CANCEL_GRACE_S = 1.0  # how long a cancelled call may take to end before the caller stops waiting for it


def consume_outcome(task: asyncio.Future[Any]) -> None:
    """Retrieve the outcome of a task left to end in the background (a call abandoned at its deadline, a release,
    a look-up nobody needed in the end): no "exception never retrieved"."""
    if not task.cancelled() and task.exception() is not None:
        log.debug("a task left to end in the background ended with %r", task.exception())


async def within(call: Awaitable[T], seconds: float, what: str = "call") -> T:
    """``await call``, but raise :class:`TimeoutError` once ``seconds`` have passed, even when ``call`` does not
    stop on cancellation. A call that completes while being cancelled still gives its answer (as ``wait_for``);
    one that fails while being cancelled is a timeout."""
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, seconds))
    except asyncio.CancelledError:
        task.cancel()  # our caller was cancelled: so is the call (not awaited: it may not stop promptly either)
        task.add_done_callback(consume_outcome)
        raise
    if not done:
        task.cancel()
        done, _ = await asyncio.wait({task}, timeout=CANCEL_GRACE_S)
        if not done:
            log.warning("%s did not stop within %.1f s of its cancellation at its %.1f s deadline; "
                        "left to end in the background", what, CANCEL_GRACE_S, seconds)
            task.add_done_callback(consume_outcome)
            raise TimeoutError
        if task.cancelled() or task.exception() is not None:
            raise TimeoutError  # whatever the cancelled call raised (httpx may turn it into a ConnectError)
    return task.result()
