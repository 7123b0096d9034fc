"""What every console page shares: the in-process API client, the signed-in identity, and rendering.

A page reads and writes only through the public REST API: it calls the gateway's own routes in process
(``httpx.ASGITransport`` over ``request.app``) with the caller's credentials — the session cookie, or an API key or
bearer token — so authentication, roles, CSRF and read-your-writes are exactly the API's. A form post carries the
CSRF token the page rendered from the ``langorch_csrf`` cookie, and the console sends it on as ``X-CSRF-Token``:
the API, not the console, decides whether it matches.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
from fastapi import Request
from fastapi.responses import RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from langorch_gateway import users

TEMPLATES = Jinja2Templates(directory=Path(__file__).resolve().parent / "templates")


def when(value: str | None) -> str:
    """An API time (RFC 3339, UTC) as the console shows it: to the second, ``—`` when absent."""
    if not value:
        return "—"
    return value.replace("T", " ")[:19] + " UTC"


def pretty(value: Any) -> str:
    """JSON for reading: indented, keys in their order, non-ASCII kept."""
    return json.dumps(value, indent=2, ensure_ascii=False)


TEMPLATES.env.filters["when"] = when
TEMPLATES.env.filters["pretty"] = pretty
LOGIN_PATH = "/ui/login"
# Pages load only this origin's scripts and styles (no inline code); forms and the SSE streams stay on it too.
PAGE_POLICY = "; ".join((
    "default-src 'self'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "object-src 'none'",
    "base-uri 'self'",
    "form-action 'self'",
    "frame-ancestors 'none'",
))
# what a page passes on to the API: the caller's credentials, and the stream position a live page has seen (the
# API's read-your-writes: the run page's header is read at least as new as its timeline)
FORWARDED = ("cookie", "authorization", "x-api-key", "x-langorch-min-position")


class ApiFailure(Exception):
    """The API refused a page's read: the page shows its problem with the same status."""

    def __init__(self, response: httpx.Response) -> None:
        super().__init__(response.status_code)
        self.response = response

    @property
    def problem(self) -> dict[str, Any]:
        return problem_of(self.response)


def problem_of(response: httpx.Response) -> dict[str, Any]:
    """The problem body of an API error (a minimal one when the body is not problem JSON)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and "code" in body:
        return body
    return {"status": response.status_code, "code": "error", "title": "Error", "detail": response.text[:500],
            "errors": {}}


@dataclass
class Console:
    """One console request: the API client speaking as the caller, and who the caller is."""

    request: Request
    api: httpx.AsyncClient
    me: dict[str, Any] = field(default_factory=dict)

    @property
    def roles(self) -> set[str]:
        return set(self.me.get("roles") or ())

    def can(self, role: str) -> bool:
        """Whether the caller holds ``role`` (admin implies every role), to show or hide an action; the API
        enforces it either way."""
        return role in self.roles or "admin" in self.roles

    @property
    def csrf(self) -> str:
        return self.request.cookies.get(users.CSRF_COOKIE, "")

    async def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        """GET an API resource's JSON; a refusal raises :class:`ApiFailure`."""
        response = await self.api.get(path, params={k: v for k, v in (params or {}).items()
                                                     if v not in (None, "")})
        if response.status_code >= 400:
            raise ApiFailure(response)
        return response.json()

    async def send(self, method: str, path: str, body: Any = None, csrf: str | None = None) -> httpx.Response:
        """An unsafe request with the CSRF token the form carried (the API checks it for sessions)."""
        headers = {"X-CSRF-Token": csrf} if csrf else {}
        return await self.api.request(method, path, json=body, headers=headers)

    def render(self, template: str, status_code: int = 200, **context: Any) -> Response:
        return render(self.request, template, status_code, console=self, **context)


def render(request: Request, template: str, status_code: int = 200, **context: Any) -> Response:
    """A page from ``templates/``, with the console's security headers."""
    context.setdefault("console", None)
    return confined(TEMPLATES.TemplateResponse(request, template, context, status_code=status_code))


def confined(response: Response) -> Response:
    response.headers["Content-Security-Policy"] = PAGE_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Cache-Control"] = "no-store"
    response.headers["Referrer-Policy"] = "same-origin"
    return response


def api_client(request: Request) -> httpx.AsyncClient:
    """A client of this gateway's own API, in process, carrying the caller's credentials and address."""
    headers = {name: request.headers[name] for name in FORWARDED if name in request.headers}
    client = (request.client.host, request.client.port) if request.client else ("127.0.0.1", 0)
    transport = httpx.ASGITransport(app=request.app, client=client)
    return httpx.AsyncClient(transport=transport, base_url=str(request.base_url).rstrip("/"), headers=headers,
                             timeout=60)


def login_redirect(request: Request) -> Response:
    """To the sign-in page, which returns here afterwards (an htmx request is redirected as a whole page)."""
    here = request.url.path + (f"?{request.url.query}" if request.url.query else "")
    target = f"{LOGIN_PATH}?{urlencode({'next': here})}"
    if request.headers.get("hx-request"):
        return Response(status_code=204, headers={"HX-Redirect": target})
    return RedirectResponse(target, status_code=303)


def cross_site(request: Request) -> bool:
    """Whether a form post came from another site (its ``Origin`` is not this one). The sign-in form carries no
    CSRF token yet — there is no session — so this keeps another site from signing a visitor in as someone else."""
    origin = request.headers.get("origin")
    # host and port only: behind a TLS-terminating proxy the gateway itself may see plain http
    return origin is not None and urlsplit(origin).netloc != request.url.netloc


def safe_next(target: str | None) -> str:
    """Where sign-in returns to: a console path of this origin only (never another site)."""
    if target and target.startswith("/ui") and not target.startswith("//") and "\\" not in target:
        return target
    return "/ui/"


async def page(request: Request, build: Callable[[Console], Awaitable[Response]], needs: str = "viewer") -> Response:
    """Run ``build`` for a signed-in caller: without a valid credential, the sign-in page instead; an API
    refusal while reading becomes an error page with the API's status and problem. ``needs``: the role of the
    API call an action makes, refused up front like the API would (403 ``forbidden`` with ``required_role``)."""
    async with api_client(request) as api:
        me = await api.get("/api/auth/me")
        if me.status_code == 401:
            return login_redirect(request)
        if me.status_code != 200:
            return render(request, "error.html", me.status_code, problem=problem_of(me))
        console = Console(request, api, me.json())
        if needs != "viewer" and not console.can(needs):
            return console.render("error.html", 403, problem={
                "status": 403, "code": "forbidden", "title": "Forbidden", "required_role": needs,
                "detail": f"this action needs the role '{needs}'"})
        try:
            return await build(console)
        except ApiFailure as failure:
            return console.render("error.html", failure.response.status_code, problem=failure.problem)


def form_errors(problem: Mapping[str, Any]) -> dict[str, list[str]]:
    """The problem's per-field messages (``errors``), as lists."""
    errors = problem.get("errors") or {}
    return {str(k): [str(m) for m in v] if isinstance(v, list) else [str(v)] for k, v in errors.items()}


def path_id(value: str) -> str:
    """A path segment for an id taken from a URL (ids are plain, but never trust them into a path)."""
    return quote(value, safe="")
