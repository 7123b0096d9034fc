"""llm_action nodes: prompt, attachments, model limits, output mappings, orchestration-mode branches."""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.binding import opt_template, template
from ckp_core.compiler.fields import MISSING, Compilation, NodeContext
from ckp_core.compiler.retry import retry_keys
from ckp_core.compiler.steps import output_mappings
from ckp_core.ir import AttachmentIR, LlmActionPayload, RetryPolicyIR


def node_llm_action(c: Compilation, ctx: NodeContext, n: dict[str, Any]) -> LlmActionPayload | None:
    p = ctx.path
    prompt_raw = c.required(n, "prompt", p)
    prompt = None if prompt_raw is MISSING else template(c, prompt_raw, f"{p}/prompt")
    system = opt_template(c, n, "system_prompt", p)
    attachments: list[AttachmentIR] = []
    raw_att = n.get("attachments", [])
    if c.expect(raw_att, (list,), "array", f"{p}/attachments"):
        for i, a in enumerate(raw_att):
            ap = f"{p}/attachments/{i}"
            at = c.obj(a, ap, ("type", "source", "description", "mime_type"))
            if at is None:
                continue
            atype = c.enum(at, "type", ap, ("text", "json", "csv", "markdown", "image"))
            if "type" not in at:
                c.required(at, "type", ap)
            src_raw = c.required(at, "source", ap)
            src = None if src_raw is MISSING else template(c, src_raw, f"{ap}/source")
            if atype is not None and src is not None:
                attachments.append(AttachmentIR(type=atype, source=src,
                                                description=c.string(at, "description", ap),
                                                mime_type=c.string(at, "mime_type", ap)))
    retry = RetryPolicyIR(**retry_keys(c, n["retry"], f"{p}/retry")) if "retry" in n else None
    outputs = output_mappings(c, n.get("outputs"), f"{p}/outputs")
    if not outputs:
        c.produced.add("llm_output")
    orchestration = c.boolean(n, "orchestration_mode", p)
    branches: list[str] = []
    raw_br = n.get("branches", [])
    if c.expect(raw_br, (list,), "array", f"{p}/branches"):
        for i, b in enumerate(raw_br):
            if c.expect(b, (str,), "node id (string)", f"{p}/branches/{i}"):
                branches.append(b)
    if orchestration and not branches:
        c.add("error", "orchestration_without_branches", f"Node '{ctx.node_id}': orchestration_mode needs "
              "branches", f"{p}/branches" if "branches" in n else f"{p}/orchestration_mode")
    temperature = c.number(n, "temperature", p, minimum=0)
    max_tokens = c.integer(n, "max_tokens", p, minimum=1)
    if prompt is None:
        return None
    return LlmActionPayload(
        prompt=prompt, system_prompt=system, model=c.string(n, "model", p), temperature=temperature,
        max_tokens=max_tokens, json_mode=c.boolean(n, "json_mode", p), attachments=attachments, retry=retry,
        timeout_ms=c.integer(n, "timeout_ms", p),
        max_cost_per_llm_call_usd=c.number(n, "max_cost_per_llm_call_usd", p, minimum=0, exclusive=True),
        min_llm_quality=c.number(n, "min_llm_quality", p), outputs=outputs,
        orchestration_mode=orchestration, branches=branches,
    )
