"""transform nodes: filter, map, reduce, join, aggregate, pivot, sort and deduplicate transformations."""

from __future__ import annotations

import re
from typing import Any

from ckp_core.compiler.binding import expression, path_expression, template
from ckp_core.compiler.fields import Compilation, NodeContext, templated
from ckp_core.ir import AggregateIR, TransformationIR, TransformPayload

TRANSFORM_TYPES = ("filter", "map", "reduce", "join", "aggregate", "pivot", "sort", "deduplicate")
PIVOT_AGGREGATES = ("first", "last", "count", "sum", "avg", "min", "max")
AGGREGATE_RE = re.compile(
    r"^\s*(count|sum|avg|min|max)\s*(?:\(\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*\))?"
    r"(?:\s+as\s+([A-Za-z_][A-Za-z0-9_]*))?\s*$", re.IGNORECASE)


def node_transform(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> TransformPayload | None:
    p = ctx.path
    raw = n.get("transformations", [])
    if not c.expect(raw, (list,), "array", f"{p}/transformations"):
        return None
    out: list[TransformationIR] = []
    ok = True
    for i, t in enumerate(raw):
        tp = f"{p}/transformations/{i}"
        tr = c.obj(t, tp, ("type", "source_variable", "expression", "output_variable", "params"))
        if tr is None:
            ok = False
            continue
        ttype = c.string(tr, "type", tp, required=True)
        if ttype == "unique":
            c.add("info", "alias_normalised", f"{tp}/type: 'unique' read as 'deduplicate'", f"{tp}/type")
            ttype = "deduplicate"
        if ttype is not None and ttype not in TRANSFORM_TYPES:
            c.add("error", "unknown_transform_type", f"Node '{ctx.node_id}': unknown transform type '{ttype}'",
                  f"{tp}/type")
            ttype = None
        out_var = c.written_field(tr, "output_variable", tp, required=True)
        source = path_expression(c, tr["source_variable"], f"{tp}/source_variable") \
            if "source_variable" in tr else None
        params_raw = tr.get("params", {})
        params = c.obj(params_raw, f"{tp}/params")
        params_tpl = template(c, params_raw, f"{tp}/params") if params is not None else None
        expr = None
        aggs: list[AggregateIR] = []
        expr_src = tr.get("expression")
        if ttype in ("filter", "map", "reduce") and expr_src is None:
            c.required(tr, "expression", tp)
            ok = False
        if ttype == "aggregate":
            if expr_src is None:
                c.required(tr, "expression", tp)
                ok = False
            else:
                aggs = aggregates(c, expr_src, f"{tp}/expression")
                ok = ok and bool(aggs)
        elif expr_src is not None:
            expr = expression(c, expr_src, f"{tp}/expression", check_roots=False)
            ok = ok and expr is not None
        if ttype == "sort" and expr_src is None and not (params and "key" in params):
            c.add("error", "missing_field", f"{tp}: sort needs params.key or an expression",
                  f"{tp}/params/key")
            ok = False
        if ttype == "pivot":
            for key in ("index", "columns", "values"):
                if not (params and key in params):
                    c.add("error", "missing_field", f"{tp}/params: required field '{key}' is missing",
                          f"{tp}/params/{key}")
                    ok = False
            if params and "aggregate" in params and not templated(params["aggregate"]):
                ok = c.enum(params, "aggregate", f"{tp}/params", PIVOT_AGGREGATES) is not None and ok
        if ttype is None or out_var is None or params_tpl is None:
            ok = False
            continue
        out.append(TransformationIR(index=i, type=ttype, source_variable=source,
                                    expression=expr, aggregates=aggs, output_variable=out_var,
                                    params=params_tpl))
    return TransformPayload(transformations=out) if ok else None


def aggregates(c: Compilation, source: Any, path: str) -> list[AggregateIR]:
    if not c.expect(source, (str,), "string", path):
        return []
    out: list[AggregateIR] = []
    for i, part in enumerate(source.split(",")):
        m = AGGREGATE_RE.match(part)
        if m is None or (m.group(1).lower() != "count" and m.group(2) is None):
            c.add("error", "expression_syntax_error", f"{path}: '{part.strip()}' is not an aggregate (count, "
                  f"count(f), sum(f), avg(f), min(f), max(f), optionally 'as <name>') at 1:{i + 1}", path)
            return []
        fn, fld, alias = m.group(1).lower(), m.group(2), m.group(3)
        name = alias or (fn if fld is None else f"{fn}_{fld.replace('.', '_')}")
        out.append(AggregateIR(function=fn, field=fld, name=name))
    return out
