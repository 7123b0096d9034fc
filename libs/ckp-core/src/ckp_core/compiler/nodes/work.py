"""sequence, processing, verification and terminate nodes: steps, internal operations, checks, and the outputs and
final operations of a path."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.binding import expression, opt_template, template
from ckp_core.compiler.fields import MISSING, Compilation, NodeContext
from ckp_core.compiler.operations import operations
from ckp_core.compiler.steps import steps, validation
from ckp_core.ir import (
    CheckIR,
    ProcessingPayload,
    SequencePayload,
    TerminatePayload,
    ValidationIR,
    VerificationPayload,
    construct,
)


def node_sequence(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> SequencePayload | None:
    compiled_steps = steps(c, n.get("steps", []), f"{ctx.path}/steps", ctx)
    validations: list[ValidationIR] = []
    raw_validations = n.get("validations")  # (absent: None, the nulls of a node being dropped)
    if raw_validations is not None and c.expect(raw_validations, (list,), "array", f"{ctx.path}/validations"):
        seen: set[str] = set()
        for i, raw in enumerate(raw_validations):
            v = validation(c, raw, f"{ctx.path}/validations/{i}", ctx, seen)
            if v is not None:
                validations.append(v)
    if compiled_steps is None:
        return None
    return construct(SequencePayload, {"kind": "sequence", "steps": compiled_steps, "validations": validations})


def node_processing(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> ProcessingPayload | None:
    ops = operations(c, n.get("operations", []), f"{ctx.path}/operations", ctx)
    return None if ops is None else ProcessingPayload(operations=ops)


def node_verification(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> VerificationPayload | None:
    p = ctx.path
    raw = c.required(n, "checks", p)
    if raw is MISSING or not c.expect(raw, (list,), "array", f"{p}/checks"):
        return None
    if not raw:
        c.add("error", "invalid_value", f"{p}/checks: '[]' is not valid; expected at least one check",
              f"{p}/checks")
        return None
    checks: list[CheckIR] = []
    seen: set[str] = set()
    for i, raw_check in enumerate(raw):
        cp = f"{p}/checks/{i}"
        ch = c.obj(raw_check, cp, ("id", "condition", "on_fail", "message"))
        if ch is None:
            continue
        cid_raw = c.required(ch, "id", cp)
        cid = None if cid_raw is MISSING else c.identifier(cid_raw, f"{cp}/id", "check id")
        if cid is not None:
            if cid in seen:
                c.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate check id '{cid}'", f"{cp}/id")
            seen.add(cid)
        cond = c.required(ch, "condition", cp)
        condition = None if cond is MISSING else expression(c, cond, f"{cp}/condition")
        on_fail = c.enum(ch, "on_fail", cp, ("fail_workflow", "warn", "continue")) or "fail_workflow"
        message = c.string(ch, "message", cp)
        if cid is not None and condition is not None:
            checks.append(CheckIR(id=cid, condition=condition, on_fail=on_fail, message=message))
    return VerificationPayload(checks=checks) if checks else None


def node_terminate(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> TerminatePayload | None:
    p = ctx.path
    status = c.enum(n, "status", p, ("success", "failed"), aliases={"failure": "failed"})
    if status is None and "status" in n:
        return None
    outputs_raw = n.get("outputs", {})
    outputs = template(c, outputs_raw, f"{p}/outputs") \
        if c.expect(outputs_raw, (dict,), "object", f"{p}/outputs") else None
    cleanup = operations(c, n["cleanup_actions"], f"{p}/cleanup_actions", ctx) if "cleanup_actions" in n else []
    error_actions = operations(c, n["error_actions"], f"{p}/error_actions", ctx) if "error_actions" in n else []
    audit = opt_template(c, n, "final_audit_log", p)
    if outputs is None or cleanup is None or error_actions is None or ("final_audit_log" in n and audit is None):
        return None
    return construct(TerminatePayload, {"kind": "terminate", "status": status or "success", "outputs": outputs,
                                        "cleanup_actions": cleanup, "error_actions": error_actions,
                                        "final_audit_log": audit})
