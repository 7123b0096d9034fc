"""api.md §2.1, §2.3 and §2.4 at start-up: the bootstrap admin (created once even when several gateway replicas
start together on an empty state; nobody and a warning without a password), the refusals to start (auth on with
the placeholder or a short secret key, auth off on a non-loopback address unless explicitly allowed), and the
loud auth-disabled mode (headers, health, readiness, ``/api/auth/me``, the gauge, the start-up warning, audit
records flagged ``auth_disabled``)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import httpx
import pytest

from langorch_gateway import users
from langorch_gateway.app import create_app
from langorch_infra.jetstream import JetStreamEventStore, connect
from langorch_infra.settings import GatewaySettings
from tests.helpers import eventually, platform_of, problem, serve_app

pytestmark = pytest.mark.integration

SECRET = "bootstrap-test-secret-key-0123456789-abcdefghij"
ADMIN_PASSWORD = "bootstrap-admin-password-3"


async def _admin_events(nats_url: str) -> list[str]:
    nc = await connect(nats_url, "test-bootstrap-events")
    try:
        return [s.envelope.type for s in await JetStreamEventStore(nc.jetstream()).read("user", "admin")]
    finally:
        await nc.close()


async def test_three_replicas_starting_together_create_one_admin(nats_url: str, database_url: str) -> None:
    settings: dict[str, Any] = {"nats_url": nats_url, "database_url": database_url, "auth_enabled": True,
                                "auth_secret_key": SECRET, "bootstrap_admin_password": ADMIN_PASSWORD}
    apps = [create_app(GatewaySettings(**settings, instance_id=f"gw-{i}")) for i in range(3)]
    async with contextlib.AsyncExitStack() as stack:
        urls = await asyncio.gather(*(stack.enter_async_context(serve_app(a, lifespan="on", what=f"gateway {i}"))
                                      for i, a in enumerate(apps)))
        assert await _admin_events(nats_url) == ["user_created"]
        for url in urls:  # every replica knows the admin
            async with httpx.AsyncClient(base_url=url, timeout=30) as c:
                r = await c.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
                assert r.status_code == 200, r.text
                assert r.json()["roles"] == ["admin"]
                metrics = (await c.get("/metrics")).text
                assert "langorch_auth_disabled 0.0" in metrics
    created = await _admin_events(nats_url)
    assert created.count("user_created") == 1


async def test_without_a_bootstrap_password_nobody_is_created_and_a_warning_says_how(
        nats_url: str, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="langorch_gateway.users")
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET}) as p:
        problem(await p.client.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD}), 401,
                "invalid_credentials")

        async def warned() -> bool:
            return any("no user exists" in r.getMessage() for r in caplog.records)

        await eventually(warned, what="the no-user warning")
        assert any("--role admin --direct" in r.getMessage() for r in caplog.records)
        assert await _admin_events(nats_url) == []


@pytest.mark.parametrize(("settings", "said"), [
    ({"auth_enabled": True}, "the development placeholder"),
    ({"auth_enabled": True, "auth_secret_key": "x" * 31}, "shorter than 32 bytes"),
    ({"auth_enabled": True, "auth_secret_key": SECRET, "bootstrap_admin_password": "short"}, "at least 12"),
    ({"auth_enabled": False, "host": "0.0.0.0"}, "not a loopback address"),
    ({"auth_enabled": False, "host": "192.0.2.10"}, "not a loopback address"),
])
async def test_the_gateway_refuses_to_start(settings: dict[str, Any], said: str) -> None:
    app = create_app(GatewaySettings(**settings))
    with pytest.raises(users.StartupRefused, match=said):  # before it connects to anything
        async with app.router.lifespan_context(app):
            pass


def test_what_starts() -> None:
    users.check_startup(GatewaySettings(auth_enabled=False, host="0.0.0.0",
                                        auth_disabled_allow_remote=True))
    users.check_startup(GatewaySettings(auth_enabled=False, host="::1"))
    users.check_startup(GatewaySettings(auth_enabled=False, host="localhost"))
    users.check_startup(GatewaySettings(auth_enabled=True, host="0.0.0.0", auth_secret_key=SECRET))
    assert not users.is_loopback("")
    assert users.is_loopback("127.0.0.2")


async def test_auth_disabled_mode_is_loud(nats_url: str, database_url: str, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="langorch_gateway.users")
    async with platform_of(nats_url, database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"auth_enabled": False}) as p:
        c = p.client
        assert any("AUTHENTICATION IS DISABLED" in r.getMessage() for r in caplog.records)
        for r in (await c.get("/api/health"), await c.get("/api/ready"), await c.get("/api/auth/me"),
                  await c.get("/api/no-such-route")):
            assert r.headers["X-LangOrch-Auth"] == "disabled"
        assert (await c.get("/api/health")).json()["auth"] == "disabled"
        assert (await c.get("/api/ready")).json()["auth"] == "disabled"
        me = (await c.get("/api/auth/me")).json()
        assert me == {"identity": "anonymous", "kind": "anonymous", "roles": ["admin", "approver", "operator",
                                                                             "viewer"],
                      "user_id": None, "email": None, "full_name": None, "auth_enabled": False, "expires_at": None}
        assert "langorch_auth_disabled 1.0" in (await c.get("/metrics")).text
        problem(await c.get("/api/auth/me", headers={"Authorization": "Bearer nonsense"}), 401, "invalid_token")
        problem(await c.get("/api/auth/me", headers={"X-API-Key": "lo_nonsense"}), 401, "invalid_token")

        r = await c.post("/api/auth/api-keys", json={"name": "dev", "roles": ["viewer"]})
        assert r.status_code == 201, r.text
        assert r.json()["created_by"] == "anonymous"
        key_id = r.json()["key_id"]

        async def audited() -> list[dict[str, Any]]:
            page = (await c.get("/api/audit", params={"category": "auth", "action": "api_key_create"})).json()
            return [i for i in page["items"] if i["resource_id"] == key_id]

        [entry] = await eventually(audited, what="the API key's audit record")
        assert (entry["actor"], entry["auth_disabled"]) == ("anonymous", True)
        # a valid credential still names its principal in disabled mode
        me = (await c.get("/api/auth/me", headers={"X-API-Key": r.json()["key"]})).json()
        assert (me["identity"], me["roles"]) == (f"api_key:{key_id}", ["viewer"])
