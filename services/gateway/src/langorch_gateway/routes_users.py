"""Users (api.md §2.3): a gateway-owned aggregate keyed by username. The gateway appends ``user_created``,
``user_updated``, ``user_deactivated``, ``user_deleted`` and ``user_password_changed`` itself (under the users
lock, after the projection has applied every user event, so usernames stay unique and one active admin always
remains), audits them (category ``user_mgmt``) and waits for the ``users`` projection.

``{user_id}`` in a path also accepts the username (a user id is tried first).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ckp_core.errors import ConcurrencyError
from ckp_core.events import EventData, UserDeactivated, UserDeleted, UserPasswordChanged, UserUpdated
from langorch_gateway import auditing, auth, deps, users
from langorch_gateway.credentials import authority
from langorch_gateway.dispatch import min_position, ryw
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Order, Where, fetch_page

router = APIRouter()

STALE = {"X-LangOrch-Consistency": "stale"}
USERNAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$"
EMAIL = r"^[^@\s]+@[^@\s]+$"
Email = Annotated[str, Field(max_length=254, pattern=EMAIL)]
FullName = Annotated[str, Field(max_length=200)]
Password = Annotated[str, Field(min_length=users.PASSWORD_MIN, max_length=users.PASSWORD_MAX)]


class UserIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    username: str = Field(pattern=USERNAME)
    email: Email
    password: Password
    full_name: FullName | None = None
    roles: list[auth.Role] | None = None
    role: auth.Role | None = Field(None, description="Accepted alias (deprecated): a single role, as roles: [role].")


class UserPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    email: Email | None = None
    full_name: FullName | None = None
    roles: list[auth.Role] | None = None
    role: auth.Role | None = Field(None, description="Accepted alias (deprecated): a single role, as roles: [role].")
    is_active: bool | None = None
    password: Password | None = None


def _roles(roles: list[auth.Role] | None, role: auth.Role | None, fields: set[str]) -> list[str] | None:
    if "role" in fields and "roles" in fields:
        raise ApiProblem("validation_failed", "send roles or its alias role, not both",
                         errors={"role": ["Not allowed together with roles"]})
    if "role" in fields:
        if role is None:
            raise ApiProblem("validation_failed", "role cannot be null", errors={"role": ["Must not be null"]})
        return [role]
    if "roles" in fields:
        if roles is None:
            raise ApiProblem("validation_failed", "roles cannot be null", errors={"roles": ["Must not be null"]})
        return sorted(set(roles))
    return None


async def _find(db: asyncpg.Pool, ident: str) -> asyncpg.Record:
    row = await db.fetchrow(
        f"SELECT {users.USER_COLUMNS} FROM users WHERE user_id = $1 OR username = $1 "  # noqa: S608 (constant)
        "ORDER BY (user_id = $1) DESC LIMIT 1", ident)
    if row is None:
        raise ApiProblem("not_found", f"user {ident} not found", resource="user")
    return row


def _active_admin(roles: Any, is_active: bool) -> bool:
    return is_active and "admin" in users.roles_of(roles)


async def _other_active_admins(db: asyncpg.Pool, user_id: str) -> int:
    return int(await db.fetchval(
        "SELECT count(*) FROM users WHERE is_active AND roles ? 'admin' AND user_id <> $1", user_id))


@router.get("/api/users")
async def list_users(
    request: Request, principal: auth.Admin, db: deps.Pool,
    search: Annotated[str | None, Query(max_length=500)] = None,
    role: Annotated[auth.Role | None, Query()] = None,
    is_active: Annotated[bool | None, Query()] = None,
    sort: Annotated[Literal["username", "created_at"], Query()] = "username",
    order: Order = "asc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of users (``search``: substring of username, email or full name)."""
    headers = await min_position(request)
    where = Where()
    if search:
        term = where.arg(search.lower())
        where.add(f"(strpos(lower(username), {term}) > 0 OR strpos(lower(email), {term}) > 0 "
                  f"OR strpos(lower(COALESCE(full_name, '')), {term}) > 0)")
    if role is not None:
        where.add(f"roles ? {where.arg(role)}")
    if is_active is not None:
        where.add(f"is_active = {where.arg(is_active)}")
    order_sql = f"{sort} {order.upper()}, user_id {order.upper()}"
    rows, total = await fetch_page(db, "users", where, order_sql, limit, offset, columns=users.USER_COLUMNS)
    return JSONResponse({"items": [users.user_out(r) for r in rows], "total": total, "limit": limit,
                         "offset": offset}, headers=headers)


@router.post("/api/users", status_code=201)
async def create_user(request: Request, principal: auth.Admin, body: UserIn) -> JSONResponse:
    """Create a user (roles default to viewer)."""
    app = deps.clients(request)
    roles = _roles(body.roles, body.role, body.model_fields_set) or (["viewer"] if body.roles is None else [])
    meta = {"username": body.username, "email": body.email, "full_name": body.full_name, "roles": roles}
    digest = await users.hash_password(body.password)
    async with (auditing.refusals_audited(request, "user_mgmt", "create", resource_type="user", resource_id=None,
                                          meta=meta),
                users.users_locked(app.pool, authority(request).users_lock)):
        user_id, position = await users.create_user(
            app, username=body.username, email=body.email, full_name=body.full_name, roles=roles,
            password_hash=digest, actor=principal.actor, causation_id=request.state.request_id)
    await auditing.decided(request, "user_mgmt", "create", resource_type="user", resource_id=user_id, meta=meta,
                           actor=principal.actor)
    headers = {"Location": f"/api/users/{user_id}", "X-LangOrch-Position": str(position)}
    if not await ryw(request, position):
        raise ApiProblem("unavailable", "the user was created but the users projection has not applied it yet; "
                         f"read /api/users/{user_id} shortly", status=503)
    return JSONResponse(users.user_out(await _find(app.pool, user_id)), status_code=201, headers=headers)


@router.get("/api/users/{user_id}")
async def get_user(request: Request, principal: auth.Viewer, user_id: str) -> JSONResponse:
    """One user: an admin may read any, a user only themselves."""
    headers = await min_position(request)
    row = await _find(deps.clients(request).pool, user_id) if principal.has("admin") else None
    if row is None:
        if principal.kind != "user" or principal.user_id is None:
            raise ApiProblem("forbidden", "reading a user needs the role 'admin' (or to be that user)",
                             required_role="admin")
        own = await _find(deps.clients(request).pool, principal.user_id)
        if user_id not in (own["user_id"], own["username"]):
            raise ApiProblem("forbidden", "reading another user needs the role 'admin'", required_role="admin")
        row = own
    return JSONResponse(users.user_out(row), headers=headers)


async def _update(request: Request, principal: auth.Principal, user_id: str, body: UserPatch) -> JSONResponse:
    app = deps.clients(request)
    fields = set(body.model_fields_set)
    for name in ("email", "is_active", "password"):
        if name in fields and getattr(body, name) is None:
            raise ApiProblem("validation_failed", f"{name} cannot be null", errors={name: ["Must not be null"]})
    new_roles = _roles(body.roles, body.role, fields)
    digest = await users.hash_password(body.password) if body.password is not None else None
    meta: dict[str, Any] = {k: v for k, v in body.model_dump(exclude_unset=True).items() if k != "password"}
    if digest is not None:
        meta["password_changed"] = True
    async with (auditing.refusals_audited(request, "user_mgmt", "update", resource_type="user",
                                          resource_id=user_id, meta=meta),
                users.users_locked(app.pool, authority(request).users_lock)):
        await users.caught_up(app)
        row = await _find(app.pool, user_id)
        username: str = row["username"]
        roles = new_roles if new_roles is not None else list(users.roles_of(row["roles"]))
        email = body.email if body.email is not None else row["email"]
        full_name = body.full_name if "full_name" in fields else row["full_name"]
        is_active = body.is_active if body.is_active is not None else bool(row["is_active"])
        if (_active_admin(row["roles"], row["is_active"]) and not _active_admin(roles, is_active)
                and await _other_active_admins(app.pool, row["user_id"]) == 0):
            raise ApiProblem("last_admin", f"{username} is the last active admin: make another user an admin first")
        payloads: list[EventData] = []
        profile = (email, full_name, sorted(roles), is_active)
        if profile != (row["email"], row["full_name"], sorted(users.roles_of(row["roles"])), row["is_active"]):
            payloads.append(UserUpdated(user_id=row["user_id"], username=username, email=email, full_name=full_name,
                                        roles=sorted(roles), is_active=is_active))
            if row["is_active"] and not is_active:
                payloads.append(UserDeactivated(user_id=row["user_id"], username=username))
        if digest is not None:
            payloads.append(UserPasswordChanged(user_id=row["user_id"], username=username, password_hash=digest))
        if not payloads:
            return JSONResponse(users.user_out(row))
        try:
            positions = await users.append(app.store, "user", username, await app.store.head("user", username),
                                           payloads, actor=principal.actor, causation_id=request.state.request_id)
        except ConcurrencyError as exc:
            raise ApiProblem("unavailable", "the user is being changed concurrently; retry", status=503) from exc
    authority(request).cache.forget(username)
    action = "deactivate" if any(isinstance(p, UserDeactivated) for p in payloads) else "update"
    await auditing.decided(request, "user_mgmt", action, resource_type="user", resource_id=row["user_id"],
                           meta=meta, actor=principal.actor)
    headers = {"X-LangOrch-Position": str(positions[-1])}
    if not await ryw(request, positions[-1]):
        return JSONResponse(users.user_out(row) | {"email": email, "full_name": full_name, "roles": sorted(roles),
                                                   "is_active": is_active}, headers=headers | STALE)
    return JSONResponse(users.user_out(await _find(app.pool, row["user_id"])), headers=headers)


@router.patch("/api/users/{user_id}")
async def patch_user(request: Request, principal: auth.Admin, user_id: str, body: UserPatch) -> JSONResponse:
    """Change a user's email, full name, roles, active flag or password."""
    return await _update(request, principal, user_id, body)


@router.put("/api/users/{user_id}", deprecated=True)
async def put_user(request: Request, principal: auth.Admin, user_id: str, body: UserPatch) -> JSONResponse:
    """Accepted alias of PATCH (a partial update)."""
    return await _update(request, principal, user_id, body)


@router.delete("/api/users/{user_id}", status_code=204)
async def delete_user(request: Request, principal: auth.Admin, user_id: str) -> Response:
    """Delete a user (never the last active admin); their tokens stop working."""
    app = deps.clients(request)
    async with (auditing.refusals_audited(request, "user_mgmt", "delete", resource_type="user",
                                          resource_id=user_id),
                users.users_locked(app.pool, authority(request).users_lock)):
        await users.caught_up(app)
        row = await _find(app.pool, user_id)
        username: str = row["username"]
        if (_active_admin(row["roles"], row["is_active"])
                and await _other_active_admins(app.pool, row["user_id"]) == 0):
            raise ApiProblem("last_admin", f"{username} is the last active admin: make another user an admin first")
        try:
            [position] = await users.append(app.store, "user", username, await app.store.head("user", username),
                                            [UserDeleted(user_id=row["user_id"], username=username)],
                                            actor=principal.actor, causation_id=request.state.request_id)
        except ConcurrencyError as exc:
            raise ApiProblem("unavailable", "the user is being changed concurrently; retry", status=503) from exc
    authority(request).cache.forget(username)
    await auditing.decided(request, "user_mgmt", "delete", resource_type="user", resource_id=row["user_id"],
                           meta={"username": username}, actor=principal.actor)
    projected = await ryw(request, position)
    return Response(status_code=204, headers={"X-LangOrch-Position": str(position)} | ({} if projected else STALE))
