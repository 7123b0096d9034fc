"""The event loop LangOrch's processes run on.

``langorch up``, its worker processes and ``langorch serve`` run their services on uvloop (libuv's event loop for
asyncio) unless ``LANGORCH_EVENT_LOOP=asyncio``: a run's events, checkpoints and step records are hundreds of
small network round trips, and every one of them is a few turns of the event loop. On the 2-core test machine,
the same runs of ``bench/runtime.py`` took about a third less time per node on uvloop and twice as many ran at
once per second (``docs/operations/performance.md``). The behaviour is the same on both loops: tasks,
cancellation and signals are asyncio's own.
"""

from __future__ import annotations

import asyncio
import importlib.util
import os
from collections.abc import Coroutine
from typing import Any, Literal, TypeVar, cast

from langorch_infra import stacks

T = TypeVar("T")

ENV = "LANGORCH_EVENT_LOOP"
Loop = Literal["uvloop", "asyncio"]


def chosen(environ: dict[str, str] | None = None) -> Loop:
    """The loop ``LANGORCH_EVENT_LOOP`` asks for: ``uvloop`` or ``asyncio``; unset, uvloop where it is installed
    (it is a dependency of LangOrch except on Windows, which uvloop does not support). Another value, or uvloop
    asked for where it is missing, is a ``ValueError`` naming the variable."""
    value = (environ if environ is not None else os.environ).get(ENV, "").strip().lower()
    available = importlib.util.find_spec("uvloop") is not None
    if not value:
        return "uvloop" if available else "asyncio"
    if value not in ("uvloop", "asyncio"):
        raise ValueError(f"{ENV}={value!r}: expected 'uvloop' or 'asyncio'")
    if value == "uvloop" and not available:
        raise ValueError(f"{ENV}=uvloop, but uvloop is not installed here: set {ENV}=asyncio or install it")
    return cast(Loop, value)


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run(main)`` on the chosen loop, the process answering SIGUSR1 and SIGUSR2 with its stacks
    (:mod:`langorch_infra.stacks`)."""
    try:
        loop = chosen()
    except ValueError:
        main.close()  # never started: no "coroutine was never awaited" warning on top of the error
        raise
    try:
        if loop == "uvloop":
            import uvloop

            return uvloop.run(_answering_for_stacks(main))
        return asyncio.run(_answering_for_stacks(main))
    finally:
        stacks.answer_early()  # the closed loop gave SIGUSR1 back its default, which would end the process


async def _answering_for_stacks(main: Coroutine[Any, Any, T]) -> T:
    stacks.install(asyncio.get_running_loop())
    return await main
