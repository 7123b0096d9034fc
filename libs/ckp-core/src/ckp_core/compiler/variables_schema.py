"""``variables_schema``: the declared variables, flat or grouped as required/optional (also used for a
human_approval node's input_schema)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import re2

from ckp_core.compiler.binding import template
from ckp_core.compiler.fields import VAR_RE, Compilation, strip_object, templated
from ckp_core.diagnostics import pointer
from ckp_core.variables import BUILTIN_NAMES, VariableSpec, VariableValidation, check_value

VAR_TYPES = ("string", "number", "integer", "boolean", "array", "object")


def variables_schema(c: Compilation, doc: dict[str, Any]) -> dict[str, VariableSpec]:
    raw = doc.get("variables_schema")
    if raw is None or not c.expect(raw, (dict,), "object", "/variables_schema"):
        return {}
    raw = strip_object(raw)
    entries: list[tuple[str, Any, str, bool | None]] = []
    nested = any(isinstance(raw.get(k), dict) for k in ("required", "optional"))
    if nested:
        for group, flag in (("required", True), ("optional", False)):
            block = raw.get(group)
            if block is None:
                continue
            if c.expect(block, (dict,), "object", f"/variables_schema/{group}"):
                for name, spec in block.items():
                    entries.append((name, spec, pointer("variables_schema", group, name), flag))
        for key in raw:
            if key not in ("required", "optional"):
                c.add("warning", "unknown_field", f"/variables_schema: unknown field '{key}' is ignored",
                      pointer("variables_schema", key))
        c.add("info", "alias_normalised", "/variables_schema: 'required/optional' read as flat variables",
              "/variables_schema")
    else:
        entries = [(n, s, pointer("variables_schema", n), None) for n, s in raw.items()]
    return variable_entries(c, entries)


def variable_entries(c: Compilation,
                     entries: Sequence[tuple[str, Any, str, bool | None]]) -> dict[str, VariableSpec]:
    out: dict[str, VariableSpec] = {}
    for name, spec, path, group_flag in entries:
        if name.startswith("_"):
            continue
        if not VAR_RE.match(name):
            c.add("error", "invalid_identifier", f"{path}: '{name}' is not a valid variable name", path)
            continue
        if name in BUILTIN_NAMES:
            c.add("error", "reserved_variable_name", f"{path}: '{name}' is a reserved name", path)
            continue
        if not c.expect(spec, (dict,), "object", path):
            continue
        parsed = variable_spec(c, strip_object(spec), path, group_flag)
        if parsed is not None:
            out[name] = parsed
    return out


def variable_spec(c: Compilation, spec: dict[str, Any], path: str, flag: bool | None) -> VariableSpec | None:
    c.unknown_fields(spec, ("type", "required", "default", "description", "origin", "sensitive",
                            "validation"), path)
    vtype = c.enum(spec, "type", path, VAR_TYPES)
    if "type" in spec and vtype is None:
        return None
    required = c.boolean(spec, "required", path, default=bool(flag))
    validation = c.obj(spec.get("validation", {}), f"{path}/validation",
                       ("regex", "min", "max", "allowed_values", "sensitive"))
    if validation is None:
        return None
    vp = f"{path}/validation"
    sensitive = c.boolean(spec, "sensitive", path)
    if "sensitive" in validation:
        c.add("info", "alias_normalised", f"{vp}/sensitive: 'validation.sensitive' read as 'sensitive'",
              f"{vp}/sensitive")
        sensitive = sensitive or c.boolean(validation, "sensitive", vp)
    regex = c.string(validation, "regex", vp)
    if regex is not None:
        try:
            re2.compile(regex)
        except re2.error as exc:
            c.add("error", "invalid_regex", f"{vp}/regex: invalid regex: {exc}", f"{vp}/regex")
            return None
    bounds = {b: c.number(validation, b, vp) for b in ("min", "max")}
    allowed = validation.get("allowed_values")
    if allowed is not None and not c.expect(allowed, (list,), "array", f"{vp}/allowed_values"):
        return None
    description = c.string(spec, "description", path)
    origin = c.enum(spec, "origin", path, ("user_strict", "user_lazy", "system_captured"), severity="warning")
    out = VariableSpec(
        type=vtype, required=required, default=spec.get("default"), has_default="default" in spec,
        description=description, origin=origin, sensitive=sensitive,
        validation=VariableValidation(regex=regex, min=bounds["min"], max=bounds["max"], allowed_values=allowed),
    )
    if "default" in spec:
        default = spec["default"]
        if templated(default):
            template(c, default, f"{path}/default")
        else:
            for message in check_value(default, out):
                c.add("error", "invalid_default", f"{path}/default: default {message}", f"{path}/default")
    return out
