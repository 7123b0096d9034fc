"""Variable specs (ckp.md §2.1), built-in names (§2.4) and run-input validation (§2.2)."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any, Literal

import re2
from pydantic import BaseModel, ConfigDict, Field

from ckp_core.errors import InvalidInputVars

BUILTIN_NAMES = frozenset({
    "run_id", "root_run_id", "parent_run_id", "procedure_id", "procedure_version", "trigger_type",
    "triggered_by", "node_id", "step_id", "loop_index", "loop_item", "error", "approval", "secrets", "now",
    "today", "run_started_at", "vars",
})

VarType = Literal["string", "number", "integer", "boolean", "array", "object"]


class VariableValidation(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    regex: str | None = None
    min: float | None = None
    max: float | None = None
    allowed_values: list[Any] | None = None


class VariableSpec(BaseModel):
    """One declared variable, normalised to the flat shape."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    type: VarType | None = None
    required: bool = False
    default: Any = None
    has_default: bool = False
    description: str | None = None
    origin: str | None = None
    sensitive: bool = False
    validation: VariableValidation = Field(default_factory=VariableValidation)


_MISSING = object()


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _not_json(constant: str) -> None:
    raise ValueError(f"{constant} is not a JSON number")


def _numeric_string(v: str) -> int | float | None:
    """The number a string holds when, after trimming, it is a JSON number that is finite as a float.

    ``json.loads`` alone also reads ``NaN``/``Infinity`` (not JSON) and overflows ``1e999`` to infinity: none of
    them is a number a run can hold (its inputs are JSON), and ``NaN`` passes every ``min``/``max`` check."""
    s = v.strip()
    try:
        parsed = json.loads(s, parse_constant=_not_json)
    except ValueError:
        return None
    if isinstance(parsed, float) and not math.isfinite(parsed):
        return None
    return parsed if _is_number(parsed) else None


def coerce(value: Any, vtype: VarType | None) -> tuple[bool, Any, str]:
    """Coerce one input value per §2.2; returns (ok, value, message-on-failure)."""
    if vtype is None:
        return True, value, ""
    if vtype == "string":
        return (True, value, "") if isinstance(value, str) else (False, None, "Must be a string")
    if vtype == "number":
        if _is_number(value) and not (isinstance(value, float) and not math.isfinite(value)):
            return True, value, ""
        if isinstance(value, str):
            n = _numeric_string(value)
            if n is not None:
                return True, n, ""
        return False, None, "Must be a number"
    if vtype == "integer":
        candidate: Any = value
        if isinstance(value, str):
            candidate = _numeric_string(value)
        if _is_number(candidate) and (isinstance(candidate, int) or float(candidate).is_integer()):
            return True, int(candidate), ""
        return False, None, "Must be an integer"
    if vtype == "boolean":
        if isinstance(value, bool):
            return True, value, ""
        if isinstance(value, str) and value.strip().lower() in ("true", "false"):
            return True, value.strip().lower() == "true", ""
        return False, None, "Must be a boolean (true/false)"
    if vtype == "array":
        return (True, value, "") if isinstance(value, list) else (False, None, "Must be a valid array")
    return (True, value, "") if isinstance(value, dict) else (False, None, "Must be a valid object")


def _fmt_num(n: float) -> str:
    return str(int(n)) if float(n).is_integer() else repr(n)


def _equal(a: Any, b: Any) -> bool:
    if _is_number(a) and _is_number(b):
        return bool(a == b)
    return bool(type(a) is type(b) and a == b)


def constraint_errors(value: Any, spec: VariableSpec) -> list[str]:
    """Every constraint of §2.2 step 3 that ``value`` (already coerced) violates, in order."""
    errors: list[str] = []
    v = spec.validation
    if v.allowed_values is not None:
        allowed = [coerce(a, spec.type)[1] if coerce(a, spec.type)[0] else a for a in v.allowed_values]
        if not any(_equal(value, a) for a in allowed):
            shown = ", ".join(a if isinstance(a, str) else json.dumps(a) for a in v.allowed_values)
            errors.append(f"Must be one of: {shown}")
    if v.regex is not None and isinstance(value, str):
        try:
            if re2.fullmatch(v.regex, value) is None:
                errors.append(f"Does not match required pattern: {v.regex}")
        except re2.error:
            errors.append(f"Does not match required pattern: {v.regex}")
    if v.min is not None or v.max is not None:
        if _is_number(value):
            if v.min is not None and value < v.min:
                errors.append(f"Must be at least {_fmt_num(v.min)}")
            if v.max is not None and value > v.max:
                errors.append(f"Must be at most {_fmt_num(v.max)}")
        elif isinstance(value, str):
            if v.min is not None and len(value) < v.min:
                errors.append(f"Must be at least {_fmt_num(v.min)} characters")
            if v.max is not None and len(value) > v.max:
                errors.append(f"Must be at most {_fmt_num(v.max)} characters")
        elif isinstance(value, list):
            if v.min is not None and len(value) < v.min:
                errors.append(f"Must contain at least {_fmt_num(v.min)} items")
            if v.max is not None and len(value) > v.max:
                errors.append(f"Must contain at most {_fmt_num(v.max)} items")
    return errors


def check_value(value: Any, spec: VariableSpec) -> list[str]:
    """Coerce and check one value; returns the messages (empty when valid)."""
    ok, coerced, message = coerce(value, spec.type)
    if not ok:
        return [message]
    return constraint_errors(coerced, spec)


def _provided(value: Any) -> bool:
    return not (value is None or (isinstance(value, str) and not value.strip()))


def validate_inputs(
    variables: Mapping[str, VariableSpec],
    inputs: Mapping[str, Any],
    builtins: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Validate and coerce run inputs (§2.2), reporting every failing field at once.

    Returns the variables the run starts with: coerced inputs, defaults (template defaults rendered against
    ``builtins`` and the coerced inputs) and undeclared inputs unchanged. Raises :class:`InvalidInputVars`.
    """
    from ckp_core.expressions import MappingScope
    from ckp_core.templates import compile_template, has_placeholder, render

    errors: dict[str, list[str]] = {}
    result: dict[str, Any] = {}
    template_defaults: list[tuple[str, VariableSpec]] = []
    for name, spec in variables.items():
        raw = inputs.get(name, _MISSING)
        if raw is _MISSING or not _provided(raw):
            if spec.has_default and spec.default is not None:
                if isinstance(spec.default, str) and has_placeholder(spec.default):
                    template_defaults.append((name, spec))
                    continue
                raw = spec.default
            elif spec.required:
                errors[f"input_vars.{name}"] = ["This field is required"]
                continue
            else:
                continue
        ok, coerced, message = coerce(raw, spec.type)
        if not ok:
            errors[f"input_vars.{name}"] = [message]
            continue
        problems = constraint_errors(coerced, spec)
        if problems:
            errors[f"input_vars.{name}"] = problems
            continue
        result[name] = coerced
    for name, value in inputs.items():
        if name in variables:
            continue
        if name in BUILTIN_NAMES:
            errors[f"input_vars.{name}"] = ["Reserved name"]
            continue
        result[name] = value
    for name, spec in template_defaults:
        rendered = render(compile_template(spec.default), MappingScope(dict(builtins or {}), result))
        if rendered is None and spec.required:
            errors[f"input_vars.{name}"] = ["This field is required"]
            continue
        if rendered is None:
            continue
        problems = check_value(rendered, spec)
        if problems:
            errors[f"input_vars.{name}"] = problems
            continue
        result[name] = coerce(rendered, spec.type)[1]
    if errors:
        raise InvalidInputVars(errors)
    return result
