"""Where a LangOrch process is, on request: its asyncio tasks' and threads' stacks, written to standard error.

``SIGUSR1`` (``kill -USR1 <pid>``) writes the stack of every asyncio task of the process's event loop, then of
every thread. It runs on the event loop, between two of its callbacks, so it answers while the loop turns, which
is when a stop or a run waits for a task that does not end (a thread's stack alone shows only the loop waiting).
``SIGUSR2`` writes every thread's stack from the interpreter's own signal handler (:mod:`faulthandler`): it
answers even when the loop is held by a call that never returns. The process goes on either way.

:func:`langorch_infra.loops.run` installs both in every LangOrch process (``langorch up``, its workers,
``langorch serve``); a process whose loop does not run in its main thread keeps the default meaning of the signals.
``langorch up`` passes SIGUSR1 on to its worker processes, which write theirs too.
"""

from __future__ import annotations

import asyncio
import contextlib
import faulthandler
import linecache
import os
import signal
import sys
import threading
from collections.abc import Callable
from types import FrameType
from typing import Any, TextIO

ALSO: list[Callable[[], None]] = []
"""Called after this process's stacks are written for SIGUSR1 (``langorch up`` passes the signal to its workers)."""
TASKS_SIGNAL = signal.SIGUSR1
THREADS_SIGNAL = signal.SIGUSR2
FRAMES_PER_TASK = 40
REPR_CHARS = 300  # of what a task waits for


def awaiting(task: asyncio.Task[Any]) -> tuple[list[FrameType], object]:
    """The frames of ``task``'s chain of awaits, outermost first, and what the innermost one waits for (a future,
    usually). :meth:`asyncio.Task.get_stack` gives only the outermost frame of a suspended task, which says little
    about where it waits."""
    frames: list[FrameType] = []
    current: Any = task.get_coro()
    while current is not None and len(frames) < FRAMES_PER_TASK:
        kind = next((k for k in _CHAINS if hasattr(current, k[1])), None)
        if kind is None:
            return frames, current  # not a coroutine: the future (or other awaitable) it waits for
        if (frame := getattr(current, kind[0], None)) is not None:
            frames.append(frame)
        current = getattr(current, kind[1], None)
    return frames, current


_CHAINS = (("cr_frame", "cr_await"), ("gi_frame", "gi_yieldfrom"), ("ag_frame", "ag_await"))
"""A coroutine's, a generator's and an async generator's frame and what it awaits."""


def write_stacks(out: TextIO | None = None) -> None:
    """Every asyncio task of the running loop (its name, then the frames of its chain of awaits, innermost last,
    and what it waits for), then every thread (:func:`faulthandler.dump_traceback`), to ``out`` (default: standard
    error)."""
    out = out if out is not None else sys.stderr
    tasks = sorted(asyncio.all_tasks(), key=lambda t: t.get_name())
    out.write(f"--- LangOrch process {os.getpid()}: {len(tasks)} asyncio tasks (SIGUSR1) ---\n")
    for task in tasks:
        frames, waits_for = awaiting(task)
        # the future the task is suspended on (asyncio's own record of it; the chain ends in its iterator)
        waits_for = getattr(task, "_fut_waiter", None) or waits_for
        out.write(f"task {task.get_name()!r}{' (cancelling)' if task.cancelling() else ''}:\n")
        for frame in frames:
            code = frame.f_code
            out.write(f'  File "{code.co_filename}", line {frame.f_lineno}, in {code.co_name}\n')
            if line := linecache.getline(code.co_filename, frame.f_lineno).strip():
                out.write(f"    {line}\n")
        if waits_for is not None:
            shown = repr(waits_for)
            out.write(f"  waiting for {shown if len(shown) <= REPR_CHARS else shown[:REPR_CHARS] + '…'}\n")
    out.write(f"--- threads of process {os.getpid()} ---\n")
    out.flush()
    with contextlib.suppress(OSError, ValueError, AttributeError):  # a stream without a file descriptor
        faulthandler.dump_traceback(file=out, all_threads=True)
    out.flush()
    for also in list(ALSO):
        with contextlib.suppress(Exception):  # a helper's failure never stops the process that was asked
            also()


def answer_early() -> bool:
    """Until :func:`install` runs (a process still importing or starting its services), SIGUSR1 writes every
    thread's stack instead of ending the process (the signal's default); SIGUSR2 as always. Call it first thing in
    a process's entry point; False outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        signal.signal(TASKS_SIGNAL, _threads_now)
        _threads_on_signal()
    except (ValueError, AttributeError, OSError):
        return False
    return True


def _threads_on_signal() -> None:
    faulthandler.register(THREADS_SIGNAL, file=sys.stderr, all_threads=True, chain=False)


def _threads_now(signum: int, frame: object) -> None:
    sys.stderr.write(f"--- LangOrch process {os.getpid()}: no event loop yet; its threads ---\n")
    sys.stderr.flush()
    with contextlib.suppress(OSError, ValueError, AttributeError):
        faulthandler.dump_traceback(file=sys.stderr, all_threads=True)


def install(loop: asyncio.AbstractEventLoop) -> bool:
    """Answer SIGUSR1 (tasks and threads, from ``loop``) and SIGUSR2 (threads, at once); False where signals cannot
    be handled (the loop is not in the main thread, or the platform has no such signals)."""
    if threading.current_thread() is not threading.main_thread():
        return False
    try:
        loop.add_signal_handler(TASKS_SIGNAL, write_stacks)
        _threads_on_signal()
    except (NotImplementedError, RuntimeError, ValueError, AttributeError, OSError):
        return False
    return True
