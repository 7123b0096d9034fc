"""The run routes clients poll (``langorch_gateway.app.HOT_ROUTES``) are matched before the included routers, and
that changes no answer: no other route matches one of their paths with one of their methods, and none of them
matches another route's path with that route's method."""

from __future__ import annotations

import re
from typing import Any

import pytest
from starlette.routing import compile_path

from langorch_gateway.app import HOT_ROUTES, create_app
from langorch_infra.settings import GatewaySettings

pytestmark = pytest.mark.unit


def flattened(app: Any) -> list[tuple[str, str]]:
    """``(method, path template)`` of every HTTP route, the included routers' routes in their place."""
    out: list[tuple[str, str]] = []

    def walk(routes: Any, prefix: str) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:  # FastAPI's wrapper of an included router
                walk(included.routes, prefix + str(getattr(route.include_context, "prefix", "") or ""))
                continue
            methods, path = getattr(route, "methods", None), getattr(route, "path", None)
            if methods and path:
                out.extend((m, prefix + path) for m in sorted(methods - {"HEAD", "OPTIONS"}))

    walk(app.routes, "")
    return out


def sample(template: str) -> str:
    """A concrete path of a template (every parameter ``x1``)."""
    return re.sub(r"\{[^}]+\}", "x1", template)


def matches(template: str, path: str) -> bool:
    regex, _, _ = compile_path(template)
    return regex.match(path) is not None


def test_the_run_routes_come_first_and_share_no_path_and_method_with_another_route() -> None:
    app = create_app(GatewaySettings(nats_url="nats://127.0.0.1:1", database_url="postgresql://x@127.0.0.1:1/x"))
    order = [getattr(r, "path", None) for r in app.router.routes]
    first_router = next(i for i, r in enumerate(app.router.routes) if hasattr(r, "original_router"))
    assert set(order[:first_router]) >= set(HOT_ROUTES)  # before every included router

    moved = [r for r in app.router.routes[:first_router] if getattr(r, "path", None) in HOT_ROUTES]
    hot = [(m, r.path) for r in moved for m in sorted(r.methods - {"HEAD", "OPTIONS"})]
    others = [route for route in flattened(app) if route not in hot]
    assert len(hot) == 5, hot  # POST and GET /api/runs, GET of a run, its events and its stream
    assert len(others) > 60
    for method, template in hot:
        for other_method, other in others:
            if other_method != method:
                continue
            assert not matches(other, sample(template)), f"{other_method} {other} also matches {template}"
            assert not matches(template, sample(other)), f"{method} {template} would take {other}"
