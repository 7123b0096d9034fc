"""Login, logout, the caller's identity, password change and API keys (api.md §2.3).

Login is open (rate limited per username and client address); the others take a principal. The gateway appends
the events (``user_logged_in``, ``login_failed``, ``user_logged_out``, ``user_password_changed``,
``api_key_created``, ``api_key_revoked``) itself, audits every decision (category ``auth``, or ``user_mgmt`` for a
password change) and, where the answer reads a projection, waits for it.
"""

from __future__ import annotations

import secrets
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from ckp_core.errors import ConcurrencyError
from ckp_core.events import (
    ANONYMOUS,
    Actor,
    ApiKeyCreated,
    ApiKeyRevoked,
    LoginFailed,
    UserLoggedIn,
    UserLoggedOut,
    UserPasswordChanged,
    format_time,
)
from langorch_gateway import auditing, auth, deps, users
from langorch_gateway.credentials import authority
from langorch_gateway.dispatch import min_position, ryw
from langorch_gateway.problems import ApiProblem, problem_response
from langorch_gateway.queries import Limit, Offset, Where, fetch_page

router = APIRouter()

STALE = {"X-LangOrch-Consistency": "stale"}
Roles = list[auth.Role]


class LoginIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(min_length=1, max_length=128)
    password: str = Field(min_length=1, max_length=users.PASSWORD_MAX)
    session: bool = False


class PasswordIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    current_password: str = Field(min_length=1, max_length=users.PASSWORD_MAX)
    new_password: str = Field(min_length=users.PASSWORD_MIN, max_length=users.PASSWORD_MAX)


class ApiKeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"\S")
    roles: Roles
    description: str | None = Field(None, max_length=2000)
    expires_at: AwareDatetime | None = None


def client_address(request: Request) -> str:
    return request.client.host if request.client is not None else "unknown"


def _secure_cookies(request: Request) -> bool:
    """Cookies are ``Secure`` unless the request came to a loopback host (plain-HTTP local development)."""
    return not users.is_loopback(request.url.hostname or "")


def _clear_cookies(response: Response, request: Request) -> None:
    secure = _secure_cookies(request)
    response.delete_cookie(users.SESSION_COOKIE, path="/", secure=secure, httponly=True, samesite="strict")
    response.delete_cookie(users.CSRF_COOKIE, path="/", secure=secure, samesite="strict")


@router.post("/api/auth/login")
async def login(request: Request, body: LoginIn) -> Response:
    """Exchange a username and password for a user token (and, with ``session``, the console's cookies)."""
    app = deps.clients(request)
    me = authority(request)
    client = client_address(request)
    throttle = users.LoginThrottle(app.js)
    meta: dict[str, Any] = {"username": body.username, "session": body.session, "client_ip": client}
    wait = await throttle.retry_after(body.username, client)
    if wait is not None:
        await auditing.decided(request, "auth", "login", resource_type="user", resource_id=body.username,
                               outcome="rejected", meta=meta, code="too_many_login_attempts",
                               detail=f"{users.LOGIN_MAX_FAILURES} failed logins in 15 minutes")
        response = problem_response(request, "too_many_login_attempts", f"too many failed logins for this user from "
                                    f"this address; retry in {wait} s", retry_after_seconds=wait)
        response.headers["Retry-After"] = str(wait)
        return response
    row = await app.pool.fetchrow("SELECT user_id, username, password_hash, is_active, roles FROM users "
                                  "WHERE username = $1", body.username)
    matches = await users.verify_password(row["password_hash"] if row is not None else None, body.password)
    if row is None or not matches or not row["is_active"]:
        await throttle.failed(body.username, client)
        if row is not None:
            reason = "invalid_password" if not matches else "inactive"
            await users.append_at_head(app.store, "user", body.username, [LoginFailed(
                user_id=row["user_id"], username=body.username, reason=reason, client_ip=client)],
                actor=ANONYMOUS, causation_id=request.state.request_id)
        await auditing.decided(request, "auth", "login_failed", resource_type="user", resource_id=body.username,
                               outcome="rejected", meta=meta, code="invalid_credentials")
        raise ApiProblem("invalid_credentials", "unknown username, wrong password or deactivated user")
    await throttle.succeeded(body.username, client)
    roles = users.roles_of(row["roles"])
    csrf = secrets.token_urlsafe(32) if body.session else None
    issued = users.issue_token(me.token_key, username=body.username, user_id=row["user_id"], roles=roles,
                               minutes=app.settings.auth_token_expire_minutes, csrf=csrf)
    actor = Actor(kind="user", id=body.username)
    [position] = await users.append_at_head(app.store, "user", body.username, [UserLoggedIn(
        user_id=row["user_id"], username=body.username, session=body.session, client_ip=client)],
        actor=actor, causation_id=request.state.request_id)
    await auditing.decided(request, "auth", "login", resource_type="user", resource_id=body.username, meta=meta,
                           actor=actor)
    response = JSONResponse({"access_token": issued.token, "token_type": "bearer", "expires_in": issued.expires_in,
                             "identity": actor.render(), "roles": sorted(roles)},
                            headers={"X-LangOrch-Position": str(position), "Cache-Control": "no-store"})
    if csrf is not None:
        secure = _secure_cookies(request)
        response.set_cookie(users.SESSION_COOKIE, issued.token, max_age=issued.expires_in, path="/", secure=secure,
                            httponly=True, samesite="strict")
        response.set_cookie(users.CSRF_COOKIE, csrf, max_age=issued.expires_in, path="/", secure=secure,
                            httponly=False, samesite="strict")
    return response


@router.post("/api/auth/logout", status_code=204)
async def logout(request: Request, principal: auth.Viewer) -> Response:
    """End the caller's token or session: its ``jti`` is refused until it would have expired; cookies cleared."""
    app = deps.clients(request)
    headers: dict[str, str] = {}
    if principal.kind == "user" and principal.token_id is not None and principal.expires_at is not None:
        await users.denylist(app.js, principal.token_id, principal.expires_at)
        assert principal.actor.id is not None  # a user principal is always named
        [position] = await users.append_at_head(app.store, "user", principal.actor.id, [UserLoggedOut(
            user_id=principal.user_id or "", username=principal.actor.id)], actor=principal.actor,
            causation_id=request.state.request_id)
        headers["X-LangOrch-Position"] = str(position)
    await auditing.decided(request, "auth", "logout", resource_type=principal.kind, resource_id=principal.actor.id,
                           actor=principal.actor)
    response = Response(status_code=204, headers=headers)
    _clear_cookies(response, request)
    return response


@router.get("/api/auth/me")
async def me(request: Request, principal: auth.Viewer) -> JSONResponse:
    """Who the caller is, with which roles, and whether auth is enabled."""
    app = deps.clients(request)
    email = full_name = None
    if principal.kind == "user" and principal.actor.id is not None:
        user = await authority(request).cache.get(app.pool, principal.actor.id)
        if user is not None:
            email, full_name = user.email, user.full_name
    return JSONResponse({
        "identity": principal.actor.render(), "kind": principal.kind, "roles": sorted(principal.roles),
        "user_id": principal.user_id, "email": email, "full_name": full_name,
        "auth_enabled": app.settings.auth_enabled,
        "expires_at": format_time(principal.expires_at) if principal.expires_at is not None else None,
    })


@router.post("/api/auth/password", status_code=204)
async def change_password(request: Request, principal: auth.Viewer, body: PasswordIn) -> Response:
    """Change the calling user's own password (the current one is checked)."""
    if principal.kind != "user" or principal.actor.id is None:
        raise ApiProblem("forbidden", "only a user (logged in with a user token or a session) has a password")
    app = deps.clients(request)
    me_ = authority(request)
    username = principal.actor.id
    client = client_address(request)
    throttle = users.LoginThrottle(app.js)
    wait = await throttle.retry_after(username, client)
    if wait is not None:
        raise ApiProblem("too_many_login_attempts", f"too many failed password checks; retry in {wait} s",
                         retry_after_seconds=wait)
    meta = {"username": username}
    async with users.users_locked(app.pool, me_.users_lock):
        await app.projector.wait(await users.last_user_position(app.js), app.settings.ryw_timeout_ms / 1000)
        row = await app.pool.fetchrow("SELECT user_id, password_hash FROM users WHERE username = $1", username)
        if row is None or not await users.verify_password(row["password_hash"], body.current_password):
            await throttle.failed(username, client)
            await auditing.decided(request, "user_mgmt", "change_password", resource_type="user",
                                   resource_id=row["user_id"] if row else None, outcome="rejected", meta=meta,
                                   code="invalid_credentials", actor=principal.actor)
            raise ApiProblem("invalid_credentials", "the current password is wrong")
        digest = await users.hash_password(body.new_password)
        head = await app.store.head("user", username)
        try:
            [position] = await users.append(app.store, "user", username, head, [UserPasswordChanged(
                user_id=row["user_id"], username=username, password_hash=digest)], actor=principal.actor,
                causation_id=request.state.request_id)
        except ConcurrencyError as exc:
            raise ApiProblem("unavailable", "the user is being changed concurrently; retry", status=503) from exc
    await auditing.decided(request, "user_mgmt", "change_password", resource_type="user", resource_id=row["user_id"],
                           meta=meta, actor=principal.actor)
    projected = await ryw(request, position)
    return Response(status_code=204, headers={"X-LangOrch-Position": str(position)} | ({} if projected else STALE))


# -- API keys ------------------------------------------------------------------------------------------------------


async def _key_row(request: Request, key_id: str) -> Any:
    row = await deps.clients(request).pool.fetchrow(
        f"SELECT * FROM {users.API_KEYS_VIEW} WHERE key_id = $1", key_id)  # noqa: S608 (a constant view)
    if row is None:
        raise ApiProblem("not_found", f"API key {key_id} not found", resource="api_key")
    return row


@router.get("/api/auth/api-keys")
async def list_api_keys(
    request: Request, principal: auth.Admin, db: deps.Pool,
    revoked: Annotated[bool | None, Query()] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of API keys, newest first (``revoked``: only revoked ones, or only live ones)."""
    headers = await min_position(request)
    where = Where()
    if revoked is not None:
        where.add("revoked_at IS NOT NULL" if revoked else "revoked_at IS NULL")
    rows, total = await fetch_page(db, users.API_KEYS_VIEW, where, "created_at DESC, key_id DESC", limit, offset)
    return JSONResponse({"items": [users.api_key_out(r) for r in rows], "total": total, "limit": limit,
                         "offset": offset}, headers=headers)


@router.post("/api/auth/api-keys", status_code=201)
async def create_api_key(request: Request, principal: auth.Admin, body: ApiKeyIn) -> JSONResponse:
    """Create an API key with fixed roles; the answer is the only time the key is shown (an idempotent replay
    answers ``key: null``)."""
    if body.expires_at is not None and body.expires_at <= datetime.now(UTC):
        raise ApiProblem("validation_failed", "expires_at must be in the future",
                         errors={"expires_at": ["Must be in the future"]})
    app = deps.clients(request)
    key_id, key = users.new_api_key()
    roles = sorted(set(body.roles))
    data = ApiKeyCreated(key_id=key_id, name=body.name.strip(), description=body.description, roles=roles,
                         key_sha256=users.sha256_hex(key), expires_at=body.expires_at)
    [position] = await users.append(app.store, "api_key", key_id, None, [data], actor=principal.actor,
                                    causation_id=request.state.request_id)
    await auditing.decided(request, "auth", "api_key_create", resource_type="api_key", resource_id=key_id,
                           meta={"name": data.name, "roles": roles, "expires_at": body.expires_at and format_time(
                               body.expires_at)}, actor=principal.actor)
    request.state.idempotency_withhold = ("key",)  # a replay of this answer must not show the key again
    headers = {"Location": f"/api/auth/api-keys/{key_id}", "X-LangOrch-Position": str(position),
               "Cache-Control": "no-store"}
    if await ryw(request, position):
        out = users.api_key_out(await _key_row(request, key_id))
    else:
        out = {"key_id": key_id, "name": data.name, "description": data.description, "roles": roles,
               "created_by": principal.actor.render(), "created_at": format_time(datetime.now(UTC)),
               "expires_at": body.expires_at and format_time(body.expires_at), "last_used_at": None,
               "revoked_at": None}
        headers |= STALE
    return JSONResponse(out | {"key": key}, status_code=201, headers=headers)


@router.delete("/api/auth/api-keys/{key_id}", status_code=204)
async def revoke_api_key(request: Request, principal: auth.Admin, key_id: str) -> Response:
    """Revoke an API key (at once on this replica; already revoked: nothing more happens)."""
    app = deps.clients(request)
    head = await app.store.head("api_key", key_id)
    if head is None:
        raise ApiProblem("not_found", f"API key {key_id} not found", resource="api_key")
    await ryw(request, head.position)
    row = await _key_row(request, key_id)
    if row["revoked_at"] is not None:
        return Response(status_code=204)
    try:
        [position] = await users.append(app.store, "api_key", key_id, head, [ApiKeyRevoked(key_id=key_id)],
                                        actor=principal.actor, causation_id=request.state.request_id)
    except ConcurrencyError:  # revoked concurrently by another request: it is revoked either way
        authority(request).keys.forget(key_id)
        return Response(status_code=204)
    await auditing.decided(request, "auth", "api_key_revoke", resource_type="api_key", resource_id=key_id,
                           meta={"name": row["name"]}, actor=principal.actor)
    projected = await ryw(request, position)
    authority(request).keys.forget(key_id)  # the projector's watch forgets it too (app.py); this replica at once
    return Response(status_code=204, headers={"X-LangOrch-Position": str(position)} | ({} if projected else STALE))
