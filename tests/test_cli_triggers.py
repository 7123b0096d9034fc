"""``langorch triggers list|show|fire|enable|disable|sync`` against a real gateway with authentication on and the
triggers service: the commands send the API key they are given, print tables or ``--json``, and a refused request
or a bad option is one ``error:`` line with the documented exit code, never a traceback."""

from __future__ import annotations

import asyncio
import json
import tempfile
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from tests.helpers import Platform, platform_of, procedure_doc, wait_until
from tests.test_cli_auth import Cli, base_env, has

pytestmark = pytest.mark.integration

ADMIN_PASSWORD = "cli-triggers-admin-password"
# no bootstrap admin: the first admin is created with --direct once the services run (as an operator would)
AUTH_ON = {"auth_enabled": True, "auth_secret_key": "cli-triggers-test-secret-0123456789-abcdef"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, agents=False, triggers=True,
                           gateway_settings=AUTH_ON) as p:
        yield p


@pytest.fixture(scope="module")
async def admin(platform: Platform) -> dict[str, str]:
    place = Path(tempfile.mkdtemp(prefix="langorch-cli-triggers-"))
    cli = Cli(base_env(LANGORCH_NATS_URL=platform.nats_url, LANGORCH_STATE_DIR=str(place / "no-state"),
                       LANGORCH_CONFIG_DIR=str(place / "config")))
    await asyncio.to_thread(cli.ok, "users", "create", "admin", "--email", "admin@example.com", "--role", "admin",
                            "--direct", "--password-stdin", stdin=ADMIN_PASSWORD + "\n")
    db = await asyncpg.connect(platform.database_url)
    try:  # the gateway's projection has the user (a login tried before counts as a failed one)
        await wait_until(lambda: db.fetchval("SELECT count(*) FROM users WHERE username = 'admin'"), timeout=60)
    finally:
        await db.close()
    login = await platform.client.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
    assert login.status_code == 200, login.text
    return {"Authorization": f"Bearer {login.json()['access_token']}"}


async def api_key(p: Platform, admin: dict[str, str], role: str) -> str:
    r = await p.client.post("/api/auth/api-keys", headers=admin, json={"name": f"cli-{role}-{uuid.uuid4().hex[:6]}",
                                                                       "roles": [role]})
    assert r.status_code == 201, r.text
    return str(r.json()["key"])


async def cli_for(p: Platform, admin: dict[str, str], role: str = "operator") -> Cli:
    place = Path(tempfile.mkdtemp(prefix="langorch-cli-triggers-"))
    return Cli(base_env(LANGORCH_API_URL=p.base_url, LANGORCH_API_KEY=await api_key(p, admin, role),
                        LANGORCH_STATE_DIR=str(place / "no-state"), LANGORCH_CONFIG_DIR=str(place / "config")))


async def active_with_block(p: Platform, admin: dict[str, str], procedure_id: str, trigger: dict[str, Any]) -> None:
    r = await p.client.post("/api/procedures", headers=admin,
                            json={"ckp_json": procedure_doc(procedure_id, trigger=trigger)})
    assert r.status_code == 201, r.text
    r = await p.client.patch(f"/api/procedures/{procedure_id}/1.0.0/status", headers=admin,
                             json={"status": "active"})
    assert r.status_code == 200, r.text


async def registered(p: Platform, admin: dict[str, str], procedure_id: str) -> httpx.Response:
    return await wait_until(lambda: p.client.get(f"/api/triggers/{procedure_id}/1.0.0", headers=admin),
                            lambda r: r.status_code == 200, timeout=60)


async def run(cli: Cli, *args: str) -> str:
    return await asyncio.to_thread(cli.ok, *args)


async def test_list_show_disable_enable_fire_and_sync(platform: Platform, admin: dict[str, str]) -> None:
    hook, timed = f"cli_hook_{uuid.uuid4().hex[:8]}", f"cli_timed_{uuid.uuid4().hex[:8]}"
    await active_with_block(platform, admin, hook, {"type": "webhook", "webhook_secret": "cli_hook_key",
                                                    "input_vars": {"greeting": "static"}})
    r = await platform.client.post("/api/procedures", headers=admin, json={"ckp_json": procedure_doc(timed)})
    assert r.status_code == 201, r.text
    r = await platform.client.post(f"/api/triggers/{timed}/1.0.0", headers=admin,
                                   json={"trigger_type": "scheduled", "schedule": "0 6 * * *"})
    assert r.status_code == 201, r.text
    await registered(platform, admin, hook)
    cli = await cli_for(platform, admin)

    [listed] = json.loads(await run(cli, "triggers", "list", "--procedure", hook, "--json"))
    assert (listed["trigger_type"], listed["source"], listed["dormant"]) == ("webhook", "ckp", False)
    table = await run(cli, "triggers", "list", "--procedure", hook)
    has(table, "1 trigger", hook, "webhook", f"/api/triggers/webhook/{hook}", "ckp")
    by_api = json.loads(await run(cli, "triggers", "list", "--source", "api", "--type", "scheduled", "--json"))
    assert timed in [t["procedure_id"] for t in by_api]
    assert hook not in [t["procedure_id"] for t in by_api]
    has(await run(cli, "triggers", "list", "--procedure", timed), "0 6 * * * (UTC)", "api")

    has(await run(cli, "triggers", "show", hook, "1.0.0"), "source", "ckp", "webhook_secret", "cli_hook_key",
        '{"greeting": "static"}')
    assert json.loads(await run(cli, "triggers", "show", hook, "1.0.0", "--json"))["revision"] == 1

    has(await run(cli, "triggers", "disable", hook, "1.0.0"), f"{hook}@1.0.0: disabled")
    assert len(json.loads(await run(cli, "triggers", "list", "--procedure", hook, "--disabled", "--json"))) == 1
    assert json.loads(await run(cli, "triggers", "list", "--procedure", hook, "--enabled", "--json")) == []
    has(await run(cli, "triggers", "enable", hook, "1.0.0"), f"{hook}@1.0.0: enabled")
    has(await run(cli, "triggers", "disable", timed, "1.0.0"), "disabled (dormant: the version is not active)")

    out = await run(cli, "triggers", "fire", hook, "1.0.0", "--inputs-json", '{"greeting": "from json"}',
                    "--input", "greeting=from option")
    has(out, f"fired {hook}@1.0.0: run ")
    run_id = out.split("run ")[1].split()[0]
    done = await _run_done(platform, admin, run_id)
    assert (done["status"], done["input_vars"]["greeting"], done["trigger_type"]) == (
        "completed", "from option", "manual")
    fired = json.loads(await run(cli, "triggers", "fire", hook, "1.0.0", "--json"))
    assert (fired["procedure_id"], fired["status"]) == (hook, "created")

    has(await run(cli, "triggers", "sync"), "0 registered, 0 updated, 0 removed, 0 not registered")
    # a block the registration refuses: sync reports it with its field and exits 1
    bad = f"cli_bad_{uuid.uuid4().hex[:8]}"
    await active_with_block(platform, admin, bad, {"type": "event", "event_source": "nats://lo.ext.a.>.b"})
    proc = await asyncio.to_thread(cli, "triggers", "sync")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    has(proc.stdout, "1 not registered", f"{bad}@1.0.0: unsupported_event_source at /trigger/event_source")
    proc = await asyncio.to_thread(cli, "triggers", "sync", "--json")
    assert proc.returncode == 1, (proc.stdout, proc.stderr)
    assert [e["procedure_id"] for e in json.loads(proc.stdout)["errors"]] == [bad]


async def _run_done(p: Platform, admin: dict[str, str], run_id: str) -> dict[str, Any]:
    r = await wait_until(lambda: p.client.get(f"/api/runs/{run_id}", headers=admin),
                         lambda r: r.status_code == 200 and r.json().get("status") in ("completed", "failed"),
                         timeout=60)
    return r.json()  # type: ignore[no-any-return]


async def test_refusals_and_bad_options_are_one_error_line(platform: Platform, admin: dict[str, str]) -> None:
    hook = f"cli_refused_{uuid.uuid4().hex[:8]}"
    await active_with_block(platform, admin, hook, {"type": "webhook", "webhook_secret": "k"})
    await registered(platform, admin, hook)
    operator, viewer = await cli_for(platform, admin), await cli_for(platform, admin, "viewer")

    line = await asyncio.to_thread(operator.error, "triggers", "show", "no_such_procedure", "1.0.0")
    has(line, "reading the trigger of no_such_procedure@1.0.0 failed", "404")
    has(await asyncio.to_thread(viewer.ok, "triggers", "show", hook, "1.0.0"), hook)  # reading needs any role
    line = await asyncio.to_thread(viewer.error, "triggers", "fire", hook, "1.0.0")
    has(line, "firing the trigger", "403")
    line = await asyncio.to_thread(viewer.error, "triggers", "disable", hook, "1.0.0")
    has(line, "disabling the trigger", "403")
    line = await asyncio.to_thread(operator.error, "triggers", "fire", hook, "1.0.0", "--input", "greeting", code=2)
    has(line, "--input 'greeting': expected key=value")
    line = await asyncio.to_thread(operator.error, "triggers", "fire", hook, "1.0.0", "--inputs-json", "[1]", code=2)
    has(line, "--inputs-json: expected a JSON object")
    line = await asyncio.to_thread(operator.error, "triggers", "fire", hook, "1.0.0", "--inputs-json", "{", code=2)
    has(line, "--inputs-json: not JSON")
    line = await asyncio.to_thread(operator.error, "triggers", "fire", hook, "1.0.0", "--input",
                                   'greeting=["not", "a", "string"]')
    has(line, "422")
    proc = await asyncio.to_thread(operator, "triggers", "list", "--type", "cron")
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
