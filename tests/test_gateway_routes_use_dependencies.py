"""The gateway's wiring (issue 13, "Gateway wiring through FastAPI ``Annotated`` dependencies"):

* ``create_app`` (``app.py``) builds the clients and keeps them on ``app.state``; only
  ``langorch_gateway/deps.py`` reads them back — route handlers receive them as typed parameters, helpers that
  are handed the request call ``deps.clients(request)``;
* those parameters are not part of the API: no operation of the OpenAPI document names one.
"""

from __future__ import annotations

import ast
import typing
from pathlib import Path

import pytest

from langorch_gateway import deps
from langorch_gateway.app import create_app
from langorch_infra.settings import GatewaySettings

pytestmark = pytest.mark.unit

PACKAGE = Path(__file__).resolve().parent.parent / "services" / "gateway" / "src" / "langorch_gateway"
ACCESSOR = "deps.py"
ROUTE_METHODS = frozenset({"get", "post", "put", "patch", "delete", "head", "options", "api_route", "websocket"})


def _is_app_state(node: ast.AST) -> bool:
    """``<x>.app.state`` (a request's application state) or ``app.state``."""
    if not (isinstance(node, ast.Attribute) and node.attr == "state"):
        return False
    owner = node.value
    return (isinstance(owner, ast.Attribute) and owner.attr == "app") or (
        isinstance(owner, ast.Name) and owner.id == "app")


def _is_route(fn: ast.AsyncFunctionDef | ast.FunctionDef) -> bool:
    for decorator in fn.decorator_list:
        call = decorator.func if isinstance(decorator, ast.Call) else decorator
        if isinstance(call, ast.Attribute) and call.attr in ROUTE_METHODS:
            return True
    return False


def state_reads(source: str, where: str) -> list[str]:
    """Where a module reads application state itself: ``request.app.state`` anywhere, and ``app.state`` in a
    route handler (the composition root may set ``app.state`` outside its handlers)."""
    tree = ast.parse(source)
    found: list[str] = []
    for node in ast.walk(tree):
        if _is_app_state(node) and isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute):
            found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
        elif isinstance(node, ast.AsyncFunctionDef | ast.FunctionDef) and _is_route(node):
            found += [f"{where}:{n.lineno}: {ast.unparse(n)} in route {node.name}" for n in ast.walk(node)
                      if _is_app_state(n) and isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)]
    return sorted(set(found))


def test_the_scan_finds_state_reads() -> None:
    source = """
app = FastAPI()
app.state.pool = None

def helper(request):
    return request.app.state.pool

@router.get("/x")
async def handler(request: Request) -> None:
    return request.app.state.js

@app.post("/y")
async def handler2() -> None:
    return app.state.js
"""
    assert [f.split(":")[1] for f in state_reads(source, "m.py")] == ["10", "14", "6"]


def test_only_the_accessor_module_reads_application_state() -> None:
    found: list[str] = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != ACCESSOR:
            found += state_reads(path.read_text(encoding="utf-8"), str(path.relative_to(PACKAGE)))
    assert not found, ("take the client as a parameter (db: deps.Pool, js: deps.JetStream, …) or, in a helper "
                       "handed the request, through deps.clients(request):\n" + "\n".join(found))


def test_dependencies_are_not_part_of_the_openapi_document() -> None:
    document = create_app(GatewaySettings()).openapi()  # no lifespan: nothing connects
    injected = {name for name, value in vars(deps).items()
                if typing.get_origin(value) is typing.Annotated}
    assert {"Pool", "JetStream", "Settings", "EventStore", "Projector", "Metrics"} <= injected
    named = {p["name"] for item in document["paths"].values() for op in item.values() if isinstance(op, dict)
             for p in op.get("parameters", [])}
    parameter_names = {"db", "js", "nc", "store", "settings", "projector", "audit_projector", "metrics", "slots",
                       "names_lock", "request"}
    assert not named & parameter_names
