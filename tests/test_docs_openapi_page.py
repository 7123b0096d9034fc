"""The OpenAPI reference page (``tools/docs/openapi_page.py``, a MkDocs hook) is generated from the gateway app
without any server: it names every route the app serves, its published ``openapi.json`` carries the same
operations, internal design documents are never referenced, and generation fails loudly."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parent.parent
HOOK = ROOT / "tools" / "docs" / "openapi_page.py"
PAGE = ROOT / "docs" / "api" / "openapi.md"


@pytest.fixture(scope="module")
def hook() -> ModuleType:
    spec = importlib.util.spec_from_file_location("langorch_docs_openapi_page", HOOK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def built(hook: ModuleType) -> tuple[Any, dict[str, Any], str]:
    app = hook.build_app()  # no NATS, no PostgreSQL: the lifespan never runs
    document = hook.openapi_document(app)
    return app, document, hook.render_page(PAGE.read_text(encoding="utf-8"), document, app)


def test_every_route_of_the_app_is_on_the_page(hook: ModuleType, built: tuple[Any, dict[str, Any], str]) -> None:
    app, _, page = built
    routes = hook.app_routes(app)
    assert len(routes) > 60, f"only {len(routes)} routes found; has route discovery broken?"
    for method, path, in_schema in routes:
        if in_schema:
            assert f"### `{method} {path}`" in page, f"{method} {path} has no section"
        else:
            assert f"| {method} | `{path}` |" in page, f"{method} {path} is not listed among the other routes"
    assert "| GET | `/metrics` |" in page


def test_every_documented_operation_is_a_route(hook: ModuleType, built: tuple[Any, dict[str, Any], str]) -> None:
    app, document, _ = built
    served = {(m, p) for m, p, in_schema in hook.app_routes(app) if in_schema}
    documented = {(m.upper(), p) for p, item in document["paths"].items() for m in item
                  if m in hook.METHODS}
    assert documented == served


def test_request_bodies_name_their_schema(built: tuple[Any, dict[str, Any], str]) -> None:
    _, _, page = built
    section = page.split("### `POST /api/runs`", 1)[1].split("### ", 1)[0]
    assert "Request body (required): [`RunCreate`](#schema-runcreate)" in section
    assert '### `RunCreate` { #schema-runcreate }' in page
    assert "| `procedure_id` |" in page.split("{ #schema-runcreate }", 1)[1]


def test_no_internal_design_references(hook: ModuleType, built: tuple[Any, dict[str, Any], str]) -> None:
    _, document, page = built
    published = json.dumps(hook.public_document(document))
    for text in (page, published):
        assert "api.md" not in text
        assert "ckp.md" not in text
        assert "§" not in text


def test_a_missing_placeholder_fails(hook: ModuleType, built: tuple[Any, dict[str, Any], str]) -> None:
    app, document, _ = built
    with pytest.raises(hook.OpenApiPageError, match="placeholder"):
        hook.render_page("# OpenAPI reference\n", document, app)


def test_an_app_that_cannot_describe_itself_fails(hook: ModuleType) -> None:
    class Broken:
        def openapi(self) -> dict[str, Any]:
            raise RuntimeError("schema generation exploded")

    class Empty:
        def openapi(self) -> dict[str, Any]:
            return {"openapi": "3.1.0", "paths": {}}

    with pytest.raises(hook.OpenApiPageError, match="exploded"):
        hook.openapi_document(Broken())
    with pytest.raises(hook.OpenApiPageError, match="no paths"):
        hook.openapi_document(Empty())
