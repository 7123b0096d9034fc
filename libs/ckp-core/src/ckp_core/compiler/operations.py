"""Internal operations (§4.3): the inputs each takes, their aliases and enums, and the compile-time checks.

Used by sequence steps, processing nodes and a terminate node's cleanup and error actions.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jsonschema

from ckp_core.compiler.binding import expression, template
from ckp_core.compiler.fields import VAR_RE, Compilation, NodeContext, regex_problem, templated, valid_timezone
from ckp_core.expressions import json_type_name
from ckp_core.ir import ExpressionIR, OperationIR, SecretRefIR, TemplateIR
from ckp_core.variables import BUILTIN_NAMES

INTERNAL_OPERATIONS = frozenset({
    "log", "wait", "set_variable", "append_to_array", "parse_json", "parse_xml", "parse_csv",
    "parse_excel_data", "calculate", "format_string", "format_data", "extract_regex", "notify", "encrypt",
    "decrypt", "hash", "validate_schema", "convert_type", "generate_id", "get_timestamp", "screenshot",
    "set_checkpoint",
})
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
# Internal operation inputs (§4.3): field → alias of; required fields; name fields never rendered.
OP_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # action: (required, optional)
    "log": (frozenset({"message"}), frozenset({"level"})),
    "wait": (frozenset({"duration_ms"}), frozenset()),
    "set_variable": (frozenset({"variable", "value"}), frozenset()),
    "append_to_array": (frozenset({"array", "value"}), frozenset()),
    "parse_json": (frozenset({"source"}), frozenset()),
    "parse_xml": (frozenset({"source"}), frozenset()),
    "parse_csv": (frozenset({"source"}), frozenset({"delimiter", "quotechar", "header", "infer_types"})),
    "parse_excel_data": (frozenset({"source"}), frozenset({"sheet_name", "header", "header_row"})),
    "calculate": (frozenset({"expression"}), frozenset()),
    "format_string": (frozenset({"template"}), frozenset()),
    "extract_regex": (frozenset({"source", "pattern"}), frozenset({"group", "all", "flags"})),
    "notify": (frozenset(), frozenset({"channel", "recipients", "subject", "message", "metadata"})),
    "encrypt": (frozenset({"value", "key"}), frozenset({"algorithm"})),
    "decrypt": (frozenset({"value", "key"}), frozenset({"algorithm", "output_type"})),
    "hash": (frozenset({"value"}), frozenset({"algorithm", "key", "encoding"})),
    "validate_schema": (frozenset({"value", "schema"}), frozenset({"on_invalid"})),
    "convert_type": (frozenset({"value", "target_type"}), frozenset()),
    "generate_id": (frozenset(), frozenset({"prefix", "format"})),
    "get_timestamp": (frozenset(), frozenset({"format", "timezone"})),
    "screenshot": (frozenset(), frozenset({"uri", "name"})),
    "set_checkpoint": (frozenset(), frozenset()),
}
OP_ALIASES: dict[str, dict[str, str]] = {
    "log": {"value": "message"},
    "wait": {"value": "duration_ms"},
    "format_string": {"value": "template"},
    "validate_schema": {"source": "value"},
    "convert_type": {"source": "value"},
    "screenshot": {"artifact_uri": "uri"},
}
OP_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("encrypt", "algorithm"): ("aes-256-gcm",),
    ("decrypt", "algorithm"): ("aes-256-gcm",),
    ("decrypt", "output_type"): ("string", "json"),
    ("hash", "algorithm"): ("sha256", "sha512", "sha1", "md5", "blake2b"),
    ("hash", "encoding"): ("hex", "base64"),
    ("validate_schema", "on_invalid"): ("fail", "report"),
    ("convert_type", "target_type"): ("string", "number", "integer", "boolean", "array", "object", "json_string"),
    ("generate_id", "format"): ("uuid4", "uuid7", "short"),
}
NAME_FIELDS = ("variable", "array")
SECRET_KEY_OPERATIONS = frozenset({"encrypt", "decrypt", "hash"})
_SECRET_KEY = frozenset({"key"})
_FLAG_OPERATIONS = ("parse_csv", "parse_excel_data", "extract_regex")
# The actions operation_checks has a check for (kept next to it, below).
_CHECKED_OPERATIONS = frozenset({"log", "wait", "extract_regex", "validate_schema", "get_timestamp",
                                 "parse_excel_data", *_FLAG_OPERATIONS})


class _Plan(NamedTuple):
    """What :func:`operation_body` checks of one action's inputs, worked out once per action."""

    aliases: tuple[tuple[str, str], ...]  # (alias, field)
    known: frozenset[str]  # its fields, output_variable included
    required: frozenset[str]
    required_sorted: tuple[str, ...]  # (the order they are reported in)
    names: tuple[str, ...]  # its required name fields, never rendered
    enums: tuple[tuple[str, tuple[str, ...]], ...]  # (field, values)
    checked: bool  # whether operation_checks has a check for it
    secrets: str | frozenset[str]  # where its template may use secrets (see binding.template)


def _plan(action: str) -> _Plan:
    required, optional = OP_FIELDS[action]
    return _Plan(
        aliases=tuple(OP_ALIASES.get(action, {}).items()),
        known=required | optional | {"output_variable"},
        required=required,
        required_sorted=tuple(sorted(required)),
        names=tuple(key for key in NAME_FIELDS if key in required),
        enums=tuple((key, values) for (op, key), values in OP_ENUMS.items() if op == action),
        checked=action in _CHECKED_OPERATIONS,
        secrets=_SECRET_KEY if action in SECRET_KEY_OPERATIONS else "deny",
    )


_PLANS = {action: _plan(action) for action in OP_FIELDS}


def operations(c: Compilation, raw: Any, path: str, ctx: NodeContext) -> list[OperationIR] | None:
    """A list of internal operations (processing, terminate actions)."""
    if not c.expect(raw, (list,), "array", path):
        return None
    out: list[OperationIR] = []
    ok = True
    for i, raw_op in enumerate(raw):
        op_path = f"{path}/{i}"
        o = c.obj(raw_op, op_path)
        if o is None:
            ok = False
            continue
        action = c.string(o, "action", op_path, required=True)
        if action is None:
            ok = False
            continue
        canonical = "format_string" if action == "format_data" else action
        if action == "restore_checkpoint":
            c.add("error", "unsupported_action", f"Node '{ctx.node_id}': action '{action}' is not supported",
                  f"{op_path}/action")
            ok = False
            continue
        if canonical not in INTERNAL_OPERATIONS:
            c.add("error", "unknown_operation", f"Node '{ctx.node_id}': unknown operation '{action}'",
                  f"{op_path}/action")
            ok = False
            continue
        if canonical != action:
            c.add("info", "alias_normalised", f"{op_path}/action: '{action}' read as '{canonical}'",
                  f"{op_path}/action")
        params = {k: v for k, v in o.items() if k != "action"}
        refs: list[SecretRefIR] = []
        body = operation_body(c, canonical, params, op_path, refs)
        if body is None:
            ok = False
            continue
        tpl, names, expression = body
        out_var = names.pop("output_variable", None)
        out.append(OperationIR(index=i, action=canonical, params=tpl, names=names, expression=expression,
                               output_variable=out_var, secrets=refs))
    return out if ok else None


def operation_body(c: Compilation, action: str, params: dict[str, Any], path: str,
                   secret_refs: list[SecretRefIR]) -> tuple[TemplateIR, dict[str, str], ExpressionIR | None] | None:
    """Check and normalise an internal operation's inputs (§4.3); returns (params, names, expression)."""
    plan = _PLANS[action]
    for old, new in plan.aliases:
        if old in params and new not in params:
            params[new] = params.pop(old)
            c.add("info", "alias_normalised", f"{path}/{old}: '{old}' read as '{new}'", f"{path}/{old}")
    if not plan.known.issuperset(params):
        c.unknown_fields(params, plan.known, path)
    ok = True
    if not params.keys() >= plan.required:
        for key in plan.required_sorted:
            if key not in params:
                c.add("error", "missing_field", f"{path}: required field '{key}' is missing", f"{path}/{key}")
                ok = False
    names: dict[str, str] = {}
    for key in plan.names:
        if key in params:
            value = params.pop(key)
            if action == "set_variable" and isinstance(value, str):
                root, *rest = value.split(".") if "." in value else (value,)
                if "" in rest or not VAR_RE.match(root):
                    kp = f"{path}/{key}"
                    c.add("error", "invalid_identifier", f"{kp}: '{value}' is not a valid variable name", kp)
                    ok = False
                elif root not in BUILTIN_NAMES:  # what c.written checks beyond the pattern just matched
                    c.produced.add(root)
                    names[key] = value
                else:
                    c.written(root, f"{path}/{key}")
                    ok = False
            elif c.written(value, f"{path}/{key}") is None:
                ok = False
            else:
                names[key] = str(value)
    if "output_variable" in params:
        out_var = c.written(params.pop("output_variable"), f"{path}/output_variable")
        if out_var is not None:
            names["output_variable"] = out_var
    expr = None
    if action == "calculate" and "expression" in params:
        expr = expression(c, params.pop("expression"), f"{path}/expression")
        ok = ok and expr is not None
    for key, values in plan.enums:
        if key in params and not templated(params[key]) and c.enum(params, key, path, values) is None:
            ok = False
    if plan.checked:
        ok = operation_checks(c, action, params, path) and ok
    tpl = template(c, params, path, secrets=plan.secrets, secret_refs=secret_refs)
    if tpl is None or not ok:
        return None
    return tpl, names, expr


def operation_checks(c: Compilation, action: str, params: dict[str, Any], path: str) -> bool:
    """The checks of particular actions' inputs (those of _CHECKED_OPERATIONS)."""
    ok = True
    if action == "log" and "level" in params and not templated(params["level"]):
        lvl = params["level"]
        if not (isinstance(lvl, str) and lvl.upper() in LOG_LEVELS):
            c.add("error", "invalid_value", f"{path}/level: '{lvl}' is not valid; expected one of DEBUG, INFO, "
                  "WARNING, ERROR", f"{path}/level")
            ok = False
    elif action == "wait" and "duration_ms" in params and not templated(params["duration_ms"]):
        ok = c.integer(params, "duration_ms", path) is not None
    elif action == "extract_regex":
        pattern = params.get("pattern")
        if isinstance(pattern, str) and not templated(pattern):
            problem = regex_problem(pattern)
            if problem:
                c.add("error", "invalid_regex", f"{path}/pattern: invalid regex: {problem}", f"{path}/pattern")
                ok = False
        flags = params.get("flags")
        if flags is not None and not templated(flags) and not (
            isinstance(flags, str) and set(flags) <= set("ims")
        ):
            c.add("error", "invalid_value", f"{path}/flags: '{flags}' is not valid; expected letters i, m, s",
                  f"{path}/flags")
            ok = False
    elif action == "validate_schema" and "schema" in params:
        schema = params["schema"]
        try:
            if not isinstance(schema, dict | bool):
                raise jsonschema.SchemaError(f"expected object, got {json_type_name(schema)}")
            jsonschema.Draft202012Validator.check_schema(schema)
        except jsonschema.SchemaError as exc:
            c.add("error", "invalid_json_schema", f"{path}/schema: invalid schema: {exc.message}",
                  f"{path}/schema")
            ok = False
    elif action == "get_timestamp":
        tz = params.get("timezone")
        if tz is not None and not templated(tz) and not (isinstance(tz, str) and valid_timezone(tz)):
            c.add("error", "invalid_timezone", f"{path}/timezone: unknown time zone '{tz}'", f"{path}/timezone")
            ok = False
    elif action == "parse_excel_data" and "header_row" in params and not templated(params["header_row"]):
        ok = c.integer(params, "header_row", path, minimum=1) is not None
    if action in _FLAG_OPERATIONS:
        for key in ("header", "infer_types", "all"):
            if key in params and not templated(params[key]):
                ok = c.expect(params[key], (bool,), "boolean", f"{path}/{key}") and ok
    return ok
