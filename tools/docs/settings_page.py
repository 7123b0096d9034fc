"""MkDocs hook (see mkdocs.yml): the settings reference of ``docs/operations/configuration.md``, generated at build
time from the pydantic-settings models in ``langorch_infra.settings``.

The committed page holds a short introduction and the placeholder :data:`PLACEHOLDER`; this hook replaces it with
one table per settings class (environment variable, type, default, description), common settings first, then each
service's own, then the nested models a setting holds (the entries of ``LANGORCH_LLM_MODELS``). Secrets show
whether they have a default, never a value.

The build fails (``PluginError``) when the settings cannot be imported, a field has no ``description``, or the
placeholder is missing, so the page can never silently go stale or empty.
"""

from __future__ import annotations

import enum
import inspect
import re
import types
import typing
from collections.abc import Iterator
from typing import Any

from pydantic import BaseModel, SecretStr
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

PAGE = "operations/configuration.md"
PLACEHOLDER = "<!-- settings-reference -->"
SETTINGS_MODULE = "langorch_infra.settings"

# Where each settings class is read; classes not listed here still get a table (named by their docstring).
SERVICE_OF = {
    "CommonSettings": "every service (compiler, runtime, approvals, gateway)",
    "CompilerSettings": "the compiler (`langorch serve compiler`)",
    "RuntimeSettings": "the runtime, including its agent and lease side (`langorch serve runtime`)",
    "ApprovalsSettings": "the approvals service (`langorch serve approvals`)",
    "GatewaySettings": "the gateway: REST/SSE API and projector (`langorch serve gateway`)",
}
NESTED_TITLES = {"LlmModelConfig": "LLM model entries"}
TITLES = {
    "CommonSettings": "Common settings",
    "CompilerSettings": "Compiler",
    "RuntimeSettings": "Runtime",
    "ApprovalsSettings": "Approvals",
    "GatewaySettings": "Gateway",
}
# references to internal design documents inside descriptions ("(api.md §12)", "…; ckp.md §4.3)")
_DOC_REF = re.compile(r"\s*\((?:api|ckp)\.md §[\d.]+\)|[,;]?\s*(?:api|ckp)\.md §[\d.]+")
_CODE_SPAN = re.compile(r"(`[^`]*`)")
_SCALARS = {str: "string", int: "integer", float: "number", bool: "boolean", SecretStr: "secret"}


class SettingsPageError(Exception):
    """The settings reference cannot be generated."""


def _settings_classes(module: types.ModuleType) -> list[type[Any]]:
    """Every ``BaseSettings`` subclass defined in ``module``, in definition order (the common base first)."""
    from pydantic_settings import BaseSettings

    found = [obj for obj in vars(module).values()
             if inspect.isclass(obj) and issubclass(obj, BaseSettings) and obj.__module__ == module.__name__]
    if not found:
        raise SettingsPageError(f"no settings classes found in {module.__name__}")
    return found


def _clean(text: str) -> str:
    """Description text for a Markdown table cell: design-document references dropped, ``|``, ``<``, ``*`` escaped
    outside code spans, on one line."""
    text = " ".join(_DOC_REF.sub("", text).split())
    text = text.replace("()", "").replace(" ,", ",").strip()
    parts = _CODE_SPAN.split(text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            parts[i] = part.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("*", r"\*")
    return "".join(parts).replace("|", r"\|")


def _type_name(annotation: Any) -> str:
    """A reader's name for a field type (``string``, ``list of strings``, ``one of `dev`, `qa`, `prod```…)."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin is typing.Annotated:
        return _type_name(args[0])
    if origin in (typing.Union, types.UnionType):
        present = [a for a in args if a is not type(None)]
        name = " or ".join(_type_name(a) for a in present)
        return f"{name} (optional)" if len(present) < len(args) else name
    if origin is typing.Literal:
        return "one of " + ", ".join(f"`{v}`" for v in args)
    if origin in (list, tuple, set, frozenset):
        return f"list of {_plural(_type_name(args[0]))}" if args else "list"
    if origin is dict:
        if len(args) == 2 and inspect.isclass(args[1]) and issubclass(args[1], BaseModel):
            return f"JSON object of {_model_anchor_name(args[1])}"
        return f"JSON object ({_type_name(args[0])} → {_type_name(args[1])})" if args else "JSON object"
    if annotation in _SCALARS:
        return _SCALARS[annotation]
    if inspect.isclass(annotation) and issubclass(annotation, enum.Enum):
        return "one of " + ", ".join(f"`{m.value}`" for m in annotation)
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return f"JSON object ({_model_anchor_name(annotation)})"
    raise SettingsPageError(f"no documented name for the type {annotation!r}")


def _plural(name: str) -> str:
    return name + "s" if name in ("string", "integer", "number", "boolean") else name


def _model_title(model: type[BaseModel]) -> str:
    return NESTED_TITLES.get(model.__name__, model.__name__)


def _model_anchor_name(model: type[BaseModel]) -> str:
    return f"[{_model_title(model).lower()}](#{_slug(_model_title(model))})"


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _constraints(field: FieldInfo) -> str:
    signs = {"ge": "≥", "gt": ">", "le": "≤", "lt": "<"}
    out = []
    for meta in field.metadata:
        for attr, sign in signs.items():
            value = getattr(meta, attr, None)
            if value is not None:
                out.append(f"{sign} {_scalar(value)}")
    return ", ".join(out)


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)


def _scalar(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _default(field: FieldInfo) -> str:
    if field.is_required():
        return "*required*"
    value = field.default_factory() if field.default_factory is not None else field.default  # type: ignore[call-arg]
    if value is PydanticUndefined:
        return "*required*"
    if _is_secret(field.annotation) or isinstance(value, SecretStr):
        return "unset" if value is None else "*built in* (secret, not shown)"
    if value is None:
        return "unset"
    if isinstance(value, dict | list):
        import json

        return f"`{json.dumps(value)}`"
    if isinstance(value, enum.Enum):
        value = value.value
    return f"`{_scalar(value)}`"


def _env_name(cls: type[Any], name: str, field: FieldInfo) -> str:
    alias = field.validation_alias if isinstance(field.validation_alias, str) else field.alias
    if alias:
        return alias.upper()
    prefix = str(cls.model_config.get("env_prefix", ""))
    return f"{prefix}{name}".upper()


def _description(owner: str, name: str, field: FieldInfo) -> str:
    if not field.description or not field.description.strip():
        raise SettingsPageError(f"{owner}.{name} has no description: add Field(description=...) in "
                                f"{SETTINGS_MODULE}")
    return _clean(field.description)


def _own_fields(cls: type[Any], base: type[Any] | None) -> Iterator[tuple[str, FieldInfo]]:
    """The fields ``cls`` adds to (or redefines from) ``base``."""
    inherited = base.model_fields if base is not None else {}
    for name, field in cls.model_fields.items():
        if name not in inherited or repr(inherited[name]) != repr(field):
            yield name, field


def _nested_models(classes: list[type[Any]]) -> list[type[BaseModel]]:
    seen: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
            if annotation not in seen:
                seen.append(annotation)
            return
        for arg in typing.get_args(annotation):
            visit(arg)

    for cls in classes:
        for field in cls.model_fields.values():
            visit(field.annotation)
    return [m for m in seen if m not in classes]


def _doc(cls: type[Any]) -> str:
    return _clean(inspect.cleandoc(cls.__doc__ or "").split("\n\n")[0].replace("``", "`"))


def _shared_names(classes: list[type[Any]]) -> list[str]:
    """A list of the variables that several service classes define for themselves (each reads its own)."""
    owners: dict[str, list[str]] = {}
    common = next((c for c in classes if c.__name__ == "CommonSettings"), None)
    for cls in classes:
        if cls is common:
            continue
        for name, field in _own_fields(cls, common):
            owners.setdefault(_env_name(cls, name, field), []).append(TITLES.get(cls.__name__, cls.__name__))
    shared = {env: names for env, names in owners.items() if len(names) > 1}
    if not shared:
        return []
    out = ["## Variables read by several services", "",
           "These variables appear in more than one table above. Each service reads the variable for its own "
           "purpose (and may have its own default), so when you run services in separate processes give them "
           "the same value everywhere unless you mean otherwise.", "",
           "| Environment variable | Read by |", "|---|---|"]
    out += [f"| `{env}` | {', '.join(names)} |" for env, names in sorted(shared.items())]
    return [*out, ""]


def render_settings_reference() -> str:
    """The Markdown that replaces :data:`PLACEHOLDER` (raises :class:`SettingsPageError`)."""
    import importlib

    from pydantic_settings import BaseSettings

    try:
        module = importlib.import_module(SETTINGS_MODULE)
    except Exception as exc:
        raise SettingsPageError(f"cannot import {SETTINGS_MODULE}: {exc}") from exc
    classes = _settings_classes(module)
    common = next((c for c in classes if c.__name__ == "CommonSettings"), None)
    out: list[str] = []
    for cls in classes:
        base = None if cls is common else common
        title = TITLES.get(cls.__name__, cls.__name__.removesuffix("Settings"))
        out += [f"## {title}", ""]
        where = SERVICE_OF.get(cls.__name__)
        lead = f"Read by {where}." if where else _doc(cls)
        if base is not None:
            lead += " The [common settings](#common-settings) apply as well."
        out += [f"{lead} Class `{cls.__name__}`.", ""]
        rows = [(name, field) for name, field in _own_fields(cls, base)]
        if not rows:
            out += ["No settings of its own.", ""]
            continue
        out += ["| Environment variable | Type | Default | Description |", "|---|---|---|---|"]
        for name, field in rows:
            kind = _type_name(field.annotation)
            limits = _constraints(field)
            if limits:
                kind += f", {limits}"
            out.append(f"| `{_env_name(cls, name, field)}` | {kind} | {_default(field)} | "
                       f"{_description(cls.__name__, name, field)} |")
        out.append("")
    out += _shared_names(classes)
    for model in _nested_models(classes):
        if issubclass(model, BaseSettings):
            continue
        out += [f"## {_model_title(model)}", "", f"{_doc(model)} Each key is a model name; its value is a JSON object "
                "with these fields.", "", "| Field | Type | Default | Description |", "|---|---|---|---|"]
        for name, field in model.model_fields.items():
            kind = _type_name(field.annotation)
            limits = _constraints(field)
            if limits:
                kind += f", {limits}"
            out.append(f"| `{name}` | {kind} | {_default(field)} | {_description(model.__name__, name, field)} |")
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def render_page(markdown: str) -> str:
    """``markdown`` with its placeholder replaced by the reference (raises when the placeholder is missing)."""
    if PLACEHOLDER not in markdown:
        raise SettingsPageError(f"{PAGE} lost its placeholder {PLACEHOLDER}")
    return markdown.replace(PLACEHOLDER, render_settings_reference(), 1)


# -- MkDocs events -----------------------------------------------------------------------------------------------

_rendered = False


def on_pre_build(config: Any) -> None:
    global _rendered
    _rendered = False


def on_page_markdown(markdown: str, page: Any, config: Any, files: Any) -> str:
    global _rendered
    if page.file.src_uri != PAGE:
        return markdown
    from mkdocs.exceptions import PluginError

    try:
        out = render_page(markdown)
    except SettingsPageError as exc:
        raise PluginError(f"settings reference: {exc}") from exc
    _rendered = True
    return out


def on_post_build(config: Any) -> None:
    if not _rendered:
        from mkdocs.exceptions import PluginError

        raise PluginError(f"settings reference: {PAGE} was not built, so the settings reference is missing")
