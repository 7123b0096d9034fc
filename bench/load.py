"""Sustained load on `langorch up` through its HTTP API, with a same-run LangGraph baseline.

Starts `python -m langorch up` as a subprocess on a fresh temporary state directory, imports the generated 10-node
internal procedure of bench/runtime.py section (a) (8 `sequence` nodes of set_variable/calculate/log steps, a
`logic` node, a `terminate`), then drives it from this process (not the server's) with `--clients` concurrent
asyncio clients on one httpx connection pool. Each client loops: `POST /api/runs`, then `GET /api/runs/{id}` every
`--poll-ms` until the run is terminal. The first `--warmup` seconds of load are not counted.

Reported: runs completed (their terminal GET answered) in the `--seconds` window after the warm-up, per second; their
latency (POST sent to the terminal GET answered) p50/p99; `GET /api/runs/{id}` and
`POST /api/runs` answer times p50/p99; runs that did not complete; and the baseline of bench/runtime.py, measured
against the same PostgreSQL right after the load: a bare LangGraph `StateGraph` of 10 trivial async nodes on
`AsyncPostgresSaver` with `durability="sync"`, N runs at once (N = `--clients`), runs/s.

    uv run python bench/load.py [--clients 40] [--seconds 30] [--poll-ms 100] [--workers N] [--nats-sync always|2m]

`--workers 0` runs every service in the API's process (the process model before `langorch up` had workers).
`--nats-sync` is handed to `langorch up`: `always` (its default) flushes every JetStream message to disk before it
is acknowledged, a duration such as `2m` (NATS's own default) flushes that often; the command printed says which.
The clients' own answer times include the wait of their one event loop on a machine they share with the server; a
**probe** in a process of its own (`--probe`, this same file) therefore also reads, one request at a time every
`--probe-ms`, `GET /api/runs/{id}` of a run that has ended and `GET /api/health`, and every fifth round times a
`POST /api/runs` (a run it does not follow), during the same window.
Also reported: the CPU time each process of `langorch up` (API process, worker processes, nats-server, PostgreSQL
with its backends) spent in the measured window, per completed run — steadier than wall-clock figures on a shared
machine, and where a run's cost goes.
Goals: >= 100 completed runs/s, GET p99 <= 50 ms, POST p99 <= 100 ms. Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from types import ModuleType
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
TERMINAL = ("completed", "failed", "canceled")


def runtime_bench() -> ModuleType:
    """bench/runtime.py, for its procedure generator and its LangGraph baseline."""
    spec = importlib.util.spec_from_file_location("bench_runtime", ROOT / "bench" / "runtime.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(ordered[min(len(ordered) - 1, max(0, int(q * len(ordered) + 0.5) - 1))], 2)


def summary(values: list[float]) -> dict[str, Any]:
    return {"p50": percentile(values, 0.5), "p99": percentile(values, 0.99),
            "mean": round(statistics.fmean(values), 2) if values else None, "n": len(values)}


class Up:
    """`langorch up` in a subprocess of its own process group, its output written to a file.

    A file, as a log collector would take it, and not a pipe read by a thread of this process: with 40 clients
    holding this process's interpreter, such a thread drained the pipe late, and the server's log writes (an access
    log line per request) then waited for room in it, holding the API's event loop."""

    def __init__(self, state: Path, port: int, extra: list[str]) -> None:
        # none of the caller's settings, but its choice of event loop (LANGORCH_EVENT_LOOP=asyncio: for profilers)
        env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_") or k == "LANGORCH_EVENT_LOOP"}
        self.port = port
        self.output = state.parent / "langorch-up.log"
        with open(self.output, "wb") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "langorch", "up", "--state-dir", str(state),
                                          "--port", str(port), *extra], cwd=ROOT,
                                         env={**env, "PYTHONUNBUFFERED": "1"}, stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True)

    @property
    def lines(self) -> list[str]:
        return self.output.read_text(errors="replace").splitlines(keepends=True)

    def wait_up(self, deadline_s: float = 180) -> None:
        deadline = time.monotonic() + deadline_s
        while "LangOrch is up" not in self.output.read_text(errors="replace"):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("langorch up did not start:\n" + "".join(self.lines))
            time.sleep(0.05)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGINT)
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def _process_table() -> dict[int, tuple[int, float, str]]:
    """``pid -> (ppid, CPU seconds used so far, command line)`` of every process readable in /proc."""
    table: dict[int, tuple[int, float, str]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:  # ended meanwhile
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after the command name, which may hold spaces
        table[int(entry.name)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / CLOCK_TICKS, cmdline)
    return table


def _kind(cmdline: str) -> str:
    if "nats-server" in cmdline:
        return "nats-server"
    if "postgres" in cmdline.split(" ", 1)[0] or cmdline.startswith("postgres:"):
        return "postgresql"
    if "langorch.workers" in cmdline:
        return "worker processes"
    return "API process (langorch up)"


def postmaster_pid(pgdata: Path) -> int:
    """The pid of the PostgreSQL server of ``pgdata``, from its pid file: pg_ctl starts it detached, so it is not a
    child of the process that asked for it, and its CPU is counted from this root."""
    return int((pgdata / "postmaster.pid").read_text().split()[0])


def cpu_by_kind(roots: list[int]) -> dict[str, float]:
    """CPU seconds used so far by the processes under ``roots`` (themselves included), by kind of process."""
    table = _process_table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    todo = [r for r in roots if r in table]
    while todo:
        pid = todo.pop()
        _, cpu, cmdline = table[pid]
        out[_kind(cmdline)] = out.get(_kind(cmdline), 0.0) + cpu
        todo.extend(children.get(pid, []))
    return out


class Load:
    """The measurements of the clients."""

    def __init__(self, measure_from: float, measure_until: float) -> None:
        self.measure_from = measure_from
        self.measure_until = measure_until
        self.post_ms: list[float] = []
        self.get_ms: list[float] = []
        self.run_ms: list[float] = []
        self.completed = 0
        self.not_completed: dict[str, int] = {}
        self.errors: dict[str, int] = {}

    def counted(self, started: float) -> bool:
        return self.measure_from <= started < self.measure_until


async def sample_cpu(roots: list[int], load: Load) -> dict[str, float]:
    """The CPU seconds each kind of process used between the window's start and end."""
    await asyncio.sleep(max(0.0, load.measure_from - time.perf_counter()))
    before = cpu_by_kind(roots)
    await asyncio.sleep(max(0.0, load.measure_until - time.perf_counter()))
    after = cpu_by_kind(roots)
    return {kind: after[kind] - before.get(kind, 0.0) for kind in after}


async def client(c: httpx.AsyncClient, procedure_id: str, poll_s: float, load: Load, stop_at: float) -> None:
    """Start a run, poll it to its end, again, until ``stop_at``; requests sent in the window are timed, runs that end
    in it are counted (with their latency)."""
    while time.perf_counter() < stop_at:
        started = time.perf_counter()
        try:
            r = await c.post("/api/runs", json={"procedure_id": procedure_id, "procedure_version": "1"})
            answered = time.perf_counter()
            if load.counted(started):
                load.post_ms.append((answered - started) * 1000)
            if r.status_code != 201:  # 202: the runtime did not create the run within the gateway's command timeout
                load.errors[f"POST {r.status_code}"] = load.errors.get(f"POST {r.status_code}", 0) + 1
                continue
            run_id = r.json()["run_id"]
            status = ""
            while status not in TERMINAL:
                await asyncio.sleep(poll_s)
                t = time.perf_counter()
                g = await c.get(f"/api/runs/{run_id}")
                done = time.perf_counter()
                if load.counted(t):
                    load.get_ms.append((done - t) * 1000)
                if g.status_code != 200:
                    load.errors[f"GET {g.status_code}"] = load.errors.get(f"GET {g.status_code}", 0) + 1
                    continue
                status = g.json()["status"]
            if load.counted(done):
                if status == "completed":
                    load.completed += 1
                    load.run_ms.append((done - started) * 1000)
                else:
                    load.not_completed[status] = load.not_completed.get(status, 0) + 1
        except httpx.HTTPError as exc:
            name = type(exc).__name__
            load.errors[name] = load.errors.get(name, 0) + 1


async def drive(base: str, procedure_id: str, clients: int, seconds: float, warmup: float,
                poll_ms: float, headers: dict[str, str], roots: list[int]) -> tuple[Load, float, dict[str, float]]:
    now = time.perf_counter()
    load = Load(now + warmup, now + warmup + seconds)
    cpu = asyncio.create_task(sample_cpu(roots, load))
    # idle connections expire before the server closes them (uvicorn: 5 s), not in a race with a new request
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients, keepalive_expiry=2.0)
    async with httpx.AsyncClient(base_url=base, timeout=60, limits=limits, headers=headers) as c:
        # clients start a run only until the window closes, and then finish the run they have
        await asyncio.gather(*(client(c, procedure_id, poll_ms / 1000, load, load.measure_until)
                               for _ in range(clients)))
    return load, seconds, await cpu


def probe(base: str, key: str, run_id: str, procedure_id: str, warmup: float, seconds: float,
          interval_ms: float) -> dict[str, Any]:
    """One request at a time from this process, every ``interval_ms``, in the measured window: the answer times of
    ``GET /api/runs/{run_id}`` and ``GET /api/health``, and of ``POST /api/runs`` every ``POST_EVERY``-th round
    (its runs are not followed), without the clients' event loop in them."""
    runs: list[float] = []
    health: list[float] = []
    posts: list[float] = []
    to_decision: list[float] = []
    after_decision: list[float] = []
    time.sleep(warmup)
    end = time.perf_counter() + seconds
    body = {"procedure_id": procedure_id, "procedure_version": "1"}
    with httpx.Client(base_url=base, timeout=60, headers={"X-API-Key": key}) as c:
        rounds = 0
        while time.perf_counter() < end:
            for path, into in ((f"/api/runs/{run_id}", runs), ("/api/health", health)):
                t = time.perf_counter()
                r = c.get(path)
                into.append((time.perf_counter() - t) * 1000)
                if r.status_code != 200:
                    raise RuntimeError(f"probe: GET {path} answered {r.status_code}")
            if rounds % POST_EVERY == 0:
                sent, t = time.time(), time.perf_counter()
                r = c.post("/api/runs", json=body)
                posts.append((time.perf_counter() - t) * 1000)
                answered = time.time()
                if r.status_code != 201:
                    raise RuntimeError(f"probe: POST /api/runs answered {r.status_code}: {r.text}")
                # where the answer's time went: until the runtime decided (run_created's timestamp), and after
                first = c.get(f"/api/runs/{r.json()['run_id']}/events", params={"limit": 1}).json()["items"][0]
                decided = datetime.fromisoformat(first["created_at"].replace("Z", "+00:00")).timestamp()
                to_decision.append((decided - sent) * 1000)
                after_decision.append((answered - decided) * 1000)
            rounds += 1
            time.sleep(interval_ms / 1000)
    return {"get_run_ms": summary(runs), "get_health_ms": summary(health), "post_runs_ms": summary(posts),
            "post_sent_to_run_created_ms": summary(to_decision),
            "run_created_to_post_answered_ms": summary(after_decision),
            "interval_ms": interval_ms, "post_every_rounds": POST_EVERY}


POST_EVERY = 5


async def prepare(base: str, doc: dict[str, Any], headers: dict[str, str]) -> str:
    """Import the procedure and run it three times; the id of the last run (ended)."""
    async with httpx.AsyncClient(base_url=base, timeout=60, headers=headers) as c:
        r = await c.post("/api/procedures", json={"ckp_json": doc})
        assert r.status_code in (200, 201), r.text
        for _ in range(3):  # one run through, so that every path is warm
            run = (await c.post("/api/runs", json={"procedure_id": doc["procedure_id"],
                                                   "procedure_version": "1"})).json()
            for _ in range(600):
                if (await c.get(f"/api/runs/{run['run_id']}")).json()["status"] in TERMINAL:
                    break
                await asyncio.sleep(0.05)
        return str(run["run_id"])


async def main(clients: int, seconds: float, warmup: float, poll_ms: float, workers: int | None,
               probe_ms: float, nats_sync: str = "always") -> dict[str, Any]:
    rb = runtime_bench()
    tmp = Path(tempfile.mkdtemp(prefix="langorch-bench-load-"))
    state = tmp / "state"
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    extra = [*(["--workers", str(workers)] if workers is not None else []), "--nats-sync", nats_sync]
    up = Up(state, port, extra)
    try:
        up.wait_up()
        doc = rb.ten_node_procedure()
        # the admin API key `langorch up` stores for the CLI at its first start (authentication is on)
        headers = {"X-API-Key": (state / "api-key").read_text().strip()}
        ended_run = await prepare(base, doc, headers)
        prober = await asyncio.create_subprocess_exec(
            sys.executable, __file__, "--probe", base, "--probe-run", ended_run, "--probe-procedure",
            doc["procedure_id"], "--warmup", str(warmup), "--seconds",
            str(seconds), "--probe-ms", str(probe_ms), env={**os.environ, "LANGORCH_API_KEY": headers["X-API-Key"]},
            stdout=asyncio.subprocess.PIPE)
        postmaster = postmaster_pid(state / "postgres" / "pgdata")
        load, window, cpu = await drive(base, doc["procedure_id"], clients, seconds, warmup, poll_ms, headers,
                                        [up.proc.pid, postmaster])
        probed = json.loads((await prober.communicate())[0])
        servers = json.loads((state / "servers.json").read_text())
        database_url = f"postgresql://postgres@127.0.0.1:{servers['postgres']['port']}/langorch"
        baseline = await rb.langgraph_baseline(database_url, clients)
        restarts = [line.strip() for line in up.lines if "exited with code" in line]
    finally:
        up.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    runs_per_s = load.completed / window
    get, post = summary(load.get_ms), summary(load.post_ms)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "command": " ".join(["python -m langorch up", *extra]),
        "procedure": "bench/runtime.py ten_node_procedure(): 8 sequence nodes x (set_variable, calculate, log) + "
                     "logic + terminate, checkpoint_strategy every_node",
        "clients": clients, "seconds": seconds, "warmup_s": warmup, "poll_ms": poll_ms,
        "completed_runs": load.completed,
        "completed_runs_per_s": round(runs_per_s, 2),
        "run_latency_ms": summary(load.run_ms),
        "get_run_ms": get,
        "post_runs_ms": post,
        "probe_one_request_at_a_time": probed,
        "cpu_ms_per_completed_run": {kind: round(seconds_used * 1000 / load.completed, 2) for kind, seconds_used
                                     in [*sorted(cpu.items()), ("total", sum(cpu.values()))]}
        if load.completed else None,
        "cpu_cores_used": round(sum(cpu.values()) / window, 2),
        "not_completed": load.not_completed,
        "errors": load.errors,
        "worker_restarts": restarts,
        "baseline_langgraph_10_nodes_postgres_sync": {
            "concurrent_runs": clients,
            "runs_per_s": round(baseline["concurrent_runs_per_s"], 2),
            "sequential_run_ms_median": round(statistics.median(baseline["ms"]), 2)},
        "ratio_baseline_to_platform_runs_per_s": round(baseline["concurrent_runs_per_s"] / runs_per_s, 2)
        if runs_per_s else None,
        "goals": {"runs_per_s>=100": runs_per_s >= 100,
                  "get_p99<=50ms": get["p99"] is not None and get["p99"] <= 50,
                  "post_p99<=100ms": post["p99"] is not None and post["p99"] <= 100,
                  "probe_get_p99<=50ms": (probed["get_run_ms"]["p99"] or 1e9) <= 50,
                  "probe_post_p99<=100ms": (probed["post_runs_ms"]["p99"] or 1e9) <= 100},
    }


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=30.0, help="measured window, after the warm-up")
    parser.add_argument("--warmup", type=float, default=5.0, help="seconds of load not counted, first")
    parser.add_argument("--poll-ms", type=float, default=100.0)
    parser.add_argument("--workers", type=int, default=None,
                        help="`langorch up --workers` (default: not given; 0: every service in one process)")
    parser.add_argument("--probe-ms", type=float, default=50.0, help="the probe's pause between its requests")
    parser.add_argument("--nats-sync", default="always",
                        help="langorch up's --nats-sync: 'always' (its default) or a duration such as 2m")
    parser.add_argument("--probe", help=argparse.SUPPRESS)
    parser.add_argument("--probe-run", help=argparse.SUPPRESS)
    parser.add_argument("--probe-procedure", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, os.environ["LANGORCH_API_KEY"], args.probe_run, args.probe_procedure,
                               args.warmup, args.seconds, args.probe_ms)))
    else:
        print(json.dumps(asyncio.run(main(args.clients, args.seconds, args.warmup, args.poll_ms, args.workers,
                                          args.probe_ms, args.nats_sync)), indent=2))
