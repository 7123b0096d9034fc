"""MkDocs hook (see mkdocs.yml): the AsyncAPI reference of ``docs/api/asyncapi.md``, generated at build time from
the same declarations the services consume with.

``langorch_infra.messaging.asyncapi_document`` is the document a running gateway serves at
``GET /api/asyncapi.json`` (FastStream generates it from the declared consumers and publishers; nothing is
contacted). The hook adds it to the site as ``api/asyncapi.json`` (descriptions without references to internal
design documents, as for ``api/openapi.json``) and replaces the page's placeholder with one table of the channels
LangOrch consumes and one of the events it publishes. The build fails (``PluginError``) when the document cannot be
generated, has no channels, or the placeholder is missing.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from types import ModuleType
from typing import Any
from urllib.parse import unquote

PAGE = "api/asyncapi.md"
JSON_FILE = "api/asyncapi.json"
PLACEHOLDER = "<!-- asyncapi-reference -->"


class AsyncApiPageError(Exception):
    """The AsyncAPI reference cannot be generated."""


def _openapi_hook() -> ModuleType:
    """The OpenAPI hook beside this file, for its description cleaning and table cells."""
    path = Path(__file__).resolve().parent / "openapi_page.py"
    spec = importlib.util.spec_from_file_location("langorch_docs_openapi_page_for_asyncapi", path)
    if spec is None or spec.loader is None:
        raise AsyncApiPageError(f"cannot load {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def asyncapi_document() -> dict[str, Any]:
    """The published document (raises :class:`AsyncApiPageError`)."""
    try:
        from langorch_gateway.app import SERVICE_VERSION
        from langorch_gateway.routes_api_docs import nats_interface

        document: dict[str, Any] = nats_interface(SERVICE_VERSION)
    except Exception as exc:  # any failure of the generation fails the build with its cause
        raise AsyncApiPageError(f"cannot build the AsyncAPI document: {type(exc).__name__}: {exc}") from exc
    if not document.get("channels"):
        raise AsyncApiPageError("the AsyncAPI document has no channels")
    return _openapi_hook().public_document(document)  # type: ignore[no-any-return]


def _ref(ref: str) -> str:
    return unquote(ref.rsplit("/", 1)[-1])


def _payloads(document: dict[str, Any], channel: dict[str, Any]) -> list[str]:
    names: list[str] = []
    for ref in channel.get("messages", {}).values():
        payload = document["components"]["messages"][_ref(ref["$ref"])]["payload"]
        names += [_ref(one["$ref"]) for one in payload.get("oneOf", [payload]) if "$ref" in one]
    return names


def _first_line(text: str | None) -> str:
    line = " ".join((text or "").strip().split("\n\n", 1)[0].split()).replace("``", "`")
    return line.replace("|", "\\|").replace("<", "&lt;").replace(">", "&gt;")  # text, never HTML


def render_reference(document: dict[str, Any]) -> str:
    """The Markdown that replaces :data:`PLACEHOLDER`."""
    channels = document["channels"]
    by_action: dict[str, list[tuple[str, dict[str, Any]]]] = {"receive": [], "send": []}
    for operation in document["operations"].values():
        key = _ref(operation["channel"]["$ref"])
        by_action[operation["action"]].append((key, channels[key]))
    info = document.get("info") or {}
    out = [f"Generated from LangOrch's messaging declarations: AsyncAPI {document['asyncapi']} "
           f"({info.get('title', '')}, version {info.get('version', '?')}), {len(channels)} channels.", "",
           "## Consumed by LangOrch", "",
           "Commands are internal: only LangOrch services publish them. Each row is one durable pull consumer "
           "(or one filter of it).", "",
           "| Subject | Consumer | Messages | What happens |", "|---|---|---|---|"]
    for key, channel in sorted(by_action["receive"], key=lambda kc: kc[1]["address"]):
        messages = ", ".join(f"`{name}`" for name in _payloads(document, channel))
        out.append(f"| `{channel['address']}` | `{key.split(':', 1)[0]}` | {messages} | "
                   f"{_first_line(channel.get('description'))} |")
    out += ["", "## Published by LangOrch", "",
            "Every event is the event envelope with `type` and `data` of its type; `*` is the aggregate id "
            "(encoded to be token-safe). The schemas of the payloads are in the document and at "
            "`GET /api/schemas/events`.", "",
            "| Subject | Payload (`data`) | Meaning |", "|---|---|---|"]
    schemas = document["components"]["schemas"]
    for _, channel in sorted(by_action["send"], key=lambda kc: kc[1]["address"]):
        [envelope] = _payloads(document, channel)
        data = _ref(schemas[envelope]["properties"]["data"]["$ref"])
        out.append(f"| `{channel['address']}` | `{data}` | {_first_line(channel.get('description'))} |")
    return "\n".join(out).rstrip() + "\n"


def render_page(markdown: str, document: dict[str, Any]) -> str:
    """``markdown`` with its placeholder replaced by the reference (raises when the placeholder is missing)."""
    if PLACEHOLDER not in markdown:
        raise AsyncApiPageError(f"{PAGE} lost its placeholder {PLACEHOLDER}")
    return markdown.replace(PLACEHOLDER, render_reference(document), 1)


# -- MkDocs events ------------------------------------------------------------------------------------------

_state: dict[str, Any] = {}


def _plugin_error(exc: Exception) -> Exception:
    from mkdocs.exceptions import PluginError

    return PluginError(f"AsyncAPI reference: {exc}")


def on_pre_build(config: Any) -> None:
    _state.clear()


def on_files(files: Any, config: Any) -> Any:
    """Generate the document once per build and add ``api/asyncapi.json`` to the site."""
    from mkdocs.structure.files import File

    try:
        document = asyncapi_document()
    except Exception as exc:  # reported as the build's PluginError
        raise _plugin_error(exc) from exc
    _state.update(document=document, rendered=False)
    files.append(File.generated(config, JSON_FILE, content=json.dumps(document, indent=2, ensure_ascii=False) + "\n"))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    if page.file.src_uri != PAGE:
        return markdown
    try:
        if "document" not in _state:
            raise AsyncApiPageError("the AsyncAPI document was not generated (on_files did not run)")
        out = render_page(markdown, _state["document"])
    except AsyncApiPageError as exc:
        raise _plugin_error(exc) from exc
    _state["rendered"] = True
    return out


def on_post_build(config: Any) -> None:
    if not _state.get("rendered"):
        raise _plugin_error(AsyncApiPageError(f"{PAGE} was not built, so the AsyncAPI reference is missing"))
