"""MkDocs hook (see mkdocs.yml): the OpenAPI reference of ``docs/api/openapi.md``, generated at build time from
the gateway application itself.

``langorch_gateway.app.create_app(GatewaySettings())`` builds the FastAPI application without connecting to
anything (NATS and PostgreSQL are opened in its lifespan, which never runs here), and ``app.openapi()`` is the
same document a running gateway serves at ``/openapi.json``.

* :func:`render_reference` turns that document into Markdown: one section per group of paths (runs, procedures,
  approvals, …), one entry per operation with its method, path, summary, parameters, request body schema and
  responses, then one table per request schema. It replaces the placeholder :data:`PLACEHOLDER` of the page.
* The raw document is added to the site as ``api/openapi.json`` (a generated file, so the page can link to it and
  the link is checked like any other).
* Routes the application serves outside the OpenAPI document (``GET /metrics``, the documentation UI) are listed
  at the end, so the page names every route of the app.

The build fails (``PluginError``) when the application cannot be built, the document has no paths, or the
placeholder is missing, so the page can never silently go stale or empty.
"""

from __future__ import annotations

import json
import re
from typing import Any

PAGE = "api/openapi.md"
JSON_FILE = "api/openapi.json"
PLACEHOLDER = "<!-- openapi-reference -->"
METHODS = ("get", "post", "put", "patch", "delete")

# path groups, in page order: (title, first path segment after /api/, one line about the group)
GROUPS: list[tuple[str, tuple[str, ...], str]] = [
    ("Runs", ("runs",), "Start, follow, control and inspect runs ([guide](runs.md))."),
    ("Procedures", ("procedures",), "Import, release and analyse procedure versions ([guide](procedures.md))."),
    ("Approvals", ("approvals",), "Human decisions on paused runs ([guide](approvals.md))."),
    ("Agents and pools", ("agents",), "Register and watch the agents runs are dispatched to "
     "([guide](agents.md))."),
    ("Leases", ("leases",), "Concurrency slots held by running steps ([guide](agents.md))."),
    ("Projects", ("projects",), "Group procedures and runs ([guide](procedures.md))."),
    ("Artifacts by name", ("artifacts",), "Older spelling of the artifact download ([guide](runs.md))."),
    ("Agent credentials", ("agent-credentials",), "Exchange of a credential grant for a secret value "
     "([guide](agents.md))."),
    ("Commands", ("commands",), "What became of a command answered `202` ([guide](index.md))."),
    ("Audit log", ("audit",), "Who did what, accepted or refused."),
    ("Metrics", ("metrics",), "Prometheus text and a JSON summary."),
    ("Configuration", ("config",), "Effective settings of every running replica."),
    ("Service", ("health", "ready", "schemas"), "Liveness, readiness and the event schemas."),
]
# routes of the app that are not in the OpenAPI document, with what they serve
UNDOCUMENTED = {
    "/metrics": "Prometheus text exposition of every service's metrics.",
    "/openapi.json": "This OpenAPI document, from the running gateway.",
    "/docs": "Interactive API documentation (Swagger UI).",
    "/docs/oauth2-redirect": "Part of the Swagger UI.",
    "/redoc": "API documentation (ReDoc).",
    "/api/asyncapi.json": "The AsyncAPI document of the NATS interface (see the AsyncAPI reference).",
}


class OpenApiPageError(Exception):
    """The OpenAPI reference cannot be generated."""


def build_app() -> Any:
    """The gateway application with default settings (no server is contacted)."""
    from langorch_gateway.app import create_app
    from langorch_infra.settings import GatewaySettings

    return create_app(GatewaySettings())


def openapi_document(app: Any | None = None) -> dict[str, Any]:
    """The OpenAPI document of the gateway (raises :class:`OpenApiPageError`)."""
    try:
        document: dict[str, Any] = (app or build_app()).openapi()
    except Exception as exc:
        raise OpenApiPageError(f"cannot build the gateway's OpenAPI document: {type(exc).__name__}: {exc}") from exc
    if not document.get("paths"):
        raise OpenApiPageError("the gateway's OpenAPI document has no paths")
    return document


def app_routes(app: Any) -> list[tuple[str, str, bool]]:
    """``(method, path, in_schema)`` of every HTTP route of ``app`` (HEAD and OPTIONS left out), including the
    routes of included routers."""
    out: list[tuple[str, str, bool]] = []

    def walk(routes: Any, prefix: str, in_schema: bool) -> None:
        for route in routes:
            included = getattr(route, "original_router", None)
            if included is not None:  # FastAPI's wrapper of an included router
                context = getattr(route, "include_context", None)
                walk(included.routes, prefix + str(getattr(context, "prefix", "") or ""),
                     in_schema and bool(getattr(context, "include_in_schema", True)))
                continue
            methods = getattr(route, "methods", None)
            path = getattr(route, "path", None)
            if not methods or not path:
                continue
            shown = in_schema and bool(getattr(route, "include_in_schema", True))
            for method in sorted(methods - {"HEAD", "OPTIONS"}):
                out.append((method, prefix + path, shown))

    walk(app.routes, "", True)
    return out


# -- schemas as short type names ----------------------------------------------------------------------------


def _ref_name(ref: str) -> str:
    return ref.rsplit("/", 1)[-1]


def _anchor(name: str) -> str:
    return "schema-" + re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def _type(schema: dict[str, Any]) -> str:
    """A reader's type for a JSON Schema: ``string``, ``integer (≥ 1)``, ``list of string``, ``RunCreate``…"""
    if "$ref" in schema:
        name = _ref_name(schema["$ref"])
        return f"[`{name}`](#{_anchor(name)})"
    if "anyOf" in schema or "oneOf" in schema:
        options = schema.get("anyOf") or schema.get("oneOf") or []
        present = [o for o in options if o.get("type") != "null"]
        text = " or ".join(_type(o) for o in present) or "null"
        return f"{text} or null" if len(present) < len(options) else text
    if "enum" in schema:
        return "one of " + ", ".join(f"`{v}`" for v in schema["enum"])
    if "const" in schema:
        return f"`{schema['const']}`"
    kind = schema.get("type")
    if kind == "array":
        items = schema.get("items") or {}
        return f"list of {_type(items)}" if items else "list"
    if kind == "object":
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict) and extra:
            return f"object of {_type(extra)}"
        return "object"
    if isinstance(kind, list):
        return " or ".join(str(k) for k in kind)
    if kind is None:
        return "any JSON"
    return str(kind) + _limits(schema)


def _limits(schema: dict[str, Any]) -> str:
    signs = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"),
             ("minLength", "length ≥"), ("maxLength", "length ≤"))
    parts = [f"{sign} {_number(schema[key])}" for key, sign in signs if key in schema]
    if "pattern" in schema:
        parts.append(f"pattern `{schema['pattern']}`")
    return f" ({', '.join(parts)})" if parts else ""


def _without_null(schema: dict[str, Any]) -> dict[str, Any]:
    """A parameter's schema without its ``null`` alternative (a query parameter is absent, never null)."""
    options = schema.get("anyOf")
    if not options:
        return schema
    present = [o for o in options if o.get("type") != "null"]
    if len(present) == 1:
        return {k: v for k, v in schema.items() if k != "anyOf"} | present[0]
    return schema | {"anyOf": present}


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _cell(text: Any) -> str:
    """Text for a Markdown table cell (one line, pipes escaped)."""
    return " ".join(str(text).split()).replace("|", r"\|")


def _default(schema: dict[str, Any]) -> str:
    if "default" not in schema:
        return ""
    return f"`{json.dumps(schema['default'])}`"


# references to internal design documents in docstrings: "(api.md §5.6)", "(api.md §5.3 filters)", "api.md §1.8"
_DESIGN_PAREN = re.compile(r"\s*\([^()]*\b(?:api|ckp|DESIGN)\.md\b[^()]*\)")
_DESIGN_REF = re.compile(r"[,;]?\s*\b(?:api|ckp|DESIGN)\.md(?:\s*§[\d.]+)?")


def clean_text(text: str) -> str:
    """Docstring text without references to internal design documents."""
    return _DESIGN_REF.sub("", _DESIGN_PAREN.sub("", text))


def _first_line(text: str | None) -> str:
    """The first paragraph of a docstring, on one line, with reST literals as Markdown code."""
    if not text:
        return ""
    para = text.strip().split("\n\n", 1)[0]
    return clean_text(" ".join(para.split()).replace("``", "`"))


def public_document(document: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``document`` whose descriptions name no internal design document (for the published file)."""

    def walk(value: Any) -> Any:
        if isinstance(value, dict):
            return {k: clean_text(v) if k == "description" and isinstance(v, str) else walk(v)
                    for k, v in value.items()}
        if isinstance(value, list):
            return [walk(v) for v in value]
        return value

    return walk(document)  # type: ignore[no-any-return]


# -- rendering ----------------------------------------------------------------------------------------------


def _group_of(path: str) -> str:
    segment = path.removeprefix("/api/").split("/", 1)[0] if path.startswith("/api/") else path.strip("/")
    for title, segments, _ in GROUPS:
        if segment in segments:
            return title
    return segment.replace("-", " ").capitalize() or "Other"


def _operations(document: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(group, method, path, operation)`` in page order: by group, then path, then method."""
    order = {title: i for i, (title, _, _) in enumerate(GROUPS)}
    ops = []
    for path, item in document["paths"].items():
        for method in METHODS:
            if method in item:
                ops.append((_group_of(path), method.upper(), path, item[method]))
    ops.sort(key=lambda o: (order.get(o[0], len(order)), o[0], o[2], METHODS.index(o[1].lower())))
    return ops


def _operation(method: str, path: str, op: dict[str, Any]) -> list[str]:
    title = op.get("summary") or op.get("operationId") or f"{method} {path}"
    out = [f"### `{method} {path}`", ""]
    lead = f"**{_cell(title)}.**"
    description = _first_line(op.get("description"))
    if description:
        lead += f" {description}"
    if op.get("deprecated"):
        lead += " *Deprecated: an accepted older spelling, kept for existing clients.*"
    out += [lead, ""]
    params = op.get("parameters") or []
    if params:
        out += ["| Parameter | In | Type | Required | Default |", "|---|---|---|---|---|"]
        for p in params:
            schema = _without_null(p.get("schema") or {})
            out.append(f"| `{p['name']}` | {p.get('in', '')} | {_cell(_type(schema))} | "
                       f"{'yes' if p.get('required') else 'no'} | {_default(schema)} |")
        out.append("")
    body = op.get("requestBody")
    if body:
        parts = []
        for media, content in (body.get("content") or {}).items():
            parts.append(f"{_type(content.get('schema') or {})} (`{media}`)")
        need = "required" if body.get("required") else "optional"
        out += [f"Request body ({need}): {', '.join(parts)}", ""]
    responses = op.get("responses") or {}
    if responses:
        listed = []
        for code, response in sorted(responses.items()):
            text = f"`{code}` {_cell(response.get('description', ''))}"
            schema = next(iter((response.get("content") or {}).values()), {}).get("schema") or {}
            if "$ref" in schema:
                text += f" ({_type(schema)})"
            listed.append(text)
        out += ["Responses: " + "; ".join(listed) + ".", ""]
    return out


def _schema_section(name: str, schema: dict[str, Any]) -> list[str]:
    out = [f'### `{name}` {{ #{_anchor(name)} }}', ""]
    if schema.get("description"):
        out += [_first_line(schema["description"]), ""]
    props = schema.get("properties") or {}
    if not props:
        return [*out, f"{_type(schema)}.", ""]
    required = set(schema.get("required") or [])
    described = any(spec.get("description") for spec in props.values())
    out += ["| Field | Type | Required | Default |" + (" Description |" if described else ""),
            "|---|---|---|---|" + ("---|" if described else "")]
    for field, spec in props.items():
        row = f"| `{field}` | {_cell(_type(spec))} | {'yes' if field in required else 'no'} | {_default(spec)} |"
        if described:
            row += f" {_cell(_first_line(spec.get('description')))} |"
        out.append(row)
    out.append("")
    if schema.get("additionalProperties") is False:
        out += ["Other fields are refused (`422 unknown_field`).", ""]
    return out


def render_reference(document: dict[str, Any], app: Any | None = None) -> str:
    """The Markdown that replaces :data:`PLACEHOLDER`."""
    ops = _operations(document)
    info = document.get("info") or {}
    out = [f"Generated from the gateway's OpenAPI {document.get('openapi', '')} document "
           f"({info.get('title', 'LangOrch API')}, version {info.get('version', '?')}): "
           f"{len(ops)} operations on {len(document['paths'])} paths.", ""]
    intros = {title: text for title, _, text in GROUPS}
    group = None
    for title, method, path, op in ops:
        if title != group:
            group = title
            out += [f"## {title}", ""]
            if title in intros:
                out += [intros[title], ""]
        out += _operation(method, path, op)
    schemas = (document.get("components") or {}).get("schemas") or {}
    if schemas:
        out += ["## Request and response schemas", "",
                "The bodies the operations above name. `HTTPValidationError` is what the generated document "
                "declares for `422`; the gateway actually answers every error with a problem document "
                "(see [Errors](errors.md)).", ""]
        for name in sorted(schemas):
            out += _schema_section(name, schemas[name])
    if app is not None:
        hidden = sorted({(m, p) for m, p, in_schema in app_routes(app) if not in_schema})
        if hidden:
            out += ["## Routes outside the OpenAPI document", "",
                    "The gateway also serves these; they are not API operations, so the document leaves them "
                    "out.", "", "| Method | Path | Serves |", "|---|---|---|"]
            for method, path in hidden:
                out.append(f"| {method} | `{path}` | {_cell(UNDOCUMENTED.get(path, ''))} |")
            out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_page(markdown: str, document: dict[str, Any], app: Any | None = None) -> str:
    """``markdown`` with its placeholder replaced by the reference (raises when the placeholder is missing)."""
    if PLACEHOLDER not in markdown:
        raise OpenApiPageError(f"{PAGE} lost its placeholder {PLACEHOLDER}")
    return markdown.replace(PLACEHOLDER, render_reference(document, app), 1)


# -- MkDocs events ------------------------------------------------------------------------------------------

_state: dict[str, Any] = {}


def _plugin_error(exc: Exception) -> Exception:
    from mkdocs.exceptions import PluginError

    return PluginError(f"OpenAPI reference: {exc}")


def on_pre_build(config: Any) -> None:
    _state.clear()


def on_files(files: Any, config: Any) -> Any:
    """Build the app once per build and add ``api/openapi.json`` to the site."""
    from mkdocs.structure.files import File

    try:
        app = build_app()
        document = openapi_document(app)
    except Exception as exc:
        raise _plugin_error(exc) from exc
    _state.update(app=app, document=document, rendered=False)
    text = json.dumps(public_document(document), indent=2, ensure_ascii=False) + "\n"
    files.append(File.generated(config, JSON_FILE, content=text))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    try:
        if "document" not in _state:
            raise OpenApiPageError("the OpenAPI document was not generated (on_files did not run)")
        out = render_page(markdown, _state["document"], _state["app"])
    except OpenApiPageError as exc:
        raise _plugin_error(exc) from exc
    _state["rendered"] = True
    return out


def on_post_build(config: Any) -> None:
    if not _state.get("rendered"):
        raise _plugin_error(OpenApiPageError(f"{PAGE} was not built, so the OpenAPI reference is missing"))
