"""api.md §2.1 with auth on, against the real stack: forged and misused credentials are 401 with no event appended
(a JWT with ``alg: none``, a wrong key, expired, the wrong audience; a credential grant and a callback token used as
user tokens; a revoked or expired API key; a bearer token in the query string; a valid credential next to an
invalid one), effective roles come from the ``users`` projection within the role cache's TTL, a deactivated user's
token stops working, and the 11th login after 10 failures is 429 even with the right password."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import jwt
import pytest

from ckp_core.subjects import EVENT_STREAM
from langorch_gateway import users
from langorch_infra.callbacks import callback_key, make_token
from langorch_infra.jetstream import connect
from langorch_infra.secrets import grant_key, make_grant
from tests.helpers import Platform, eventually, platform_of, problem

pytestmark = pytest.mark.integration

SECRET = "credentials-test-secret-key-0123456789-abcdefgh"
ADMIN_PASSWORD = "bootstrap-admin-password-2"
ROLE_CACHE_S = 1.0
AUTH_ON = {"auth_enabled": True, "auth_secret_key": SECRET, "bootstrap_admin_password": ADMIN_PASSWORD,
           "auth_role_cache_s": ROLE_CACHE_S}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           gateway_settings=AUTH_ON) as p:
        yield p


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def token_of(c: httpx.AsyncClient, username: str, password: str) -> str:
    r = await c.post("/api/auth/login", json={"username": username, "password": password})
    assert r.status_code == 200, r.text
    return str(r.json()["access_token"])


async def stream_head(nats_url: str) -> int:
    nc = await connect(nats_url, "test-stream-head")
    try:
        return int((await nc.jetstream().stream_info(EVENT_STREAM)).state.last_seq)
    finally:
        await nc.close()


async def make_user(c: httpx.AsyncClient, admin: dict[str, str], username: str, roles: list[str]) -> dict[str, Any]:
    r = await c.post("/api/users", headers=admin, json={"username": username, "email": f"{username}@example.com",
                                                        "password": f"{username}-password-1", "roles": roles})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


def claims(**override: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"iss": "langorch", "aud": "langorch-api", "sub": "admin", "roles": ["admin"], "iat": now,
            "exp": now + 600, "jti": uuid.uuid4().hex} | override


async def test_forged_and_misused_tokens_are_401_and_append_nothing(platform: Platform) -> None:
    c = platform.client
    admin = bearer(await token_of(c, "admin", ADMIN_PASSWORD))
    me = (await c.get("/api/auth/me", headers=admin)).json()
    key = users.user_token_key(SECRET)
    good = claims(uid=me["user_id"])
    assert (await c.get("/api/users", headers=bearer(jwt.encode(good, key, algorithm="HS256")))).status_code == 200

    forged = {
        "alg none": jwt.encode(good, None, algorithm="none"),
        "wrong key": jwt.encode(good, users.user_token_key("another-secret-key-of-at-least-32-bytes!"),
                                algorithm="HS256"),
        "the secret itself as key": jwt.encode(good, SECRET, algorithm="HS256"),
        "wrong audience": jwt.encode(good | {"aud": "agent_credential"}, key, algorithm="HS256"),
        "wrong issuer": jwt.encode(good | {"iss": "someone"}, key, algorithm="HS256"),
        "no jti": jwt.encode({k: v for k, v in good.items() if k != "jti"}, key, algorithm="HS256"),
        "unknown user": jwt.encode(good | {"sub": "mallory"}, key, algorithm="HS256"),
        "another user's id": jwt.encode(good | {"uid": "0192f7c4-6a1e-7c3b-8e55-9d2f4b1a7c10"}, key,
                                        algorithm="HS256"),
        "credential grant": make_grant(grant_key(SECRET), run_id="r1", secret_name="db", node_id="n", step_id="s",
                                       agent_id="a1"),
        "callback token": make_token(callback_key(SECRET), "r1", "n", "s", "d1", int(time.time()) + 600),
        "garbage": "not-a-token",
        "agent token": "lo_agt_0000000000000000000000000000",
        "malformed API key": "lo_k_123_abc",
    }
    before = await stream_head(platform.nats_url)
    for name, token in forged.items():
        body = problem(await c.get("/api/users", headers=bearer(token)), 401, "invalid_token")
        assert body["detail"], name
    expired = jwt.encode(good | {"iat": int(time.time()) - 7200, "exp": int(time.time()) - 60}, key,
                         algorithm="HS256")
    problem(await c.get("/api/users", headers=bearer(expired)), 401, "token_expired")
    r = await c.get("/api/users", headers={"Authorization": "Basic YWRtaW46eA=="})
    problem(r, 401, "invalid_token")
    assert r.headers["WWW-Authenticate"] == "Bearer"
    # a credential present and invalid is 401 even next to a valid one
    problem(await c.get("/api/users", headers=admin | {"X-API-Key": "lo_k_00000000000000000000000000000000_x"}),
            401, "invalid_token")
    # credentials in the query string are refused, valid or not
    token = admin["Authorization"].removeprefix("Bearer ")
    for name in ("access_token", "token", "api_key"):
        problem(await c.get("/api/users", params={name: token}), 401, "invalid_token")
        problem(await c.get("/api/users", params={name: token}, headers=admin), 401, "invalid_token")
    assert await stream_head(platform.nats_url) == before, "a refused credential appended an event"


async def test_revoked_and_expired_api_keys_are_401(platform: Platform) -> None:
    c = platform.client
    admin = bearer(await token_of(c, "admin", ADMIN_PASSWORD))
    soon = datetime.now(UTC) + timedelta(seconds=3)
    r = await c.post("/api/auth/api-keys", headers=admin,
                     json={"name": "short-lived", "roles": ["admin"], "expires_at": soon.isoformat()})
    assert r.status_code == 201, r.text
    short = r.json()["key"]
    r = await c.post("/api/auth/api-keys", headers=admin, json={"name": "to revoke", "roles": ["admin"]})
    revoked = r.json()["key"]
    assert (await c.get("/api/users", headers={"X-API-Key": short})).status_code == 200
    assert (await c.get("/api/users", headers={"X-API-Key": revoked})).status_code == 200
    assert (await c.delete(f"/api/auth/api-keys/{r.json()['key_id']}", headers=admin)).status_code == 204
    before = await stream_head(platform.nats_url)
    problem(await c.get("/api/users", headers={"X-API-Key": revoked}), 401, "invalid_token")
    problem(await c.get("/api/users", headers=bearer(revoked)), 401, "invalid_token")
    tampered = short[:-4] + ("AAAA" if not short.endswith("AAAA") else "BBBB")
    problem(await c.get("/api/users", headers={"X-API-Key": tampered}), 401, "invalid_token")

    async def expired() -> bool:
        return (await c.get("/api/users", headers={"X-API-Key": short})).status_code == 401

    await eventually(expired, timeout=30, what="the API key to expire")
    problem(await c.get("/api/users", headers={"X-API-Key": short}), 401, "token_expired")
    assert await stream_head(platform.nats_url) == before


async def test_removing_a_role_and_deactivating_take_effect_within_the_cache_ttl(platform: Platform) -> None:
    c = platform.client
    admin = bearer(await token_of(c, "admin", ADMIN_PASSWORD))
    bob = await make_user(c, admin, "bob", ["admin", "operator"])
    bob_token = bearer(await token_of(c, "bob", "bob-password-1"))
    assert (await c.get("/api/users", headers=bob_token)).status_code == 200
    changed = time.monotonic()
    r = await c.patch(f"/api/users/{bob['user_id']}", headers=admin, json={"roles": ["operator"]})
    assert r.status_code == 200, r.text

    async def refused() -> bool:
        return (await c.get("/api/users", headers=bob_token)).status_code == 403

    await eventually(refused, timeout=30, what="bob's admin role to be gone")
    assert time.monotonic() - changed < ROLE_CACHE_S + 5  # within the cache TTL (plus a loaded machine's slack)
    body = problem(await c.get("/api/users", headers=bob_token), 403, "forbidden")
    assert body["required_role"] == "admin"
    me = (await c.get("/api/auth/me", headers=bob_token)).json()
    assert me["roles"] == ["operator"]  # from the projection, not from the token

    r = await c.patch(f"/api/users/{bob['user_id']}", headers=admin, json={"is_active": False})
    assert r.status_code == 200, r.text
    assert r.json()["is_active"] is False

    async def locked_out() -> bool:
        return (await c.get("/api/auth/me", headers=bob_token)).status_code == 401

    await eventually(locked_out, timeout=30, what="bob's token to stop working")
    problem(await c.get("/api/auth/me", headers=bob_token), 401, "invalid_token")
    problem(await c.post("/api/auth/login", json={"username": "bob", "password": "bob-password-1"}), 401,
            "invalid_credentials")
    r = await c.patch(f"/api/users/{bob['user_id']}", headers=admin, json={"is_active": True})
    assert r.json()["is_active"] is True
    assert (await c.get("/api/auth/me", headers=bob_token)).status_code == 200  # reactivated: the token works


async def test_ten_failed_logins_then_429_even_with_the_right_password(platform: Platform) -> None:
    c = platform.client
    admin = bearer(await token_of(c, "admin", ADMIN_PASSWORD))
    await make_user(c, admin, "frank", ["viewer"])
    for _ in range(10):
        problem(await c.post("/api/auth/login", json={"username": "frank", "password": "wrong-password"}), 401,
                "invalid_credentials")
    r = await c.post("/api/auth/login", json={"username": "frank", "password": "frank-password-1"})
    body = problem(r, 429, "too_many_login_attempts")
    assert body["retryable"] is True
    assert 1 <= int(r.headers["Retry-After"]) <= 15 * 60 + 1
    assert body["retry_after_seconds"] == int(r.headers["Retry-After"])
    # the counter is per username: another user from the same address still logs in
    assert (await c.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})).status_code == 200

    async def audited() -> list[dict[str, Any]]:
        page = (await c.get("/api/audit", headers=admin, params={"category": "auth", "action": "login",
                                                                 "outcome": "rejected"})).json()
        return [i for i in page["items"] if i["meta"].get("code") == "too_many_login_attempts"]

    assert await eventually(audited, what="the throttled login's audit record")
