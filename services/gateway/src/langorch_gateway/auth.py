"""Principals and roles (api.md §2): who is calling, and whether they may.

Every route declares what it needs with one of the typed dependencies below, so the requirement is visible in
the signature and the role-matrix test can walk them:

* ``principal: auth.Viewer`` — any authenticated principal (every user and API key may read);
* ``auth.Operator``, ``auth.Approver``, ``auth.Admin`` — that role (``admin`` implies every role; ``operator``
  does not imply ``approver``);
* ``auth.OperatorOrAgent`` — an operator, or an agent token (the handler checks it is the agent's own record).

Open routes (health, readiness, the API document, login, callbacks, grants, ``/metrics``) take none of them and
are listed in :data:`OPEN_ROUTES`.

The credential itself is checked by the application's :class:`Authenticator` (``deps.Clients.authenticator``):
it returns the principal of the request's credential, ``None`` when the request carries none, and raises a 401
problem when one is present but invalid. With auth disabled (api.md §2.4) a request without credentials acts as
``anonymous`` holding every role; a present but invalid credential is still 401.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import Annotated, Literal, Protocol

from fastapi import Depends, Request, Security
from fastapi.security import APIKeyCookie, APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer

from ckp_core.events import ANONYMOUS, Actor
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem

__all__ = [
    "ALL_ROLES",
    "OPEN_ROUTES",
    "Admin",
    "Approver",
    "Authenticator",
    "Operator",
    "OperatorOrAgent",
    "Principal",
    "Role",
    "Viewer",
    "actor",
    "principal",
    "required_role",
]

Role = Literal["viewer", "operator", "approver", "admin"]
ALL_ROLES: tuple[Role, ...] = ("viewer", "operator", "approver", "admin")

# (method, path template) of the routes that answer without a principal (api.md §2.2's open list); every other
# route must take one of the role dependencies (tests/test_auth_role_matrix.py walks them)
OPEN_ROUTES: frozenset[tuple[str, str]] = frozenset({
    ("GET", "/api/health"), ("GET", "/api/ready"), ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/redoc"),
    ("GET", "/docs/oauth2-redirect"), ("POST", "/api/auth/login"), ("POST", "/api/runs/{run_id}/callback"),
    ("GET", "/api/agent-credentials/{secret_name}"), ("GET", "/metrics"), ("GET", "/api/metrics"),
    ("POST", "/api/triggers/webhook/{procedure_id}"), ("GET", "/api/asyncapi.json"),
    ("GET", "/"), ("GET", "/ui"), ("GET", "/ui/login"), ("POST", "/ui/login"),  # the console's entry and sign-in
})


@dataclass(frozen=True)
class Principal:
    """The authenticated caller of one request."""

    actor: Actor
    roles: frozenset[str] = frozenset()
    auth_disabled: bool = False  # the anonymous principal of auth-disabled mode
    user_id: str | None = None
    expires_at: datetime | None = None
    token_id: str | None = None  # a user token's jti (logout denylists it)
    extra: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        return self.actor.kind

    def has(self, role: Role) -> bool:
        """Whether this principal holds ``role`` (admin implies all; every user and API key may read)."""
        if self.auth_disabled:
            return True
        if self.kind not in ("user", "api_key"):
            return False  # agents, triggers: only the endpoints that name them
        return role == "viewer" or "admin" in self.roles or role in self.roles


ANONYMOUS_DISABLED = Principal(actor=ANONYMOUS, roles=frozenset(ALL_ROLES), auth_disabled=True)


class Authenticator(Protocol):
    """Checks the credential a request carries (api.md §2.1's order: API key, bearer token, session cookie)."""

    async def authenticate(self, request: Request) -> Principal | None:
        """The principal, ``None`` without any credential; raises :class:`ApiProblem` (401) when a credential is
        present but invalid, and 403 ``csrf_failed`` for a session's unsafe request without its CSRF header."""
        ...


async def principal(request: Request) -> Principal:
    """The request's principal (checked once per request): 401 ``unauthenticated`` without a credential, unless
    auth is disabled."""
    known = getattr(request.state, "principal", None)
    if isinstance(known, Principal):
        return known
    app = clients(request)
    found = await app.authenticator.authenticate(request)
    if found is None:
        if app.settings.auth_enabled:
            raise ApiProblem("unauthenticated", "this endpoint needs a credential: an API key (X-API-Key), a bearer "
                             "token or a console session")
        found = ANONYMOUS_DISABLED
    request.state.principal = found
    return found


def actor(request: Request) -> Actor:
    """The actor of the request's commands, events and audit records (``anonymous`` before authentication)."""
    known = getattr(request.state, "principal", None)
    return known.actor if isinstance(known, Principal) else ANONYMOUS


# The credentials as OpenAPI security schemes (api.md §2.1), so the API document and Swagger UI show them; the
# checks themselves are the Authenticator's (these only read the headers, and never refuse on their own).
API_KEY_SCHEME = APIKeyHeader(name="X-API-Key", scheme_name="ApiKey", auto_error=False,
                              description="An API key, lo_<key_id>_<secret> (also accepted as a bearer token).")
BEARER_SCHEME = HTTPBearer(scheme_name="Bearer", bearerFormat="JWT", auto_error=False,
                           description="A user token from POST /api/auth/login, or an API key.")
SESSION_SCHEME = APIKeyCookie(name="langorch_session", scheme_name="Session", auto_error=False,
                              description="A console session; unsafe methods also need the X-CSRF-Token header.")


def _requiring(role: Role, *, agents: bool = False) -> Callable[..., Awaitable[Principal]]:
    async def check(request: Request,
                    _key: Annotated[str | None, Security(API_KEY_SCHEME)] = None,
                    _bearer: Annotated[HTTPAuthorizationCredentials | None, Security(BEARER_SCHEME)] = None,
                    _session: Annotated[str | None, Security(SESSION_SCHEME)] = None) -> Principal:
        who = await principal(request)
        if agents and who.kind == "agent":
            return who
        if not who.has(role):
            raise ApiProblem("forbidden", f"this action needs the role '{role}'", required_role=role)
        return who

    check.required_role = role  # type: ignore[attr-defined]
    check.__name__ = f"require_{role}{'_or_agent' if agents else ''}"
    return check


def required_role(dependency: object) -> str | None:
    """The role a dependency callable of this module requires (``None`` for any other callable)."""
    role = getattr(dependency, "required_role", None)
    return role if isinstance(role, str) else None


Viewer = Annotated[Principal, Depends(_requiring("viewer"))]
Operator = Annotated[Principal, Depends(_requiring("operator"))]
Approver = Annotated[Principal, Depends(_requiring("approver"))]
Admin = Annotated[Principal, Depends(_requiring("admin"))]
OperatorOrAgent = Annotated[Principal, Depends(_requiring("operator", agents=True))]
