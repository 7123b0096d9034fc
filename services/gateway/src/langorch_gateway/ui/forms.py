"""The start-run form, generated from a version's ``variables_schema`` (the API's normalised flat form).

The form only collects text: the API validates and coerces the inputs (numbers in strings, ``"true"``/``"false"``),
so its 422 ``invalid_input_vars`` messages are shown beside the fields they name. Only arrays and objects are parsed
here, as JSON, because a text box cannot hold them otherwise.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

FIELD_PREFIX = "var."  # form field names of the variables: var.<name>
STRUCTURED = ("array", "object")


@dataclass(frozen=True)
class Field:
    """One input of the form."""

    name: str
    type: str | None
    required: bool
    description: str | None
    default: Any
    choices: list[str] = field(default_factory=list)
    hint: str = ""
    captured: bool = False  # the workflow sets it (origin system_captured): shown apart, optional

    @property
    def form_name(self) -> str:
        return FIELD_PREFIX + self.name

    @property
    def element_id(self) -> str:
        return "var-" + "".join(ch if ch.isalnum() else "-" for ch in self.name)

    @property
    def error_key(self) -> str:
        return f"input_vars.{self.name}"

    @property
    def multiline(self) -> bool:
        return self.type in STRUCTURED


def fields_of(schema: Mapping[str, Any] | None) -> list[Field]:
    """The form's fields, required ones first, each in declaration order."""
    out: list[Field] = []
    for name, spec in (schema or {}).items():
        rules = spec.get("validation") or {}
        allowed = rules.get("allowed_values")
        vtype = spec.get("type")
        choices = ["true", "false"] if vtype == "boolean" else [_text(v) for v in allowed] if allowed else []
        out.append(Field(name=name, type=vtype, required=bool(spec.get("required")),
                         description=spec.get("description"), default=spec.get("default"), choices=choices,
                         hint=_hint(vtype, rules), captured=spec.get("origin") == "system_captured"))
    return sorted(out, key=lambda f: (not f.required, f.captured))


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _hint(vtype: str | None, rules: Mapping[str, Any]) -> str:
    parts = [vtype or "any type"]
    low, high = rules.get("min"), rules.get("max")
    what = "length " if vtype in ("string", "array") else ""
    if low is not None and high is not None:
        parts.append(f"{what}{low:g} to {high:g}")
    elif low is not None:
        parts.append(f"{what}at least {low:g}")
    elif high is not None:
        parts.append(f"{what}at most {high:g}")
    if rules.get("regex"):
        parts.append(f"matching {rules['regex']}")
    if vtype in STRUCTURED:
        parts.append("as JSON")
    return ", ".join(parts)


def input_vars(fields: list[Field], form: Mapping[str, str]) -> tuple[dict[str, Any], dict[str, list[str]]]:
    """The run's ``input_vars`` from the submitted form, and the fields that could not be read (bad JSON).
    An empty field is left out, so the schema's default applies (or the API reports a required field)."""
    values: dict[str, Any] = {}
    errors: dict[str, list[str]] = {}
    for f in fields:
        raw = form.get(f.form_name, "")
        if raw.strip() == "":
            continue
        if f.multiline:
            try:
                values[f.name] = json.loads(raw)
            except ValueError as exc:
                errors[f.error_key] = [f"Must be valid JSON ({exc.args[0]})"]
        else:
            values[f.name] = raw
    return values, errors


def form_values(fields: list[Field], values: Mapping[str, Any]) -> dict[str, str]:
    """The form's text for known input values (a rerun's form starts from the original run's inputs): strings as
    they are, anything else as JSON."""
    return {f.form_name: _text(values[f.name]) for f in fields if f.name in values}
