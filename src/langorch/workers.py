"""The worker processes of ``langorch up``: the compiler, runtime, approvals and triggers beside the gateway's
process.

Executing runs is CPU work on an event loop; sharing one loop with the gateway made API reads wait for the runtime
and the other way round. ``langorch up`` therefore keeps the gateway in its own process and runs the other
services in ``--workers`` child processes (``python -m langorch.workers``), each a replica of all of them: JetStream
durable consumers spread the commands over them as over any replicas. One more child, the **creation worker**
(``--role creation``), decides run creations alone (``lo.cmd.run.create``: ``POST /api/runs``, reruns, subflows,
triggers): a start is answered once the runtime has decided it, and a worker executing many runs made that
decision wait for turns on its busy event loop. The creation worker executes nothing and is mostly idle, so the
kernel runs it as soon as a creation arrives.

The protocol between the two sides is two pipes:

* The child's **stdin** carries one JSON line, the configuration (the NATS and PostgreSQL URLs the parent knows only
  once its embedded servers are up, and the callback URL), and then nothing. Its end of file means the parent is
  gone, however it went (a SIGKILL included): the child then stops by itself, and leaves at once if the stop takes
  longer than ``ORPHAN_EXIT_S``. On Linux the child also asks the kernel for a SIGTERM when its parent dies
  (``PR_SET_PDEATHSIG``), which reaches it while it is still importing and not reading its stdin yet. No worker
  outlives ``langorch up``.
* The child's **stdout** carries status lines for the parent: ``ready <port>`` once every service runs, with the
  port of its ``/metrics`` (127.0.0.1 only; the gateway's ``GET /metrics`` merges it into its own). Anything the
  child or a library prints goes to stderr, like its logs.

SIGTERM asks a worker to stop (its services are canceled; a run in progress is picked up from its last checkpoint by
the next replica). A worker runs in a session of its own, so a terminal's Ctrl-C reaches only ``langorch up``, which
stops the workers. A worker that exits on its own after it was ready is reported and started again, after
``RESTART_DELAYS_S``; one that exits before it was ever ready fails the start.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO, Any

from prometheus_client import CollectorRegistry
from prometheus_client.metrics_core import Metric
from prometheus_client.parser import text_string_to_metric_families

from langorch_infra import loops

log = logging.getLogger(__name__)

# after the parent is gone, the longest a worker takes to stop before it exits regardless
ORPHAN_EXIT_S = 10.0
# a crashed worker is started again after these delays (the last repeats), the delay resets after RESTART_RESET_S
RESTART_DELAYS_S = (0.5, 1.0, 2.0, 5.0, 10.0)
RESTART_RESET_S = 60.0
SCRAPE_TIMEOUT_S = 2.0


class WorkerFailed(Exception):
    """A worker exited before it was ready the first time: ``langorch up`` cannot start."""


@dataclass
class WorkerConfig:
    """What a worker needs from its parent once the servers are up."""

    nats_url: str
    database_url: str
    public_url: str
    names: tuple[str, ...] = ("compiler", "runtime", "approvals", "triggers")
    creation_apart: bool = False  # the runtime leaves run creations to the creation worker

    def line(self) -> bytes:
        return (json.dumps({"nats_url": self.nats_url, "database_url": self.database_url,
                            "public_url": self.public_url, "names": list(self.names),
                            "creation_apart": self.creation_apart}) + "\n").encode()


EXECUTING = "services"
"""A worker's role: the compiler, runtime, approvals and triggers."""
CREATION = "creation"
"""A worker's role: run creation alone."""


@dataclass
class Worker:
    """One worker child process, started again when it crashes."""

    index: int
    state_dir: Path
    role: str = EXECUTING
    proc: subprocess.Popen[bytes] | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    metrics_port: int | None = None
    starts: int = 0
    config: WorkerConfig | None = None

    @property
    def name(self) -> str:
        return "the creation worker" if self.role == CREATION else f"worker {self.index}"

    @property
    def duties(self) -> str:
        return "run creation" if self.role == CREATION else "the compiler, runtime, approvals and triggers"

    def spawn(self) -> None:
        """Start the child now; it imports its services while the parent does something else."""
        self.ready = threading.Event()
        self.metrics_port = None
        # -X importtime and the like are not passed on; the interpreter and the environment are
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "langorch.workers", "--state-dir", str(self.state_dir), "--index", str(self.index),
             "--parent", str(os.getpid()), "--role", self.role],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=None, start_new_session=True)
        self.starts += 1
        threading.Thread(target=self._read_status, args=(self.proc, self.ready), daemon=True,
                         name=f"langorch-{self.name}-status").start()
        if self.config is not None:
            self.configure(self.config)

    def _read_status(self, proc: subprocess.Popen[bytes], ready: threading.Event) -> None:
        assert proc.stdout is not None
        for raw in proc.stdout:
            word, _, rest = raw.decode(errors="replace").strip().partition(" ")
            if word == "ready" and proc is self.proc:
                self.metrics_port = int(rest) if rest.isdigit() and int(rest) > 0 else None
                ready.set()

    def configure(self, config: WorkerConfig) -> None:
        """Send the configuration (kept for a restart); the child starts its services when it has it."""
        if self.role == CREATION:
            config = replace(config, names=(CREATION,), creation_apart=False)
        self.config = config
        if self.proc is None or self.proc.stdin is None:
            return
        with contextlib.suppress(OSError):  # a child that already died is reported by the supervision
            self.proc.stdin.write(config.line())
            self.proc.stdin.flush()

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc is not None else None

    def terminate(self) -> None:
        """Ask the child to stop (SIGTERM), without waiting."""
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.terminate()

    def wait(self, timeout: float) -> None:
        """Wait for the child to exit; kill it after ``timeout`` seconds. Its pipes are closed."""
        if self.proc is None:
            return
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self._close()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
            self.proc.wait()
        self._close()

    def _close(self) -> None:
        if self.proc is not None and self.proc.stdin is not None:
            with contextlib.suppress(OSError):
                self.proc.stdin.close()


@dataclass
class WorkerPool:
    """The worker processes of one ``langorch up``: spawned early, configured once the servers are up, supervised
    while it serves, stopped with it."""

    count: int
    state_dir: Path
    report: Callable[[str], None] = print
    creation_apart: bool = True  # one more worker, the creation worker
    workers: list[Worker] = field(default_factory=list)
    stopping: bool = False
    config: WorkerConfig | None = None

    def spawn(self) -> None:
        """Start the executing workers now; the creation worker is started by :meth:`spawn_creation`."""
        self.workers = [Worker(i + 1, self.state_dir) for i in range(self.count)]
        if self.creation_apart and self.count:
            self.workers.append(Worker(self.count + 1, self.state_dir, CREATION))
        for worker in self.workers:
            if worker.role != CREATION:
                worker.spawn()

    def spawn_creation(self) -> None:
        """Start the creation worker, once the gateway serves: three processes importing at once on two cores made
        the gateway answer ``/api/health`` later (median 1.5-1.8 s against 1.8-2.8 s in ``bench/startup.py``). A
        start sent before it is ready waits in its stream."""
        for worker in self.workers:
            if worker.role == CREATION and worker.proc is None and not self.stopping:
                worker.spawn()

    def configure(self, config: WorkerConfig) -> None:
        """Configure the first worker now, the others once it is ready (:meth:`wait_ready`): the first one creates
        the runtime's checkpoint tables, and LangGraph's migrations run by two replicas at once on a fresh database
        deadlock (``pg_advisory_lock`` against ``CREATE INDEX CONCURRENTLY``). The creation worker, which touches no
        table, is configured at once as well."""
        config = replace(config, creation_apart=self.creation_apart)
        self.config = config
        if self.workers:
            self.workers[0].configure(config)
        for worker in self.workers[1:]:
            if worker.role == CREATION:
                worker.configure(config)

    @property
    def pids(self) -> list[int]:
        return [w.pid for w in self.workers if w.pid is not None]

    async def wait_ready(self) -> None:
        """Until every worker is ready (or the workers are being stopped), configuring the other workers once the
        first is ready; :class:`WorkerFailed` when one exits first."""
        while not self.stopping:
            for worker in self.workers:
                code = worker.exit_code()
                if code is not None and not worker.ready.is_set() and worker.starts == 1:
                    raise WorkerFailed(f"{worker.name} (pid {worker.pid}) exited with code {code} before it was "
                                       "ready; its output is above")
            if self.workers[0].ready.is_set() and self.config is not None:
                for worker in self.workers[1:]:
                    if worker.config is None:
                        worker.configure(self.config)
            if all(w.ready.is_set() for w in self.workers):
                return
            await asyncio.sleep(0.02)

    async def supervise(self) -> None:
        """Start a worker again when it exits (until :meth:`terminate`); runs until canceled."""
        delays: dict[int, int] = {}
        last_start: dict[int, float] = {w.index: time.monotonic() for w in self.workers}
        while True:
            await asyncio.sleep(0.2)
            for worker in self.workers:
                code = worker.exit_code()
                if code is None or self.stopping or (worker.starts == 1 and not worker.ready.is_set()):
                    continue  # running, stopping, or never ready: :meth:`wait_ready` fails the start
                now = time.monotonic()
                if now - last_start[worker.index] > RESTART_RESET_S:
                    delays[worker.index] = 0
                attempt = delays.get(worker.index, 0)
                delay = RESTART_DELAYS_S[min(attempt, len(RESTART_DELAYS_S) - 1)]
                self.report(f"{worker.name} (pid {worker.pid}, {worker.duties}) exited with code {code}; starting it "
                            f"again in {delay:g} s")
                worker.wait(1)
                await asyncio.sleep(delay)
                if self.stopping:
                    return
                delays[worker.index] = attempt + 1
                last_start[worker.index] = time.monotonic()
                worker.spawn()

    def terminate(self) -> None:
        self.stopping = True
        for worker in self.workers:
            worker.terminate()

    def wait(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for worker in self.workers:
            worker.wait(max(0.0, deadline - time.monotonic()))

    def kill(self) -> None:
        self.stopping = True
        for worker in self.workers:
            with contextlib.suppress(Exception):  # a forced stop: one failed kill must not spare the others
                worker.kill()

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to every worker that is ready (SIGUSR1: their stacks, after the parent's); one still
        starting may not answer it yet."""
        for worker in self.workers:
            if worker.proc is not None and worker.proc.poll() is None and worker.ready.is_set():
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signum)

    def registry(self) -> WorkerMetrics:
        return WorkerMetrics(self)


class WorkerMetrics(CollectorRegistry):
    """The workers' registries for the gateway's ``GET /metrics``: each ready worker's ``/metrics`` read at every
    scrape (a blocking read of a local socket, bounded by ``SCRAPE_TIMEOUT_S``), the workers' samples of one name
    and labels summed (``langorch_build_info`` stays 1, a ``_created`` time is the first worker's), a worker that
    does not answer left out of that scrape."""

    def __init__(self, pool: WorkerPool) -> None:
        super().__init__(auto_describe=False)
        self.pool = pool

    def collect(self) -> Iterable[Metric]:
        families: dict[str, Metric] = {}
        index: dict[tuple[str, str, tuple[tuple[str, str], ...]], int] = {}
        for worker in self.pool.workers:
            port = worker.metrics_port
            if port is None or not worker.ready.is_set():
                continue
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics",
                                            timeout=SCRAPE_TIMEOUT_S) as answer:
                    text = answer.read().decode()
            except OSError as exc:
                log.warning("%s did not answer GET /metrics: %s", worker.name, exc)
                continue
            for family in text_string_to_metric_families(text):
                merged = families.get(family.name)
                if merged is None:
                    merged = families[family.name] = Metric(family.name, family.documentation, family.type,
                                                            family.unit)
                for sample in family.samples:
                    key = (family.name, sample.name, tuple(sorted(sample.labels.items())))
                    at = index.get(key)
                    if at is None:
                        index[key] = len(merged.samples)
                        merged.samples.append(sample)
                    elif (family.name != "langorch_build_info" and not sample.name.endswith("_created")
                          and not math.isnan(sample.value)):
                        kept = merged.samples[at]
                        merged.samples[at] = kept._replace(value=kept.value + sample.value)
        return list(families.values())


# -- the child side ------------------------------------------------------------------------------------------------


def _watch_parent(stdin: IO[bytes], config: asyncio.Future[dict[str, Any]], stop: asyncio.Event,
                  loop: asyncio.AbstractEventLoop) -> None:
    """Thread: the configuration line, then end of file (the parent is gone): stop, and exit if that hangs."""
    line = stdin.readline()

    def configured() -> None:
        if not config.done():
            config.set_result(json.loads(line))

    if line:
        loop.call_soon_threadsafe(configured)
        while stdin.read(65536):
            pass
    loop.call_soon_threadsafe(stop.set)
    time.sleep(ORPHAN_EXIT_S)
    os._exit(1)


async def serve_worker(status: IO[str]) -> None:
    """Run the services of one worker until SIGTERM, SIGINT or the parent's end."""
    from langorch.serving import build_hosts, stop_tasks
    from langorch_infra import logs, tracing
    from langorch_infra.hosting import OpsApp, OpsServer, settle_heap_later
    from langorch_infra.metrics import combined_registry

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    config: asyncio.Future[dict[str, Any]] = loop.create_future()
    threading.Thread(target=_watch_parent, args=(sys.stdin.buffer, config, stop, loop), daemon=True,
                     name="langorch-parent-watch").start()
    stopper: asyncio.Future[Any] = asyncio.create_task(stop.wait())
    await asyncio.wait([config, stopper], return_when=asyncio.FIRST_COMPLETED)
    if not config.done() or stop.is_set():
        return
    got = config.result()
    tracing.setup(got["names"])  # OTLP export when the OTEL_* variables ask for it
    hosts = build_hosts(tuple(got["names"]), got["nats_url"], got["database_url"], got["public_url"],
                        creation_apart=bool(got.get("creation_apart")))
    registry = combined_registry([h.registry for h in hosts])

    async def checks() -> dict[str, str]:
        merged: dict[str, str] = {}
        for h in hosts:
            for name, verdict in (await h.ready_checks()).items():
                merged[name] = verdict if merged.get(name, "ok") == "ok" else merged[name]
        return merged

    ops = OpsServer(OpsApp("worker", hosts[0].version, registry, checks), 0, host="127.0.0.1")
    served = await ops.start()
    tasks: list[asyncio.Task[Any]] = [asyncio.create_task(logs.serve_as(h.service, h.serve(0)), name=h.service)
                                      for h in hosts]

    async def all_started() -> None:
        for h in hosts:
            await h.started.wait()

    started: asyncio.Future[Any] = asyncio.create_task(all_started())
    try:
        await asyncio.wait([started, stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
        if all(h.started.is_set() for h in hosts):
            status.write(f"ready {ops.port if served else 0}\n")
            status.flush()
            settling = asyncio.create_task(settle_heap_later())
            await asyncio.wait([stopper, *tasks], return_when=asyncio.FIRST_COMPLETED)
            settling.cancel()
    finally:
        started.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await started
        await stop_tasks(tasks, 0)
        await ops.stop()
        stopper.cancel()
    failed = [t for t in tasks if t.done() and not t.cancelled() and t.exception() is not None]
    if failed and not stop.is_set():
        raise failed[0].exception()  # type: ignore[misc]


def _die_with_parent(argv: list[str]) -> None:
    """SIGTERM when the parent dies (Linux), and exit now if it is already gone (``--parent <pid>`` in ``argv``)."""
    if sys.platform == "linux":
        import ctypes

        pr_set_pdeathsig = 1
        with contextlib.suppress(OSError, AttributeError):  # an unusual libc: the stdin pipe still tells
            ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, signal.SIGTERM)
    if "--parent" in argv:
        parent = argv[argv.index("--parent") + 1]
        if parent.isdigit() and os.getppid() != int(parent):
            os._exit(1)


def main() -> None:
    """``python -m langorch.workers --state-dir <dir> --index <n> --parent <pid> [--role services|creation]``
    (started by ``langorch up``; the state directory and index only name the worker in a process list, the role
    says which services it imports ahead of its configuration)."""
    _die_with_parent(sys.argv)
    from langorch_infra import stacks

    stacks.answer_early()  # SIGUSR1 while importing: the stacks, not the end of the worker
    # stdout is the status pipe; whatever else prints goes to stderr with the logs
    status = os.fdopen(os.dup(sys.stdout.fileno()), "w", encoding="utf-8")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # until the loop handles it: the parent decides when to stop
    from langorch.cli import _logging
    from langorch.serving import WORKER_SERVICES, import_services

    _logging("worker", terminal_default=True)  # its stderr is the one of `langorch up`
    role = sys.argv[sys.argv.index("--role") + 1] if "--role" in sys.argv[:-1] else EXECUTING
    # before the configuration arrives: the parent is starting the servers
    import_services((CREATION,) if role == CREATION else WORKER_SERVICES)
    code = 0
    try:
        loops.run(serve_worker(status))
    except Exception:  # the worker's failure: logged here, reported by the parent with the exit code
        log.exception("the worker failed")
        code = 1
    from langorch_infra import tracing

    tracing.shutdown()  # os._exit skips the SDK's exit hook: the spans still queued are exported now
    logging.shutdown()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
