"""Issue 2 acceptance: the README start command serves /api/health and the quickstart works, with embedded
NATS and PostgreSQL (no server URLs in the environment); Ctrl-C stops it and the data stays."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from langorch_infra.embedded import free_port
from tests.helpers import example, follow_run, langorch_command

pytestmark = pytest.mark.integration


async def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        for _ in range(300):
            assert proc.poll() is None, log.read_text()
            try:
                r = await client.get("/api/health")
                if r.status_code == 200:
                    return r.json()  # type: ignore[no-any-return]
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("langorch up never became healthy:\n" + log.read_text())


def start_up(state_dir: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LANGORCH_NATS_URL", "LANGORCH_DATABASE_URL")}
    with log.open("ab") as out:
        return subprocess.Popen(langorch_command("up", "--state-dir", str(state_dir), "--port", str(port)),
                                env=env, stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


@pytest.fixture
def state() -> Iterator[Path]:
    """The state directory, outside pytest's basetemp (see ``pg_server_url`` in conftest: the embedded
    PostgreSQL must keep its way to its data directory whatever another pytest session does meanwhile)."""
    path = Path(tempfile.mkdtemp(prefix="langorch-up-test-"))
    yield path / "state"
    shutil.rmtree(path, ignore_errors=True)


async def test_up_serves_health_and_runs_the_quickstart(tmp_path: Path, state: Path) -> None:
    log, port = tmp_path / "up.log", free_port()
    base = f"http://127.0.0.1:{port}"
    proc = start_up(state, port, log)
    try:
        health = await wait_healthy(base, proc, log)
        assert health["status"] == "ok"
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            r = await c.post("/api/procedures", json={"ckp_json": example("internal_variables.ckp.json")})
            assert r.status_code == 201, r.text
            r = await c.post("/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "1.0.0"})
            assert r.status_code == 201, r.text
            run_id = r.json()["run_id"]
            events, end = await follow_run(c, run_id)
            assert end == "completed"
            assert events[-1]["payload"]["outputs"]["result"] == "ok"
    finally:
        code = stop(proc) if proc.poll() is None else proc.returncode
    assert code == 0, log.read_text()
    assert "LangOrch is up" in log.read_text()

    # data kept in the state directory: a second start still knows the run
    proc = start_up(state, port, log)
    try:
        await wait_healthy(base, proc, log)
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            r = await c.get(f"/api/runs/{run_id}")
            assert r.status_code == 200
            assert r.json()["status"] == "completed"
    finally:
        assert stop(proc) == 0, log.read_text()
