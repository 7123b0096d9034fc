"""Settings for administrators (api.md §17, §2.3): users and API keys, managed through the API.

* ``/ui/settings/users``: the users (``GET /api/users``, searched and paged from the URL); a new user's form
  (``POST /api/users``, the API's per-field errors beside the fields); a user's roles changed, or the user
  deactivated or reactivated (``PATCH /api/users/{id}``) — the API's refusal, such as removing the last active
  admin (409 ``last_admin``), shown on the list.
* ``/ui/settings/api-keys``: the keys (``GET /api/auth/api-keys``); a new key (``POST /api/auth/api-keys``) whose
  secret is shown once, on the answer to the form — never in a URL, never stored; a key revoked after a
  confirmation page (``DELETE /api/auth/api-keys/{key_id}``).

The API allows every one of these to admins only, so the pages do too: anyone else is refused up front (403),
as the API would refuse them.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlencode

from fastapi import APIRouter, Request
from fastapi.responses import RedirectResponse, Response

from langorch_gateway.ui import routes
from langorch_gateway.ui.console import Console, form_errors, page, path_id, problem_of

router = APIRouter(include_in_schema=False)

ROLES = ("viewer", "operator", "approver", "admin")
USERS = "/ui/settings/users"
KEYS = "/ui/settings/api-keys"
USER_FIELDS = ("username", "full_name", "email", "password")
KEY_PAGE = 200  # the API's largest page: the revoke confirmation looks a key up page by page


async def _posted(request: Request) -> tuple[dict[str, str], list[str]]:
    """A posted form's text fields, and its checked roles (in the order roles are listed)."""
    submitted = await request.form()
    checked = {str(v) for v in submitted.getlist("roles")}
    return ({k: v for k, v in submitted.multi_items() if isinstance(v, str) and k != "roles"},
            [r for r in ROLES if r in checked] + sorted(checked - set(ROLES)))  # unknown ones: the API says so


def _done(path: str, what: str, **more: str) -> RedirectResponse:
    return RedirectResponse(f"{path}?{urlencode({'done': what, **more})}", status_code=303)


# -- users --------------------------------------------------------------------------------------------------------


async def _users(ui: Console, status_code: int = 200, **shown: Any) -> Response:
    query = ui.request.query_params
    search = query.get("search", "").strip()
    limit, offset = routes._int(query.get("limit"), routes.RUNS_PAGE), routes._int(query.get("offset"), 0)
    listing = await ui.get("/api/users", {"search": search, "limit": limit, "offset": offset})
    shown.setdefault("typed", {"roles": ["viewer"]})
    return ui.render("users.html", status_code, listing=listing, search=search, roles=ROLES,
                     pages=routes._pager(ui.request, listing), title="Settings: users", **shown)


@router.get(USERS)
async def users_page(request: Request) -> Response:
    """The users, a new user's form, and each user's roles and active flag to change."""

    async def build(ui: Console) -> Response:
        return await _users(ui)

    return await page(request, build, needs="admin")


@router.post(USERS)
async def create_user(request: Request) -> Response:
    """A new user (``POST /api/users``): username, display name, email, roles and an initial password."""
    form, roles = await _posted(request)

    async def build(ui: Console) -> Response:
        body: dict[str, Any] = {name: form.get(name, "").strip() for name in USER_FIELDS if name != "password"}
        body["password"] = form.get("password", "")
        if not body["full_name"]:
            del body["full_name"]
        body["roles"] = roles
        answer = await ui.send("POST", "/api/users", body, csrf=form.get("csrf_token"))
        if answer.status_code == 201:
            return _done(USERS, f"created user {answer.json()['username']}")
        problem = problem_of(answer)
        errors = form_errors(problem)
        if problem.get("code") == "user_exists":
            errors.setdefault("username", []).append(str(problem.get("detail") or "This username is taken"))
        for key in [k for k in errors if k.startswith("roles.")]:  # one role's error: at the roles
            errors.setdefault("roles", []).extend(errors.pop(key))
        typed = {k: v for k, v in form.items() if k in USER_FIELDS and k != "password"} | {"roles": roles}
        return await _users(ui, answer.status_code, create_problem=problem, create_errors=errors, typed=typed)

    return await page(request, build, needs="admin")


@router.post(USERS + "/{user_id}")
async def change_user(request: Request, user_id: str) -> Response:
    """Set a user's roles (``action=roles`` with the checked ``roles``), or deactivate or reactivate them."""
    form, roles = await _posted(request)
    action = form.get("action", "")

    async def build(ui: Console) -> Response:
        choices: dict[str, dict[str, Any]] = {"roles": {"roles": roles}, "deactivate": {"is_active": False},
                                              "reactivate": {"is_active": True}}
        changes = choices.get(action)
        if changes is None:
            return ui.render("error.html", 422, problem={
                "status": 422, "code": "validation_failed", "title": "Unknown action",
                "detail": "choose roles, deactivate or reactivate", "errors": {"action": ["Unknown action"]}})
        answer = await ui.send("PATCH", f"/api/users/{path_id(user_id)}", changes, csrf=form.get("csrf_token"))
        if answer.status_code == 200:
            changed = answer.json()
            what = {"roles": "roles set", "deactivate": "deactivated", "reactivate": "reactivated"}[action]
            return _done(USERS, f"{changed['username']} {what}")
        return await _users(ui, answer.status_code, action_problem=problem_of(answer), action_user=user_id)

    return await page(request, build, needs="admin")


# -- API keys -----------------------------------------------------------------------------------------------------


async def _keys(ui: Console, status_code: int = 200, **shown: Any) -> Response:
    query = ui.request.query_params
    revoked = query.get("revoked", "false")
    limit, offset = routes._int(query.get("limit"), routes.RUNS_PAGE), routes._int(query.get("offset"), 0)
    listing = await ui.get("/api/auth/api-keys", {"revoked": revoked if revoked in ("true", "false") else None,
                                                  "limit": limit, "offset": offset})
    shown.setdefault("typed", {"roles": ["viewer"]})
    return ui.render("api_keys.html", status_code, listing=listing, revoked=revoked, roles=ROLES,
                     pages=routes._pager(ui.request, listing), title="Settings: API keys", **shown)


@router.get(KEYS)
async def keys_page(request: Request) -> Response:
    """The API keys (live ones by default, ``?revoked=true`` or ``all``), and a new key's form."""

    async def build(ui: Console) -> Response:
        return await _keys(ui)

    return await page(request, build, needs="admin")


def _expiry(value: str) -> str | None:
    """An expiry date (``YYYY-MM-DD`` from a date input) as the start of that day in UTC; anything else as typed,
    so the API reports it."""
    value = value.strip()
    return routes._date_bound(value) if value else None


@router.post(KEYS)
async def create_key(request: Request) -> Response:
    """A new API key: its secret is shown on this answer only, with a hint to copy it now."""
    form, roles = await _posted(request)

    async def build(ui: Console) -> Response:
        body: dict[str, Any] = {"name": form.get("name", ""), "roles": roles}
        if form.get("description", "").strip():
            body["description"] = form["description"].strip()
        if expires := _expiry(form.get("expires_at", "")):
            body["expires_at"] = expires
        answer = await ui.send("POST", "/api/auth/api-keys", body, csrf=form.get("csrf_token"))
        if answer.status_code == 201:
            return ui.render("api_key_created.html", created=answer.json(), title="Settings: new API key")
        problem = problem_of(answer)
        errors = form_errors(problem)
        for key in [k for k in errors if k.startswith("roles.")]:
            errors.setdefault("roles", []).extend(errors.pop(key))
        typed = {k: form.get(k, "") for k in ("name", "description", "expires_at")} | {"roles": roles}
        return await _keys(ui, answer.status_code, create_problem=problem, create_errors=errors, typed=typed)

    return await page(request, build, needs="admin")


async def _find_key(ui: Console, key_id: str) -> dict[str, Any] | None:
    offset = 0
    while True:
        chunk = await ui.get("/api/auth/api-keys", {"limit": KEY_PAGE, "offset": offset})
        found = next((k for k in chunk["items"] if k["key_id"] == key_id), None)
        offset += len(chunk["items"])
        if found is not None or not chunk["items"] or offset >= chunk["total"]:
            return found


@router.get(KEYS + "/{key_id}/revoke")
async def revoke_confirmation(request: Request, key_id: str) -> Response:
    """Which key is about to be revoked, and the button that does it."""

    async def build(ui: Console) -> Response:
        key = await _find_key(ui, key_id)
        if key is None:
            return ui.render("error.html", 404, problem={"status": 404, "code": "not_found", "title": "Not found",
                                                         "detail": f"API key {key_id} not found"})
        return ui.render("api_key_revoke.html", key=key, title="Settings: revoke an API key")

    return await page(request, build, needs="admin")


@router.post(KEYS + "/{key_id}/revoke")
async def revoke_key(request: Request, key_id: str) -> Response:
    """Revoke the key (``DELETE /api/auth/api-keys/{key_id}``): from now on it is refused (401)."""
    form, _ = await _posted(request)

    async def build(ui: Console) -> Response:
        answer = await ui.send("DELETE", f"/api/auth/api-keys/{path_id(key_id)}", csrf=form.get("csrf_token"))
        if answer.status_code == 204:
            return _done(KEYS, f"revoked API key {key_id}")
        return await _keys(ui, answer.status_code, action_problem=problem_of(answer))

    return await page(request, build, needs="admin")
