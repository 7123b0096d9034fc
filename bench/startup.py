"""Start time of `langorch up`, with its baselines measured in the same run.

Runs `python -m langorch up` as a subprocess on a fresh temporary state directory (`--state-dir`), waits for
`GET /api/health` to answer 200, stops it with SIGINT, then starts it again `--starts` times on the same state
(what a developer does every morning) and reports, per start, the seconds from the process start to:

* `health`: the first 200 of `GET /api/health` (the gateway serves);
* `banner`: the "LangOrch is up" line (the gateway serves and every worker process runs its services).

and the CPU seconds the `langorch up` process itself (the one that answers /api/health) had used when /api/health
first answered (`health_cpu_s`): on a machine shared with other work the wall-clock figures follow its load, the CPU
time much less.

Baselines, same run, same machine load:

* `import_floor_s`: `python -c "import langorch.cli, langorch.up, langorch_gateway.app, uvicorn"`, the modules the
  process that answers /api/health cannot do without. No start can be faster than this import on this machine; it
  is most of a start when Python has no bytecode cache.
* `servers_alone_s`: the embedded NATS and PostgreSQL started on the same state directory until both accept
  connections, with no LangOrch code running (what a second start must do anyway).

Python's bytecode cache matters a lot: with `PYTHONDONTWRITEBYTECODE=1` and no `__pycache__` every start compiles
~1,800 modules. `uv sync` writes the bytecode of the installed packages (`compile-bytecode` in pyproject.toml), so
only LangOrch's own workspace modules are compiled at each start then. `--bytecode` also gives the measured
processes a cache for those (`PYTHONPYCACHEPREFIX` in a temporary directory, filled by the first start).

    uv run python bench/startup.py [--starts 3] [--workers N] [--bytecode]

Prints one JSON object.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DEADLINE_S = 120.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def environment(pycache: Path | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    env["PYTHONUNBUFFERED"] = "1"
    if pycache is not None:
        env.pop("PYTHONDONTWRITEBYTECODE", None)
        env["PYTHONPYCACHEPREFIX"] = str(pycache)
    return env


def healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError):
        return False


CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) process ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def one_start(state: Path, env: dict[str, str], workers: int | None) -> dict[str, float]:
    """Start `langorch up`, time /api/health and the banner, stop it with SIGINT; seconds."""
    port = free_port()
    t0 = time.perf_counter()
    extra = ["--workers", str(workers)] if workers is not None else []
    proc = subprocess.Popen([sys.executable, "-m", "langorch", "up", "--state-dir", str(state), "--port", str(port),
                             *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, start_new_session=True)
    banner: list[float] = []
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)
            if "LangOrch is up" in line and not banner:
                banner.append(time.perf_counter() - t0)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        while not healthy(port):
            if proc.poll() is not None or time.perf_counter() - t0 > DEADLINE_S:
                raise RuntimeError("langorch up did not become healthy:\n" + "".join(lines))
            time.sleep(0.01)
        health = time.perf_counter() - t0
        health_cpu = cpu_s(proc.pid)
        while not banner:
            if proc.poll() is not None or time.perf_counter() - t0 > DEADLINE_S:
                raise RuntimeError("langorch up printed no banner:\n" + "".join(lines))
            time.sleep(0.01)
        stop = time.perf_counter()
        os.killpg(proc.pid, signal.SIGINT)
        code = proc.wait(60)
        stopped = time.perf_counter() - stop
        if code != 0:
            raise RuntimeError(f"langorch up exited with {code}:\n" + "".join(lines))
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    reader.join(5)
    return {"health_s": round(health, 3), "health_cpu_s": round(health_cpu, 2), "banner_s": round(banner[0], 3),
            "stop_s": round(stopped, 3)}


def import_floor(env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import langorch.cli, langorch.up, langorch_gateway.app, uvicorn"],
                   cwd=ROOT, env=env, check=True)
    return round(time.perf_counter() - t0, 3)


def servers_alone(state: Path) -> float:
    """The embedded servers of ``state`` started as `langorch up` does (NATS, then PostgreSQL), until both accept
    connections."""
    from langorch_infra.embedded import EmbeddedNats, EmbeddedPostgres

    servers = json.loads((state / "servers.json").read_text())
    t0 = time.perf_counter()
    nats = EmbeddedNats(state / "nats", servers["nats"]["port"], log_file=state / "logs" / "nats-server.log").start()
    pg = EmbeddedPostgres(state / "postgres", servers["postgres"]["port"], log_file=state / "logs" / "postgresql.log")
    try:
        pg.start()
        return round(time.perf_counter() - t0, 3)
    finally:
        nats.terminate()
        pg.stop()
        nats.stop()


def installed_bytecode() -> str:
    """Whether the installed packages carry bytecode (``uv sync`` with ``compile-bytecode``)."""
    import pydantic

    cached = any((Path(pydantic.__file__).parent / "__pycache__").glob("*.pyc"))
    return "the installed packages' bytecode from uv sync" if cached else "no bytecode for the installed packages"


def main(starts: int, workers: int | None, bytecode: bool) -> dict[str, Any]:
    tmp = Path(tempfile.mkdtemp(prefix="langorch-bench-startup-"))
    state = tmp / "state"
    pycache = tmp / "pycache" if bytecode else None
    env = environment(pycache)
    try:
        first = one_start(state, env, workers)
        later = [one_start(state, env, workers) for _ in range(starts)]
        floors = [import_floor(env) for _ in range(3)]
        alone = [servers_alone(state) for _ in range(3)]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    health = [s["health_s"] for s in later]
    floor = statistics.median(floors)
    return {
        "machine": {"cpus": os.cpu_count(), "python": sys.version.split()[0],
                    "load_average_1m": round(os.getloadavg()[0], 2)},
        "command": "python -m langorch up" + (f" --workers {workers}" if workers is not None else "") + " (no uv run)",
        "bytecode_cache": "PYTHONPYCACHEPREFIX in a temporary directory, filled by the first start" if bytecode
        else (f"PYTHONDONTWRITEBYTECODE is set: {installed_bytecode()}; LangOrch's own modules compile at each start"
              if env.get("PYTHONDONTWRITEBYTECODE") else "the environment's (__pycache__ beside the sources)"),
        "first_start": first,
        "later_starts": later,
        "later_health_s_median": round(statistics.median(health), 3),
        "later_health_s_max": max(health),
        "later_health_cpu_s_median": round(statistics.median(s["health_cpu_s"] for s in later), 2),
        "later_banner_s_median": round(statistics.median(s["banner_s"] for s in later), 3),
        "baseline_import_floor_s": floors,
        "baseline_import_floor_s_median": round(floor, 3),
        "baseline_servers_alone_s": alone,
        "baseline_servers_alone_s_median": round(statistics.median(alone), 3),
        "later_health_minus_import_floor_s": round(statistics.median(health) - floor, 3),
        "goal": "later starts serve /api/health in <= 3 s",
    }


if __name__ == "__main__":
    # a SIGTERM (a timeout, `kill`) stops the benchmark as Ctrl-C does, with the servers and processes it started
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--starts", type=int, default=3, help="starts on the existing state after the first")
    parser.add_argument("--workers", type=int, default=None,
                        help="`langorch up --workers` (default: not given; 0: one process)")
    parser.add_argument("--bytecode", action="store_true", help="give the started processes a bytecode cache")
    args = parser.parse_args()
    print(json.dumps(main(args.starts, args.workers, args.bytecode), indent=2))
