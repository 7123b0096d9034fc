"""CKP compiler, first slice: decode → dialect check → parse/normalise → validate → bind → IR (ckp.md §6).

Every problem becomes a :class:`Diagnostic` with its JSON Pointer; the compiler never raises for bad input.
Node types other than ``sequence``, ``logic`` and ``terminate``, and internal operations other than ``log``,
``set_variable`` and ``wait``, are recognised but rejected with ``not_implemented`` until their runtime exists.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import date
from typing import Any

import re2

from ckp_core.diagnostics import Diagnostic, Severity, pointer, sort_key
from ckp_core.expressions import ExpressionSyntaxError, json_type_name, parse_expression
from ckp_core.ir import (
    Binding,
    EdgeIR,
    GlobalConfigIR,
    LogicPayload,
    NodeIR,
    ProcedureIR,
    RuleIR,
    SequencePayload,
    StepIR,
    TerminatePayload,
)
from ckp_core.templates import TemplateSyntaxError, compile_template, has_placeholder
from ckp_core.variables import BUILTIN_NAMES, VariableSpec, VariableValidation, check_value

COMPILER_VERSION = "0.1.0"
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024

NODE_TYPES = (
    "sequence", "logic", "loop", "parallel", "subflow", "processing", "verification", "llm_action",
    "human_approval", "transform", "terminate",
)
SUPPORTED_NODE_TYPES = frozenset({"sequence", "logic", "terminate"})
INTERNAL_OPERATIONS = frozenset({
    "log", "wait", "set_variable", "append_to_array", "parse_json", "parse_xml", "parse_csv",
    "parse_excel_data", "calculate", "format_string", "format_data", "extract_regex", "notify", "encrypt",
    "decrypt", "hash", "validate_schema", "convert_type", "generate_id", "get_timestamp", "screenshot",
    "set_checkpoint",
})
SUPPORTED_OPERATIONS = frozenset({"log", "set_variable", "wait"})

ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PROCEDURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
RESERVED_VERSIONS = frozenset({"latest", "versions", "deployments", "diff"})

ROOT_FIELDS = frozenset({
    "procedure_id", "version", "name", "description", "status", "effective_date", "trigger",
    "retrieval_metadata", "global_config", "variables_schema", "workflow_graph", "provenance", "release",
    "$schema",
})
GLOBAL_CONFIG_FIELDS = frozenset({
    "max_retries", "retry_delay_ms", "backoff_multiplier", "retry_policy", "timeout_ms",
    "default_step_timeout_ms", "max_hops", "on_failure", "screenshot_on_fail", "logging_level",
    "telemetry_enabled", "checkpoint_strategy", "checkpoint_storage", "checkpoint_retention_days",
    "resume_on_failure", "execution_mode", "mock_external_calls", "test_data_overrides", "rate_limiting",
    "secrets_config", "audit_config", "workflow_dispatch_mode", "max_cost_usd", "max_cost_per_llm_call_usd",
    "min_llm_quality",
})
# global_config fields whose runtime semantics are not built yet: accepted only at their inert defaults.
GLOBAL_CONFIG_PENDING: dict[str, Any] = {
    "on_failure": None, "timeout_ms": None, "resume_on_failure": False, "mock_external_calls": False,
    "test_data_overrides": {}, "max_cost_usd": None,
}
NODE_COMMON_FIELDS = frozenset({
    "type", "description", "agent", "next_node", "error_handlers", "is_checkpoint", "sla", "telemetry",
    "idempotency_key", "dispatch_mode", "workflow_dispatch_mode",
})
NODE_PENDING_FIELDS = ("error_handlers", "sla", "idempotency_key")
TYPE_FIELDS = {
    "sequence": frozenset({"steps", "validations"}),
    "logic": frozenset({"rules", "default_next_node"}),
    "terminate": frozenset({"status", "outputs", "cleanup_actions", "error_actions", "final_audit_log"}),
}
STEP_META_FIELDS = frozenset({
    "step_id", "action", "description", "timeout_ms", "wait_ms", "wait_after_ms", "retry_on_failure",
    "retry_config", "output_variable", "output_mapping", "idempotency_key", "workflow_dispatch_mode",
    "screenshot_on_complete",
})
STEP_PENDING_FIELDS = ("retry_on_failure", "retry_config", "output_mapping", "idempotency_key",
                       "screenshot_on_complete")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
VAR_TYPES = ("string", "number", "integer", "boolean", "array", "object")


@dataclass
class CompileResult:
    """Either an IR (no errors) or the diagnostics explaining why not; warnings/infos in both cases."""

    diagnostics: list[Diagnostic]
    ir: ProcedureIR | None = None
    procedure_id: str | None = None
    version: str | None = None

    @property
    def ok(self) -> bool:
        return self.ir is not None

    @property
    def errors(self) -> list[Diagnostic]:
        return [d for d in self.diagnostics if d.severity == "error"]


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(doc: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of a document."""
    return "sha256:" + hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


@dataclass
class _Compiler:
    doc: dict[str, Any]
    original: dict[str, Any]
    diags: list[Diagnostic] = field(default_factory=list)
    reads: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    produced: set[str] = field(default_factory=set)

    # -- reporting -----------------------------------------------------------------------------
    def add(self, severity: Severity, code: str, message: str, path: str,
            node_id: str | None = None, step_id: str | None = None, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(severity=severity, code=code, message=message, path=path,
                                     node_id=node_id, step_id=step_id, hint=hint))

    def expect(self, value: Any, kinds: tuple[type, ...], expected: str, path: str,
               node_id: str | None = None, step_id: str | None = None) -> bool:
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            self.add("error", "invalid_type", f"{path}: expected {expected}, got {json_type_name(value)}",
                     path, node_id, step_id)
        return ok

    def opt_str(self, obj: dict[str, Any], key: str, path: str, node_id: str | None = None,
                step_id: str | None = None) -> str | None:
        v = obj.get(key)
        if v is None:
            return None
        return v if self.expect(v, (str,), "string", f"{path}/{key}", node_id, step_id) else None

    def opt_int(self, obj: dict[str, Any], key: str, path: str, node_id: str | None = None,
                step_id: str | None = None, minimum: int = 0) -> int | None:
        v = obj.get(key)
        if v is None:
            return None
        p = f"{path}/{key}"
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not self.expect(v, (int,), "integer", p, node_id, step_id):
            return None
        if v < minimum:
            self.add("error", "invalid_value", f"{p}: '{v}' is not valid; expected an integer >= {minimum}",
                     p, node_id, step_id)
            return None
        return int(v)

    def unknown_fields(self, obj: dict[str, Any], known: Iterable[str], path: str,
                       node_id: str | None = None, step_id: str | None = None) -> None:
        known_set = set(known)
        for key in obj:
            if key not in known_set:
                self.add("warning", "unknown_field", f"{path}: unknown field '{key}' is ignored",
                         f"{path}/{key}", node_id, step_id)

    # -- expressions and templates ---------------------------------------------------------------
    def expression(self, source: Any, path: str, node_id: str | None) -> str | None:
        if not self.expect(source, (str,), "string", path, node_id):
            return None
        try:
            expr = parse_expression(source)
        except ExpressionSyntaxError as exc:
            self.add("error", _expression_code(exc), f"{path}: {exc}", path, node_id)
            return None
        for root in expr.referenced_roots:
            self.reads.append((root, path, node_id, None))
        return str(source)

    def template(self, value: Any, path: str, node_id: str | None, step_id: str | None = None) -> bool:
        try:
            tpl = compile_template(value)
        except TemplateSyntaxError as exc:
            where = path + exc.path
            self.add("error", "template_syntax_error",
                     f"{where}: invalid placeholder '{{{{{exc.placeholder}}}}}': {exc.reason}",
                     where, node_id, step_id)
            return False
        for ph in tpl.placeholders:
            for root in ph.expression.referenced_roots:
                self.reads.append((root, path + ph.path, node_id, step_id))
        return True

    # -- document --------------------------------------------------------------------------------
    def run(self) -> CompileResult:
        doc = self.doc
        self.unknown_fields(doc, ROOT_FIELDS, "")
        procedure_id = self.identity("procedure_id", PROCEDURE_ID_RE, "procedure id")
        version = self.identity("version", VERSION_RE, "version")
        if version in RESERVED_VERSIONS:
            self.add("error", "invalid_value", f"/version: '{version}' is not valid; expected a non-reserved"
                     " version", "/version")
        name = self.opt_str(doc, "name", "")
        description = self.opt_str(doc, "description", "")
        status = self.opt_str(doc, "status", "")
        if status is not None and status not in (
            "draft", "active", "approved", "inactive", "deprecated", "archived"
        ):
            self.add("warning", "invalid_value", f"/status: '{status}' is not valid; expected one of draft, "
                     "active, approved, inactive, deprecated, archived", "/status")
        effective = self.opt_str(doc, "effective_date", "")
        if effective is not None:
            try:
                date.fromisoformat(effective)
                if len(effective) != 10:
                    raise ValueError(effective)
            except ValueError:
                self.add("error", "invalid_value", f"/effective_date: '{effective}' is not valid; expected "
                         "YYYY-MM-DD", "/effective_date")
                effective = None
        if doc.get("trigger") not in (None, {}) and not (
            isinstance(doc["trigger"], dict) and doc["trigger"].get("type", "manual") == "manual"
        ):
            self.add("error", "not_implemented", "/trigger: triggers other than 'manual' are not supported "
                     "by this LangOrch version yet", "/trigger")
        gc = self.global_config()
        variables = self.variables()
        wg = doc.get("workflow_graph")
        nodes: dict[str, NodeIR] = {}
        start_node: str | None = None
        edges: list[EdgeIR] = []
        unknown_types = False
        if wg is None:
            self.add("error", "missing_field", "/: required field 'workflow_graph' is missing",
                     "/workflow_graph")
        elif self.expect(wg, (dict,), "object", "/workflow_graph"):
            wg = _strip_comments(wg)
            self.unknown_fields(wg, ("start_node", "nodes"), "/workflow_graph")
            start_node = wg.get("start_node")
            if start_node is None:
                self.add("error", "missing_field", "/workflow_graph: required field 'start_node' is missing",
                         "/workflow_graph/start_node")
            elif not self.expect(start_node, (str,), "string", "/workflow_graph/start_node"):
                start_node = None
            raw_nodes = wg.get("nodes")
            if raw_nodes is None:
                self.add("error", "missing_field", "/workflow_graph: required field 'nodes' is missing",
                         "/workflow_graph/nodes")
            elif self.expect(raw_nodes, (dict,), "object", "/workflow_graph/nodes"):
                if not raw_nodes:
                    self.add("error", "invalid_value", "/workflow_graph/nodes: '{}' is not valid; expected at"
                             " least one node", "/workflow_graph/nodes")
                for node_id, raw in raw_nodes.items():
                    result = self.node(node_id, raw)
                    if result == "unknown":
                        unknown_types = True
                    elif isinstance(result, NodeIR):
                        nodes[node_id] = result
                        edges.extend(_edges_of(result))
                if start_node is not None and start_node not in raw_nodes:
                    self.add("error", "unknown_start_node", f"start_node '{start_node}' does not exist in "
                             "nodes", "/workflow_graph/start_node")
                for e in edges:
                    if e.target not in raw_nodes:
                        self.add("error", "unknown_target",
                                 f"Node '{e.source}': {_edge_field(e)} '{e.target}' not found",
                                 _edge_path(e), e.source)
                if not unknown_types and start_node is not None and start_node in raw_nodes:
                    self.reachability(start_node, list(raw_nodes), edges)
        self.undeclared(variables)
        self.diags.sort(key=sort_key)
        if any(d.severity == "error" for d in self.diags):
            return CompileResult(self.diags, None, procedure_id, version)
        assert procedure_id
        assert version
        assert start_node
        ir = ProcedureIR(
            procedure_id=procedure_id, version=version, name=name or procedure_id, description=description,
            status=status, effective_date=effective, content_hash=content_hash(self.original),
            compiler_version=COMPILER_VERSION, global_config=gc, variables=variables, start_node=start_node,
            nodes=nodes, edges=edges, tags=_tags(doc), diagnostics=self.diags,
        )
        return CompileResult(self.diags, ir, procedure_id, version)

    def identity(self, key: str, pattern: re.Pattern[str], kind: str) -> str | None:
        v = self.doc.get(key)
        if v is None:
            self.add("error", "missing_field", f"/: required field '{key}' is missing", f"/{key}")
            return None
        if not self.expect(v, (str,), "string", f"/{key}"):
            return None
        if not pattern.match(v):
            self.add("error", "invalid_identifier", f"/{key}: '{v}' is not a valid {kind}", f"/{key}")
            return None
        return str(v)

    def global_config(self) -> GlobalConfigIR:
        raw = self.doc.get("global_config")
        if raw is None or not self.expect(raw, (dict,), "object", "/global_config"):
            return GlobalConfigIR()
        gc = _strip_comments(raw)
        self.unknown_fields(gc, GLOBAL_CONFIG_FIELDS, "/global_config")
        for key, inert in GLOBAL_CONFIG_PENDING.items():
            if gc.get(key) not in (None, inert):
                self.add("error", "not_implemented", f"/global_config/{key}: not supported by this LangOrch "
                         "version yet", f"/global_config/{key}")
        for key in ("max_retries", "retry_delay_ms", "default_step_timeout_ms"):
            self.opt_int(gc, key, "/global_config")
        kwargs: dict[str, Any] = {}
        hops = self.opt_int(gc, "max_hops", "/global_config", minimum=1)
        if hops is not None:
            kwargs["max_hops"] = hops
        level = self.opt_str(gc, "logging_level", "/global_config")
        if level is not None:
            if level.upper() in LOG_LEVELS:
                kwargs["logging_level"] = level.upper()
            else:
                self.add("error", "invalid_value", f"/global_config/logging_level: '{level}' is not valid; "
                         "expected one of DEBUG, INFO, WARNING, ERROR", "/global_config/logging_level")
        mode = self.opt_str(gc, "execution_mode", "/global_config")
        if mode is not None and mode != "production":
            code = "invalid_value" if mode not in ("dry_run", "validation_only") else "not_implemented"
            self.add("error", code, f"/global_config/execution_mode: '{mode}' is not supported; expected "
                     "production", "/global_config/execution_mode")
        strategy = self.opt_str(gc, "checkpoint_strategy", "/global_config")
        if strategy is not None:
            strategy = "disabled" if strategy == "none" else strategy
            if strategy in ("every_node", "critical_nodes_only", "disabled"):
                kwargs["checkpoint_strategy"] = strategy
            else:
                self.add("error", "invalid_value", f"/global_config/checkpoint_strategy: '{strategy}' is not "
                         "valid; expected every_node, critical_nodes_only or disabled",
                         "/global_config/checkpoint_strategy")
        for key in ("checkpoint_storage", "checkpoint_retention_days"):
            if key in gc:
                self.add("info", "field_has_no_effect", f"/global_config/{key}: '{key}' has no effect in "
                         "LangOrch", f"/global_config/{key}")
        audit = gc.get("audit_config")
        if isinstance(audit, dict) and isinstance(audit.get("redacted_fields"), list):
            kwargs["redacted_fields"] = [f for f in audit["redacted_fields"] if isinstance(f, str)]
        return GlobalConfigIR(**kwargs)

    def variables(self) -> dict[str, VariableSpec]:
        raw = self.doc.get("variables_schema")
        if raw is None or not self.expect(raw, (dict,), "object", "/variables_schema"):
            return {}
        entries: list[tuple[str, Any, str, bool | None]] = []
        nested = any(isinstance(raw.get(k), dict) for k in ("required", "optional"))
        if nested:
            for group, flag in (("required", True), ("optional", False)):
                block = raw.get(group)
                if block is None:
                    continue
                if self.expect(block, (dict,), "object", f"/variables_schema/{group}"):
                    for name, spec in block.items():
                        entries.append((name, spec, pointer("variables_schema", group, name), flag))
            self.add("info", "alias_normalised", "/variables_schema: 'required/optional' read as flat "
                     "variables", "/variables_schema")
        else:
            entries = [(n, s, pointer("variables_schema", n), None) for n, s in raw.items()]
        out: dict[str, VariableSpec] = {}
        for name, spec, path, group_flag in entries:
            if name.startswith("_"):
                continue
            if not VAR_RE.match(name):
                self.add("error", "invalid_identifier", f"{path}: '{name}' is not a valid variable name", path)
                continue
            if name in BUILTIN_NAMES:
                self.add("error", "reserved_variable_name", f"{path}: '{name}' is a reserved name", path)
                continue
            if not self.expect(spec, (dict,), "object", path):
                continue
            parsed = self.variable_spec(spec, path, group_flag)
            if parsed is not None:
                out[name] = parsed
        return out

    def variable_spec(self, spec: dict[str, Any], path: str, flag: bool | None) -> VariableSpec | None:
        spec = _strip_comments(spec)
        self.unknown_fields(spec, ("type", "required", "default", "description", "origin", "sensitive",
                                   "validation"), path)
        vtype = spec.get("type")
        if vtype is not None and vtype not in VAR_TYPES:
            self.add("error", "invalid_value", f"{path}/type: '{vtype}' is not valid; expected one of "
                     + ", ".join(VAR_TYPES), f"{path}/type")
            return None
        required = spec.get("required", bool(flag))
        if not self.expect(required, (bool,), "boolean", f"{path}/required"):
            return None
        validation = spec.get("validation") or {}
        if not self.expect(validation, (dict,), "object", f"{path}/validation"):
            return None
        sensitive = bool(spec.get("sensitive") or validation.get("sensitive"))
        regex = validation.get("regex")
        if regex is not None:
            if not self.expect(regex, (str,), "string", f"{path}/validation/regex"):
                return None
            try:
                re2.compile(regex)
            except re2.error as exc:
                self.add("error", "invalid_regex", f"{path}/validation/regex: invalid regex: {exc}",
                         f"{path}/validation/regex")
                return None
        for bound in ("min", "max"):
            b = validation.get(bound)
            if b is not None and not self.expect(b, (int, float), "number", f"{path}/validation/{bound}"):
                return None
        allowed = validation.get("allowed_values")
        if allowed is not None and not self.expect(allowed, (list,), "array",
                                                   f"{path}/validation/allowed_values"):
            return None
        out = VariableSpec(
            type=vtype, required=required, default=spec.get("default"), has_default="default" in spec
            and spec["default"] is not None, description=spec.get("description")
            if isinstance(spec.get("description"), str) else None,
            origin=spec.get("origin") if isinstance(spec.get("origin"), str) else None, sensitive=sensitive,
            validation=VariableValidation(regex=regex, min=validation.get("min"), max=validation.get("max"),
                                          allowed_values=allowed),
        )
        default = spec.get("default")
        if default is not None:
            if isinstance(default, str) and has_placeholder(default):
                self.template(default, f"{path}/default", None)
            else:
                for message in check_value(default, out):
                    self.add("error", "invalid_default", f"{path}/default: default {message}",
                             f"{path}/default")
        return out

    # -- nodes -------------------------------------------------------------------------------------
    def node(self, node_id: str, raw: Any) -> NodeIR | str | None:
        path = pointer("workflow_graph", "nodes", node_id)
        if not ID_RE.match(node_id):
            self.add("error", "invalid_identifier", f"{path}: '{node_id}' is not a valid node id", path, node_id)
        if not self.expect(raw, (dict,), "object", path, node_id):
            return None
        raw = _strip_comments(raw)
        ntype = raw.get("type")
        if ntype is None:
            self.add("error", "missing_field", f"{path}: required field 'type' is missing", f"{path}/type",
                     node_id)
            return "unknown"
        if not isinstance(ntype, str) or ntype not in NODE_TYPES:
            self.add("error", "unknown_node_type", f"Node '{node_id}': unknown node type '{ntype}' (expected "
                     f"one of: {', '.join(NODE_TYPES)})", f"{path}/type", node_id)
            return "unknown"
        if ntype not in SUPPORTED_NODE_TYPES:
            self.add("error", "not_implemented", f"Node '{node_id}': node type '{ntype}' is not supported by "
                     "this LangOrch version yet", f"{path}/type", node_id)
            return None
        self.unknown_fields(raw, NODE_COMMON_FIELDS | TYPE_FIELDS[ntype], path, node_id)
        for key in NODE_PENDING_FIELDS:
            if raw.get(key) not in (None, [], {}):
                self.add("error", "not_implemented", f"Node '{node_id}': '{key}' is not supported by this "
                         "LangOrch version yet", f"{path}/{key}", node_id)
        description = self.opt_str(raw, "description", path, node_id)
        agent = self.opt_str(raw, "agent", path, node_id)
        orchestrator = agent is None or agent.lower() == "masteragent"
        next_node = self.opt_str(raw, "next_node", path, node_id)
        is_checkpoint = raw.get("is_checkpoint", False)
        if not self.expect(is_checkpoint, (bool,), "boolean", f"{path}/is_checkpoint", node_id):
            is_checkpoint = False
        payload: SequencePayload | LogicPayload | TerminatePayload | None
        if ntype in ("logic", "terminate") and next_node is not None:
            self.add("error", "edge_not_allowed", f"Node '{node_id}' ({ntype}) must not have next_node",
                     f"{path}/next_node", node_id)
        if ntype == "sequence":
            payload = self.sequence(node_id, raw, path, orchestrator, agent)
        elif ntype == "logic":
            payload = self.logic(node_id, raw, path)
        else:
            if raw.get("error_handlers"):
                self.add("error", "edge_not_allowed", f"Node '{node_id}' (terminate) must not have "
                         "error_handlers", f"{path}/error_handlers", node_id)
            payload = self.terminate(node_id, raw, path)
        if payload is None:
            return None
        return NodeIR(id=node_id, type=ntype, description=description, agent=agent,
                      channel=None if orchestrator or agent is None else agent.lower(),
                      orchestrator=orchestrator, next_node=next_node if ntype == "sequence" else None,
                      is_checkpoint=is_checkpoint, payload=payload)

    def sequence(self, node_id: str, raw: dict[str, Any], path: str, orchestrator: bool,
                 agent: str | None) -> SequencePayload | None:
        if raw.get("validations"):
            self.add("error", "not_implemented", f"Node '{node_id}': 'validations' is not supported by this "
                     "LangOrch version yet", f"{path}/validations", node_id)
        steps_raw = raw.get("steps", [])
        if steps_raw is None:
            steps_raw = []
        if not self.expect(steps_raw, (list,), "array", f"{path}/steps", node_id):
            return None
        steps: list[StepIR] = []
        seen: set[str] = set()
        for i, step_raw in enumerate(steps_raw):
            step = self.step(node_id, i, step_raw, f"{path}/steps/{i}", orchestrator, agent, seen)
            if step is not None:
                steps.append(step)
        return SequencePayload(steps=steps)

    def step(self, node_id: str, index: int, raw: Any, path: str, orchestrator: bool, agent: str | None,
             seen: set[str]) -> StepIR | None:
        if not self.expect(raw, (dict,), "object", path, node_id):
            return None
        raw = _strip_comments(raw)
        step_id = raw.get("step_id")
        if step_id is None:
            self.add("error", "missing_field", f"{path}: required field 'step_id' is missing",
                     f"{path}/step_id", node_id)
            return None
        if not self.expect(step_id, (str,), "string", f"{path}/step_id", node_id):
            return None
        if not ID_RE.match(step_id):
            self.add("error", "invalid_identifier", f"{path}/step_id: '{step_id}' is not a valid step id",
                     f"{path}/step_id", node_id, step_id)
        if step_id in seen:
            self.add("error", "duplicate_id", f"Node '{node_id}': duplicate step id '{step_id}'",
                     f"{path}/step_id", node_id, step_id)
        seen.add(step_id)
        action = raw.get("action")
        if action is None:
            self.add("error", "missing_field", f"{path}: required field 'action' is missing",
                     f"{path}/action", node_id, step_id)
            return None
        if not self.expect(action, (str,), "string", f"{path}/action", node_id, step_id):
            return None
        for key in STEP_PENDING_FIELDS:
            if raw.get(key) not in (None, False, {}):
                self.add("error", "not_implemented", f"Node '{node_id}', step '{step_id}': '{key}' is not "
                         "supported by this LangOrch version yet", f"{path}/{key}", node_id, step_id)
        params = {k: v for k, v in raw.items() if k not in STEP_META_FIELDS and k != "params"}
        nested = raw.get("params")
        if nested is not None and self.expect(nested, (dict,), "object", f"{path}/params", node_id, step_id):
            for k, v in nested.items():
                if k in params:
                    self.add("warning", "param_conflict", f"Node '{node_id}', step '{step_id}': parameter "
                             f"'{k}' given twice; the flat value wins", f"{path}/params/{k}", node_id, step_id)
                else:
                    params[k] = v
        internal = action in INTERNAL_OPERATIONS and not (action == "screenshot" and not orchestrator)
        if action == "restore_checkpoint":
            self.add("error", "unsupported_action", f"Node '{node_id}', step '{step_id}': action '{action}' "
                     "is not supported", f"{path}/action", node_id, step_id)
            return None
        if orchestrator and not internal:
            self.add("error", "unknown_action", f"Node '{node_id}', step '{step_id}': action '{action}' is "
                     f"not an internal operation and node '{node_id}' has no agent channel", f"{path}/action",
                     node_id, step_id)
            return None
        if internal and action not in SUPPORTED_OPERATIONS:
            self.add("error", "not_implemented", f"Node '{node_id}', step '{step_id}': operation '{action}' "
                     "is not supported by this LangOrch version yet", f"{path}/action", node_id, step_id)
            return None
        output_variable = self.opt_str(raw, "output_variable", path, node_id, step_id)
        if output_variable is not None:
            self.written_name(output_variable, f"{path}/output_variable", node_id, step_id)
        if internal:
            params = self.operation(action, params, path, node_id, step_id)
            binding = Binding(kind="internal", action=action)
        else:
            binding = Binding(kind="channel", channel=(agent or "").lower(), action=action)
        if not self.template(params, path, node_id, step_id):
            return None
        timeout = self.opt_int(raw, "timeout_ms", path, node_id, step_id)
        wait_ms = self.opt_int(raw, "wait_ms", path, node_id, step_id) or 0
        wait_after = self.opt_int(raw, "wait_after_ms", path, node_id, step_id) or 0
        return StepIR(step_id=step_id, action=action, binding=binding, params=params,
                      output_variable=output_variable, timeout_ms=timeout, wait_ms=wait_ms,
                      wait_after_ms=wait_after)

    def operation(self, action: str, params: dict[str, Any], path: str, node_id: str,
                  step_id: str) -> dict[str, Any]:
        """Normalise aliases and check the inputs of a supported internal operation."""
        def alias(old: str, new: str) -> None:
            if old in params and new not in params:
                params[new] = params.pop(old)
                self.add("info", "alias_normalised", f"{path}/{old}: '{old}' read as '{new}'",
                         f"{path}/{old}", node_id, step_id)

        if action == "log":
            alias("value", "message")
            level = params.get("level", "INFO")
            if isinstance(level, str) and not has_placeholder(level) and level.upper() not in LOG_LEVELS:
                self.add("error", "invalid_value", f"{path}/level: '{level}' is not valid; expected one of "
                         "DEBUG, INFO, WARNING, ERROR", f"{path}/level", node_id, step_id)
            self.unknown_fields(params, ("message", "level"), path, node_id, step_id)
        elif action == "wait":
            alias("value", "duration_ms")
            d = params.get("duration_ms")
            if d is None:
                self.add("error", "missing_field", f"{path}: required field 'duration_ms' is missing",
                         f"{path}/duration_ms", node_id, step_id)
            elif not (isinstance(d, str) and has_placeholder(d)):
                self.opt_int(params, "duration_ms", path, node_id, step_id)
            self.unknown_fields(params, ("duration_ms",), path, node_id, step_id)
        elif action == "set_variable":
            var = params.get("variable")
            if var is None:
                self.add("error", "missing_field", f"{path}: required field 'variable' is missing",
                         f"{path}/variable", node_id, step_id)
            elif self.expect(var, (str,), "string", f"{path}/variable", node_id, step_id):
                root, *rest = var.split(".")
                bad = [s for s in rest if not s]
                if bad or not VAR_RE.match(root):
                    self.add("error", "invalid_identifier", f"{path}/variable: '{var}' is not a valid "
                             "variable name", f"{path}/variable", node_id, step_id)
                else:
                    self.written_name(root, f"{path}/variable", node_id, step_id)
            if "value" not in params:
                self.add("error", "missing_field", f"{path}: required field 'value' is missing",
                         f"{path}/value", node_id, step_id)
            self.unknown_fields(params, ("variable", "value"), path, node_id, step_id)
        return params

    def written_name(self, name: str, path: str, node_id: str | None, step_id: str | None) -> None:
        if name in BUILTIN_NAMES:
            self.add("error", "reserved_variable_name", f"{path}: '{name}' is a reserved name", path, node_id,
                     step_id)
        elif not VAR_RE.match(name):
            self.add("error", "invalid_identifier", f"{path}: '{name}' is not a valid variable name", path,
                     node_id, step_id)
        else:
            self.produced.add(name)

    def logic(self, node_id: str, raw: dict[str, Any], path: str) -> LogicPayload | None:
        rules_raw = raw.get("rules", []) or []
        default = self.opt_str(raw, "default_next_node", path, node_id)
        if not self.expect(rules_raw, (list,), "array", f"{path}/rules", node_id):
            return None
        rules: list[RuleIR] = []
        for i, rule in enumerate(rules_raw):
            rp = f"{path}/rules/{i}"
            if not self.expect(rule, (dict,), "object", rp, node_id):
                continue
            rule = _strip_comments(rule)
            self.unknown_fields(rule, ("condition", "next_node"), rp, node_id)
            missing = [k for k in ("condition", "next_node") if rule.get(k) is None]
            for k in missing:
                self.add("error", "missing_field", f"{rp}: required field '{k}' is missing", f"{rp}/{k}",
                         node_id)
            if missing:
                continue
            condition = self.expression(rule["condition"], f"{rp}/condition", node_id)
            target = self.opt_str(rule, "next_node", rp, node_id)
            if condition is not None and target is not None:
                rules.append(RuleIR(condition=condition, next_node=target))
        if not rules_raw and default is None:
            self.add("error", "empty_logic", f"Node '{node_id}': logic needs at least one rule or a "
                     "default_next_node", path, node_id)
        elif default is None:
            self.add("warning", "logic_without_default", f"Node '{node_id}': no default_next_node; an "
                     "unmatched run fails with logic_no_route", path, node_id)
        return LogicPayload(rules=rules, default_next_node=default)

    def terminate(self, node_id: str, raw: dict[str, Any], path: str) -> TerminatePayload | None:
        for key in ("cleanup_actions", "error_actions", "final_audit_log"):
            if raw.get(key) not in (None, [], {}):
                self.add("error", "not_implemented", f"Node '{node_id}': '{key}' is not supported by this "
                         "LangOrch version yet", f"{path}/{key}", node_id)
        status = raw.get("status", "success")
        if status == "failure":
            status = "failed"
            self.add("info", "alias_normalised", f"{path}/status: 'failure' read as 'failed'", f"{path}/status",
                     node_id)
        if status not in ("success", "failed"):
            self.add("error", "invalid_value", f"{path}/status: '{status}' is not valid; expected success or "
                     "failed", f"{path}/status", node_id)
            return None
        outputs = raw.get("outputs", {}) or {}
        if not self.expect(outputs, (dict,), "object", f"{path}/outputs", node_id):
            return None
        if not self.template(outputs, f"{path}/outputs", node_id):
            return None
        return TerminatePayload(status=status, outputs=outputs)

    # -- graph checks ------------------------------------------------------------------------------
    def reachability(self, start: str, node_ids: list[str], edges: list[EdgeIR]) -> None:
        adjacent: dict[str, list[str]] = {}
        for e in edges:
            adjacent.setdefault(e.source, []).append(e.target)
        seen = {start}
        queue = deque([start])
        while queue:
            for nxt in adjacent.get(queue.popleft(), []):
                if nxt not in seen:
                    seen.add(nxt)
                    queue.append(nxt)
        for node_id in node_ids:
            if node_id not in seen:
                self.add("warning", "unreachable_node", f"Node '{node_id}' is unreachable from start_node "
                         f"'{start}'", pointer("workflow_graph", "nodes", node_id), node_id)

    def undeclared(self, variables: dict[str, VariableSpec]) -> None:
        known = set(variables) | self.produced | BUILTIN_NAMES
        reported: set[tuple[str, str]] = set()
        for root, path, node_id, step_id in self.reads:
            if root not in known and (root, path) not in reported:
                reported.add((root, path))
                self.add("warning", "undeclared_variable", f"{path}: '{root}' is not declared and no step "
                         "produces it; it renders as null", path, node_id, step_id)


def _expression_code(exc: ExpressionSyntaxError) -> str:
    name = type(exc).__name__
    return {
        "UnknownFunctionError": "unknown_function",
        "FunctionArityError": "function_arity",
        "InvalidRegexError": "invalid_regex",
    }.get(name, "expression_syntax_error")


def _strip_comments(obj: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_"))}


def _tags(doc: dict[str, Any]) -> list[str]:
    meta = doc.get("retrieval_metadata")
    tags = meta.get("tags") if isinstance(meta, dict) else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _edges_of(node: NodeIR) -> list[EdgeIR]:
    out: list[EdgeIR] = []
    p = node.payload
    if node.next_node is not None:
        out.append(EdgeIR(source=node.id, target=node.next_node, kind="next"))
    if isinstance(p, LogicPayload):
        for rule in p.rules:
            out.append(EdgeIR(source=node.id, target=rule.next_node, kind="condition",
                              label=rule.condition))
        if p.default_next_node is not None:
            out.append(EdgeIR(source=node.id, target=p.default_next_node, kind="default"))
    return out


def _edge_field(e: EdgeIR) -> str:
    return {"next": "next_node", "condition": "rules[].next_node", "default": "default_next_node"}[e.kind]


def _edge_path(e: EdgeIR) -> str:
    base = pointer("workflow_graph", "nodes", e.source)
    return {"next": f"{base}/next_node", "condition": f"{base}/rules",
            "default": f"{base}/default_next_node"}[e.kind]


def _dialect(doc: dict[str, Any]) -> Diagnostic | None:
    wg = doc.get("workflow_graph")
    if isinstance(wg, dict) and isinstance(wg.get("nodes"), list):
        return Diagnostic(severity="error", code="unsupported_dialect", path="/workflow_graph/nodes",
                          message="unsupported CKP dialect: workflow_graph.nodes must be an object keyed by "
                          "node id")
    if "workflow_graph" not in doc:
        if isinstance(doc.get("nodes"), list):
            return Diagnostic(severity="error", code="unsupported_dialect", path="/nodes",
                              message="unsupported CKP dialect: nodes must be inside workflow_graph as an "
                              "object keyed by node id (found a top-level 'nodes' array)")
        for key in ("start_node_id", "entry"):
            if key in doc:
                return Diagnostic(severity="error", code="unsupported_dialect", path=f"/{key}",
                                  message="unsupported CKP dialect: the entry node is "
                                  f"workflow_graph.start_node (found '{key}')")
    return None


def compile_document(doc: Any) -> CompileResult:
    """Compile a decoded CKP document. Never raises for bad input: problems come back as diagnostics."""
    if not isinstance(doc, dict):
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message="CKP document must be a JSON object")])
    dialect = _dialect(doc)
    if dialect is not None:
        return CompileResult([dialect])
    return _Compiler(_strip_comments(doc), doc).run()


def compile_text(text: str | bytes) -> CompileResult:
    """Decode JSON text (≤ 10 MiB) and compile it."""
    size = len(text.encode("utf-8") if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message=f"CKP document is {size} bytes; the limit is 10 MiB")])
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError) as exc:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message=f"CKP document is not valid JSON: {exc}")])
    return compile_document(doc)
