"""Steps: internal operations or actions dispatched to the node's agent channel, their output mappings, and the
validations of sequence nodes."""

from __future__ import annotations

from functools import lru_cache
from typing import Any

import jmespath
from lxml import etree

from ckp_core.compiler.binding import expression, opt_template, path_expression, template
from ckp_core.compiler.fields import ID_RE, MISSING, Compilation, NodeContext, regex_problem
from ckp_core.compiler.operations import INTERNAL_OPERATIONS, operation_body
from ckp_core.compiler.retry import retry_keys
from ckp_core.diagnostics import pointer
from ckp_core.ir import Binding, OutputMappingIR, SecretRefIR, StepIR, ValidationIR, construct
from ckp_core.templates import has_placeholder

# Conventional dispatched actions per channel (§4.4), used for hints by explain and the console.
CONVENTIONAL_ACTIONS: dict[str, frozenset[str]] = {
    "web": frozenset({"navigate", "wait_for_element", "click", "type", "clear", "extract_text",
                      "extract_table_data", "wait_for_text", "scroll_to_element", "take_screenshot", "screenshot",
                      "execute_javascript", "switch_frame", "switch_window", "upload_file", "download_file"}),
    "desktop": frozenset({"launch_app", "activate_window", "wait_for_window", "wait_for_dialog", "click", "type",
                          "press_key", "press_keys", "copy_to_clipboard", "paste_from_clipboard",
                          "select_all_results", "click_cell", "read_excel_file", "close_window", "maximize_window",
                          "minimize_window", "screenshot"}),
    "email": frozenset({"compose_email", "send_email", "read_email", "search_email", "download_attachment"}),
    "api": frozenset({"http_request", "graphql_query", "soap_request", "websocket_connect"}),
    "database": frozenset({"execute_query", "execute_procedure", "bulk_insert", "bulk_update", "transaction_begin",
                           "transaction_commit", "transaction_rollback", "backup_data", "restore_data"}),
    "*": frozenset({"read_file", "write_file", "delete_file", "move_file", "copy_file", "list_directory",
                    "create_directory", "zip_files", "unzip_files"}),
}
STEP_META_FIELDS = frozenset({
    "step_id", "action", "description", "timeout_ms", "wait_ms", "wait_after_ms", "retry_on_failure",
    "retry_config", "output_variable", "output_mapping", "idempotency_key", "workflow_dispatch_mode",
    "screenshot_on_complete",
})
STEP_OPTIONS = STEP_META_FIELDS - {"step_id", "action"}


def steps(c: Compilation, raw: Any, path: str, ctx: NodeContext,
          recovery_of: str | None = None) -> list[StepIR] | None:
    """A list of steps (a sequence node's, or an error handler's recovery steps); None if one is invalid.

    Steps are the most numerous models of an IR: each is made of the fields :func:`step` checked, without
    validating them again.
    """
    if type(raw) is not list and not c.expect(raw, (list,), "array", path):
        return None
    out: list[StepIR] = []
    seen: set[str] = set()
    ok = True
    for i, raw_step in enumerate(raw):
        compiled = step(c, raw_step, f"{path}/{i}", ctx, seen)
        c.step_id = None
        if compiled is None:
            ok = False
        else:
            out.append(construct(StepIR, compiled))
    return out if ok else None


def step(c: Compilation, raw: Any, path: str, ctx: NodeContext, seen: set[str]) -> dict[str, Any] | None:
    """One step: every field of its :class:`StepIR`, checked, or None."""
    s = c.view(raw, path)
    if s is None:
        return None
    step_id = s.get("step_id")
    if type(step_id) is not str or not ID_RE.match(step_id):  # (the common case without a reader's call)
        step_id_raw = c.required(s, "step_id", path)
        step_id = None if step_id_raw is MISSING else c.identifier(step_id_raw, f"{path}/step_id", "step id")
    c.step_id = step_id
    if step_id is not None:
        if step_id in seen:
            c.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate step id '{step_id}'",
                  f"{path}/step_id")
        seen.add(step_id)
    action = s.get("action")
    if type(action) is not str:
        action = c.string(s, "action", path, required=True)
    plain = s.keys().isdisjoint(STEP_OPTIONS)  # the common case: none of the readers below has anything to read
    if plain and "params" not in s:  # the parameters: every field but step_id and action
        params = dict(s)
        params.pop("step_id", None)
        params.pop("action", None)
    else:
        params = {k: v for k, v in s.items() if k not in STEP_META_FIELDS and k != "params"}
    if "params" in s:
        nested = c.obj(s["params"], f"{path}/params")
        for k, v in (nested or {}).items():
            if k in params:
                c.add("warning", "param_conflict", f"{c.where()}: parameter '{k}' given twice; the flat "
                      "value wins", f"{path}/params/{pointer(k)[1:]}")
            else:
                params[k] = v
    step_keys: dict[str, Any] = {}
    if plain:
        timeout, wait_ms, wait_after, retry_enabled = None, 0, 0, False
        output_variable, output_mapping, idem, step_dispatch, screenshot_on_complete = None, {}, None, None, False
        description = None
    else:
        timeout = c.integer(s, "timeout_ms", path)
        wait_ms = c.integer(s, "wait_ms", path) or 0
        wait_after = c.integer(s, "wait_after_ms", path) or 0
        retry_enabled = c.boolean(s, "retry_on_failure", path)
        if "retry_config" in s:
            retry_enabled = True
            step_keys = retry_keys(c, s["retry_config"], f"{path}/retry_config")
        output_variable = c.written_field(s, "output_variable", path)
        output_mapping = output_mappings(c, s.get("output_mapping"), f"{path}/output_mapping")
        idem = opt_template(c, s, "idempotency_key", path)
        step_dispatch = c.dispatch_mode(s, "workflow_dispatch_mode", path)
        screenshot_on_complete = c.boolean(s, "screenshot_on_complete", path)
        description = c.string(s, "description", path)
    if action is None or step_id is None:
        return None
    if action == "restore_checkpoint":
        c.add("error", "unsupported_action", f"{c.where()}: action '{action}' is not supported",
              f"{path}/action")
        return None
    canonical = "format_string" if action == "format_data" else action
    internal = canonical in INTERNAL_OPERATIONS and not (canonical == "screenshot" and not ctx.orchestrator)
    if ctx.orchestrator and not internal:
        c.add("error", "unknown_action", f"{c.where()}: action '{action}' is not an internal operation and "
              f"node '{ctx.node_id}' has no agent channel", f"{path}/action")
        return None
    secret_refs: list[SecretRefIR] = []
    if internal:
        if canonical != action:
            c.add("info", "alias_normalised", f"{path}/action: '{action}' read as '{canonical}'",
                  f"{path}/action")
        op = operation_body(c, canonical, params, path, secret_refs)
        if op is None:
            return None
        tpl, names, expression = op
        binding = _INTERNAL_BINDINGS[canonical]
    else:
        channel_tpl = template(c, params, path, secrets="allow", secret_refs=secret_refs)
        if channel_tpl is None:
            return None
        tpl = channel_tpl
        names, expression = {}, None
        binding = _channel_binding(ctx.channel, action)
    retry = None
    if retry_enabled:
        retry = c.gc.retry_policy.model_copy(update=step_keys) if step_keys else c.gc.retry_policy
    return {
        "step_id": step_id, "action": canonical if internal else action, "description": description,
        "binding": binding, "params": tpl, "names": names, "expression": expression,
        "timeout_ms": timeout if timeout is not None else c.gc.default_step_timeout_ms,
        "wait_ms": wait_ms, "wait_after_ms": wait_after, "retry": retry, "output_variable": output_variable,
        "output_mapping": output_mapping, "idempotency_key": idem,
        "dispatch_mode": step_dispatch or ctx.dispatch_mode or c.gc.workflow_dispatch_mode,
        "screenshot_on_complete": screenshot_on_complete, "secrets": secret_refs,
    }


_INTERNAL_BINDINGS = {action: Binding(kind="internal", action=action) for action in INTERNAL_OPERATIONS}  # immutable


@lru_cache(maxsize=1024)
def _channel_binding(channel: str | None, action: str) -> Binding:
    return Binding(kind="channel", channel=channel, action=action)


def output_mappings(c: Compilation, raw: Any, path: str) -> dict[str, OutputMappingIR]:
    if raw is None:
        return {}
    m = c.obj(raw, path)
    out: dict[str, OutputMappingIR] = {}
    for var, mapping in (m or {}).items():
        vp = f"{path}/{pointer(var)[1:]}"
        if c.written(var, vp) is None:
            continue
        parsed = output_mapping(c, mapping, vp)
        if parsed is not None:
            out[var] = parsed
    return out


def output_mapping(c: Compilation, mapping: Any, path: str) -> OutputMappingIR | None:
    if not isinstance(mapping, str):
        c.add("error", "invalid_output_mapping", f"{path}: '{mapping}' is not a valid output mapping", path)
        return None
    text = mapping.strip()
    if text in ("text", "raw", "content", "llm_response", "result"):
        if text not in ("text", "result"):
            c.add("info", "alias_normalised", f"{path}: '{text}' read as 'text'", path)
        return OutputMappingIR(kind="text", source=mapping)
    if has_placeholder(mapping):
        tpl = template(c, mapping, path, local_names=frozenset({"result", "text"}))
        return None if tpl is None else OutputMappingIR(kind="template", source=mapping, template=tpl)
    for prefix in ("json_extract:", "json:", "$."):
        if text.startswith(prefix):
            arg = text[len(prefix):].strip()
            if prefix != "json:":
                c.add("info", "alias_normalised", f"{path}: '{prefix}' read as 'json:'", path)
            if not arg:
                return OutputMappingIR(kind="json", source=mapping, argument="")
            expr = path_expression(c, arg, path, check_roots=False)
            return None if expr is None else OutputMappingIR(kind="json", source=mapping, argument=arg, path=expr)
    if text.startswith("jmespath:"):
        arg = text[len("jmespath:"):].strip()
        try:
            jmespath.compile(arg)
        except (jmespath.exceptions.JMESPathError, ValueError) as exc:
            c.add("error", "invalid_output_mapping", f"{path}: invalid JMESPath expression: {exc}", path)
            return None
        return OutputMappingIR(kind="jmespath", source=mapping, argument=arg)
    if text.startswith("regex:"):
        arg = mapping.split(":", 1)[1]
        arg = arg[1:] if arg.startswith(" ") else arg
        problem = regex_problem(arg)
        if problem:
            c.add("error", "invalid_regex", f"{path}: invalid regex: {problem}", path)
            return None
        return OutputMappingIR(kind="regex", source=mapping, argument=arg)
    if text.startswith("xpath:"):
        arg = text[len("xpath:"):].strip()
        try:
            etree.XPath(arg)
        except etree.XPathSyntaxError as exc:
            c.add("error", "invalid_output_mapping", f"{path}: invalid XPath expression: {exc}", path)
            return None
        return OutputMappingIR(kind="xpath", source=mapping, argument=arg)
    c.add("error", "invalid_output_mapping", f"{path}: '{mapping}' is not a valid output mapping", path)
    return None


def validation(c: Compilation, raw: Any, path: str, ctx: NodeContext,
               seen: set[str]) -> ValidationIR | None:
    v = c.obj(raw, path, ("id", "check", "condition", "expected_values", "on_failure", "max_node_retries",
                          "message"))
    if v is None:
        return None
    vid_raw = c.required(v, "id", path)
    vid = None if vid_raw is MISSING else c.identifier(vid_raw, f"{path}/id", "validation id")
    if vid is not None:
        if vid in seen:
            c.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate validation id '{vid}'",
                  f"{path}/id")
        seen.add(vid)
    check = c.enum(v, "check", path, ("custom", "value_in_range", "screen_text_contains", "element_exists"))
    if check is None and "check" in v:
        return None
    check = check or "custom"
    condition = None
    expected: list[str] = []
    binding = None
    if check in ("custom", "value_in_range"):
        cond = c.required(v, "condition", path)
        if cond is not MISSING:
            condition = expression(c, cond, f"{path}/condition")
    else:
        values = c.required(v, "expected_values", path)
        if values is not MISSING and c.expect(values, (list,), "array", f"{path}/expected_values"):
            if not values:
                c.add("error", "invalid_value", f"{path}/expected_values: '[]' is not valid; expected at least "
                      "one value", f"{path}/expected_values")
            for i, item in enumerate(values):
                if c.expect(item, (str,), "string", f"{path}/expected_values/{i}"):
                    expected.append(item)
        if ctx.orchestrator:
            c.add("error", "channel_required", f"Node '{ctx.node_id}': validation '{vid}' ({check}) needs an "
                  "agent channel", f"{path}/check")
            return None
        action = "wait_for_text" if check == "screen_text_contains" else "wait_for_element"
        binding = Binding(kind="channel", channel=ctx.channel, action=action)
    on_failure = c.enum(v, "on_failure", path, ("throw_exception", "fail_workflow", "retry_node"))
    retries = c.integer(v, "max_node_retries", path)
    message = opt_template(c, v, "message", path)
    if vid is None or (check in ("custom", "value_in_range") and condition is None):
        return None
    return ValidationIR(id=vid, check=check, condition=condition, expected_values=expected,
                        on_failure=on_failure or "throw_exception",
                        max_node_retries=1 if retries is None else retries, message=message, binding=binding)
