"""``llm_action`` (ckp.md §3.12, §7.13): one model call (recorded under step id ``llm``, so a replay reuses the
completion, §7.4), its text mapped to variables; in orchestration mode the model picks the next node."""

from __future__ import annotations

import json

from ckp_core.events import (
    DryRunStepSkipped,
    ErrorObject,
    LlmRouteSelected,
    StepMockApplied,
    StepReplayed,
    StepRetrying,
    StepTestOverrideApplied,
    TemplateWarning,
)
from ckp_core.ir import LlmActionPayload, NodeIR
from langorch_runtime.errors import StepError
from langorch_runtime.frames import Frame, NodeState, RunState, frame_string, vars_of
from langorch_runtime.llm import LlmResult, build_messages, request_for, resolve_image_artifacts
from langorch_runtime.machine.context import compact_json
from langorch_runtime.machine.outcomes import Next, NodeFailure, Outcome
from langorch_runtime.machine.policies import after_retry_after, retry_allowed, retry_delay
from langorch_runtime.machine.steps import StepRunner
from langorch_runtime.mappings import apply_output_mapping
from langorch_runtime.steps import StepRecord, idempotency_key, now_iso


async def run(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, current: NodeState,
              p: LlmActionPayload) -> Outcome | None:
    fs = frame_string(frame, node.id, current["visit"])
    gc = m.ir.global_config
    if node.id in gc.test_data_overrides:
        value = gc.test_data_overrides[node.id]
        text = value if isinstance(value, str) else compact_json(value)
        await m.emit(StepTestOverrideApplied(node_id=node.id, step_id="llm", frame=fs, override_key=node.id))
    elif m.dry_run():
        text = ""
        await m.emit(DryRunStepSkipped(node_id=node.id, step_id="llm", frame=fs, action="chat", binding_kind="llm"))
    elif gc.mock_external_calls:
        text = ""
        await m.emit(StepMockApplied(node_id=node.id, step_id="llm", frame=fs, action="chat", binding_kind="llm"))
    else:
        text = await call(m, state, frame, node, p, fs)
    namespace = vars_of(state, frame)
    if p.outputs:
        for var, mapping in p.outputs.items():
            try:
                value, warns = apply_output_mapping(mapping, text, m.scope(state, frame, node.id), llm=True)
            except StepError as exc:
                raise NodeFailure(exc.error.model_copy(update={"node_id": node.id})) from exc
            namespace[var] = value
            for w in warns:
                await m.emit(TemplateWarning(variable=var, reason=w, location={
                    "node_id": node.id, "step_id": None, "field": f"/outputs/{var}"}))
    else:
        namespace["llm_output"] = text
    if p.orchestration_mode:
        requested = None
        try:
            parsed = json.loads(text)
            requested = parsed.get("_next_node") if isinstance(parsed, dict) else None
        except ValueError:
            requested = None
        valid = isinstance(requested, str) and requested in p.branches
        chosen = requested if valid else (node.next_node or (p.branches[0] if p.branches else None))
        await m.emit(LlmRouteSelected(node_id=node.id, frame=fs, requested=requested
                                      if isinstance(requested, str) else None, chosen=chosen or "", valid=valid))
        return Next(chosen)
    return Next(node.next_node)


async def call(m: StepRunner, state: RunState, frame: Frame, node: NodeIR, p: LlmActionPayload, fs: str) -> str:
    """The model call of an ``llm_action`` (§3.12, §7.13), recorded under step id ``llm`` so a replay
    reuses the completion instead of calling again (§7.4)."""
    if m.llm is None:
        raise NodeFailure(ErrorObject(code="llm_error", node_id=node.id, frame=fs, message="this runtime has "
                                      "no LLM client", details={"reason": "not_configured"}))
    identity = f"{node.id}:llm:{fs}"
    record = await m.steps.get(identity)
    if record is not None and record.status == "completed" and isinstance(record.result, dict):
        await m.emit(StepReplayed(node_id=node.id, step_id="llm", frame=fs, action="chat",
                                  output_variable=None, original_attempt=record.attempt))
        return str(record.result.get("text") or "")
    system = None
    if p.system_prompt is not None:
        system = await m.render(p.system_prompt, state, frame, node.id, None, "/system_prompt", text=True)
    prompt = await m.render(p.prompt, state, frame, node.id, None, "/prompt", text=True)
    attachments = [(a, await m.render(a.source, state, frame, node.id, None, f"/attachments/{i}/source"))
                   for i, a in enumerate(p.attachments)]
    try:
        if m.artifacts is not None:
            attachments = await resolve_image_artifacts(attachments, m.artifacts, m.root_run_id)
        messages = build_messages(p, system, prompt, attachments)
    except StepError as exc:
        raise NodeFailure(exc.error.model_copy(update={"node_id": node.id, "frame": fs})) from exc
    attempt = (record.attempt + (1 if record.status == "failed" else 0)) if record is not None else 1
    retries = 0
    counters = state.setdefault("llm", {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0})
    result: LlmResult
    while True:
        key = idempotency_key(m.run.run_id, node.id, "llm", fs, attempt)
        await m.steps.put(identity, StepRecord(status="started", attempt=attempt, idempotency_key=key,
                                               node_id=node.id, step_id="llm", frame=fs, updated_at=now_iso()))
        request = request_for(p, m.ir.global_config, messages, spent_usd=float(counters["cost_usd"]),
                              idempotency_key=key, emit=m.emit, node_id=node.id, frame=fs, attempt=attempt)
        try:
            async with m.admitted(node.id, "llm", fs, attempt):
                await m.settle()
                result = await m.llm.complete(request)
            break
        except StepError as exc:
            error = exc.error.model_copy(update={"node_id": node.id, "step_id": "llm", "frame": fs,
                                                 "attempt": attempt})
        policy = p.retry
        if policy is not None and retries < policy.max_retries and retry_allowed(policy, error):
            delay = after_retry_after(retry_delay(policy, retries), error)
            retries += 1
            await m.emit(StepRetrying(node_id=node.id, step_id="llm", frame=fs, attempt=attempt, action="chat",
                                      delay_ms=delay, next_attempt=attempt + 1, source="retry_policy", error=error))
            await m.sleep(delay / 1000)
            attempt += 1
            continue
        await m.record_failed(identity, key, node, "llm", fs, attempt, error)
        raise NodeFailure(error)
    counters["prompt_tokens"] += result.usage.prompt_tokens
    counters["completion_tokens"] += result.usage.completion_tokens
    counters["cost_usd"] += result.estimated_cost_usd or 0.0
    await m.steps.put(identity, StepRecord(status="completed", attempt=attempt, idempotency_key=key,
                                           node_id=node.id, step_id="llm", frame=fs,
                                           result={"text": result.text, "model": result.model},
                                           updated_at=now_iso()))
    return str(result.text)
