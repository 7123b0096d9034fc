"""``subflow`` (ckp.md §3.9): a child run, started once per visit (and per retry), awaited, its outputs mapped."""

from __future__ import annotations

import copy
from typing import Any, cast

from ckp_core.events import (
    ErrorObject,
    StepTestOverrideApplied,
    SubflowCompleted,
    SubflowFailed,
    SubflowStarted,
    TemplateWarning,
)
from ckp_core.expressions import MappingScope, evaluate
from ckp_core.ids import new_id
from ckp_core.ir import NodeIR, SubflowPayload
from langorch_runtime.frames import APPROVALS_KEY, Frame, NodeState, RunState, SubflowData, frame_string, vars_of
from langorch_runtime.machine.context import collector
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome, Pause
from langorch_runtime.machine.steps import StepRunner
from langorch_runtime.steps import StepRecord, now_iso

MAX_CHAIN = 10  # runs on a call chain; the last may not start another child


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: SubflowPayload) -> Outcome | None:
    """A child run (§3.9): started once per visit, awaited, its outputs mapped back."""
    fs = frame_string(frame, node.id, current["visit"])
    gc = m.ir.global_config
    data = cast(SubflowData, current["data"])  # its child run, once started
    if node.id in gc.test_data_overrides and "child" not in data:
        outputs = gc.test_data_overrides[node.id]
        await m.emit(StepTestOverrideApplied(node_id=node.id, step_id="subflow", frame=fs, override_key=node.id))
        await map_child_outputs(m, state, frame, node, p, outputs if isinstance(outputs, dict) else {}, {})
        return Next(node.next_node)
    if m.children is None:
        raise NodeFailure(ErrorObject(code="subflow_failed", node_id=node.id, frame=fs, message="this runtime "
                                      "has no child-run support configured", details={"reason": "no_children"}))
    if "child" not in data:  # the child gets inputs only through its mapping
        return await start_child(m, state, frame, node, current, p, fs, rerun_of=None)
    child_id = data["child"]
    resolution = state.setdefault("resolutions", {}).pop(child_id, None)
    if resolution is None:
        state.setdefault("waits", {}).setdefault(child_id, {
            "kind": "child_run", "id": child_id, "node_id": node.id, "step_id": None,
            "frame_id": frame["id"], "frame": fs, "expires_at": None, "suspends_run": True})
        return Pause(child_id, "child_run")
    status = resolution.get("status")
    base = {"node_id": node.id, "frame": fs, "child_run_id": child_id, "procedure_id": p.procedure_id,
            "version": data.get("version") or "", "resumes_run": True}
    if status == "completed":
        mapped = await map_child_outputs(m, state, frame, node, p, resolution.get("outputs") or {},
                                         resolution.get("variables") or {})
        await m.emit(SubflowCompleted(**base, mapped_variables=mapped))
        return Next(node.next_node)
    error = ErrorObject.model_validate(resolution.get("error") or {
        "code": "canceled" if status == "canceled" else "internal_error", "retryable": status != "canceled",
        "message": f"child run {child_id} ended {status}"})
    await m.emit(SubflowFailed(**base, on_failure=p.on_failure, error=error))
    if p.on_failure == "continue":
        return Next(node.next_node)
    if p.on_failure == "retry" and data.get("attempt", 1) <= p.max_retries:
        return await start_child(m, state, frame, node, current, p, fs, rerun_of=child_id)
    raise NodeFailure(ErrorObject(code="subflow_failed", node_id=node.id, frame=fs,
                                  message=f"child run {child_id} of '{p.procedure_id}' {status}: "
                                  f"{error.message}", cause=error.model_dump(mode="json")))


async def start_child(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
                      p: SubflowPayload, fs: str, rerun_of: str | None) -> Outcome:
    """Start the child run of this attempt (idempotently: its id is kept in the step store) and wait for it."""
    assert m.children is not None
    data = cast(SubflowData, current["data"])
    chain = list(m.run.run_created.get("call_chain") or [m.ir.procedure_id])
    if p.procedure_id in chain:
        raise NodeFailure(ErrorObject(code="subflow_recursion", node_id=node.id, frame=fs,
                                      message=f"subflow '{p.procedure_id}' is already on the call chain "
                                      f"({' -> '.join([*chain, p.procedure_id])})"))
    if len(chain) >= MAX_CHAIN:
        raise NodeFailure(ErrorObject(code="subflow_depth_exceeded", node_id=node.id, frame=fs,
                                      message=f"a chain of {len(chain)} runs may not start another child"))
    namespace = vars_of(state, frame)
    inputs: dict[str, Any] = {}
    if p.inherit_context:
        inputs.update({k: copy.deepcopy(v) for k, v in namespace.items() if k != APPROVALS_KEY})
    for key, path in p.input_paths.items():
        inputs[key] = await m.evaluate(path, state, frame, node.id, f"/input_mapping/{key}")
    mapped = await m.render(p.input_mapping, state, frame, node.id, None, "/input_mapping")
    if isinstance(mapped, dict):
        inputs.update(mapped)
    attempt = data.get("attempt", 0) + 1
    identity = f"{node.id}:subflow:{fs}:{attempt}"
    record = await m.steps.get(identity)
    child_id = str((record.result or {}).get("child_run_id")) if record and record.result else new_id()
    if record is None:
        await m.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=child_id,
                                               node_id=node.id, step_id="subflow", frame=fs,
                                               result={"child_run_id": child_id}, updated_at=now_iso()))
    await m.settle()
    version = await m.children.start(
        parent_run_id=m.run.run_id, parent_node_id=node.id,
        root_run_id=m.run.run_created.get("root_run_id") or m.run.run_id,
        call_chain=[*chain, p.procedure_id], procedure_id=p.procedure_id, version=p.version, inputs=inputs,
        child_run_id=child_id, rerun_of=rerun_of,
        dry_run=m.dry_run(),
        project_id=m.run.run_created.get("project_id"))
    data.update({"child": child_id, "version": version, "attempt": attempt})
    suspends = len(m.runnable(state)) <= 1
    state.setdefault("waits", {})[child_id] = {
        "kind": "child_run", "id": child_id, "node_id": node.id, "step_id": None, "frame_id": frame["id"],
        "frame": fs, "expires_at": None, "suspends_run": suspends}
    await m.emit(SubflowStarted(node_id=node.id, frame=fs, child_run_id=child_id, procedure_id=p.procedure_id,
                                version=version, attempt=attempt, suspends_run=suspends))
    return Pause(child_id, "child_run")


async def map_child_outputs(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, p: SubflowPayload,
                            outputs: dict[str, Any], variables: dict[str, Any]) -> list[str]:
    """The child's outputs (and final variables) into the namespace through ``output_mapping``, else all of them
    as ``subflow_output``; returns the variables written."""
    namespace = vars_of(state, frame)
    if not p.output_mapping:
        namespace["subflow_output"] = copy.deepcopy(outputs)
        return ["subflow_output"]
    for var, path in p.output_mapping.items():
        root = path.roots[0] if path.roots else None
        source = outputs if root is not None and root in outputs else variables
        unresolved: list[tuple[str, str]] = []
        namespace[var] = evaluate(path.compiled, MappingScope(source), collector(unresolved))
        for variable, reason in unresolved[:1]:
            await m.emit(TemplateWarning(variable=variable, reason=reason, location={
                "node_id": node.id, "step_id": None, "field": f"/output_mapping/{var}"}))
    return list(p.output_mapping)
