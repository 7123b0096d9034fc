"""api.md §2.1, §2.3 with auth on, against the real stack: the bootstrap admin, login (bearer token and console
session), ``/api/auth/me``, logout (the token's ``jti`` is refused afterwards), password change, users and API
keys, and the events and audit records the gateway writes for them (never a password hash in a view)."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from ckp_core.subjects import EVENT_STREAM
from langorch_infra.jetstream import connect
from tests.helpers import Platform, eventually, platform_of, problem

pytestmark = pytest.mark.integration

SECRET = "test-auth-secret-key-0123456789-abcdefghijklmnop"
ADMIN_PASSWORD = "bootstrap-admin-password-1"
AUTH_ON = {"auth_enabled": True, "auth_secret_key": SECRET, "bootstrap_admin_password": ADMIN_PASSWORD}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False,
                           gateway_settings=AUTH_ON) as p:
        yield p


async def login(c: httpx.AsyncClient, username: str, password: str, **extra: Any) -> dict[str, Any]:
    r = await c.post("/api/auth/login", json={"username": username, "password": password, **extra})
    assert r.status_code == 200, r.text
    return r.json()  # type: ignore[no-any-return]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def admin_headers(c: httpx.AsyncClient) -> dict[str, str]:
    return bearer((await login(c, "admin", ADMIN_PASSWORD))["access_token"])


async def user_events(nats_url: str, username: str) -> list[dict[str, Any]]:
    """Every event of one user aggregate, straight from LO_EVT."""
    nc = await connect(nats_url, "test-user-events")
    try:
        js = nc.jetstream()
        sub = await js.subscribe(f"lo.evt.user.{username}.>", ordered_consumer=True, stream=EVENT_STREAM)
        out: list[dict[str, Any]] = []
        try:
            while True:
                msg = await sub.next_msg(timeout=1)
                out.append(json.loads(msg.data))
        except TimeoutError:
            pass
        await sub.unsubscribe()
        return out
    finally:
        await nc.close()


async def test_the_bootstrap_admin_logs_in_and_reads_who_it_is(platform: Platform) -> None:
    c = platform.client
    assert (await c.get("/api/health")).json()["auth"] == "enabled"
    r = await c.get("/api/health")
    assert r.headers["X-LangOrch-Auth"] == "enabled"
    problem(await c.get("/api/auth/me"), 401, "unauthenticated")
    body = await login(c, "admin", ADMIN_PASSWORD)
    assert set(body) == {"access_token", "token_type", "expires_in", "identity", "roles"}
    assert (body["token_type"], body["identity"], body["roles"]) == ("bearer", "user:admin", ["admin"])
    assert 3500 <= body["expires_in"] <= 3600
    me = (await c.get("/api/auth/me", headers=bearer(body["access_token"]))).json()
    assert set(me) == {"identity", "kind", "roles", "user_id", "email", "full_name", "auth_enabled", "expires_at"}
    assert (me["identity"], me["kind"], me["roles"], me["auth_enabled"]) == ("user:admin", "user", ["admin"], True)
    assert me["user_id"]
    assert me["expires_at"].endswith("Z")
    events = await user_events(platform.nats_url, "admin")
    assert [e["type"] for e in events][:2] == ["user_created", "user_logged_in"]
    assert events[0]["actor"] == {"kind": "system", "id": "gateway"}
    assert events[0]["data"]["password_hash"].startswith("$argon2id$")


async def test_wrong_password_is_401_and_audited_without_the_password(platform: Platform) -> None:
    c = platform.client
    wrong = problem(await c.post("/api/auth/login", json={"username": "admin", "password": "not-the-password"}),
                    401, "invalid_credentials")
    unknown = problem(await c.post("/api/auth/login", json={"username": "nobody-here", "password": "whatever-it-is"}),
                      401, "invalid_credentials")
    assert wrong["detail"] == unknown["detail"]  # the answer does not tell which part was wrong
    problem(await c.post("/api/auth/login", json={"username": "admin"}), 422, "validation_failed")
    headers = await admin_headers(c)

    async def failures() -> list[dict[str, Any]]:
        r = await c.get("/api/audit", params={"category": "auth", "action": "login_failed"}, headers=headers)
        assert r.status_code == 200, r.text
        return r.json()["items"]  # type: ignore[no-any-return]

    items = await eventually(failures, what="the failed logins' audit records")
    assert {i["resource_id"] for i in items} >= {"admin", "nobody-here"}
    assert all(i["outcome"] == "rejected" and i["auth_disabled"] is False for i in items)
    assert "not-the-password" not in json.dumps(items)
    types = [e["type"] for e in await user_events(platform.nats_url, "admin")]
    assert "login_failed" in types
    assert await user_events(platform.nats_url, "nobody-here") == []  # an unknown name appends nothing


async def test_users_crud_roles_and_the_last_admin(platform: Platform) -> None:
    c = platform.client
    h = await admin_headers(c)
    r = await c.post("/api/users", headers=h, json={"username": "carol", "email": "carol@example.com",
                                                    "password": "carol-password-1", "full_name": "Carol C"})
    assert r.status_code == 201, r.text
    carol = r.json()
    assert set(carol) == {"user_id", "username", "email", "full_name", "roles", "is_active", "created_at",
                          "updated_at", "last_login_at"}
    assert (carol["roles"], carol["is_active"], carol["last_login_at"]) == (["viewer"], True, None)
    assert r.headers["Location"] == f"/api/users/{carol['user_id']}"
    problem(await c.post("/api/users", headers=h, json={"username": "carol", "email": "c2@example.com",
                                                        "password": "another-password"}), 409, "user_exists")
    body = problem(await c.post("/api/users", headers=h, json={"username": "-bad", "email": "no-at-sign",
                                                               "password": "short", "roles": ["boss"]}),
                   422, "validation_failed")
    assert set(body["errors"]) == {"username", "email", "password", "roles.0"}
    problem(await c.post("/api/users", headers=h, json={"username": "x1", "email": "x@e.com",
                                                        "password": "long-enough-pw", "colour": "red"}),
            422, "unknown_field")

    r = await c.post("/api/users", headers=h, json={"username": "dave", "email": "dave@example.com",
                                                    "password": "dave-password-1", "role": "operator"})
    assert r.status_code == 201, r.text
    assert r.json()["roles"] == ["operator"]  # the single-role alias

    listed = (await c.get("/api/users", headers=h, params={"role": "operator"})).json()
    assert [u["username"] for u in listed["items"]] == ["dave"]
    listed = (await c.get("/api/users", headers=h, params={"search": "CAROL@", "sort": "created_at"})).json()
    assert [u["username"] for u in listed["items"]] == ["carol"]
    assert "password_hash" not in json.dumps(listed)

    # a user reads themselves, not others; a viewer cannot list
    ct = (await login(c, "carol", "carol-password-1"))["access_token"]
    assert (await c.get(f"/api/users/{carol['user_id']}", headers=bearer(ct))).json()["username"] == "carol"
    assert (await c.get("/api/users/carol", headers=bearer(ct))).status_code == 200  # by username too
    admin_id = (await c.get("/api/auth/me", headers=h)).json()["user_id"]
    problem(await c.get(f"/api/users/{admin_id}", headers=bearer(ct)), 403, "forbidden")
    assert problem(await c.get("/api/users", headers=bearer(ct)), 403, "forbidden")["required_role"] == "admin"

    r = await c.patch(f"/api/users/{carol['user_id']}", headers=h, json={"roles": ["approver", "operator"],
                                                                          "full_name": None})
    assert r.status_code == 200, r.text
    assert (r.json()["roles"], r.json()["full_name"]) == (["approver", "operator"], None)
    problem(await c.patch(f"/api/users/{carol['user_id']}", headers=h, json={"email": None}), 422,
            "validation_failed")
    problem(await c.patch("/api/users/no-such-user", headers=h, json={"full_name": "x"}), 404, "not_found")

    # the only admin can neither lose the role, be deactivated nor be deleted
    problem(await c.patch(f"/api/users/{admin_id}", headers=h, json={"roles": ["viewer"]}), 409, "last_admin")
    problem(await c.patch(f"/api/users/{admin_id}", headers=h, json={"is_active": False}), 409, "last_admin")
    problem(await c.delete(f"/api/users/{admin_id}", headers=h), 409, "last_admin")

    r = await c.delete(f"/api/users/{carol['user_id']}", headers=h)
    assert r.status_code == 204, r.text
    problem(await c.get(f"/api/users/{carol['user_id']}", headers=h), 404, "not_found")
    problem(await c.get("/api/auth/me", headers=bearer(ct)), 401, "invalid_token")  # a deleted user's token
    # a new carol: the old carol's token stays refused, the new one's works at once
    r = await c.post("/api/users", headers=h, json={"username": "carol", "email": "carol2@example.com",
                                                    "password": "carol-password-2"})
    assert r.status_code == 201, r.text
    assert r.json()["user_id"] != carol["user_id"]
    problem(await c.get("/api/auth/me", headers=bearer(ct)), 401, "invalid_token")
    new_token = (await login(c, "carol", "carol-password-2"))["access_token"]
    assert (await c.get("/api/auth/me", headers=bearer(new_token))).json()["user_id"] == r.json()["user_id"]
    types = [e["type"] for e in await user_events(platform.nats_url, "carol")]
    assert types[0] == "user_created"
    assert types.count("user_created") == 2
    assert "user_deleted" in types
    assert "user_updated" in types


async def test_password_change_and_logout(platform: Platform) -> None:
    c = platform.client
    h = await admin_headers(c)
    r = await c.post("/api/users", headers=h, json={"username": "erin", "email": "erin@example.com",
                                                    "password": "erin-password-1"})
    assert r.status_code == 201, r.text
    token = (await login(c, "erin", "erin-password-1"))["access_token"]
    problem(await c.post("/api/auth/password", headers=bearer(token),
                         json={"current_password": "wrong-password", "new_password": "erin-password-2"}),
            401, "invalid_credentials")
    body = problem(await c.post("/api/auth/password", headers=bearer(token),
                                json={"current_password": "erin-password-1", "new_password": "short"}),
                   422, "validation_failed")
    assert "new_password" in body["errors"]
    r = await c.post("/api/auth/password", headers=bearer(token),
                     json={"current_password": "erin-password-1", "new_password": "erin-password-2"})
    assert r.status_code == 204, r.text
    problem(await c.post("/api/auth/login", json={"username": "erin", "password": "erin-password-1"}), 401,
            "invalid_credentials")
    token = (await login(c, "erin", "erin-password-2"))["access_token"]
    assert (await c.get("/api/auth/me", headers=bearer(token))).status_code == 200
    r = await c.post("/api/auth/logout", headers=bearer(token))
    assert r.status_code == 204, r.text
    problem(await c.get("/api/auth/me", headers=bearer(token)), 401, "invalid_token")
    types = [e["type"] for e in await user_events(platform.nats_url, "erin")]
    assert {"user_password_changed", "user_logged_out"} <= set(types)

    async def password_audited() -> list[dict[str, Any]]:
        page = (await c.get("/api/audit", headers=h, params={"category": "user_mgmt,auth", "limit": 500})).json()
        return [i for i in page["items"] if i["action"] == "change_password" and i["outcome"] == "accepted"]

    await eventually(password_audited, what="the password change's audit record")
    views = [(await c.get("/api/audit", headers=h, params={"limit": 500})).text,
             (await c.get("/api/users", headers=h)).text, (await c.get("/api/users/erin", headers=h)).text]
    for text in views:  # hashes travel only in the events; no password in any view either
        assert "$argon2" not in text
        assert "erin-password-" not in text
    # an API key has no password
    key = (await c.post("/api/auth/api-keys", headers=h, json={"name": "ci", "roles": ["viewer"]})).json()["key"]
    problem(await c.post("/api/auth/password", headers={"X-API-Key": key},
                         json={"current_password": "x", "new_password": "long-enough-password"}), 403, "forbidden")


async def test_console_session_needs_its_csrf_header(platform: Platform) -> None:
    async with httpx.AsyncClient(base_url=platform.base_url, timeout=30) as fresh:  # keeps its own cookie jar
        r = await fresh.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD,
                                                      "session": True})
    assert r.status_code == 200, r.text
    cookies = {k.lower(): v for k, v in r.headers.multi_items() if k.lower() == "set-cookie"}
    raw = [v for k, v in r.headers.multi_items() if k.lower() == "set-cookie"]
    session = next(v for v in raw if v.startswith("langorch_session="))
    csrf_cookie = next(v for v in raw if v.startswith("langorch_csrf="))
    assert cookies
    assert "HttpOnly" in session
    assert "SameSite=strict" in session or "SameSite=Strict" in session
    assert "Path=/" in session
    assert "Secure" not in session  # the request came to 127.0.0.1
    assert "HttpOnly" not in csrf_cookie
    jar = {"langorch_session": r.cookies["langorch_session"], "langorch_csrf": r.cookies["langorch_csrf"]}
    async with httpx.AsyncClient(base_url=platform.base_url, cookies=jar, timeout=30) as browser:
        assert (await browser.get("/api/auth/me")).json()["identity"] == "user:admin"
        key = {"name": "from the console", "roles": ["viewer"]}
        problem(await browser.post("/api/auth/api-keys", json=key), 403, "csrf_failed")
        problem(await browser.post("/api/auth/api-keys", json=key, headers={"X-CSRF-Token": "nope"}), 403,
                "csrf_failed")
        r = await browser.post("/api/auth/api-keys", json=key, headers={"X-CSRF-Token": jar["langorch_csrf"]})
        assert r.status_code == 201, r.text
        assert r.json()["created_by"] == "user:admin"
        r = await browser.post("/api/auth/logout", headers={"X-CSRF-Token": jar["langorch_csrf"]})
        assert r.status_code == 204, r.text
        cleared = [v for k, v in r.headers.multi_items() if k.lower() == "set-cookie"]
        assert any(v.startswith("langorch_session=") and "Max-Age=0" in v for v in cleared)
    async with httpx.AsyncClient(base_url=platform.base_url, cookies=jar, timeout=30) as stale:
        problem(await stale.get("/api/auth/me"), 401, "invalid_token")


async def test_api_keys_create_list_use_and_revoke(platform: Platform) -> None:
    c = platform.client
    h = await admin_headers(c)
    r = await c.post("/api/auth/api-keys", headers=h, json={"name": "deploy bot", "roles": ["operator"],
                                                            "description": "CI"})
    assert r.status_code == 201, r.text
    created = r.json()
    assert set(created) == {"key_id", "name", "description", "roles", "created_by", "created_at", "expires_at",
                            "last_used_at", "revoked_at", "key"}
    key = created["key"]
    assert key.startswith(f"lo_{created['key_id']}_")
    assert (created["roles"], created["created_by"]) == (["operator"], "user:admin")
    me = (await c.get("/api/auth/me", headers={"X-API-Key": key})).json()
    assert (me["identity"], me["kind"], me["roles"]) == (f"api_key:{created['key_id']}", "api_key", ["operator"])
    assert (await c.get("/api/auth/me", headers=bearer(key))).status_code == 200  # as a bearer too

    async def used() -> dict[str, Any]:
        page = (await c.get("/api/auth/api-keys", headers=h)).json()
        return next(k for k in page["items"] if k["key_id"] == created["key_id"])

    listed = await used()
    assert "key" not in listed
    assert listed["last_used_at"] is not None
    assert key not in json.dumps((await c.get("/api/auth/api-keys", headers=h)).json())
    problem(await c.post("/api/auth/api-keys", headers={"X-API-Key": key}, json={"name": "x", "roles": []}), 403,
            "forbidden")  # an operator key cannot mint keys
    body = problem(await c.post("/api/auth/api-keys", headers=h, json={"name": "", "roles": ["root"],
                                                                       "expires_at": "2020-01-01T00:00:00Z"}),
                   422, "validation_failed")
    assert {"name", "roles.0"} <= set(body["errors"])
    problem(await c.post("/api/auth/api-keys", headers=h, json={"name": "old", "roles": [],
                                                                "expires_at": "2020-01-01T00:00:00Z"}),
            422, "validation_failed")

    r = await c.delete(f"/api/auth/api-keys/{created['key_id']}", headers=h)
    assert r.status_code == 204, r.text
    problem(await c.get("/api/auth/me", headers={"X-API-Key": key}), 401, "invalid_token")
    assert (await c.delete(f"/api/auth/api-keys/{created['key_id']}", headers=h)).status_code == 204
    problem(await c.delete("/api/auth/api-keys/k_00000000000000000000000000000000", headers=h), 404, "not_found")
    revoked = (await c.get("/api/auth/api-keys", headers=h, params={"revoked": "true"})).json()["items"]
    assert created["key_id"] in {k["key_id"] for k in revoked}
    live = (await c.get("/api/auth/api-keys", headers=h, params={"revoked": "false"})).json()["items"]
    assert created["key_id"] not in {k["key_id"] for k in live}

    # an idempotent replay of the creation answers the same key id without the key
    r1 = await c.post("/api/auth/api-keys", headers=h | {"Idempotency-Key": "k-1"},
                      json={"name": "replayed", "roles": ["viewer"]})
    r2 = await c.post("/api/auth/api-keys", headers=h | {"Idempotency-Key": "k-1"},
                      json={"name": "replayed", "roles": ["viewer"]})
    assert (r1.status_code, r2.status_code) == (201, 201)
    assert r2.headers.get("Idempotent-Replayed") == "true"
    assert r2.json()["key_id"] == r1.json()["key_id"]
    assert r1.json()["key"].startswith("lo_")
    assert r2.json()["key"] is None
    # the key is scoped to the principal: another admin's same key is a new request, and no credential is 401
    r3 = await c.post("/api/auth/api-keys", headers={"X-API-Key": r1.json()["key"], "Idempotency-Key": "k-1"},
                      json={"name": "replayed", "roles": ["viewer"]})
    problem(r3, 403, "forbidden")  # a viewer key: refused, not answered from the admin's replay
    admin_key = (await c.post("/api/auth/api-keys", headers=h, json={"name": "admin 2", "roles": ["admin"]})).json()
    r4 = await c.post("/api/auth/api-keys", headers={"X-API-Key": admin_key["key"], "Idempotency-Key": "k-1"},
                      json={"name": "replayed", "roles": ["viewer"]})
    assert r4.status_code == 201, r4.text
    assert "Idempotent-Replayed" not in r4.headers
    assert r4.json()["key_id"] != r1.json()["key_id"]
    problem(await c.post("/api/auth/api-keys", headers={"Idempotency-Key": "k-1"},
                         json={"name": "replayed", "roles": ["viewer"]}), 401, "unauthenticated")
