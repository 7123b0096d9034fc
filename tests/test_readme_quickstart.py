"""Issue 2 and 15 acceptance: the README's start command serves /api/health with authentication on, and the README's
quickstart commands, run as written (only the port, and ``uv run`` as this interpreter), work in a directory like a
fresh checkout with embedded NATS and PostgreSQL: the CLI finds the key ``langorch up`` stored in ``.langorch/``, and
curl sends it from ``LANGORCH_API_KEY``. Ctrl-C stops it and the data stays."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.ports import free_port

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"


def quickstart_blocks() -> list[str]:
    """The ``bash`` blocks of the README's Quickstart section, in order."""
    section = README.read_text(encoding="utf-8").split("\n## Quickstart\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def as_run_here(block: str, port: int) -> str:
    return block.replace("localhost:8080", f"localhost:{port}").replace("uv run langorch",
                                                                        f"{sys.executable} -m langorch")


def env_for(port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LANGORCH_")}
    # the README's port is 8080; this test's is free_port()
    return {**env, "LANGORCH_API_URL": f"http://127.0.0.1:{port}", "COLUMNS": "200"}


async def wait_healthy(base: str, proc: subprocess.Popen[bytes], log: Path) -> dict[str, object]:
    async with httpx.AsyncClient(base_url=base, timeout=2) as client:
        for _ in range(600):
            assert proc.poll() is None, log.read_text()
            try:
                r = await client.get("/api/health")
                if r.status_code == 200:
                    return r.json()  # type: ignore[no-any-return]
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("langorch up never became healthy:\n" + log.read_text())


async def wait_banner(proc: subprocess.Popen[bytes], log: Path) -> str:
    for _ in range(1800):
        text = log.read_text(errors="replace")
        if "LangOrch is up" in text and "CLI key" in text.split("LangOrch is up")[-1]:
            return text
        assert proc.poll() is None, text
        await asyncio.sleep(0.1)
    raise AssertionError("no banner with the CLI key:\n" + log.read_text())


def start_up(checkout: Path, port: int, log: Path) -> subprocess.Popen[bytes]:
    """``langorch up`` as the README starts it, in ``checkout`` (state in ``./.langorch``)."""
    with log.open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "langorch", "up", "--port", str(port)], cwd=checkout,
                                env=env_for(port), stdout=out, stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen[bytes]) -> int:
    proc.send_signal(signal.SIGINT)
    return proc.wait(60)


@pytest.fixture
def checkout() -> Iterator[Path]:
    """A directory standing for a fresh checkout (its ``examples/`` is the project's), outside pytest's basetemp
    (see ``pg_server_url`` in conftest: the embedded PostgreSQL must keep its way to its data directory whatever
    another pytest session does meanwhile)."""
    path = Path(tempfile.mkdtemp(prefix="langorch-up-test-"))
    (path / "examples").symlink_to(ROOT / "examples")
    yield path
    shutil.rmtree(path, ignore_errors=True)


async def test_up_serves_health_and_the_readme_quickstart_runs_with_auth_on(tmp_path: Path, checkout: Path) -> None:
    log, port = tmp_path / "up.log", free_port()
    base = f"http://127.0.0.1:{port}"
    blocks = quickstart_blocks()
    assert len(blocks) == 2, blocks
    proc = start_up(checkout, port, log)
    try:
        health = await wait_healthy(base, proc, log)
        assert health["status"] == "ok"
        assert health.get("auth") == "enabled", health
        banner = await wait_banner(proc, log)
        assert "password" in banner
        key_file = checkout / ".langorch" / "api-key"
        assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
        async with httpx.AsyncClient(base_url=base, timeout=30) as c:
            r = await c.get("/api/procedures")
            assert r.status_code == 401, r.text  # auth is on: nothing is readable without a credential

        outputs = []
        for block in blocks:
            done = await asyncio.to_thread(
                subprocess.run, ["bash", "-euo", "pipefail", "-c", as_run_here(block, port)], cwd=checkout,
                env=env_for(port), capture_output=True, text=True, timeout=300)
            assert done.returncode == 0, (block, done.stdout, done.stderr)
            outputs.append(done.stdout)
        cli, rest = outputs
        assert "ok (0 errors" in cli, cli
        assert "run ended: completed" in cli, cli
        assert "unauthenticated" not in rest, rest
        assert "event: end" in rest, rest
        assert '"status":"completed"' in rest.replace(" ", ""), rest
        assert "invalid_input_vars" in rest, rest
        run_id = re.findall(r'"run_id":\s*"([^"]+)"', rest)[0]
    finally:
        code = stop(proc) if proc.poll() is None else proc.returncode
    assert code == 0, log.read_text()

    # data kept in the state directory: a second start still knows the run, and shows no password
    first_log = log.read_text()
    proc = start_up(checkout, port, log)
    try:
        await wait_healthy(base, proc, log)
        again = (await wait_banner(proc, log))[len(first_log):]
        assert "password" not in again, again
        headers = {"X-API-Key": key_file.read_text().strip()}
        async with httpx.AsyncClient(base_url=base, timeout=30, headers=headers) as c:
            r = await c.get(f"/api/runs/{run_id}")
            assert r.status_code == 200, r.text
            assert r.json()["status"] == "completed"
    finally:
        assert stop(proc) == 0, log.read_text()


def test_the_quickstart_sends_the_key_with_every_api_request() -> None:
    """Every curl of the quickstart but health and readiness carries the key."""
    for block in quickstart_blocks():
        for command in re.split(r"(?<!\\)\n", block):
            if "curl " in command and "/api/health" not in command and "/api/ready" not in command:
                assert '-H "X-API-Key: $LANGORCH_API_KEY"' in command, command
    assert any("export LANGORCH_API_KEY=$(cat .langorch/api-key)" in b for b in quickstart_blocks())
