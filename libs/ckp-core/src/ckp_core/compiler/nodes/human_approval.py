"""human_approval nodes: the decision asked for, options and their routes, the input schema, the timeout."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.binding import opt_template, template
from ckp_core.compiler.fields import Compilation, NodeContext
from ckp_core.compiler.variables_schema import variable_entries
from ckp_core.diagnostics import pointer
from ckp_core.expressions import json_type_name
from ckp_core.ir import HumanApprovalPayload


def node_human_approval(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> HumanApprovalPayload | None:
    p = ctx.path
    prompt = template(c, n.get("prompt", ""), f"{p}/prompt")
    decision_type = c.enum(n, "decision_type", p, ("approve_reject", "select_option", "provide_input"))
    if decision_type is None and "decision_type" in n:
        return None
    decision_type = decision_type or "approve_reject"
    options: list[str] = []
    if "options" in n and c.expect(n["options"], (list,), "array", f"{p}/options"):
        for i, o in enumerate(n["options"]):
            if c.expect(o, (str,), "string", f"{p}/options/{i}"):
                if o in options:
                    c.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate option id '{o}'",
                          f"{p}/options/{i}")
                options.append(o)
    routes: dict[str, str] = {}
    if "option_routes" in n:
        for opt, target in (c.obj(n["option_routes"], f"{p}/option_routes") or {}).items():
            op_ = f"{p}/option_routes/{pointer(opt)[1:]}"
            if not c.expect(target, (str,), "node id (string)", op_):
                continue
            if opt not in options:
                c.add("error", "invalid_option_route", f"Node '{ctx.node_id}': option_routes key '{opt}' is not "
                      "an option", op_)
                continue
            routes[opt] = target
    on_approve = c.node_ref(n, "on_approve", p)
    on_reject = c.node_ref(n, "on_reject", p)
    on_timeout = c.node_ref(n, "on_timeout", p)
    if decision_type == "select_option":
        if not options:
            c.add("error", "missing_field" if "options" not in n else "invalid_value",
                  f"{p}: select_option requires a non-empty 'options' list", f"{p}/options")
        if on_approve is None and not all(o in routes for o in options):
            c.add("error", "approval_missing_route", f"Node '{ctx.node_id}': select_option requires on_approve "
                  "(or option_routes for every option)", f"{p}/on_approve")
    else:
        for fld, value in (("on_approve", on_approve), ("on_reject", on_reject)):
            if value is None:
                c.add("error", "approval_missing_route", f"Node '{ctx.node_id}': {decision_type} requires "
                      f"{fld}", f"{p}/{fld}")
    input_schema: dict[str, Any] = {}
    if "input_schema" in n:
        raw_schema = n["input_schema"]
        if not isinstance(raw_schema, dict):
            c.add("error", "invalid_json_schema", f"{p}/input_schema: invalid schema: expected a flat "
                  f"variables_schema object, got {json_type_name(raw_schema)}", f"{p}/input_schema")
        else:
            entries = [(k, v, f"{p}/input_schema/{pointer(k)[1:]}", None) for k, v in raw_schema.items()]
            input_schema = variable_entries(c, entries)
    input_variable = c.written_field(n, "input_variable", p)
    decision_variable = c.written_field(n, "decision_variable", p)
    context = opt_template(c, n, "context_data", p)
    timeout = c.integer(n, "timeout_ms", p)
    timeout_action = c.enum(n, "timeout_action", p, ("auto_approve", "auto_reject", "escalate"))
    if timeout_action is not None and timeout is None:
        c.add("warning", "timeout_action_without_timeout", f"Node '{ctx.node_id}': timeout_action has no "
              "effect without timeout_ms", f"{p}/timeout_action")
    if timeout is not None:
        route_field = {"auto_approve": "on_approve", "auto_reject": "on_reject",
                       "escalate": "on_timeout"}.get(timeout_action or "", "on_timeout")
        target = {"on_approve": on_approve, "on_reject": on_reject, "on_timeout": on_timeout}[route_field]
        if timeout_action is None and target is None:
            route_field, target = "on_reject", on_reject
        if target is None:
            c.add("error", "approval_timeout_unrouted", f"Node '{ctx.node_id}': a timeout would route to "
                  f"{route_field}, which is not set", f"{p}/timeout_ms")
    level = c.enum(n, "approval_level", p, ("standard", "manager", "executive"))
    if prompt is None:
        return None
    return HumanApprovalPayload(
        prompt=prompt, decision_type=decision_type, options=options, option_routes=routes,
        input_schema=input_schema, input_variable=input_variable, decision_variable=decision_variable,
        context_data=context, timeout_ms=timeout, timeout_action=timeout_action,
        escalation_contact=c.string(n, "escalation_contact", p), approval_level=level,
        on_approve=on_approve, on_reject=on_reject, on_timeout=on_timeout,
    )
