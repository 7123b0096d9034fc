"""A LangOrch process writes where it is when asked (``langorch_infra.stacks``, installed by ``loops.run``):
SIGUSR1 gives every asyncio task's stack and every thread's, SIGUSR2 every thread's even while the event loop is
held by a call that never returns; the process goes on either way. Checked on real processes, on both loops."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port
from tests.test_up_lifecycle import _wait_gone, start_up, state_dir

pytestmark = pytest.mark.integration
__all__ = ["state_dir"]  # the fixture, shared with test_up_lifecycle

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 30

PROGRAM = textwrap.dedent("""
    import asyncio, sys, time
    from langorch_infra import loops

    async def waiting_for_something_that_never_comes():
        await asyncio.Event().wait()

    def holding_the_loop():
        time.sleep(3600)

    async def main():
        stuck = asyncio.create_task(waiting_for_something_that_never_comes(), name="the-stuck-one")
        await asyncio.sleep(0)
        print("ready", flush=True)
        if sys.argv[1] == "hold":
            holding_the_loop()
        await asyncio.sleep(3600)
        stuck.cancel()

    loops.run(main())
""")


class Process:
    """``text`` run from the file ``program`` (so that its source lines can be shown), its standard error collected;
    started once it has printed ``ready``."""

    def __init__(self, program: Path, mode: str, event_loop: str, text: str = PROGRAM) -> None:
        program.write_text(text)
        self.proc = subprocess.Popen([sys.executable, str(program), mode], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     env={**os.environ, "LANGORCH_EVENT_LOOP": event_loop})
        self.err: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        assert self.proc.stdout is not None
        assert self.proc.stdout.readline().strip() == "ready", "".join(self.err)

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.err.append(line)

    def written_after(self, sig: int, until: str) -> str:
        start = len(self.err)
        self.proc.send_signal(sig)
        deadline = time.monotonic() + DEADLINE_S
        while True:
            text = "".join(self.err[start:])
            if until in text:
                return text
            assert self.proc.poll() is None, f"the process ended ({self.proc.returncode}):\n{text}"
            assert time.monotonic() < deadline, f"nothing with {until!r} after {DEADLINE_S} s:\n{text}"
            time.sleep(0.02)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE_S)


@pytest.mark.parametrize("event_loop", ["uvloop", "asyncio"])
def test_sigusr1_writes_every_task_s_stack_and_the_process_goes_on(event_loop: str, tmp_path: Path) -> None:
    p = Process(tmp_path / "program.py", "turn", event_loop)
    try:
        text = p.written_after(signal.SIGUSR1, "most recent call first")  # the threads' part, written last
        assert "asyncio tasks (SIGUSR1)" in text, text
        assert "task 'the-stuck-one':" in text, text
        # its chain of awaits, down to the line it waits on and the future it waits for
        assert "in waiting_for_something_that_never_comes" in text, text
        assert "await asyncio.Event().wait()" in text, text
        assert "in wait" in text, text
        assert "waiting for <Future pending" in text, text
        assert "in main" in text, text  # the main task, waiting in its sleep
        again = p.written_after(signal.SIGUSR1, "most recent call first")  # it still runs and answers again
        assert "the-stuck-one" in again, again
    finally:
        p.stop()


def test_sigusr2_answers_while_the_loop_is_held(tmp_path: Path) -> None:
    p = Process(tmp_path / "program.py", "hold", "uvloop")
    try:
        # "ready" is printed just before the loop is held: the first answers can come from before the call
        deadline = time.monotonic() + DEADLINE_S
        while "holding_the_loop" not in (text := p.written_after(signal.SIGUSR2, "most recent call first")):
            assert time.monotonic() < deadline, text
            time.sleep(0.1)
        assert "in main" in text, text
        assert p.proc.poll() is None
    finally:
        p.stop()


def test_langorch_up_passes_sigusr1_on_to_its_workers(state_dir: Path) -> None:
    up = start_up(state_dir, free_port())
    up.wait_ready()
    start = len(up.lines)
    os.kill(up.proc.pid, signal.SIGUSR1)
    deadline = time.monotonic() + DEADLINE_S
    while True:
        headers = [line for _, line in up.lines[start:] if line.startswith("--- LangOrch process ")]
        pids = {int(line.split()[3].rstrip(":")) for line in headers}
        if up.proc.pid in pids and len(pids) >= 2:
            break  # its own tasks, and those of a worker (the runtime's, the creation worker's)
        assert time.monotonic() < deadline, "\n".join(line for _, line in up.lines[start:])
        time.sleep(0.05)
    worker_tasks = "\n".join(line for _, line in up.lines[start:])
    assert "task " in worker_tasks
    assert httpx.get(f"http://127.0.0.1:{up.port}/api/health", timeout=10).status_code == 200  # still serving
    up.interrupt()
    assert up.proc.wait(timeout=60) == 0, up.text
    assert not _wait_gone(state_dir)


def test_sigusr1_before_the_loop_runs_writes_the_threads_and_does_not_end_the_process(tmp_path: Path) -> None:
    """A process still importing (``langorch`` commands and workers call ``answer_early`` first): SIGUSR1's default
    would end it."""
    p = Process(tmp_path / "starting.py", "", "uvloop", textwrap.dedent("""
        import sys, time
        from langorch_infra import stacks

        def still_importing():
            print("ready", flush=True)
            time.sleep(3600)

        stacks.answer_early()
        still_importing()
    """))
    try:
        text = p.written_after(signal.SIGUSR1, "still_importing")  # the handler runs in the main thread
        assert "no event loop yet" in text, text
        assert p.proc.poll() is None
    finally:
        p.stop()


def test_sigusr1_after_the_loop_has_closed_does_not_end_the_process(tmp_path: Path) -> None:
    """``langorch up`` stops its servers after its loop has closed: a SIGUSR1 then still writes the threads."""
    p = Process(tmp_path / "stopping.py", "", "uvloop", textwrap.dedent("""
        import asyncio, time
        from langorch_infra import loops

        async def main():
            await asyncio.sleep(0)

        def stopping_the_servers():
            print("ready", flush=True)
            time.sleep(3600)

        loops.run(main())
        stopping_the_servers()
    """))
    try:
        p.written_after(signal.SIGUSR1, "stopping_the_servers")
        assert p.proc.poll() is None
    finally:
        p.stop()
