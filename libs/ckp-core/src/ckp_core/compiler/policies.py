"""Node policies: error handlers (with their recovery steps), SLA and telemetry."""

from __future__ import annotations

import re
from typing import Any

from ckp_core.compiler.fields import Compilation, NodeContext, strip_object
from ckp_core.compiler.retry import retry_keys
from ckp_core.compiler.steps import steps
from ckp_core.diagnostics import pointer
from ckp_core.expressions import json_type_name
from ckp_core.ir import CustomMetricIR, ErrorHandlerIR, HandlerTriggerIR, RetryPolicyIR, SlaIR, TelemetryIR

HANDLER_FIELDS = frozenset({
    "error_type", "trigger", "action", "recovery_strategy", "max_retries", "delay_ms", "retry_policy",
    "recovery_steps", "fallback_node", "notify_on_error", "error_metadata",
})
HANDLER_ACTIONS = ("retry", "retry_node", "fail", "screenshot_and_fail", "ignore", "escalate")
RECOVERY_STRATEGY = {"retry_node": "retry_node", "continue": "ignore", "stop": "fail", "fallback_node": "escalate"}
METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")


def error_handlers(c: Compilation, raw: Any, path: str, orchestrator: bool,
                   channel: str | None) -> list[ErrorHandlerIR]:
    if not c.expect(raw, (list,), "array", path):
        return []
    out: list[ErrorHandlerIR] = []
    catch_all_at: int | None = None
    for i, raw_h in enumerate(raw):
        hp = f"{path}/{i}"
        h = c.obj(raw_h, hp, HANDLER_FIELDS)
        if h is None:
            continue
        error_type = c.string(h, "error_type", hp) or ""
        trigger = None
        if "trigger" in h:
            trigger = handler_trigger(c, h["trigger"], f"{hp}/trigger")
        action = c.enum(h, "action", hp, HANDLER_ACTIONS)
        if "action" not in h and "recovery_strategy" in h:
            strategy = c.enum(h, "recovery_strategy", hp, tuple(RECOVERY_STRATEGY))
            if strategy is not None:
                action = RECOVERY_STRATEGY[strategy]
                c.add("info", "alias_normalised", f"{hp}/recovery_strategy: '{strategy}' read as action "
                      f"'{action}'", f"{hp}/recovery_strategy")
        action = action or "fail"
        max_retries = c.integer(h, "max_retries", hp)
        if max_retries == 0 and action in ("retry", "retry_node"):
            c.add("warning", "retry_without_retries", f"Node '{c.node_id}': handler {i} retries 0 times", hp)
        delay = c.integer(h, "delay_ms", hp)
        policy = None
        if "retry_policy" in h:
            keys = retry_keys(c, h["retry_policy"], f"{hp}/retry_policy")
            policy = RetryPolicyIR(**keys)
        ctx = NodeContext(c.node_id or "", "sequence", hp, orchestrator, channel, None)
        recovery = steps(c, h.get("recovery_steps", []), f"{hp}/recovery_steps", ctx) or []
        fallback = c.node_ref(h, "fallback_node", hp)
        metadata = c.obj(h["error_metadata"], f"{hp}/error_metadata") if "error_metadata" in h else None
        handler = ErrorHandlerIR(
            index=i, error_type=error_type, trigger=trigger, action=action,
            max_retries=3 if max_retries is None else max_retries, delay_ms=1000 if delay is None else delay,
            retry_policy=policy, recovery_steps=recovery, fallback_node=fallback,
            notify_on_error=c.boolean(h, "notify_on_error", hp), error_metadata=metadata,
        )
        if catch_all_at is not None:
            c.add("warning", "shadowed_error_handler", f"Node '{c.node_id}': error handler {i} can never "
                  "match", hp, hint=f"handler {catch_all_at} matches every error")
        elif handler.catch_all:
            catch_all_at = i
        out.append(handler)
    return out


def handler_trigger(c: Compilation, raw: Any, path: str) -> HandlerTriggerIR | None:
    t = c.obj(raw, path, ("error_text_contains", "error_code", "http_status_codes"))
    if t is None:
        return None
    kw: dict[str, Any] = {}
    for key in ("error_text_contains", "error_code"):
        if key in t:
            v = t[key]
            items = [v] if isinstance(v, str) else v
            if isinstance(items, list) and all(isinstance(x, str) for x in items):
                kw[key] = items
            else:
                c.add("error", "invalid_type", f"{path}/{key}: expected string or array of strings, got "
                      f"{json_type_name(v)}", f"{path}/{key}")
    if "http_status_codes" in t:
        codes = t["http_status_codes"]
        if isinstance(codes, list) and all(isinstance(code, int) and not isinstance(code, bool) for code in codes):
            kw["http_status_codes"] = codes
        else:
            c.add("error", "invalid_type", f"{path}/http_status_codes: expected array of integers, got "
                  f"{json_type_name(codes)}", f"{path}/http_status_codes")
    return HandlerTriggerIR(**kw) if kw else None


def sla(c: Compilation, raw: Any, path: str, ntype: str) -> SlaIR | None:
    s = c.obj(raw, path, ("max_duration_ms", "on_breach", "escalation_handler", "enforce"))
    if s is None:
        return None
    limit = c.integer(s, "max_duration_ms", path, required=True)
    on_breach = c.enum(s, "on_breach", path, ("warn", "fail", "escalate")) or "warn"
    handler = c.node_ref(s, "escalation_handler", path)
    enforce = c.boolean(s, "enforce", path)
    if handler is not None and ntype == "terminate":
        c.add("error", "edge_not_allowed", f"Node '{c.node_id}' (terminate) must not have "
              "sla.escalation_handler", f"{path}/escalation_handler")
        handler = None
    if on_breach == "escalate" and handler is None and ntype != "terminate":
        c.add("error", "sla_escalate_without_handler", f"Node '{c.node_id}': sla.on_breach 'escalate' "
              "requires escalation_handler", f"{path}/on_breach")
    if enforce and on_breach == "warn":
        c.add("warning", "sla_enforce_with_warn", f"Node '{c.node_id}': an enforced SLA with on_breach "
              "'warn' cancels the node without failing it", f"{path}/enforce")
    if limit is None:
        return None
    return SlaIR(max_duration_ms=limit, on_breach=on_breach, escalation_handler=handler,
                 enforce=enforce)


def telemetry(c: Compilation, raw: Any, path: str) -> TelemetryIR | None:
    t = c.obj(raw, path, ("track_duration", "track_retries", "custom_metrics", "trace_id", "span_id"))
    if t is None:
        return None
    metrics: list[CustomMetricIR] = []
    cm = t.get("custom_metrics")
    mp = f"{path}/custom_metrics"
    entries: list[tuple[Any, Any, str]] = []
    if isinstance(cm, list):
        for i, item in enumerate(cm):
            if isinstance(item, dict):
                entries.append((item.get("name"), item.get("value", 1), f"{mp}/{i}"))
            else:
                entries.append((item, 1, f"{mp}/{i}"))
    elif isinstance(cm, dict):
        entries = [(k, v, f"{mp}/{pointer(k)[1:]}") for k, v in strip_object(cm).items()]
    elif cm is not None:
        c.add("error", "invalid_type", f"{mp}: expected array or object, got {json_type_name(cm)}", mp)
    for name, value, ep in entries:
        if not (isinstance(name, str) and METRIC_RE.match(name)):
            c.add("warning", "invalid_custom_metric", f"Node '{c.node_id}': custom metric '{name}' is not a "
                  "valid metric name (^[a-z][a-z0-9_]{0,62}$)", ep)
            continue
        if not isinstance(value, int | float) or isinstance(value, bool):
            c.add("warning", "invalid_custom_metric", f"Node '{c.node_id}': custom metric '{name}' has a "
                  f"non-numeric value ({json_type_name(value)}); it counts 1", ep)
            value = 1
        try:
            amount = float(value)
        except OverflowError:  # an integer beyond a double's range
            c.add("warning", "invalid_custom_metric", f"Node '{c.node_id}': custom metric '{name}' has a "
                  "value too large for a number (beyond ±1.8e308); it counts 1", ep)
            amount = 1.0
        metrics.append(CustomMetricIR(name=name, value=amount))
    return TelemetryIR(track_duration=c.boolean(t, "track_duration", path, True),
                       track_retries=c.boolean(t, "track_retries", path, True), custom_metrics=metrics,
                       trace_id=c.string(t, "trace_id", path), span_id=c.string(t, "span_id", path))
