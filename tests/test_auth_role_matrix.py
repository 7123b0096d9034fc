"""Roles on every endpoint (api.md §2.2), checked two ways:

* **statically**: every route of the app is in :data:`EXPECTED` below (the documented requirement, transcribed
  from the API's role tables), and its handler declares exactly that requirement through one of the role
  dependencies of ``langorch_gateway.auth``; an open route takes none and is in ``auth.OPEN_ROUTES``. A new route
  with no requirement, or one that is not documented here, fails this test;
* the console's pages (``/ui``, api.md §17) take no role dependency: they call the API with the caller's
  credentials, so the API decides. They are ``"ui:<role>"`` entries — the role of the API calls the page or
  action makes — and are checked apart: without a valid credential they redirect to the sign-in page, with one
  they answer, and an action the principal's roles do not allow is 403 like the API's;
* **against the real stack** with auth on: for every route and every principal — none, an invalid API key, a
  forged token, and an API key of each role — the gateway answers the documented outcome: 401 without or with an
  invalid credential, 403 ``forbidden`` naming ``required_role`` when the role is missing, and neither when it is
  held (the request itself may then be refused for other reasons: placeholder ids are 404, empty bodies 422).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator
from typing import Any
from urllib.parse import quote

import httpx
import pytest
from fastapi.routing import APIRoute
from starlette.routing import Route

from langorch_gateway import auth
from langorch_gateway.app import create_app
from langorch_infra.settings import GatewaySettings
from tests.helpers import Platform, platform_of

ADMIN_PASSWORD = "matrix-admin-password-1"
SECRET_KEY = "role-matrix-secret-key-of-at-least-32-bytes"

# The documented requirement of every route: a role, "open", or one of the role-plus-rule entries:
#   "agent_or_operator" — operator, or the agent's own token (the dependency is auth.OperatorOrAgent);
#   "self_or_admin" — any principal may call it, the handler lets a user read only itself unless admin;
#   "submitter_or_admin" — any principal, the handler lets only the command's submitter or an admin read it;
#   "any_user" — any principal; the handler refuses non-users (API keys have no password).
EXPECTED: dict[tuple[str, str], str] = {
    # §2.3 auth, API keys, users
    ("POST", "/api/auth/login"): "open",
    ("POST", "/api/auth/logout"): "viewer",
    ("GET", "/api/auth/me"): "viewer",
    ("POST", "/api/auth/password"): "any_user",
    ("GET", "/api/auth/api-keys"): "admin",
    ("POST", "/api/auth/api-keys"): "admin",
    ("DELETE", "/api/auth/api-keys/{key_id}"): "admin",
    ("GET", "/api/users"): "admin",
    ("POST", "/api/users"): "admin",
    ("GET", "/api/users/{user_id}"): "self_or_admin",
    ("PATCH", "/api/users/{user_id}"): "admin",
    ("PUT", "/api/users/{user_id}"): "admin",  # alias of PATCH (§1.8)
    ("DELETE", "/api/users/{user_id}"): "admin",
    # §3 meta
    ("GET", "/api/health"): "open",
    ("GET", "/api/ready"): "open",
    ("GET", "/openapi.json"): "open",
    ("GET", "/docs"): "open",
    ("GET", "/redoc"): "open",
    ("GET", "/docs/oauth2-redirect"): "open",
    ("GET", "/api/asyncapi.json"): "open",  # the API documents, like /openapi.json
    ("GET", "/api/schemas/events"): "viewer",
    ("GET", "/api/commands/{command_id}"): "submitter_or_admin",
    # §4 procedures
    ("POST", "/api/procedures"): "operator",
    ("POST", "/api/procedures/validate"): "viewer",
    ("GET", "/api/procedures"): "viewer",
    ("GET", "/api/procedures/{procedure_id}"): "viewer",
    ("GET", "/api/procedures/{procedure_id}/versions"): "viewer",
    ("GET", "/api/procedures/{procedure_id}/{version}"): "viewer",
    ("PUT", "/api/procedures/{procedure_id}/{version}"): "operator",
    ("DELETE", "/api/procedures/{procedure_id}/{version}"): "operator",
    ("PATCH", "/api/procedures/{procedure_id}/{version}/status"): "operator",
    ("POST", "/api/procedures/{procedure_id}/{version}/promote"): "operator",  # admin for prod (below)
    ("POST", "/api/procedures/{procedure_id}/{version}/rollback"): "operator",  # admin for prod (below)
    ("GET", "/api/procedures/{procedure_id}/deployments"): "viewer",
    ("GET", "/api/procedures/{procedure_id}/{version}/graph"): "viewer",
    ("POST", "/api/procedures/{procedure_id}/{version}/explain"): "viewer",
    ("GET", "/api/procedures/{procedure_id}/diff"): "viewer",
    # §5 runs
    ("POST", "/api/runs"): "operator",
    ("GET", "/api/runs"): "viewer",
    ("GET", "/api/runs/{run_id}"): "viewer",
    ("POST", "/api/runs/{run_id}/cancel"): "operator",
    ("POST", "/api/runs/{run_id}/retry"): "operator",
    ("POST", "/api/runs/{run_id}/rerun"): "operator",
    ("DELETE", "/api/runs/{run_id}"): "operator",
    ("POST", "/api/runs/cleanup"): "admin",
    ("DELETE", "/api/runs/cleanup/history"): "admin",  # alias of cleanup (§1.8)
    ("GET", "/api/runs/{run_id}/events"): "viewer",
    ("GET", "/api/runs/{run_id}/stream"): "viewer",
    ("GET", "/api/runs/{run_id}/graph"): "viewer",
    ("GET", "/api/runs/{run_id}/artifacts"): "viewer",
    ("GET", "/api/runs/{run_id}/artifacts/{artifact_id}"): "viewer",
    ("GET", "/api/runs/{run_id}/artifacts/{artifact_id}/content"): "viewer",
    ("GET", "/api/artifacts/{run_id}/{name}"): "viewer",  # alias of …/content (§1.8)
    ("GET", "/api/runs/{run_id}/diagnostics"): "viewer",
    ("GET", "/api/runs/{run_id}/checkpoints"): "viewer",
    ("GET", "/api/runs/{run_id}/checkpoints/{checkpoint_id}"): "operator",
    ("GET", "/api/runs/{run_id}/children"): "viewer",
    ("POST", "/api/runs/{run_id}/callback"): "open",  # the callback token
    # §6 approvals
    ("GET", "/api/approvals"): "viewer",
    ("GET", "/api/approvals/stream"): "viewer",
    ("GET", "/api/approvals/{approval_id}"): "viewer",
    ("POST", "/api/approvals/{approval_id}/decision"): "approver",
    # §10 triggers
    ("POST", "/api/triggers/webhook/{procedure_id}"): "open",  # the HMAC signature (§10.5)
    ("POST", "/api/triggers/sync"): "operator",
    ("GET", "/api/triggers"): "viewer",
    ("GET", "/api/triggers/{procedure_id}/{version}"): "viewer",
    ("POST", "/api/triggers/{procedure_id}/{version}"): "operator",
    ("DELETE", "/api/triggers/{procedure_id}/{version}"): "operator",
    ("POST", "/api/triggers/{procedure_id}/{version}/enable"): "operator",
    ("POST", "/api/triggers/{procedure_id}/{version}/disable"): "operator",
    ("POST", "/api/triggers/{procedure_id}/{version}/fire"): "operator",
    ("GET", "/api/triggers/{procedure_id}/{version}/fires"): "viewer",
    # §7 agents, §8 leases
    ("GET", "/api/agents"): "viewer",
    ("POST", "/api/agents"): "operator",
    ("GET", "/api/agents/probe-capabilities"): "operator",
    ("GET", "/api/agents/pools"): "viewer",
    ("GET", "/api/agents/bootstrap/{channel}"): "viewer",
    ("POST", "/api/agents/heartbeat"): "agent_or_operator",
    ("GET", "/api/agents/{agent_id}"): "viewer",
    ("PATCH", "/api/agents/{agent_id}"): "agent_or_operator",
    ("PUT", "/api/agents/{agent_id}"): "agent_or_operator",  # alias of PATCH (§1.8)
    ("DELETE", "/api/agents/{agent_id}"): "operator",
    ("POST", "/api/agents/{agent_id}/sync-capabilities"): "operator",
    ("POST", "/api/agents/{agent_id}/token"): "operator",
    ("GET", "/api/leases"): "viewer",
    ("GET", "/api/leases/{lease_id}"): "viewer",
    ("DELETE", "/api/leases/{lease_id}"): "operator",
    # §9 projects
    ("GET", "/api/projects"): "viewer",
    ("POST", "/api/projects"): "operator",
    ("GET", "/api/projects/{project_id}"): "viewer",
    ("PATCH", "/api/projects/{project_id}"): "operator",
    ("PUT", "/api/projects/{project_id}"): "operator",  # alias of PATCH (§1.8)
    ("DELETE", "/api/projects/{project_id}"): "admin",
    ("GET", "/api/projects/{project_id}/cost-summary"): "viewer",
    # §11 secrets
    ("GET", "/api/secrets"): "viewer",
    ("POST", "/api/secrets"): "admin",
    ("GET", "/api/secrets/{name}"): "viewer",
    ("PATCH", "/api/secrets/{name}"): "admin",
    ("PUT", "/api/secrets/{name}"): "admin",  # alias of PATCH (§1.8)
    ("DELETE", "/api/secrets/{name}"): "admin",
    ("POST", "/api/secrets/{name}/check"): "admin",
    # §12 audit, §13 metrics, §14 configuration
    ("GET", "/api/audit"): "viewer",
    ("GET", "/metrics"): "open",  # unless LANGORCH_METRICS_TOKEN is set (then that bearer)
    ("GET", "/api/metrics"): "open",  # alias of /metrics (§1.8)
    ("GET", "/api/metrics/summary"): "viewer",
    ("GET", "/api/config"): "admin",
    # §15.3 credential grants
    ("GET", "/api/agent-credentials/{secret_name}"): "open",  # the grant
    # §17 web console: pages and form actions over the API ("ui:<role>": the role of the API calls they make)
    ("GET", "/"): "open",  # redirects to /ui/
    ("GET", "/ui"): "open",  # redirects to /ui/
    ("GET", "/ui/login"): "open",
    ("POST", "/ui/login"): "open",
    ("POST", "/ui/logout"): "ui:viewer",
    ("GET", "/ui/"): "ui:viewer",
    ("GET", "/ui/runs"): "ui:viewer",
    ("POST", "/ui/runs"): "ui:operator",
    ("GET", "/ui/runs/{run_id}"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/header"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/graph"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/replay"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/rerun"): "ui:operator",
    ("GET", "/ui/runs/cleanup"): "ui:admin",
    ("POST", "/ui/runs/cleanup"): "ui:admin",
    ("GET", "/ui/runs/{run_id}/{tab}"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/usage"): "ui:viewer",
    ("GET", "/ui/runs/{run_id}/checkpoints/{checkpoint_id}"): "ui:operator",  # the API's checkpoint state
    ("POST", "/ui/runs/{run_id}/{action}"): "ui:operator",
    ("GET", "/ui/procedures"): "ui:viewer",
    ("POST", "/ui/procedures"): "ui:operator",
    ("GET", "/ui/procedures/{procedure_id}"): "ui:viewer",
    ("GET", "/ui/procedures/{procedure_id}/diff"): "ui:viewer",
    ("GET", "/ui/procedures/{procedure_id}/{version}"): "ui:viewer",
    ("POST", "/ui/procedures/{procedure_id}/{version}/runs"): "ui:operator",
    ("GET", "/ui/procedures/{procedure_id}/{version}/trigger"): "ui:viewer",
    ("POST", "/ui/procedures/{procedure_id}/{version}/trigger"): "ui:operator",
    ("POST", "/ui/procedures/{procedure_id}/{version}/trigger/{action}"): "ui:operator",
    ("POST", "/ui/procedures/{procedure_id}/{version}/lifecycle/{action}"): "ui:operator",
    ("POST", "/ui/procedures/{procedure_id}/{version}/source"): "ui:operator",
    ("GET", "/ui/procedures/{procedure_id}/{version}/explain"): "ui:viewer",
    ("GET", "/ui/approvals"): "ui:viewer",
    ("GET", "/ui/agents"): "ui:viewer",
    ("POST", "/ui/agents/actions"): "ui:operator",
    ("POST", "/ui/leases/actions"): "ui:operator",
    ("POST", "/ui/projects/actions"): "ui:operator",
    ("POST", "/ui/triggers/actions"): "ui:operator",
    ("GET", "/ui/leases"): "ui:viewer",
    ("GET", "/ui/projects"): "ui:viewer",
    ("GET", "/ui/triggers"): "ui:viewer",
    ("GET", "/ui/audit"): "ui:viewer",
    ("GET", "/ui/settings"): "ui:viewer",  # the admin parts only for admins
    ("GET", "/ui/settings/users"): "ui:admin",
    ("POST", "/ui/settings/users"): "ui:admin",
    ("POST", "/ui/settings/users/{user_id}"): "ui:admin",
    ("GET", "/ui/settings/api-keys"): "ui:admin",
    ("POST", "/ui/settings/api-keys"): "ui:admin",
    ("GET", "/ui/settings/api-keys/{key_id}/revoke"): "ui:admin",
    ("POST", "/ui/settings/api-keys/{key_id}/revoke"): "ui:admin",
    ("GET", "/ui/approvals/{approval_id}"): "ui:viewer",
    ("POST", "/ui/approvals/{approval_id}/decision"): "ui:approver",
}
RULES = {"agent_or_operator": "operator", "self_or_admin": "viewer", "submitter_or_admin": "viewer",
         "any_user": "viewer"}
ROLE_OF_PRINCIPAL = ("viewer", "operator", "approver", "admin")


def routes() -> Iterator[tuple[str, str, Any]]:
    """(method, path template, the route object) of every route the app serves, in included routers too."""
    app = create_app(GatewaySettings())
    stack: list[Any] = list(app.router.routes)
    while stack:
        route = stack.pop()
        if hasattr(route, "original_router"):
            stack.extend(route.original_router.routes)
        elif isinstance(route, APIRoute | Route):
            for method in sorted(route.methods or ()):
                if method != "HEAD":
                    yield method, route.path, route


def declared_roles(route: Any) -> set[str]:
    """The roles the route's dependencies require (at any depth)."""
    found: set[str] = set()
    pending = list(route.dependant.dependencies) if isinstance(route, APIRoute) else []
    while pending:
        dependant = pending.pop()
        role = auth.required_role(dependant.call)
        if role is not None:
            agents = getattr(dependant.call, "__name__", "").endswith("_or_agent")
            found.add("agent_or_operator" if agents else role)
        pending.extend(dependant.dependencies)
    return found


def documented_role(method: str, path: str) -> str:
    """The role that the principals' sweep expects (a rule entry stands for the role its dependency checks)."""
    expected = EXPECTED[(method, path)]
    return RULES.get(expected, expected)


# -- static: every route declares what the documentation says ------------------------------------------------


@pytest.mark.unit
def test_every_route_is_documented_and_declares_its_role() -> None:
    served = {(m, p): r for m, p, r in routes()}
    undocumented = sorted(set(served) - set(EXPECTED))
    assert not undocumented, f"routes with no documented role requirement (add them to EXPECTED): {undocumented}"
    assert set(EXPECTED) <= set(served), f"documented but not served: {sorted(set(EXPECTED) - set(served))}"
    wrong = []
    for key, route in served.items():
        expected = EXPECTED[key]
        declared = declared_roles(route)
        if expected == "open":
            if declared or key not in auth.OPEN_ROUTES:
                wrong.append((key, "open", sorted(declared)))
        elif expected.startswith("ui:"):
            if declared or key in auth.OPEN_ROUTES or not key[1].startswith("/ui/"):
                wrong.append((key, expected, sorted(declared)))
        elif declared != {RULES.get(expected, expected) if expected != "agent_or_operator" else expected}:
            wrong.append((key, expected, sorted(declared)))
    assert not wrong, f"(route, documented, declared): {wrong}"


@pytest.mark.unit
def test_the_static_check_catches_a_route_without_a_role() -> None:
    """The walk sees a handler's dependencies: one without any has no declared role."""
    from fastapi import FastAPI

    app = FastAPI()

    @app.get("/api/unguarded")
    async def unguarded() -> dict[str, str]:
        return {}

    @app.get("/api/guarded")
    async def guarded(principal: auth.Admin) -> dict[str, str]:
        return {}

    by_path = {r.path: r for r in app.router.routes if isinstance(r, APIRoute)}
    assert declared_roles(by_path["/api/unguarded"]) == set()
    assert declared_roles(by_path["/api/guarded"]) == {"admin"}


# -- against the real stack ----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, runtime=False, agents=False, approvals=False,
                           gateway_settings={"auth_enabled": True, "auth_secret_key": SECRET_KEY,
                                             "bootstrap_admin_password": ADMIN_PASSWORD}) as p:
        yield p


async def admin_token(c: httpx.AsyncClient) -> str:
    """Log in as the bootstrap admin (created in the background at start-up: poll)."""
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        r = await c.post("/api/auth/login", json={"username": "admin", "password": ADMIN_PASSWORD})
        if r.status_code == 200:
            return str(r.json()["access_token"])
        assert asyncio.get_running_loop().time() < deadline, r.text
        await asyncio.sleep(0.2)


async def role_keys(c: httpx.AsyncClient) -> dict[str, str]:
    token = await admin_token(c)
    keys = {}
    for role in ROLE_OF_PRINCIPAL:
        r = await c.post("/api/auth/api-keys", json={"name": f"matrix-{role}", "roles": [role]},
                         headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 201, r.text
        keys[role] = str(r.json()["key"])
    return keys


def concrete(path: str) -> str:
    """The path with placeholder ids (nothing by these names exists)."""
    values = {"run_id": "01900000-0000-7000-8000-000000000000", "version": "1", "action": "cancel"}
    out = path
    while "{" in out:
        start, end = out.index("{"), out.index("}")
        name = out[start + 1:end]
        out = out[:start] + values.get(name, f"no-such-{name.replace('_', '-')}") + out[end + 1:]
    return out


async def status_of(c: httpx.AsyncClient, method: str, path: str, headers: dict[str, str]) -> tuple[int, Any]:
    """The status and problem body of one request; an SSE stream is closed as soon as it answers."""
    body = {} if method in ("POST", "PUT", "PATCH") else None
    async with c.stream(method, concrete(path), json=body, headers=headers, timeout=30) as r:
        if r.headers.get("content-type", "").startswith("text/event-stream"):
            return r.status_code, None
        await r.aread()
        with contextlib.suppress(ValueError):
            return r.status_code, r.json()
        return r.status_code, None


@pytest.mark.integration
async def test_every_route_answers_every_principal_as_documented(platform: Platform) -> None:
    c = platform.client
    keys = await role_keys(c)
    forged = ("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.eyJpc3MiOiJsYW5nb3JjaCIsImF1ZCI6ImxhbmdvcmNoLWFwaSIsInN1YiI6"
              "ImFkbWluIiwicm9sZXMiOlsiYWRtaW4iXX0.")  # alg none, admin claims
    checked = 0
    wrong: list[tuple[str, str, str, int, Any]] = []
    for method, path, _ in sorted(routes(), key=lambda x: (x[1], x[0])):
        expected = EXPECTED[(method, path)]
        if expected == "open" or expected.startswith("ui:"):
            continue
        role = documented_role(method, path)
        cases: list[tuple[str, dict[str, str]]] = [
            ("none", {}), ("invalid-key", {"X-API-Key": "lo_nokey_notasecret"}),
            ("forged-token", {"Authorization": f"Bearer {forged}"}),
            *((f"key:{held}", {"X-API-Key": keys[held]}) for held in ROLE_OF_PRINCIPAL),
        ]
        for who, headers in cases:
            status, problem = await status_of(c, method, path, headers)
            checked += 1
            held = who.removeprefix("key:") if who.startswith("key:") else None
            if held is None:
                ok = status == 401
            elif held == "admin" or role == "viewer" or held == role:
                ok = status not in (401, 403) or (expected == "any_user" and status == 403) or (
                    expected == "self_or_admin" and held != "admin" and status == 403)
            else:
                ok = status == 403 and isinstance(problem, dict) and problem.get("code") == "forbidden" and (
                    problem.get("required_role") == role)
            if not ok:
                wrong.append((method, path, who, status, problem))
    assert not wrong, "\n".join(map(str, wrong))
    documented = sum(1 for v in EXPECTED.values() if v != "open" and not v.startswith("ui:"))
    assert checked == documented * 7


@pytest.mark.integration
async def test_console_pages_send_strangers_to_sign_in_and_answer_by_role(platform: Platform) -> None:
    """Every ``/ui`` page and action: no or an invalid credential → 303 to ``/ui/login?next=…``; a principal
    holding the role → answered (placeholder ids may be 404); one without it → 403 ``forbidden``."""
    c = platform.client
    keys = await role_keys(c)
    forged = "eyJhbGciOiJub25lIn0.eyJzdWIiOiJhZG1pbiJ9."
    wrong: list[tuple[str, str, str, int, str | None]] = []
    checked = 0
    for (method, path), expected in sorted(EXPECTED.items()):
        if not expected.startswith("ui:"):
            continue
        role = expected.removeprefix("ui:")
        strangers = [("none", {}), ("invalid-key", {"X-API-Key": "lo_nokey_notasecret"}),
                     ("forged-token", {"Authorization": f"Bearer {forged}"})]
        for who, headers in [*strangers, *((f"key:{held}", {"X-API-Key": keys[held]}) for held in ROLE_OF_PRINCIPAL)]:
            r = await c.request(method, concrete(path), headers=headers, data={} if method == "POST" else None)
            checked += 1
            location = r.headers.get("location")
            held = who.removeprefix("key:") if who.startswith("key:") else None
            to_login = r.status_code == 303 and (location or "").startswith("/ui/login")
            if held is None:
                ok = to_login and (method == "POST" or location == f"/ui/login?next={quote(concrete(path), safe='')}")
            elif held == "admin" or role == "viewer" or held == role:
                ok = r.status_code not in (401, 403) and not (location or "").startswith("/ui/login?")
            else:
                ok = r.status_code == 403 and f"this action needs the role &#39;{role}&#39;" in r.text
            if not ok:
                wrong.append((method, path, who, r.status_code, location))
    assert not wrong, "\n".join(map(str, wrong))
    assert checked == 7 * sum(1 for v in EXPECTED.values() if v.startswith("ui:"))


@pytest.mark.integration
async def test_prod_promotion_and_rollback_need_admin(platform: Platform) -> None:
    c = platform.client
    keys = await role_keys(c)
    for action in ("promote", "rollback"):
        path = f"/api/procedures/no-such-procedure/1/{action}"
        r = await c.post(path, json={"target_channel": "prod"}, headers={"X-API-Key": keys["operator"]})
        assert (r.status_code, r.json()["code"], r.json()["required_role"]) == (403, "forbidden", "admin"), r.text
        r = await c.post(path, json={"target_channel": "qa"}, headers={"X-API-Key": keys["operator"]})
        assert r.status_code == 404, r.text  # allowed: the placeholder version does not exist
        r = await c.post(path, json={"target_channel": "prod"}, headers={"X-API-Key": keys["admin"]})
        assert r.status_code == 404, r.text


@pytest.mark.integration
async def test_open_routes_answer_without_a_principal(platform: Platform) -> None:
    c = platform.client
    for path in ("/api/health", "/api/ready", "/openapi.json", "/docs", "/redoc", "/metrics"):
        r = await c.get(path)
        assert r.status_code in (200, 503), (path, r.status_code, r.text[:200])  # /api/ready may say not ready
    assert (await c.get("/api/health")).json()["auth"] == "enabled"
    assert (await c.get("/api/health")).headers["X-LangOrch-Auth"] == "enabled"


@pytest.mark.unit
def test_the_api_document_shows_the_credentials_each_operation_takes() -> None:
    document = create_app(GatewaySettings()).openapi()
    assert set(document["components"]["securitySchemes"]) == {"ApiKey", "Bearer", "Session"}
    for path, operations in document["paths"].items():
        for method, operation in operations.items():
            expected = EXPECTED[(method.upper(), path)]
            security = operation.get("security")
            if expected == "open":
                assert security is None, (method, path)
            else:
                assert security == [{"ApiKey": []}, {"Bearer": []}, {"Session": []}], (method, path)
