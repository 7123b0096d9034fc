"""Every loop that runs until its task is cancelled stops when it is, even when a library swallowed the
cancellation on the way (Python 3.11's ``asyncio.wait_for`` returns the result of a future that completed as the
cancellation arrived, and the task goes on: ``langorch_infra.cancel``).

The rule the source follows, checked here: in ``libs``, ``services`` and ``src``, a ``while`` loop of a coroutine
that runs until cancelled (``while True``, or any ``while`` that reads a subscription; awaiting something, with no
``return``, ``break`` or ``raise``) calls ``stop_if_cancelled()`` in each round.
Then a regression of what CI hit: the runtime's list of held runs, cancelled just as a change woke it, kept its
stop (and the test's shutdown) waiting for 60 s."""

from __future__ import annotations

import ast
import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import nats
import pytest

from ckp_core.subjects import LEASES_BUCKET
from langorch_infra.cancel import cancel_and_wait
from langorch_infra.jetstream import ensure_topology
from langorch_runtime.dispatch_view import KvView
from langorch_runtime.ownership import RunOwnership

ROOT = Path(__file__).resolve().parent.parent
SOURCE_ROOTS = (ROOT / "libs", ROOT / "services", ROOT / "src")
FOLLOWING_READS = {"next_msg"}  # nats-py's read of a subscription (through wait_for)


def _sources() -> Iterator[Path]:
    for root in SOURCE_ROOTS:
        yield from sorted(p for p in root.rglob("*.py")
                          if "src" in p.parts and ".venv" not in p.parts and "build" not in p.parts)


def _endless_loops_without_the_check() -> list[str]:
    found = []
    for path in _sources():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for function in ast.walk(tree):
            if not isinstance(function, ast.AsyncFunctionDef):
                continue
            for loop in ast.walk(function):
                if not isinstance(loop, ast.While):
                    continue
                inside = list(ast.walk(loop))
                endless = isinstance(loop.test, ast.Constant) and loop.test.value is True
                # a loop under another condition that follows a subscription also runs until cancelled (say,
                # until the connection is re-established), and its reads are where a cancellation is swallowed
                follows = any(isinstance(n, ast.Await) and isinstance(n.value, ast.Call)
                              and getattr(n.value.func, "attr", None) in FOLLOWING_READS for n in inside)
                if not endless and not follows:
                    continue
                if not any(isinstance(n, ast.Await) for n in inside):
                    continue
                if any(isinstance(n, ast.Return | ast.Break | ast.Raise) for n in inside):
                    continue  # it has a way out of its own
                called = {n.func.id if isinstance(n.func, ast.Name) else getattr(n.func, "attr", None)
                          for n in inside if isinstance(n, ast.Call)}
                if "stop_if_cancelled" not in called:
                    found.append(f"{path.relative_to(ROOT)}:{loop.lineno} in {function.name}")
    return found


@pytest.mark.unit
def test_every_endless_loop_checks_for_a_swallowed_cancellation() -> None:
    assert _endless_loops_without_the_check() == []


@pytest.mark.unit
def test_the_check_finds_such_a_loop(tmp_path: Path) -> None:
    # the scan itself: a loop like the one CI hung in is reported (a scan that finds nothing proves nothing)
    tree = ast.parse("async def f(e):\n    while True:\n        await wait_for(e.wait(), 5)\n")
    loops = [n for n in ast.walk(tree) if isinstance(n, ast.While)]
    assert len(loops) == 1
    called = {n.func.id for n in ast.walk(loops[0]) if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    assert "stop_if_cancelled" not in called


@pytest.mark.integration
async def test_the_held_runs_list_stops_when_cancelled_as_a_change_wakes_it(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    await ensure_topology(nc.jetstream())
    ownership = RunOwnership(nc, nc.jetstream(), "cancel-test")
    try:
        await ownership.start()
        await asyncio.sleep(0.2)  # the list's task now waits for a change (inside asyncio.wait_for)
        # a change and the stop in the same turn of the loop: the change completes the awaited future first, and
        # Python 3.11's wait_for then returns it instead of raising the cancellation
        tasks = list(ownership._tasks)
        ownership._changed.set()
        stopping = asyncio.ensure_future(ownership.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10)  # not wait_for: it could swallow this very failure
        assert stopping in done, "the ownership did not stop within 10 s"
        assert all(task.done() for task in tasks)
    finally:
        await nc.close()


@pytest.mark.unit
async def test_cancel_and_wait_hands_on_the_cancellation_of_its_caller() -> None:
    release = asyncio.Event()

    async def stubborn() -> None:  # a task that does not stop when cancelled (until released)
        while not release.is_set():
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(10)

    task = asyncio.create_task(stubborn())
    await asyncio.sleep(0)
    caller = asyncio.ensure_future(cancel_and_wait([task]))
    await asyncio.sleep(0.05)
    caller.cancel()  # as a bounded stop whose time is up
    done, _ = await asyncio.wait({caller}, timeout=5)
    ended, cancelled = caller in done, caller.cancelled()
    release.set()  # let everything end before asserting
    task.cancel()
    await asyncio.wait({task, caller}, timeout=5)
    assert ended
    assert cancelled  # not returned as if the task had ended
    assert task.done()


@pytest.mark.unit
async def test_cancel_and_wait_drops_the_outcomes_of_the_tasks() -> None:
    async def failing() -> None:
        raise RuntimeError("a last failure")

    async def waiting() -> None:
        await asyncio.sleep(10)

    tasks = [asyncio.create_task(failing()), asyncio.create_task(waiting())]
    await asyncio.sleep(0)
    await cancel_and_wait(tasks)
    assert all(task.done() for task in tasks)


@pytest.mark.integration
async def test_a_kv_view_stops_when_a_read_swallows_its_cancellation(nats_url: str) -> None:
    """CI: the agent dispatcher's view of ``lo_leases`` kept following after its stop cancelled it (its loop runs
    until the connection is re-established, not ``while True``), and the dispatcher's stop hung for 60 s."""
    nc = await nats.connect(nats_url)
    js = nc.jetstream()
    await ensure_topology(js)
    view = KvView(js, LEASES_BUCKET)
    subscribe = view._subscribe

    async def swallowing_reads() -> Any:
        sub = await subscribe()
        read = sub.next_msg

        async def next_msg(timeout: float = 1.0) -> Any:
            try:
                return await read(timeout=timeout)
            except asyncio.CancelledError:  # as wait_for does when the read completed as the cancellation came
                raise nats.errors.TimeoutError from None

        sub.next_msg = next_msg
        return sub

    view._subscribe = swallowing_reads  # type: ignore[method-assign]
    try:
        await view.start()
        await asyncio.sleep(0.1)  # the view now waits in a read
        stopping = asyncio.ensure_future(view.stop())
        done, _ = await asyncio.wait({stopping}, timeout=10)  # not wait_for: it could swallow this very failure
        assert stopping in done, "the view did not stop within 10 s"
    finally:
        await nc.close()
