"""API keys are cached per gateway replica (``users.ApiKeyCache``), and a key revoked through one replica is refused
by another as soon as that replica's projector sees the revocation — not only when the cache's TTL
(``LANGORCH_AUTH_ROLE_CACHE_S``, here its largest value) runs out. The same holds for a user's removed role."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from langorch_gateway.app import create_app
from langorch_gateway.users import ApiKeyCache
from langorch_infra.settings import GatewaySettings
from tests.helpers import eventually, problem, serve_app

SECRET = "key-cache-test-secret-key-0123456789-abcdefghij"
ADMIN_PASSWORD = "bootstrap-admin-password-4"
CACHE_S = 30.0  # the largest role cache the settings allow
PROMPTLY_S = 10.0  # well under CACHE_S: a refusal within this is the projector's doing, not the TTL's


@contextlib.asynccontextmanager
async def two_replicas(nats_url: str, database_url: str) -> AsyncIterator[tuple[httpx.AsyncClient, ...]]:
    settings: dict[str, Any] = {"nats_url": nats_url, "database_url": database_url, "auth_enabled": True,
                                "auth_secret_key": SECRET, "bootstrap_admin_password": ADMIN_PASSWORD,
                                "auth_role_cache_s": CACHE_S}
    apps = [create_app(GatewaySettings(**settings, instance_id=f"gw-{i}")) for i in range(2)]
    async with contextlib.AsyncExitStack() as stack:
        urls = [await stack.enter_async_context(serve_app(a, lifespan="on", what=f"gateway {i}"))
                for i, a in enumerate(apps)]
        yield tuple([await stack.enter_async_context(httpx.AsyncClient(base_url=u, timeout=30)) for u in urls])


async def admin_token(c: httpx.AsyncClient) -> dict[str, str]:
    async def logged_in() -> str | None:
        r = await c.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        return str(r.json()["access_token"]) if r.status_code == 200 else None

    return {"Authorization": f"Bearer {await eventually(logged_in, what='the bootstrap admin')}"}


@pytest.mark.integration
async def test_a_key_revoked_on_one_replica_is_refused_promptly_by_another(nats_url: str,
                                                                          database_url: str) -> None:
    async with two_replicas(nats_url, database_url) as (a, b):
        admin = await admin_token(a)
        r = await a.post("/api/auth/api-keys", headers=admin, json={"name": "revoked elsewhere", "roles": ["admin"]})
        assert r.status_code == 201, r.text
        key_id, key = r.json()["key_id"], {"X-API-Key": r.json()["key"]}
        kept = await a.post("/api/auth/api-keys", headers=admin, json={"name": "kept", "roles": ["viewer"]})
        other = {"X-API-Key": kept.json()["key"]}

        async def works_on_b() -> bool:  # B's projector may be a moment behind A's write
            return (await b.get("/api/users", headers=key)).status_code == 200

        await eventually(works_on_b, what="the new key to work on replica B")
        assert (await b.get("/api/users", headers=key)).status_code == 200  # B has it cached now
        assert (await b.get("/api/procedures", headers=other)).status_code == 200

        assert (await a.delete(f"/api/auth/api-keys/{key_id}", headers=admin)).status_code == 204
        problem(await a.get("/api/users", headers=key), 401, "invalid_token")  # the replica that revoked: at once

        async def refused_on_b() -> bool:
            return (await b.get("/api/users", headers=key)).status_code == 401

        await eventually(refused_on_b, timeout=PROMPTLY_S, what="replica B to refuse the revoked key before its "
                         "cache's TTL (its projector saw the revocation)")
        problem(await b.get("/api/users", headers={"Authorization": f"Bearer {key['X-API-Key']}"}), 401,
                "invalid_token")
        assert (await b.get("/api/procedures", headers=other)).status_code == 200  # another key still works


@pytest.mark.integration
async def test_a_role_removed_on_one_replica_is_refused_promptly_by_another(nats_url: str,
                                                                           database_url: str) -> None:
    async with two_replicas(nats_url, database_url) as (a, b):
        admin = await admin_token(a)
        r = await a.post("/api/users", headers=admin, json={"username": "carol", "email": "carol@example.com",
                                                            "password": "carol-password-1", "roles": ["admin"]})
        assert r.status_code == 201, r.text
        user_id = r.json()["user_id"]
        login = await b.post("/api/auth/login", json={"username": "carol", "password": "carol-password-1"})
        assert login.status_code == 200, login.text
        carol = {"Authorization": f"Bearer {login.json()['access_token']}"}
        assert (await b.get("/api/users", headers=carol)).status_code == 200  # B has carol cached as an admin

        r = await a.patch(f"/api/users/{user_id}", headers=admin, json={"roles": ["viewer"]})
        assert r.status_code == 200, r.text

        async def forbidden_on_b() -> bool:
            return (await b.get("/api/users", headers=carol)).status_code == 403

        await eventually(forbidden_on_b, timeout=PROMPTLY_S, what="replica B to drop carol's admin role before its "
                         "cache's TTL (its projector saw the change)")
        assert (await b.get("/api/auth/me", headers=carol)).json()["roles"] == ["viewer"]


@pytest.mark.unit
async def test_a_cache_forgets_what_changed_while_it_was_being_read() -> None:
    """A row read while the projector saw its aggregate change is not kept (the read may predate the change)."""
    cache = ApiKeyCache(CACHE_S)
    reading = asyncio.Event()
    release = asyncio.Event()

    class SlowPool:
        async def fetchrow(self, sql: str, key_id: str) -> dict[str, Any]:
            reading.set()
            await release.wait()
            return {"key_sha256": "x", "roles": "[]", "expires_at": None, "revoked_at": None}

    read = asyncio.create_task(cache.get(SlowPool(), "k_1"))  # type: ignore[arg-type]
    await reading.wait()
    cache.changed("k_1")  # the revocation reached the table while the read was under way
    release.set()
    assert (await read) is not None
    assert cache.cached("k_1") == (False, None)
    await cache.get(SlowPool(), "k_1")  # type: ignore[arg-type]  # a read after the change is kept
    assert cache.cached("k_1")[0] is True
