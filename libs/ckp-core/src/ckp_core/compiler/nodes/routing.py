"""logic, loop and parallel nodes: the types that route to other nodes of the graph."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.binding import expression, opt_template
from ckp_core.compiler.fields import MISSING, Compilation, NodeContext
from ckp_core.ir import BranchIR, LogicPayload, LoopPayload, ParallelPayload, RuleIR, construct

_RULE_FIELDS = frozenset({"condition", "next_node"})


def node_logic(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> LogicPayload | None:
    rules_raw = n.get("rules", [])
    default = c.node_ref(n, "default_next_node", ctx.path)
    if type(rules_raw) is not list and not c.expect(rules_raw, (list,), "array", f"{ctx.path}/rules"):
        return None
    rules: list[RuleIR] = []
    for i, rule in enumerate(rules_raw):
        rp = f"{ctx.path}/rules/{i}"
        r = c.view(rule, rp)
        if r is None:
            continue
        if not _RULE_FIELDS.issuperset(r):
            c.unknown_fields(r, _RULE_FIELDS, rp)
        cond = r["condition"] if "condition" in r else c.required(r, "condition", rp)
        target = r.get("next_node")
        if type(target) is not str:  # (the common case without a reader's call)
            target = c.node_ref(r, "next_node", rp, required=True)
        condition = None if cond is MISSING else expression(c, cond, f"{rp}/condition")
        if condition is not None and target is not None:
            rules.append(construct(RuleIR, {"condition": condition, "next_node": target}))
    if not rules_raw and default is None:
        c.add("error", "empty_logic", f"Node '{ctx.node_id}': logic needs at least one rule or a "
              "default_next_node", ctx.path)
    elif default is None:
        c.add("warning", "logic_without_default", f"Node '{ctx.node_id}': no default_next_node; an unmatched "
              "run fails with logic_no_route", ctx.path)
    return construct(LogicPayload, {"kind": "logic", "rules": rules, "default_next_node": default})


def node_loop(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> LoopPayload | None:
    p = ctx.path
    it = c.required(n, "iterator", p)
    iterator = None if it is MISSING else expression(c, it, f"{p}/iterator")
    var = c.written_field(n, "iterator_variable", p, required=True)
    index = c.written_field(n, "index_variable", p)
    body = c.node_ref(n, "body_node", p, required=True)
    collect = c.written_field(n, "collect_variable", p)
    collect_expr = opt_template(c, n, "collect_expression", p)
    errors_var = c.written_field(n, "errors_variable", p)
    max_iter = c.integer(n, "max_iterations", p)
    if iterator is None or var is None or body is None:
        return None
    return LoopPayload(iterator=iterator, iterator_variable=var, index_variable=index, body_node=body,
                       collect_variable=collect, collect_expression=collect_expr, errors_variable=errors_var,
                       max_iterations=max_iter, continue_on_error=c.boolean(n, "continue_on_error", p))


def node_parallel(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> ParallelPayload | None:
    p = ctx.path
    raw = n.get("branches", [])
    branches: list[BranchIR] = []
    if c.expect(raw, (list,), "array", f"{p}/branches"):
        if not raw:
            c.add("error", "empty_parallel", f"Node '{ctx.node_id}': parallel needs at least one branch",
                  f"{p}/branches")
        seen: set[str] = set()
        for i, b in enumerate(raw):
            bp = f"{p}/branches/{i}"
            br = c.obj(b, bp, ("branch_id", "start_node"))
            if br is None:
                continue
            bid_raw = c.required(br, "branch_id", bp)
            bid = None if bid_raw is MISSING else c.identifier(bid_raw, f"{bp}/branch_id", "branch id")
            start = c.node_ref(br, "start_node", bp, required=True)
            if bid is not None and bid in seen:
                c.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate branch id '{bid}'",
                      f"{bp}/branch_id")
            if bid is not None:
                seen.add(bid)
            if bid is not None and start is not None:
                branches.append(BranchIR(branch_id=bid, start_node=start))
    wait = c.enum(n, "wait_strategy", p, ("all", "any"), aliases={"first": "any"})
    failure = n.get("branch_failure")
    if failure == "retry":
        c.add("error", "invalid_value", f"{p}/branch_failure: 'retry' is not valid; expected one of continue, "
              "fail", f"{p}/branch_failure")
        bf = None
    else:
        bf = c.enum(n, "branch_failure", p, ("continue", "fail"), aliases={"stop": "fail"})
    conc = c.integer(n, "max_concurrency", p, minimum=1)
    c.produced.add("parallel_results")
    if not branches:
        return None
    return ParallelPayload(branches=branches, wait_strategy=wait or "all",
                           branch_failure=bf or "continue", max_concurrency=conc)
