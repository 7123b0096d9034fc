"""``human_approval`` (ckp.md §3.6): asks once per visit (the request is kept in the step store, so a replayed
super-step does not ask twice), pauses the frame until the decision, then routes on it. Test overrides and dry runs
decide at once (§7.9)."""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from ckp_core.events import (
    ApprovalAutoResolved,
    ApprovalDecisionReceived,
    ApprovalRequested,
    StepTestOverrideApplied,
    format_time,
)
from ckp_core.ids import new_id
from ckp_core.ir import HumanApprovalPayload, NodeIR
from langorch_runtime.frames import APPROVALS_KEY, ApprovalData, Frame, NodeState, RunState, frame_string, vars_of
from langorch_runtime.machine.outcomes import Next, Outcome, Pause
from langorch_runtime.machine.steps import StepRunner
from langorch_runtime.steps import StepRecord, now_iso


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: HumanApprovalPayload) -> Outcome | None:
    data = cast(ApprovalData, current["data"])  # the approval id, once asked
    fs = frame_string(frame, node.id, current["visit"])
    gc = m.ir.global_config
    resolution: dict[str, Any] | None = None
    if "wait_id" in data:
        resolution = state.get("resolutions", {}).pop(data["wait_id"], None)
        if resolution is None:
            return Pause(data["wait_id"], "awaiting_approval")
        decision = decision_record(p, resolution, data["wait_id"])
    elif node.id in gc.test_data_overrides:
        override = gc.test_data_overrides[node.id]
        await m.emit(StepTestOverrideApplied(node_id=node.id, frame=fs, override_key=node.id))
        raw = override if isinstance(override, dict) else {"decision": override}
        decision = decision_record(p, {**raw, "source": "test_override"}, None)
    elif m.dry_run():
        auto = p.options[0] if p.decision_type == "select_option" and p.options else "approved"
        decision = decision_record(p, {"decision": auto, "payload": {} if p.decision_type ==
                                       "provide_input" else None, "source": "dry_run"}, None)
        route = route_decision(p, decision)
        await m.emit(ApprovalAutoResolved(node_id=node.id, frame=fs, decision=auto,
                                          payload=decision.get("payload"), routed_to=route))
        store_decision(state, frame, node, p, decision)
        return Next(route)
    else:
        return await ask(m, state, frame, node, data, p, fs)
    route = route_decision(p, decision)
    store_decision(state, frame, node, p, decision)
    if not (resolution or {}).get("_announced"):
        await m.emit(decision_received(node, fs, p, decision, resumes_run=resolution is not None))
    return Next(route)


async def ask(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, data: ApprovalData,
              p: HumanApprovalPayload, fs: str) -> Outcome:
    """Request the approval (``approval_requested``, ``lo.cmd.approval.request``) and wait for its decision."""
    prompt = await m.render(p.prompt, state, frame, node.id, None, "/prompt", text=True)
    context = None
    if p.context_data is not None:
        context = await m.render(p.context_data, state, frame, node.id, None, "/context_data")
    # a retried run asks again: its earlier approvals were canceled when it ended
    identity = f"{node.id}:approval:{fs}" + (f":retry{m.run.retry_epoch}" if m.run.retry_epoch else "")
    record = await m.steps.get(identity)
    known = (record.result or {}) if record is not None else {}
    approval_id = str(known.get("approval_id") or new_id())
    expires_at = known.get("expires_at")
    if record is None:
        if p.timeout_ms is not None:
            expires_at = format_time(datetime.now(UTC) + timedelta(milliseconds=p.timeout_ms))
        await m.steps.put(identity, StepRecord(
            status="started", attempt=1, idempotency_key=approval_id, node_id=node.id, step_id="approval",
            frame=fs, result={"approval_id": approval_id, "expires_at": expires_at, "announced": False},
            updated_at=now_iso()))
    suspends = len(m.runnable(state)) <= 1
    state.setdefault("waits", {})[approval_id] = {
        "kind": "approval", "id": approval_id, "node_id": node.id, "step_id": None, "frame_id": frame["id"],
        "frame": fs, "expires_at": expires_at, "suspends_run": suspends,
    }
    data["wait_id"] = approval_id
    if not known.get("announced"):
        input_schema = {k: v.model_dump(mode="json", exclude={"has_default"}, exclude_none=True)
                        for k, v in p.input_schema.items()}
        await m.emit(ApprovalRequested(
            node_id=node.id, frame=fs, approval_id=approval_id, node_name=node.description,
            decision_type=p.decision_type, options=p.options, prompt=prompt, context_data=context,
            expires_at=expires_at, timeout_action=p.timeout_action, approval_level=p.approval_level,
            escalation_contact=p.escalation_contact, input_schema=input_schema, suspends_run=suspends))
        if m.on_approval is not None:
            await m.settle()
            await m.on_approval({
                "approval_id": approval_id, "run_id": m.run.run_id,
                "procedure_id": m.ir.procedure_id, "procedure_version": m.ir.version,
                "project_id": m.run.run_created.get("project_id"), "node_id": node.id,
                "node_name": node.description, "prompt": prompt, "context_data": context,
                "decision_type": p.decision_type, "options": p.options, "input_schema": input_schema,
                "expires_at": expires_at, "timeout_action": p.timeout_action,
                "approval_level": p.approval_level, "escalation_contact": p.escalation_contact})
        await m.steps.put(identity, StepRecord(
            status="started", attempt=1, idempotency_key=approval_id, node_id=node.id, step_id="approval",
            frame=fs, result={"approval_id": approval_id, "expires_at": expires_at, "announced": True},
            updated_at=now_iso()))
    return Pause(approval_id, "awaiting_approval")


def decision_received(node: NodeIR, fs: str, p: HumanApprovalPayload, decision: dict[str, Any],
                      resumes_run: bool) -> ApprovalDecisionReceived:
    return ApprovalDecisionReceived(
        node_id=node.id, frame=fs, approval_id=decision.get("approval_id"), status=decision["status"],
        decision=decision.get("decision"), decided_by=decision.get("decided_by"), comment=decision.get("comment"),
        source=decision.get("source") or "human", routed_to=route_decision(p, decision),
        resumes_run=resumes_run)


def decision_record(p: HumanApprovalPayload, raw: Mapping[str, Any], approval_id: str | None) -> dict[str, Any]:
    decision = raw.get("decision")
    if decision in ("approve", "reject"):
        decision = f"{decision}d"
    status = raw.get("status")
    if status is None:
        status = decision if decision in ("approved", "rejected") else "decided"
    return {"approval_id": approval_id or raw.get("approval_id"), "status": status, "decision": decision,
            "decided_by": raw.get("decided_by"), "decided_at": raw.get("decided_at") or now_iso(),
            "comment": raw.get("comment"), "payload": raw.get("payload"), "source": raw.get("source") or "human"}


def route_decision(p: HumanApprovalPayload, d: Mapping[str, Any]) -> str | None:
    decision, status = d.get("decision"), d.get("status")
    if status == "escalated" or decision == "timeout":
        return p.on_timeout if p.on_timeout is not None else p.on_reject
    if decision == "approved":
        return p.on_approve
    if decision == "rejected":
        return p.on_reject
    if isinstance(decision, str) and decision in p.options:
        return p.option_routes.get(decision, p.on_approve)
    return p.on_reject


def store_decision(state: RunState, frame: Frame, node: NodeIR, p: HumanApprovalPayload,
                   decision: dict[str, Any]) -> None:
    namespace = vars_of(state, frame)
    records = dict(namespace.get(APPROVALS_KEY, {}))
    records[node.id] = decision
    namespace[APPROVALS_KEY] = records
    if p.decision_variable:
        namespace[p.decision_variable] = decision.get("decision")
    if p.decision_type == "provide_input" and p.input_variable:
        namespace[p.input_variable] = decision.get("payload")
