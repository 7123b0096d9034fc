"""subflow nodes: the child procedure and the output mapping; the input mapping is bound after every node is
compiled (:func:`finish_subflows`), when all parent variables are known."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from ckp_core.compiler.binding import expression, path_expression, template
from ckp_core.compiler.fields import PROCEDURE_ID_RE, Compilation, NodeContext
from ckp_core.diagnostics import pointer
from ckp_core.ir import ExpressionIR, NodeIR, SubflowPayload, TemplateIR, TriggerIR
from ckp_core.variables import VariableSpec

BARE_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+|\[[0-9]+\])*$")


def node_subflow(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> SubflowPayload | None:
    p = ctx.path
    pid = c.string(n, "procedure_id", p, required=True)
    if pid is not None and not PROCEDURE_ID_RE.match(pid):
        c.add("error", "invalid_identifier", f"{p}/procedure_id: '{pid}' is not a valid procedure id",
              f"{p}/procedure_id")
        pid = None
    version = c.string(n, "version", p)
    if version == "latest":
        version = None
    mapping: dict[str, Any] = {}
    if "input_mapping" in n:
        mapping = c.obj(n["input_mapping"], f"{p}/input_mapping") or {}
        mapping = dict(n["input_mapping"]) if mapping else {}
    outputs: dict[str, ExpressionIR] = {}
    if "output_mapping" in n:
        om = c.obj(n["output_mapping"], f"{p}/output_mapping") or {}
        for var, child_path in om.items():
            vp = f"{p}/output_mapping/{pointer(var)[1:]}"
            if c.written(var, vp) is None:
                continue
            expr = path_expression(c, child_path, vp, check_roots=False)
            if expr is not None:
                outputs[var] = expr
    else:
        c.produced.add("subflow_output")
    if not outputs:
        c.produced.add("subflow_output")
    on_failure = c.enum(n, "on_failure", p, ("fail_parent", "continue", "retry")) or "fail_parent"
    retries = c.integer(n, "max_retries", p)
    if pid is None:
        return None
    c.pending_subflows.append((ctx.node_id, mapping, f"{p}/input_mapping"))
    return SubflowPayload(procedure_id=pid, version=version, input_mapping=TemplateIR(source={}),
                          output_mapping=outputs, inherit_context=c.boolean(n, "inherit_context", p),
                          on_failure=on_failure, max_retries=1 if retries is None else retries)


def finish_subflows(c: Compilation, nodes: dict[str, NodeIR], variables: Mapping[str, VariableSpec],
                    trigger: TriggerIR | None) -> None:
    """Subflow input mappings need the complete set of parent variables (bare references, §3.9)."""
    known = set(variables) | c.produced | set(trigger.input_vars if trigger else ())
    for node_id, mapping, path in c.pending_subflows:
        c.node_id = node_id
        paths: dict[str, ExpressionIR] = {}
        rest: dict[str, Any] = {}
        for key, value in mapping.items():
            kp = f"{path}/{pointer(key)[1:]}"
            if isinstance(value, str) and BARE_PATH_RE.match(value.strip()) \
                    and value.strip().split(".")[0].split("[")[0] in known:
                c.add("info", "bare_reference", f"{kp}: '{value}' is read as a variable; write "
                      f"'{{{{{value.strip()}}}}}'", kp)
                expr = expression(c, value.strip(), kp)
                if expr is not None:
                    paths[key] = expr
            else:
                rest[key] = value
        tpl = template(c, rest, path)
        node = nodes.get(node_id)
        if node is not None and isinstance(node.payload, SubflowPayload) and tpl is not None:
            payload = node.payload.model_copy(update={"input_mapping": tpl, "input_paths": paths})
            nodes[node_id] = node.model_copy(update={"payload": payload})
        elif node is not None:
            del nodes[node_id]
    c.node_id = None
