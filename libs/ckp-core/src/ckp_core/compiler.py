"""The CKP compiler (ckp.md §6): decode → dialect check → parse/normalise → validate → bind → IR.

Every problem becomes a :class:`Diagnostic` with its JSON Pointer; the compiler never raises for bad input and
performs no I/O except through the injected, read-only :class:`ProcedureLookup` used for subflow checks.
"""

from __future__ import annotations

import gc
import hashlib
import json
import re
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from typing import Any, Protocol
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import jmespath
import jsonschema
import re2
from croniter import croniter
from lxml import etree

from ckp_core.diagnostics import Diagnostic, Severity, pointer, sort_key
from ckp_core.expressions import (
    Access,
    Const,
    ExpressionSyntaxError,
    Index,
    Member,
    Name,
    PlaceholderExpr,
    ast_to_json,
    json_type_name,
    parse_expression,
)
from ckp_core.expressions import Node as AstNode
from ckp_core.ir import (
    AggregateIR,
    AttachmentIR,
    Binding,
    BranchIR,
    CheckIR,
    CustomMetricIR,
    EdgeIR,
    ErrorHandlerIR,
    ExpressionIR,
    GlobalConfigIR,
    HandlerTriggerIR,
    HumanApprovalPayload,
    LlmActionPayload,
    LogicPayload,
    LoopPayload,
    NodeIR,
    OperationIR,
    OutputMappingIR,
    ParallelPayload,
    Payload,
    ProcedureIR,
    ProcessingPayload,
    RateLimitingIR,
    RetryPolicyIR,
    RuleIR,
    SecretReferenceIR,
    SecretRefIR,
    SecretsConfigIR,
    SequencePayload,
    SlaIR,
    StepIR,
    SubflowPayload,
    SubflowRefIR,
    TelemetryIR,
    TemplateIR,
    TerminatePayload,
    TransformationIR,
    TransformPayload,
    TriggerIR,
    ValidationIR,
    VerificationPayload,
)
from ckp_core.templates import TemplateSyntaxError, compile_template_checked, has_placeholder, template_to_json
from ckp_core.variables import BUILTIN_NAMES, VariableSpec, VariableValidation, check_value

COMPILER_VERSION = "0.2.0"
MAX_DOCUMENT_BYTES = 10 * 1024 * 1024

NODE_TYPES = (
    "sequence", "logic", "loop", "parallel", "subflow", "processing", "verification", "llm_action",
    "human_approval", "transform", "terminate",
)
INTERNAL_OPERATIONS = frozenset({
    "log", "wait", "set_variable", "append_to_array", "parse_json", "parse_xml", "parse_csv",
    "parse_excel_data", "calculate", "format_string", "format_data", "extract_regex", "notify", "encrypt",
    "decrypt", "hash", "validate_schema", "convert_type", "generate_id", "get_timestamp", "screenshot",
    "set_checkpoint",
})
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

ID_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,127}$")
VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
PROCEDURE_ID_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$")
VERSION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]{0,63}$")
METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
BARE_PATH_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+|\[[0-9]+\])*$")
AGGREGATE_RE = re.compile(
    r"^\s*(count|sum|avg|min|max)\s*(?:\(\s*([A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z0-9_]+)*)\s*\))?"
    r"(?:\s+as\s+([A-Za-z_][A-Za-z0-9_]*))?\s*$", re.IGNORECASE)
RESERVED_VERSIONS = frozenset({"latest", "versions", "deployments", "diff"})
VAR_TYPES = ("string", "number", "integer", "boolean", "array", "object")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")

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
NODE_COMMON_FIELDS = frozenset({
    "type", "description", "agent", "next_node", "error_handlers", "is_checkpoint", "sla", "telemetry",
    "idempotency_key", "dispatch_mode", "workflow_dispatch_mode",
})
TYPE_FIELDS: dict[str, frozenset[str]] = {
    "sequence": frozenset({"steps", "validations"}),
    "logic": frozenset({"rules", "default_next_node"}),
    "loop": frozenset({"iterator", "iterator_variable", "index_variable", "body_node", "collect_variable",
                       "collect_expression", "errors_variable", "max_iterations", "continue_on_error"}),
    "parallel": frozenset({"branches", "wait_strategy", "branch_failure", "max_concurrency"}),
    "subflow": frozenset({"procedure_id", "version", "input_mapping", "output_mapping", "inherit_context",
                          "on_failure", "max_retries"}),
    "processing": frozenset({"operations"}),
    "verification": frozenset({"checks"}),
    "llm_action": frozenset({"prompt", "system_prompt", "model", "temperature", "max_tokens", "json_mode",
                             "attachments", "retry", "timeout_ms", "max_cost_per_llm_call_usd", "min_llm_quality",
                             "outputs", "orchestration_mode", "branches"}),
    "human_approval": frozenset({"prompt", "decision_type", "options", "option_routes", "input_schema",
                                 "input_variable", "decision_variable", "context_data", "timeout_ms",
                                 "timeout_action", "escalation_contact", "approval_level", "on_approve",
                                 "on_reject", "on_timeout"}),
    "transform": frozenset({"transformations"}),
    "terminate": frozenset({"status", "outputs", "cleanup_actions", "error_actions", "final_audit_log"}),
}
NO_NEXT_NODE = frozenset({"logic", "human_approval", "terminate"})
STEP_META_FIELDS = frozenset({
    "step_id", "action", "description", "timeout_ms", "wait_ms", "wait_after_ms", "retry_on_failure",
    "retry_config", "output_variable", "output_mapping", "idempotency_key", "workflow_dispatch_mode",
    "screenshot_on_complete",
})

# Internal operation inputs (§4.3): field → alias of; required fields; name fields never rendered.
OP_FIELDS: dict[str, tuple[frozenset[str], frozenset[str]]] = {
    # action: (required, optional)
    "log": (frozenset({"message"}), frozenset({"level"})),
    "wait": (frozenset({"duration_ms"}), frozenset()),
    "set_variable": (frozenset({"variable", "value"}), frozenset()),
    "append_to_array": (frozenset({"array", "value"}), frozenset()),
    "parse_json": (frozenset({"source"}), frozenset()),
    "parse_xml": (frozenset({"source"}), frozenset()),
    "parse_csv": (frozenset({"source"}), frozenset({"delimiter", "quotechar", "header", "infer_types"})),
    "parse_excel_data": (frozenset({"source"}), frozenset({"sheet_name", "header", "header_row"})),
    "calculate": (frozenset({"expression"}), frozenset()),
    "format_string": (frozenset({"template"}), frozenset()),
    "extract_regex": (frozenset({"source", "pattern"}), frozenset({"group", "all", "flags"})),
    "notify": (frozenset(), frozenset({"channel", "recipients", "subject", "message", "metadata"})),
    "encrypt": (frozenset({"value", "key"}), frozenset({"algorithm"})),
    "decrypt": (frozenset({"value", "key"}), frozenset({"algorithm", "output_type"})),
    "hash": (frozenset({"value"}), frozenset({"algorithm", "key", "encoding"})),
    "validate_schema": (frozenset({"value", "schema"}), frozenset({"on_invalid"})),
    "convert_type": (frozenset({"value", "target_type"}), frozenset()),
    "generate_id": (frozenset(), frozenset({"prefix", "format"})),
    "get_timestamp": (frozenset(), frozenset({"format", "timezone"})),
    "screenshot": (frozenset(), frozenset({"uri", "name"})),
    "set_checkpoint": (frozenset(), frozenset()),
}
OP_ALIASES: dict[str, dict[str, str]] = {
    "log": {"value": "message"},
    "wait": {"value": "duration_ms"},
    "format_string": {"value": "template"},
    "validate_schema": {"source": "value"},
    "convert_type": {"source": "value"},
    "screenshot": {"artifact_uri": "uri"},
}
OP_ENUMS: dict[tuple[str, str], tuple[str, ...]] = {
    ("encrypt", "algorithm"): ("aes-256-gcm",),
    ("decrypt", "algorithm"): ("aes-256-gcm",),
    ("decrypt", "output_type"): ("string", "json"),
    ("hash", "algorithm"): ("sha256", "sha512", "sha1", "md5", "blake2b"),
    ("hash", "encoding"): ("hex", "base64"),
    ("validate_schema", "on_invalid"): ("fail", "report"),
    ("convert_type", "target_type"): ("string", "number", "integer", "boolean", "array", "object", "json_string"),
    ("generate_id", "format"): ("uuid4", "uuid7", "short"),
}
NAME_FIELDS = ("variable", "array")
SECRET_KEY_OPERATIONS = frozenset({"encrypt", "decrypt", "hash"})

RETRY_KEYS = {
    "max_retries": "max_retries", "max_attempts": "max_retries", "strategy": "strategy",
    "retry_delay_ms": "retry_delay_ms", "delay_ms": "retry_delay_ms", "base_delay_ms": "retry_delay_ms",
    "backoff_ms": "retry_delay_ms", "backoff_multiplier": "backoff_multiplier", "multiplier": "backoff_multiplier",
    "max_delay_ms": "max_delay_ms", "jitter": "jitter", "retry_on": "retry_on",
}
RETRY_STRATEGIES = ("fixed", "linear", "exponential_backoff", "fibonacci")
HANDLER_FIELDS = frozenset({
    "error_type", "trigger", "action", "recovery_strategy", "max_retries", "delay_ms", "retry_policy",
    "recovery_steps", "fallback_node", "notify_on_error", "error_metadata",
})
HANDLER_ACTIONS = ("retry", "retry_node", "fail", "screenshot_and_fail", "ignore", "escalate")
RECOVERY_STRATEGY = {"retry_node": "retry_node", "continue": "ignore", "stop": "fail", "fallback_node": "escalate"}
TRANSFORM_TYPES = ("filter", "map", "reduce", "join", "aggregate", "pivot", "sort", "deduplicate")
PIVOT_AGGREGATES = ("first", "last", "count", "sum", "avg", "min", "max")
SECRET_PROVIDERS = {
    "env": "env", "env_vars": "env", "environment": "env", "vault": "vault", "hashicorp_vault": "vault",
    "aws": "aws", "aws_secrets_manager": "aws", "aws_secrets": "aws", "azure": "azure",
    "azure_key_vault": "azure", "azure_keyvault": "azure", "langorch": "langorch", "database": "langorch",
    "catalog": "langorch", "platform": "langorch",
}
TRIGGER_TYPES = ("manual", "scheduled", "webhook", "event", "file_watch")
TRIGGER_FIELDS_BY_TYPE: dict[str, frozenset[str]] = {
    "manual": frozenset(),
    "scheduled": frozenset({"schedule", "timezone"}),
    "webhook": frozenset({"webhook_secret", "signature_scheme"}),
    "event": frozenset({"event_source", "event_filter"}),
    "file_watch": frozenset({"file_watch_path"}),
}
TRIGGER_COMMON = frozenset({"type", "input_vars", "dedupe_window_seconds", "max_concurrent_runs"})
TRIGGER_NESTED = ("webhook_config", "event_config", "event", "file_watch", "file_watch_config", "file")
TRIGGER_NESTED_MAP: dict[tuple[str, str], str] = {
    ("webhook_config", "secret"): "webhook_secret",
    ("event", "source"): "event_source",
    ("event_config", "event_source"): "event_source",
    ("event_config", "event_filter"): "event_filter",
    ("file_watch", "path"): "file_watch_path",
    ("file_watch_config", "path"): "file_watch_path",
    ("file", "path"): "file_watch_path",
}
RETRIEVAL_ALIASES = {"intents": "primary_intents", "domain": "business_domain"}
MISSING = object()


class ProcedureLookup(Protocol):
    """Read-only access to stored procedure versions, for subflow checks (§3.9).

    Returns the subflow references of the version (``version`` None or ``latest``: the newest active one), or
    None when no such version is stored.
    """

    def __call__(self, procedure_id: str, version: str | None) -> list[SubflowRefIR] | None: ...


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

    def summary(self) -> dict[str, int]:
        out = {"errors": 0, "warnings": 0, "infos": 0}
        for d in self.diagnostics:
            out[{"error": "errors", "warning": "warnings", "info": "infos"}[d.severity]] += 1
        return out


def canonical_json(value: Any) -> str:
    """Canonical JSON text: sorted keys, compact separators, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)


def content_hash(doc: Any) -> str:
    """``sha256:<hex>`` of the canonical JSON of a document."""
    return "sha256:" + hashlib.sha256(canonical_json(doc).encode("utf-8")).hexdigest()


def is_orchestrator(agent: Any) -> bool:
    return agent is None or (isinstance(agent, str) and agent.lower() == "masteragent")


def _strip(obj: Mapping[str, Any]) -> dict[str, Any]:
    """Drop comment keys (``_…``) and null values (an optional field given as null is absent)."""
    return {k: v for k, v in obj.items() if not (isinstance(k, str) and k.startswith("_")) and v is not None}


def _templated(value: Any) -> bool:
    return isinstance(value, str) and has_placeholder(value)


def _secret_uses(node: Any, out: list[tuple[str | None, str | None]]) -> None:
    """Collect ``secrets.<alias>[.<field>]`` reads of a syntax tree (alias None: not a literal reference)."""
    if isinstance(node, Access) and isinstance(node.base, Name) and node.base.name == "secrets":
        accs = node.accessors
        alias = _literal_key(accs[0]) if accs else None
        fld = _literal_key(accs[1]) if len(accs) > 1 else None
        out.append((alias, fld))
        for acc in accs:
            if isinstance(acc, Index):
                _secret_uses(acc.expr, out)
        return
    if isinstance(node, Name):
        if node.name == "secrets":
            out.append((None, None))
        return
    if isinstance(node, tuple):
        for item in node:
            _secret_uses(item, out)
        return
    if hasattr(node, "__dataclass_fields__"):
        for name in node.__dataclass_fields__:
            _secret_uses(getattr(node, name), out)


def _literal_key(acc: Any) -> str | None:
    if isinstance(acc, Member):
        return str(acc.key)
    if isinstance(acc, Index) and isinstance(acc.expr, Const) and isinstance(acc.expr.value, str):
        return acc.expr.value
    return None


def _is_path(node: AstNode) -> bool:
    if isinstance(node, Name):
        return True
    if isinstance(node, Access) and isinstance(node.base, Name):
        return all(isinstance(a, Member) or (isinstance(a, Index) and isinstance(a.expr, Const))
                   for a in node.accessors)
    if isinstance(node, PlaceholderExpr) and not node.has_fallback:
        return _is_path(node.expr)
    return False


def _path_root(node: AstNode) -> str | None:
    if isinstance(node, Name):
        return node.name
    if isinstance(node, Access) and isinstance(node.base, Name):
        return node.base.name
    if isinstance(node, PlaceholderExpr):
        return _path_root(node.expr)
    return None


@dataclass
class _Read:
    root: str
    path: str
    node_id: str | None
    step_id: str | None


@dataclass
class _Compiler:
    doc: dict[str, Any]
    original: dict[str, Any]
    lookup: ProcedureLookup | None = None
    diags: list[Diagnostic] = field(default_factory=list)
    reads: list[_Read] = field(default_factory=list)
    produced: set[str] = field(default_factory=set)
    secret_aliases: set[str] = field(default_factory=set)
    secret_uses: list[tuple[str, str, str | None, str | None]] = field(default_factory=list)
    node_id: str | None = None
    step_id: str | None = None
    gc: GlobalConfigIR = field(default_factory=GlobalConfigIR)
    gc_retry_keys: dict[str, Any] = field(default_factory=dict)
    pending_subflows: list[tuple[str, dict[str, Any], str]] = field(default_factory=list)
    secrets: dict[str, SecretReferenceIR] = field(default_factory=dict)

    # -- reporting and typed field access -------------------------------------------------------------------
    def add(self, severity: Severity, code: str, message: str, path: str, hint: str | None = None) -> None:
        self.diags.append(Diagnostic(severity=severity, code=code, message=message, path=path,
                                     node_id=self.node_id, step_id=self.step_id, hint=hint))

    def where(self) -> str:
        if self.node_id is None:
            return ""
        if self.step_id is None:
            return f"Node '{self.node_id}'"
        return f"Node '{self.node_id}', step '{self.step_id}'"

    def expect(self, value: Any, kinds: tuple[type, ...], expected: str, path: str) -> bool:
        ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
        if not ok:
            self.add("error", "invalid_type", f"{path}: expected {expected}, got {json_type_name(value)}", path)
        return ok

    def obj(self, value: Any, path: str, known: Iterable[str] | None = None) -> dict[str, Any] | None:
        """An object field: comments and nulls dropped, unknown keys warned about when ``known`` is given."""
        if not self.expect(value, (dict,), "object", path):
            return None
        out = _strip(value)
        if known is not None:
            self.unknown_fields(out, known, path)
        return out

    def unknown_fields(self, obj: Mapping[str, Any], known: Iterable[str], path: str) -> None:
        known_set = set(known)
        for key in obj:
            if key not in known_set:
                self.add("warning", "unknown_field", f"{path}: unknown field '{key}' is ignored",
                         f"{path}/{pointer(key)[1:]}")

    def required(self, obj: Mapping[str, Any], key: str, path: str) -> Any:
        if key not in obj:
            self.add("error", "missing_field", f"{path or '/'}: required field '{key}' is missing",
                     f"{path}/{pointer(key)[1:]}")
            return MISSING
        return obj[key]

    def string(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        return v if self.expect(v, (str,), "string", f"{path}/{key}") else None

    def boolean(self, obj: Mapping[str, Any], key: str, path: str, default: bool = False) -> bool:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return default
        return bool(v) if self.expect(v, (bool,), "boolean", f"{path}/{key}") else default

    def integer(self, obj: Mapping[str, Any], key: str, path: str, minimum: int = 0,
                required: bool = False) -> int | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if not self.expect(v, (int,), "integer", p):
            return None
        if v < minimum:
            self.add("error", "invalid_value", f"{p}: '{v}' is not valid; expected an integer >= {minimum}", p)
            return None
        return int(v)

    def number(self, obj: Mapping[str, Any], key: str, path: str, minimum: float | None = None,
               exclusive: bool = False) -> float | None:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if not self.expect(v, (int, float), "number", p):
            return None
        if minimum is not None and (v <= minimum if exclusive else v < minimum):
            bound = f"> {minimum}" if exclusive else f">= {minimum}"
            self.add("error", "invalid_value", f"{p}: '{v}' is not valid; expected a number {bound}", p)
            return None
        try:
            return float(v)
        except OverflowError:  # an integer beyond a double's range
            self.add("error", "invalid_value", f"{p}: the number is too large (beyond ±1.8e308)", p)
            return None

    def enum(self, obj: Mapping[str, Any], key: str, path: str, values: tuple[str, ...],
             aliases: Mapping[str, str] | None = None, fold_case: bool = False,
             severity: Severity = "error") -> str | None:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return None
        p = f"{path}/{key}"
        if not self.expect(v, (str,), "string", p):
            return None
        candidate = v.lower() if fold_case else v
        if aliases and candidate in aliases:
            self.add("info", "alias_normalised", f"{p}: '{v}' read as '{aliases[candidate]}'", p)
            candidate = aliases[candidate]
        if candidate not in values:
            self.add(severity, "invalid_value", f"{p}: '{v}' is not valid; expected one of {', '.join(values)}", p)
            return None
        return str(candidate)

    def identifier(self, value: Any, path: str, kind: str, pattern: re.Pattern[str] = ID_RE) -> str | None:
        if not self.expect(value, (str,), "string", path):
            return None
        if not pattern.match(value):
            self.add("error", "invalid_identifier", f"{path}: '{value}' is not a valid {kind}", path)
            return None
        return str(value)

    def node_ref(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        return v if self.expect(v, (str,), "node id (string)", f"{path}/{key}") else None

    def written(self, value: Any, path: str) -> str | None:
        """A variable name the procedure writes (counted as produced)."""
        if not self.expect(value, (str,), "string", path):
            return None
        if value in BUILTIN_NAMES:
            self.add("error", "reserved_variable_name", f"{path}: '{value}' is a reserved name", path)
            return None
        if not VAR_RE.match(value):
            self.add("error", "invalid_identifier", f"{path}: '{value}' is not a valid variable name", path)
            return None
        self.produced.add(value)
        return str(value)

    def written_field(self, obj: Mapping[str, Any], key: str, path: str, required: bool = False) -> str | None:
        v = self.required(obj, key, path) if required else obj.get(key, MISSING)
        if v is MISSING:
            return None
        return self.written(v, f"{path}/{key}")

    # -- expressions and templates --------------------------------------------------------------------------
    def expression(self, source: Any, path: str, check_roots: bool = True,
                   local_names: frozenset[str] = frozenset()) -> ExpressionIR | None:
        if not self.expect(source, (str,), "string", path):
            return None
        try:
            expr = parse_expression(source)
        except ExpressionSyntaxError as exc:
            self.add("error", _expression_code(exc), f"{path}: {exc}", path)
            return None
        except RecursionError:
            self.add("error", "expression_syntax_error", f"{path}: expression nested too deeply", path)
            return None
        uses: list[tuple[str | None, str | None]] = []
        _secret_uses(expr.ast, uses)
        if uses:
            self.add("error", "secret_not_allowed", f"{path}: secrets may only be used in agent parameters and "
                     "encryption keys", path)
            return None
        if check_roots:
            for root in expr.referenced_roots - local_names:
                self.reads.append(_Read(root, path, self.node_id, self.step_id))
        return ExpressionIR(source=source, ast=ast_to_json(expr.ast), roots=sorted(expr.referenced_roots))

    def path_expression(self, source: Any, path: str, check_roots: bool = True) -> ExpressionIR | None:
        """An expression that must be a path (§5.2): ``name{.segment|[index]}``."""
        expr = self.expression(source, path, check_roots)
        if expr is None:
            return None
        if not _is_path(expr.compiled.ast):
            self.add("error", "expression_syntax_error", f"{path}: '{source}' is not a path (name.segment[index])",
                     path)
            return None
        return expr

    def template(self, value: Any, path: str, secrets: str | frozenset[str] = "deny",
                 local_names: frozenset[str] = frozenset(),
                 secret_refs: list[SecretRefIR] | None = None) -> TemplateIR | None:
        """Compile a template field. ``secrets`` (§7.14): ``deny``, ``allow`` (agent parameters) or the set of
        top-level keys where they are allowed (``{"key"}`` for encrypt/decrypt/hash)."""
        try:
            tpl, errors = compile_template_checked(value)
        except (RecursionError, TemplateSyntaxError):
            self.add("error", "template_syntax_error", f"{path}: template nested too deeply", path)
            return None
        for exc in errors:
            where = path + exc.path
            self.add("error", "template_syntax_error", f"{where}: invalid placeholder '{exc.raw}': {exc.reason}",
                     where)
        if tpl is None:
            return None
        ok = True
        for ph in tpl.placeholders:
            where = path + ph.path
            uses: list[tuple[str | None, str | None]] = []
            if "secrets" in ph.expression.referenced_roots:
                _secret_uses(ph.expression.ast, uses)
            allowed = secrets == "allow" or (
                isinstance(secrets, frozenset) and ph.path.split("/")[1:2] and ph.path.split("/")[1] in secrets)
            if uses and not allowed:
                self.add("error", "secret_not_allowed", f"{where}: secrets may only be used in agent parameters "
                         "and encryption keys", where)
                ok = False
                continue
            for alias, fld in uses:
                if alias is None:
                    self.add("error", "secret_not_allowed", f"{where}: secrets must be referenced as "
                             "secrets.<alias>[.<field>]", where)
                    ok = False
                    continue
                self.secret_uses.append((alias, where, self.node_id, self.step_id))
                if secret_refs is not None:
                    secret_refs.append(SecretRefIR(alias=alias, field=fld, path=where))
            for root in ph.expression.referenced_roots - local_names - {"secrets"}:
                self.reads.append(_Read(root, where, self.node_id, self.step_id))
        if not ok:
            return None
        data = template_to_json(tpl)
        return TemplateIR(source=data["source"], strings=data["strings"])

    def opt_template(self, obj: Mapping[str, Any], key: str, path: str, **kw: Any) -> TemplateIR | None:
        if key not in obj:
            return None
        return self.template(obj[key], f"{path}/{key}", **kw)

    # -- document -------------------------------------------------------------------------------------------
    def run(self) -> CompileResult:
        doc = self.doc
        self.unknown_fields(doc, ROOT_FIELDS, "")
        procedure_id = self.identity("procedure_id", PROCEDURE_ID_RE, "procedure id")
        version = self.identity("version", VERSION_RE, "version")
        if version is not None and version.lower() in RESERVED_VERSIONS:
            self.add("error", "invalid_value", f"/version: '{version}' is not valid; expected a version that is not "
                     "a reserved word (latest, versions, deployments, diff)", "/version")
        if procedure_id == "validate":
            self.add("error", "invalid_value", "/procedure_id: 'validate' is not valid; expected a procedure id "
                     "that is not reserved", "/procedure_id")
        name = self.string(doc, "name", "")
        description = self.string(doc, "description", "")
        status = self.enum(doc, "status", "", ("draft", "active", "approved", "inactive", "deprecated", "archived"),
                           severity="warning")
        status = status or (doc.get("status") if isinstance(doc.get("status"), str) else None)
        effective = self.effective_date()
        self.gc, gc_on_failure = self.global_config()
        variables = self.variables()
        trigger = self.trigger()
        retrieval = self.retrieval_metadata()
        provenance = self.obj(doc["provenance"], "/provenance") if "provenance" in doc else None
        nodes, start_node, edges, unknown_types, raw_node_ids = self.graph(gc_on_failure)
        self.finish_subflows(nodes, variables, trigger)
        subflow_refs = [SubflowRefIR(node_id=n.id, procedure_id=n.payload.procedure_id, version=n.payload.version)
                        for n in nodes.values() if isinstance(n.payload, SubflowPayload)]
        self.subflow_checks(procedure_id, subflow_refs)
        if not unknown_types and start_node is not None and start_node in raw_node_ids:
            self.reachability(start_node, raw_node_ids, edges, nodes)
        self.undeclared(variables, trigger)
        self.check_secret_aliases()
        self.diags.sort(key=sort_key)
        if any(d.severity == "error" for d in self.diags):
            return CompileResult(self.diags, None, procedure_id, version)
        assert procedure_id is not None
        assert version is not None
        assert start_node is not None
        ir = ProcedureIR(
            procedure_id=procedure_id, version=version, name=name or procedure_id, description=description,
            status=status, effective_date=effective, content_hash=content_hash(self.original),
            compiler_version=COMPILER_VERSION, trigger=trigger, global_config=self.gc, variables=variables,
            secrets=self.secrets, start_node=start_node, nodes=nodes, edges=edges, subflow_refs=subflow_refs,
            retrieval_metadata=retrieval, provenance=provenance, tags=_tags(retrieval), diagnostics=self.diags,
        )
        return CompileResult(self.diags, ir, procedure_id, version)

    def identity(self, key: str, pattern: re.Pattern[str], kind: str) -> str | None:
        v = self.required(self.doc, key, "")
        if v is MISSING:
            return None
        return self.identifier(v, f"/{key}", kind, pattern)

    def effective_date(self) -> str | None:
        effective = self.string(self.doc, "effective_date", "")
        if effective is None:
            return None
        try:
            if len(effective) != 10:
                raise ValueError(effective)
            date.fromisoformat(effective)
        except ValueError:
            self.add("error", "invalid_value", f"/effective_date: '{effective}' is not valid; expected YYYY-MM-DD",
                     "/effective_date")
            return None
        return effective

    def retrieval_metadata(self) -> dict[str, Any] | None:
        raw = self.doc.get("retrieval_metadata")
        if raw is None:
            return None
        meta = self.obj(raw, "/retrieval_metadata")
        if meta is None:
            return None
        for alias, canonical in RETRIEVAL_ALIASES.items():
            if alias in meta:
                value = meta.pop(alias)
                self.add("info", "alias_normalised", f"/retrieval_metadata/{alias}: '{alias}' read as '{canonical}'",
                         f"/retrieval_metadata/{alias}")
                meta.setdefault(canonical, value)
        for key in ("primary_intents", "negative_intents", "keywords", "tags"):
            v = meta.get(key)
            if v is not None and not (isinstance(v, list) and all(isinstance(i, str) for i in v)):
                self.add("error", "invalid_type", f"/retrieval_metadata/{key}: expected array of strings, got "
                         f"{json_type_name(v)}", f"/retrieval_metadata/{key}")
        if "business_domain" in meta:
            self.expect(meta["business_domain"], (str,), "string", "/retrieval_metadata/business_domain")
        return meta

    # -- global_config --------------------------------------------------------------------------------------
    def global_config(self) -> tuple[GlobalConfigIR, str | None]:
        raw = self.doc.get("global_config")
        if raw is None:
            return GlobalConfigIR(), None
        p = "/global_config"
        gc = self.obj(raw, p, GLOBAL_CONFIG_FIELDS)
        if gc is None:
            return GlobalConfigIR(), None
        kw: dict[str, Any] = {}
        for key in ("max_retries", "retry_delay_ms", "timeout_ms", "default_step_timeout_ms"):
            v = self.integer(gc, key, p)
            if v is not None:
                kw[key] = v
        hops = self.integer(gc, "max_hops", p, minimum=1)
        if hops is not None:
            kw["max_hops"] = hops
        mult = self.number(gc, "backoff_multiplier", p, minimum=1)
        if mult is not None:
            kw["backoff_multiplier"] = mult
        if "retry_policy" in gc:
            self.gc_retry_keys = self.retry_keys(gc["retry_policy"], f"{p}/retry_policy")
        flat = {"max_retries": kw.get("max_retries"), "retry_delay_ms": kw.get("retry_delay_ms"),
                "backoff_multiplier": kw.get("backoff_multiplier")}
        base = {k: v for k, v in flat.items() if v is not None}
        kw["retry_policy"] = RetryPolicyIR(**{**base, **self.gc_retry_keys})
        on_failure = self.node_ref(gc, "on_failure", p)
        if on_failure is not None:
            kw["on_failure"] = on_failure
        for key in ("screenshot_on_fail", "telemetry_enabled", "resume_on_failure", "mock_external_calls"):
            if key in gc:
                kw[key] = self.boolean(gc, key, p, default=key == "telemetry_enabled")
        level = self.enum({k: v.upper() if isinstance(v, str) else v for k, v in gc.items()
                           if k == "logging_level"}, "logging_level", p, LOG_LEVELS)
        if level is not None:
            kw["logging_level"] = level
        strategy = self.enum(gc, "checkpoint_strategy", p, ("every_node", "critical_nodes_only", "disabled"),
                             aliases={"none": "disabled"})
        if strategy is not None:
            kw["checkpoint_strategy"] = strategy
        for key in ("checkpoint_storage", "checkpoint_retention_days"):
            if key in gc:
                self.add("info", "field_has_no_effect", f"{p}/{key}: '{key}' has no effect in LangOrch", f"{p}/{key}")
        mode = self.enum(gc, "execution_mode", p, ("production", "dry_run", "validation_only"))
        if mode is not None:
            kw["execution_mode"] = mode
        if "test_data_overrides" in gc:
            overrides = self.obj(gc["test_data_overrides"], f"{p}/test_data_overrides")
            if overrides is not None:
                kw["test_data_overrides"] = dict(gc["test_data_overrides"])
        if "rate_limiting" in gc:
            kw["rate_limiting"] = self.rate_limiting(gc["rate_limiting"], f"{p}/rate_limiting")
        if "secrets_config" in gc:
            kw["secrets_config"] = self.secrets_config(gc["secrets_config"], f"{p}/secrets_config")
        if "audit_config" in gc:
            audit = self.obj(gc["audit_config"], f"{p}/audit_config",
                             ("enabled", "redacted_fields", "audit_level", "storage_location", "retention_days",
                              "include_sensitive_data"))
            if audit is not None:
                kw["audit_enabled"] = self.boolean(audit, "enabled", f"{p}/audit_config", default=True)
                fields_ = audit.get("redacted_fields", [])
                if self.expect(fields_, (list,), "array", f"{p}/audit_config/redacted_fields"):
                    names = []
                    for i, f in enumerate(fields_):
                        if self.expect(f, (str,), "string", f"{p}/audit_config/redacted_fields/{i}"):
                            names.append(f)
                    kw["redacted_fields"] = names
        dispatch = self.enum({k: v.lower() if isinstance(v, str) else v for k, v in gc.items()
                              if k == "workflow_dispatch_mode"}, "workflow_dispatch_mode", p, ("async", "sync"))
        if dispatch is not None:
            kw["workflow_dispatch_mode"] = dispatch
        for key in ("max_cost_usd", "max_cost_per_llm_call_usd"):
            cost = self.number(gc, key, p, minimum=0, exclusive=True)
            if cost is not None:
                kw[key] = cost
        quality = self.number(gc, "min_llm_quality", p)
        if quality is not None:
            kw["min_llm_quality"] = quality
        return GlobalConfigIR(**kw), on_failure

    def rate_limiting(self, raw: Any, p: str) -> RateLimitingIR:
        rl = self.obj(raw, p, ("enabled", "max_requests_per_minute", "max_concurrent_operations", "max_wait_ms"))
        if rl is None:
            return RateLimitingIR()
        kw: dict[str, Any] = {"enabled": self.boolean(rl, "enabled", p)}
        for key in ("max_requests_per_minute", "max_concurrent_operations"):
            v = self.integer(rl, key, p, minimum=1)
            if v is not None:
                kw[key] = v
        wait = self.integer(rl, "max_wait_ms", p)
        if wait is not None:
            kw["max_wait_ms"] = wait
        return RateLimitingIR(**kw)

    def provider(self, obj: Mapping[str, Any], key: str, p: str) -> str | None:
        v = obj.get(key, MISSING)
        if v is MISSING:
            return None
        if not self.expect(v, (str,), "string", f"{p}/{key}"):
            return None
        canonical = SECRET_PROVIDERS.get(v.lower())
        if canonical is None:
            self.add("error", "invalid_value", f"{p}/{key}: '{v}' is not valid; expected one of env, vault, aws, "
                     "azure, langorch", f"{p}/{key}")
            return None
        if canonical != v:
            self.add("info", "alias_normalised", f"{p}/{key}: '{v}' read as '{canonical}'", f"{p}/{key}")
        return canonical

    def secrets_config(self, raw: Any, p: str) -> SecretsConfigIR:
        sc = self.obj(raw, p, ("provider", "type", "vault_url", "secret_references"))
        if sc is None:
            return SecretsConfigIR()
        if "type" in sc and "provider" not in sc:
            self.add("info", "alias_normalised", f"{p}/type: 'type' read as 'provider'", f"{p}/type")
            sc["provider"] = sc.pop("type")
        provider = self.provider(sc, "provider", p)
        vault_url = self.string(sc, "vault_url", p)
        refs = sc.get("secret_references", {})
        if self.expect(refs, (dict,), "object", f"{p}/secret_references"):
            for alias, ref in _strip(refs).items():
                rp = f"{p}/secret_references/{pointer(alias)[1:]}"
                self.secret_aliases.add(alias)
                if isinstance(ref, str):
                    self.secrets[alias] = SecretReferenceIR(key=ref)
                elif isinstance(ref, dict):
                    r = self.obj(ref, rp, ("key", "provider", "field"))
                    if r is None:
                        continue
                    key = self.string(r, "key", rp, required=True)
                    prov = self.provider(r, "provider", rp)
                    fld = self.string(r, "field", rp)
                    if key is not None:
                        self.secrets[alias] = SecretReferenceIR(key=key, provider=prov, field=fld)
                else:
                    self.add("error", "invalid_type", f"{rp}: expected string or object, got {json_type_name(ref)}",
                             rp)
        return SecretsConfigIR(provider=provider, vault_url=vault_url)

    def retry_keys(self, raw: Any, p: str) -> dict[str, Any]:
        """The keys a RetryPolicy object sets explicitly (§4.8), aliases resolved."""
        rp = self.obj(raw, p, RETRY_KEYS)
        if rp is None:
            return {}
        out: dict[str, Any] = {}
        for key, value in rp.items():
            canonical = RETRY_KEYS.get(key)
            if canonical is None:
                continue
            if canonical != key:
                self.add("info", "alias_normalised", f"{p}/{key}: '{key}' read as '{canonical}'", f"{p}/{key}")
            if canonical in out:
                continue
            if key == "max_attempts":
                n = self.integer(rp, key, p, minimum=1)
                if n is not None:
                    out["max_retries"] = n - 1
            elif canonical in ("max_retries", "retry_delay_ms", "max_delay_ms"):
                n = self.integer(rp, key, p)
                if n is not None:
                    out[canonical] = n
            elif canonical == "backoff_multiplier":
                m = self.number(rp, key, p, minimum=1)
                if m is not None:
                    out[canonical] = m
            elif canonical == "strategy":
                s = self.enum(rp, key, p, RETRY_STRATEGIES)
                if s is not None:
                    out[canonical] = s
            elif canonical == "jitter":
                if isinstance(value, bool):
                    out["jitter"] = 1.0 if value else 0.0
                elif isinstance(value, int | float) and 0 <= value <= 1:
                    out["jitter"] = float(value)
                else:
                    self.add("error", "invalid_value", f"{p}/{key}: '{value}' is not valid; expected true, false or "
                             "a fraction in [0, 1]", f"{p}/{key}")
            elif canonical == "retry_on":
                codes = [value] if isinstance(value, str) else value
                if isinstance(codes, list) and all(isinstance(c, str) for c in codes):
                    out["retry_on"] = list(codes)
                else:
                    self.add("error", "invalid_type", f"{p}/{key}: expected array of strings, got "
                             f"{json_type_name(value)}", f"{p}/{key}")
        return out

    # -- variables ------------------------------------------------------------------------------------------
    def variables(self) -> dict[str, VariableSpec]:
        raw = self.doc.get("variables_schema")
        if raw is None or not self.expect(raw, (dict,), "object", "/variables_schema"):
            return {}
        raw = _strip(raw)
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
            for key in raw:
                if key not in ("required", "optional"):
                    self.add("warning", "unknown_field", f"/variables_schema: unknown field '{key}' is ignored",
                             pointer("variables_schema", key))
            self.add("info", "alias_normalised", "/variables_schema: 'required/optional' read as flat variables",
                     "/variables_schema")
        else:
            entries = [(n, s, pointer("variables_schema", n), None) for n, s in raw.items()]
        return self.variable_entries(entries)

    def variable_entries(self, entries: Sequence[tuple[str, Any, str, bool | None]]) -> dict[str, VariableSpec]:
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
            parsed = self.variable_spec(_strip(spec), path, group_flag)
            if parsed is not None:
                out[name] = parsed
        return out

    def variable_spec(self, spec: dict[str, Any], path: str, flag: bool | None) -> VariableSpec | None:
        self.unknown_fields(spec, ("type", "required", "default", "description", "origin", "sensitive",
                                   "validation"), path)
        vtype = self.enum(spec, "type", path, VAR_TYPES)
        if "type" in spec and vtype is None:
            return None
        required = self.boolean(spec, "required", path, default=bool(flag))
        validation = self.obj(spec.get("validation", {}), f"{path}/validation",
                              ("regex", "min", "max", "allowed_values", "sensitive"))
        if validation is None:
            return None
        vp = f"{path}/validation"
        sensitive = self.boolean(spec, "sensitive", path)
        if "sensitive" in validation:
            self.add("info", "alias_normalised", f"{vp}/sensitive: 'validation.sensitive' read as 'sensitive'",
                     f"{vp}/sensitive")
            sensitive = sensitive or self.boolean(validation, "sensitive", vp)
        regex = self.string(validation, "regex", vp)
        if regex is not None:
            try:
                re2.compile(regex)
            except re2.error as exc:
                self.add("error", "invalid_regex", f"{vp}/regex: invalid regex: {exc}", f"{vp}/regex")
                return None
        bounds = {b: self.number(validation, b, vp) for b in ("min", "max")}
        allowed = validation.get("allowed_values")
        if allowed is not None and not self.expect(allowed, (list,), "array", f"{vp}/allowed_values"):
            return None
        description = self.string(spec, "description", path)
        origin = self.enum(spec, "origin", path, ("user_strict", "user_lazy", "system_captured"), severity="warning")
        out = VariableSpec(
            type=vtype, required=required, default=spec.get("default"), has_default="default" in spec,
            description=description, origin=origin, sensitive=sensitive,
            validation=VariableValidation(regex=regex, min=bounds["min"], max=bounds["max"], allowed_values=allowed),
        )
        if "default" in spec:
            default = spec["default"]
            if _templated(default):
                self.template(default, f"{path}/default")
            else:
                for message in check_value(default, out):
                    self.add("error", "invalid_default", f"{path}/default: default {message}", f"{path}/default")
        return out

    # -- trigger --------------------------------------------------------------------------------------------
    def trigger(self) -> TriggerIR | None:
        raw = self.doc.get("trigger")
        if raw is None:
            return None
        p = "/trigger"
        trig = self.obj(raw, p)
        if trig is None:
            return None
        ttype_raw = trig.get("type", "manual")
        if ttype_raw not in TRIGGER_TYPES:
            self.add("error", "invalid_trigger_type", f"trigger.type '{ttype_raw}' is invalid; expected one of "
                     "[manual, scheduled, webhook, event, file_watch]", f"{p}/type")
            return None
        ttype: str = ttype_raw
        flat: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for key, value in trig.items():
            if key in TRIGGER_NESTED:
                continue
            flat[key] = value
            origin[key] = f"{p}/{pointer(key)[1:]}"
        for block in TRIGGER_NESTED:
            if block not in trig:
                continue
            nested = self.obj(trig[block], f"{p}/{block}")
            if nested is None:
                continue
            if block == "event" and "provider" in nested and "topic" in nested and "source" not in nested:
                nested["source"] = f"{nested.pop('provider')}://{nested.pop('topic')}"
            for key, value in nested.items():
                np_ = f"{p}/{block}/{pointer(key)[1:]}"
                canonical = TRIGGER_NESTED_MAP.get((block, key))
                if canonical is None:
                    self.add("warning", "ignored_trigger_field", f"trigger.{block}.{key} is ignored for type "
                             f"'{ttype}'", np_)
                    continue
                if canonical in flat:
                    continue
                self.add("info", "alias_normalised", f"{np_}: '{block}.{key}' read as '{canonical}'", np_)
                flat[canonical] = value
                origin[canonical] = np_
        relevant = TRIGGER_COMMON | TRIGGER_FIELDS_BY_TYPE[ttype]
        all_trigger_fields = TRIGGER_COMMON.union(*TRIGGER_FIELDS_BY_TYPE.values())
        kw: dict[str, Any] = {"type": ttype}
        for key in list(flat):
            if key not in relevant:
                if key in all_trigger_fields:
                    self.add("warning", "ignored_trigger_field", f"trigger.{key} is ignored for type '{ttype}'",
                             origin[key])
                else:
                    self.add("warning", "unknown_field", f"{p}: unknown field '{key}' is ignored", origin[key])
                del flat[key]
        if "input_vars" in flat:
            iv = self.obj(trig["input_vars"], origin["input_vars"])
            if iv is not None:
                kw["input_vars"] = dict(trig["input_vars"])
        dedupe = self.integer(flat, "dedupe_window_seconds", p)
        if dedupe is not None:
            kw["dedupe_window_seconds"] = dedupe
        mcr = self.integer(flat, "max_concurrent_runs", p, minimum=1)
        if mcr is not None:
            kw["max_concurrent_runs"] = mcr
        if ttype == "scheduled":
            schedule = flat.get("schedule")
            if schedule is None:
                self.add("error", "missing_schedule", "trigger.type 'scheduled' requires a 'schedule' (cron "
                         "expression)", f"{p}/schedule")
            elif not _valid_cron(schedule):
                self.add("error", "invalid_cron", f"trigger.schedule '{schedule}' is not a valid 5-field cron "
                         "expression", origin["schedule"])
            else:
                kw["schedule"] = schedule
            tz = flat.get("timezone")
            if tz is not None:
                if isinstance(tz, str) and _valid_timezone(tz):
                    kw["timezone"] = tz
                else:
                    self.add("error", "invalid_timezone", f"{origin['timezone']}: unknown time zone '{tz}'",
                             origin["timezone"])
        elif ttype == "webhook":
            secret = flat.get("webhook_secret")
            if secret is None:
                self.add("error", "missing_webhook_secret", "trigger.type 'webhook' requires 'webhook_secret' (name "
                         "of the signing secret)", f"{p}/webhook_secret")
            elif self.expect(secret, (str,), "string", origin["webhook_secret"]):
                kw["webhook_secret"] = secret
            scheme = self.enum(flat, "signature_scheme", p, ("timestamped", "body"))
            if scheme is not None:
                kw["signature_scheme"] = scheme
                if scheme == "body" and not dedupe:
                    self.add("error", "body_signature_requires_dedupe", "trigger.signature_scheme 'body' requires "
                             "dedupe_window_seconds > 0", origin["signature_scheme"])
        elif ttype == "event":
            source = flat.get("event_source")
            if source is None:
                self.add("error", "missing_event_source", "trigger.type 'event' requires 'event_source'",
                         f"{p}/event_source")
            elif not (isinstance(source, str) and source.startswith("nats://lo.ext.")
                      and len(source) > len("nats://lo.ext.")):
                self.add("error", "unsupported_event_source", f"trigger.event_source '{source}' is not supported; "
                         "use nats://lo.ext.<subject>", origin["event_source"])
            else:
                kw["event_source"] = source
            if "event_filter" in flat:
                filt = flat["event_filter"]
                if not isinstance(filt, str):
                    self.add("error", "invalid_type", f"{origin['event_filter']}: expected expression string, got "
                             f"{json_type_name(filt)}", origin["event_filter"])
                else:
                    kw["event_filter"] = self.expression(filt, origin["event_filter"], check_roots=False)
        elif ttype == "file_watch":
            path = flat.get("file_watch_path")
            if path is None:
                self.add("error", "missing_file_watch_path", "trigger.type 'file_watch' requires 'file_watch_path'",
                         f"{p}/file_watch_path")
            elif self.expect(path, (str,), "string", origin["file_watch_path"]):
                kw["file_watch_path"] = path
        return TriggerIR(**kw)

    # -- graph ----------------------------------------------------------------------------------------------
    def graph(self, on_failure: str | None) -> tuple[dict[str, NodeIR], str | None, list[EdgeIR], bool, list[str]]:
        nodes: dict[str, NodeIR] = {}
        edges: list[EdgeIR] = []
        wg = self.required(self.doc, "workflow_graph", "")
        if wg is MISSING:
            return nodes, None, edges, False, []
        graph = self.obj(wg, "/workflow_graph", ("start_node", "nodes"))
        if graph is None:
            return nodes, None, edges, False, []
        start_node = self.node_ref(graph, "start_node", "/workflow_graph", required=True)
        raw_nodes = self.required(graph, "nodes", "/workflow_graph")
        if raw_nodes is MISSING or not self.expect(raw_nodes, (dict,), "object", "/workflow_graph/nodes"):
            return nodes, start_node, edges, False, []
        node_ids = [k for k in raw_nodes if not k.startswith("_")]
        if not node_ids:
            self.add("error", "invalid_value", "/workflow_graph/nodes: '{}' is not valid; expected at least one node",
                     "/workflow_graph/nodes")
        unknown_types = False
        for node_id in node_ids:
            result = self.node(node_id, raw_nodes[node_id])
            self.node_id = self.step_id = None
            if result == "unknown":
                unknown_types = True
            elif isinstance(result, NodeIR):
                nodes[node_id] = result
                edges.extend(_edges_of(result))
        if on_failure is not None and start_node is not None:
            edges.append(EdgeIR(source=start_node, target=on_failure, kind="on_failure",
                                field="/global_config/on_failure"))
        if start_node is not None and start_node not in raw_nodes:
            self.add("error", "unknown_start_node", f"start_node '{start_node}' does not exist in nodes",
                     "/workflow_graph/start_node")
        for e in edges:
            if e.target not in raw_nodes or e.target.startswith("_"):
                self.node_id = e.source if e.kind != "on_failure" else None
                label = _edge_field_name(e)
                who = f"Node '{e.source}'" if e.kind != "on_failure" else "global_config"
                self.add("error", "unknown_target", f"{who}: {label} '{e.target}' not found", e.field)
        self.node_id = None
        return nodes, start_node, edges, unknown_types, node_ids

    def node(self, node_id: str, raw: Any) -> NodeIR | str | None:
        path = pointer("workflow_graph", "nodes", node_id)
        self.node_id, self.step_id = node_id, None
        if not ID_RE.match(node_id):
            self.add("error", "invalid_identifier", f"{path}: '{node_id}' is not a valid node id", path)
        n = self.obj(raw, path)
        if n is None:
            return None
        ntype = self.required(n, "type", path)
        if ntype is MISSING:
            return "unknown"
        if not isinstance(ntype, str) or ntype not in NODE_TYPES:
            self.add("error", "unknown_node_type", f"Node '{node_id}': unknown node type '{ntype}' (expected one of: "
                     f"{', '.join(NODE_TYPES)})", f"{path}/type")
            return "unknown"
        self.unknown_fields(n, NODE_COMMON_FIELDS | TYPE_FIELDS[ntype], path)
        agent = n.get("agent")
        if agent is not None and not self.expect(agent, (str,), "string", f"{path}/agent"):
            agent = None
        orchestrator = is_orchestrator(agent)
        channel = None if orchestrator else str(agent).lower()
        next_node = self.node_ref(n, "next_node", path)
        if next_node is not None and ntype in NO_NEXT_NODE:
            self.add("error", "edge_not_allowed", f"Node '{node_id}' ({ntype}) must not have next_node",
                     f"{path}/next_node")
            next_node = None
        if "workflow_dispatch_mode" in n and "dispatch_mode" not in n:
            self.add("info", "alias_normalised", f"{path}/workflow_dispatch_mode: 'workflow_dispatch_mode' read as "
                     "'dispatch_mode'", f"{path}/workflow_dispatch_mode")
            n["dispatch_mode"] = n.pop("workflow_dispatch_mode")
        dispatch_mode = self.dispatch_mode(n, "dispatch_mode", path)
        handlers: list[ErrorHandlerIR] = []
        if "error_handlers" in n:
            if ntype == "terminate":
                self.add("error", "edge_not_allowed", f"Node '{node_id}' (terminate) must not have error_handlers",
                         f"{path}/error_handlers")
            else:
                handlers = self.error_handlers(n["error_handlers"], f"{path}/error_handlers", orchestrator, channel)
        sla = self.sla(n["sla"], f"{path}/sla", ntype) if "sla" in n else None
        telemetry = self.telemetry(n["telemetry"], f"{path}/telemetry") if "telemetry" in n else None
        idem = self.opt_template(n, "idempotency_key", path)
        ctx = _NodeCtx(node_id, ntype, path, orchestrator, channel, dispatch_mode)
        payload = self.payload(ctx, n)
        if payload is None:
            return None
        description = self.string(n, "description", path)
        return NodeIR(
            id=node_id, type=ntype, description=description, agent=agent, channel=channel,
            orchestrator=orchestrator, next_node=next_node, error_handlers=handlers,
            is_checkpoint=self.boolean(n, "is_checkpoint", path), sla=sla, telemetry=telemetry,
            idempotency_key=idem, dispatch_mode=dispatch_mode, payload=payload,
        )

    def dispatch_mode(self, obj: Mapping[str, Any], key: str, path: str) -> str | None:
        v = obj.get(key)
        return self.enum({key: v.lower() if isinstance(v, str) else v} if key in obj else {}, key, path,
                         ("async", "sync"))

    def payload(self, ctx: _NodeCtx, n: dict[str, Any]) -> Payload | None:
        handler: Callable[[_NodeCtx, dict[str, Any]], Payload | None] = getattr(self, f"node_{ctx.type}")
        return handler(ctx, n)

    # -- sequence and steps ---------------------------------------------------------------------------------
    def node_sequence(self, ctx: _NodeCtx, n: dict[str, Any]) -> SequencePayload | None:
        steps = self.steps(n.get("steps", []), f"{ctx.path}/steps", ctx)
        validations: list[ValidationIR] = []
        raw_validations = n.get("validations", [])
        if self.expect(raw_validations, (list,), "array", f"{ctx.path}/validations"):
            seen: set[str] = set()
            for i, raw in enumerate(raw_validations):
                v = self.validation(raw, f"{ctx.path}/validations/{i}", ctx, seen)
                if v is not None:
                    validations.append(v)
        if steps is None:
            return None
        return SequencePayload(steps=steps, validations=validations)

    def steps(self, raw: Any, path: str, ctx: _NodeCtx, recovery_of: str | None = None) -> list[StepIR] | None:
        if not self.expect(raw, (list,), "array", path):
            return None
        out: list[StepIR] = []
        seen: set[str] = set()
        ok = True
        for i, raw_step in enumerate(raw):
            step = self.step(raw_step, f"{path}/{i}", ctx, seen)
            self.step_id = None
            if step is None:
                ok = False
            else:
                out.append(step)
        return out if ok else None

    def step(self, raw: Any, path: str, ctx: _NodeCtx, seen: set[str]) -> StepIR | None:
        s = self.obj(raw, path)
        if s is None:
            return None
        step_id_raw = self.required(s, "step_id", path)
        step_id = None if step_id_raw is MISSING else self.identifier(step_id_raw, f"{path}/step_id", "step id")
        self.step_id = step_id
        if step_id is not None:
            if step_id in seen:
                self.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate step id '{step_id}'",
                         f"{path}/step_id")
            seen.add(step_id)
        action = self.string(s, "action", path, required=True)
        params = {k: v for k, v in s.items() if k not in STEP_META_FIELDS and k != "params"}
        if "params" in s:
            nested = self.obj(s["params"], f"{path}/params")
            for k, v in (nested or {}).items():
                if k in params:
                    self.add("warning", "param_conflict", f"{self.where()}: parameter '{k}' given twice; the flat "
                             "value wins", f"{path}/params/{pointer(k)[1:]}")
                else:
                    params[k] = v
        timeout = self.integer(s, "timeout_ms", path)
        wait_ms = self.integer(s, "wait_ms", path) or 0
        wait_after = self.integer(s, "wait_after_ms", path) or 0
        retry_enabled = self.boolean(s, "retry_on_failure", path)
        step_keys: dict[str, Any] = {}
        if "retry_config" in s:
            retry_enabled = True
            step_keys = self.retry_keys(s["retry_config"], f"{path}/retry_config")
        output_variable = self.written_field(s, "output_variable", path)
        output_mapping = self.output_mappings(s.get("output_mapping"), f"{path}/output_mapping")
        idem = self.opt_template(s, "idempotency_key", path)
        step_dispatch = self.dispatch_mode(s, "workflow_dispatch_mode", path)
        screenshot_on_complete = self.boolean(s, "screenshot_on_complete", path)
        description = self.string(s, "description", path)
        if action is None or step_id is None:
            return None
        if action == "restore_checkpoint":
            self.add("error", "unsupported_action", f"{self.where()}: action '{action}' is not supported",
                     f"{path}/action")
            return None
        canonical = "format_string" if action == "format_data" else action
        internal = canonical in INTERNAL_OPERATIONS and not (canonical == "screenshot" and not ctx.orchestrator)
        if ctx.orchestrator and not internal:
            self.add("error", "unknown_action", f"{self.where()}: action '{action}' is not an internal operation and "
                     f"node '{ctx.node_id}' has no agent channel", f"{path}/action")
            return None
        secret_refs: list[SecretRefIR] = []
        if internal:
            if canonical != action:
                self.add("info", "alias_normalised", f"{path}/action: '{action}' read as '{canonical}'",
                         f"{path}/action")
            op = self.operation_body(canonical, params, path, secret_refs)
            if op is None:
                return None
            tpl, names, expression = op
            binding = Binding(kind="internal", action=canonical)
        else:
            channel_tpl = self.template(params, path, secrets="allow", secret_refs=secret_refs)
            if channel_tpl is None:
                return None
            tpl = channel_tpl
            names, expression = {}, None
            binding = Binding(kind="channel", channel=ctx.channel, action=action)
        retry = None
        if retry_enabled:
            retry = self.gc.retry_policy.model_copy(update=step_keys) if step_keys else self.gc.retry_policy
        return StepIR(
            step_id=step_id, action=canonical if internal else action, description=description, binding=binding,
            params=tpl, names=names, expression=expression,
            timeout_ms=timeout if timeout is not None else self.gc.default_step_timeout_ms,
            wait_ms=wait_ms, wait_after_ms=wait_after, retry=retry, output_variable=output_variable,
            output_mapping=output_mapping, idempotency_key=idem,
            dispatch_mode=step_dispatch or ctx.dispatch_mode or self.gc.workflow_dispatch_mode,
            screenshot_on_complete=screenshot_on_complete, secrets=secret_refs,
        )

    def operation_body(self, action: str, params: dict[str, Any], path: str,
                       secret_refs: list[SecretRefIR]) -> tuple[TemplateIR, dict[str, str], ExpressionIR | None] | None:
        """Check and normalise an internal operation's inputs (§4.3); returns (params, names, expression)."""
        for old, new in OP_ALIASES.get(action, {}).items():
            if old in params and new not in params:
                params[new] = params.pop(old)
                self.add("info", "alias_normalised", f"{path}/{old}: '{old}' read as '{new}'", f"{path}/{old}")
        required, optional = OP_FIELDS[action]
        self.unknown_fields(params, required | optional | {"output_variable"}, path)
        ok = True
        for key in sorted(required):
            if key not in params:
                self.add("error", "missing_field", f"{path}: required field '{key}' is missing", f"{path}/{key}")
                ok = False
        names: dict[str, str] = {}
        for key in NAME_FIELDS:
            if key in params and key in required:
                value = params.pop(key)
                kp = f"{path}/{key}"
                if action == "set_variable" and isinstance(value, str):
                    root, *rest = value.split(".")
                    if any(not part for part in rest) or not VAR_RE.match(root):
                        self.add("error", "invalid_identifier", f"{kp}: '{value}' is not a valid variable name", kp)
                        ok = False
                    elif self.written(root, kp) is None:
                        ok = False
                    else:
                        names[key] = value
                elif self.written(value, kp) is None:
                    ok = False
                else:
                    names[key] = str(value)
        if "output_variable" in params:
            out_var = self.written(params.pop("output_variable"), f"{path}/output_variable")
            if out_var is not None:
                names["output_variable"] = out_var
        expression = None
        if action == "calculate" and "expression" in params:
            expression = self.expression(params.pop("expression"), f"{path}/expression")
            ok = ok and expression is not None
        for (op, key), values in OP_ENUMS.items():
            if op == action and key in params and not _templated(params[key]) \
                    and self.enum(params, key, path, values) is None:
                ok = False
        ok = self.operation_checks(action, params, path) and ok
        allowed = frozenset({"key"}) if action in SECRET_KEY_OPERATIONS else "deny"
        tpl = self.template(params, path, secrets=allowed, secret_refs=secret_refs)
        if tpl is None or not ok:
            return None
        return tpl, names, expression

    def operation_checks(self, action: str, params: dict[str, Any], path: str) -> bool:
        ok = True
        if action == "log" and "level" in params and not _templated(params["level"]):
            lvl = params["level"]
            if not (isinstance(lvl, str) and lvl.upper() in LOG_LEVELS):
                self.add("error", "invalid_value", f"{path}/level: '{lvl}' is not valid; expected one of DEBUG, INFO, "
                         "WARNING, ERROR", f"{path}/level")
                ok = False
        elif action == "wait" and "duration_ms" in params and not _templated(params["duration_ms"]):
            ok = self.integer(params, "duration_ms", path) is not None
        elif action == "extract_regex":
            pattern = params.get("pattern")
            if isinstance(pattern, str) and not _templated(pattern):
                problem = _regex_problem(pattern)
                if problem:
                    self.add("error", "invalid_regex", f"{path}/pattern: invalid regex: {problem}", f"{path}/pattern")
                    ok = False
            flags = params.get("flags")
            if flags is not None and not _templated(flags) and not (
                isinstance(flags, str) and set(flags) <= set("ims")
            ):
                self.add("error", "invalid_value", f"{path}/flags: '{flags}' is not valid; expected letters i, m, s",
                         f"{path}/flags")
                ok = False
        elif action == "validate_schema" and "schema" in params:
            schema = params["schema"]
            try:
                if not isinstance(schema, dict | bool):
                    raise jsonschema.SchemaError(f"expected object, got {json_type_name(schema)}")
                jsonschema.Draft202012Validator.check_schema(schema)
            except jsonschema.SchemaError as exc:
                self.add("error", "invalid_json_schema", f"{path}/schema: invalid schema: {exc.message}",
                         f"{path}/schema")
                ok = False
        elif action == "get_timestamp":
            tz = params.get("timezone")
            if tz is not None and not _templated(tz) and not (isinstance(tz, str) and _valid_timezone(tz)):
                self.add("error", "invalid_timezone", f"{path}/timezone: unknown time zone '{tz}'", f"{path}/timezone")
                ok = False
        elif action == "parse_excel_data" and "header_row" in params and not _templated(params["header_row"]):
            ok = self.integer(params, "header_row", path, minimum=1) is not None
        for key in ("header", "infer_types", "all"):
            if key in params and not _templated(params[key]) and action in ("parse_csv", "parse_excel_data",
                                                                            "extract_regex"):
                ok = self.expect(params[key], (bool,), "boolean", f"{path}/{key}") and ok
        return ok

    def operations(self, raw: Any, path: str, ctx: _NodeCtx) -> list[OperationIR] | None:
        """A list of internal operations (processing, terminate actions)."""
        if not self.expect(raw, (list,), "array", path):
            return None
        out: list[OperationIR] = []
        ok = True
        for i, raw_op in enumerate(raw):
            op_path = f"{path}/{i}"
            o = self.obj(raw_op, op_path)
            if o is None:
                ok = False
                continue
            action = self.string(o, "action", op_path, required=True)
            if action is None:
                ok = False
                continue
            canonical = "format_string" if action == "format_data" else action
            if action == "restore_checkpoint":
                self.add("error", "unsupported_action", f"Node '{ctx.node_id}': action '{action}' is not supported",
                         f"{op_path}/action")
                ok = False
                continue
            if canonical not in INTERNAL_OPERATIONS:
                self.add("error", "unknown_operation", f"Node '{ctx.node_id}': unknown operation '{action}'",
                         f"{op_path}/action")
                ok = False
                continue
            if canonical != action:
                self.add("info", "alias_normalised", f"{op_path}/action: '{action}' read as '{canonical}'",
                         f"{op_path}/action")
            params = {k: v for k, v in o.items() if k != "action"}
            refs: list[SecretRefIR] = []
            body = self.operation_body(canonical, params, op_path, refs)
            if body is None:
                ok = False
                continue
            tpl, names, expression = body
            out_var = names.pop("output_variable", None)
            out.append(OperationIR(index=i, action=canonical, params=tpl, names=names, expression=expression,
                                   output_variable=out_var, secrets=refs))
        return out if ok else None

    def output_mappings(self, raw: Any, path: str) -> dict[str, OutputMappingIR]:
        if raw is None:
            return {}
        m = self.obj(raw, path)
        out: dict[str, OutputMappingIR] = {}
        for var, mapping in (m or {}).items():
            vp = f"{path}/{pointer(var)[1:]}"
            if self.written(var, vp) is None:
                continue
            parsed = self.output_mapping(mapping, vp)
            if parsed is not None:
                out[var] = parsed
        return out

    def output_mapping(self, mapping: Any, path: str) -> OutputMappingIR | None:
        if not isinstance(mapping, str):
            self.add("error", "invalid_output_mapping", f"{path}: '{mapping}' is not a valid output mapping", path)
            return None
        text = mapping.strip()
        if text in ("text", "raw", "content", "llm_response", "result"):
            if text not in ("text", "result"):
                self.add("info", "alias_normalised", f"{path}: '{text}' read as 'text'", path)
            return OutputMappingIR(kind="text", source=mapping)
        if has_placeholder(mapping):
            tpl = self.template(mapping, path, local_names=frozenset({"result", "text"}))
            return None if tpl is None else OutputMappingIR(kind="template", source=mapping, template=tpl)
        for prefix in ("json_extract:", "json:", "$."):
            if text.startswith(prefix):
                arg = text[len(prefix):].strip()
                if prefix != "json:":
                    self.add("info", "alias_normalised", f"{path}: '{prefix}' read as 'json:'", path)
                if not arg:
                    return OutputMappingIR(kind="json", source=mapping, argument="")
                expr = self.path_expression(arg, path, check_roots=False)
                return None if expr is None else OutputMappingIR(kind="json", source=mapping, argument=arg, path=expr)
        if text.startswith("jmespath:"):
            arg = text[len("jmespath:"):].strip()
            try:
                jmespath.compile(arg)
            except (jmespath.exceptions.JMESPathError, ValueError) as exc:
                self.add("error", "invalid_output_mapping", f"{path}: invalid JMESPath expression: {exc}", path)
                return None
            return OutputMappingIR(kind="jmespath", source=mapping, argument=arg)
        if text.startswith("regex:"):
            arg = mapping.split(":", 1)[1]
            arg = arg[1:] if arg.startswith(" ") else arg
            problem = _regex_problem(arg)
            if problem:
                self.add("error", "invalid_regex", f"{path}: invalid regex: {problem}", path)
                return None
            return OutputMappingIR(kind="regex", source=mapping, argument=arg)
        if text.startswith("xpath:"):
            arg = text[len("xpath:"):].strip()
            try:
                etree.XPath(arg)
            except etree.XPathSyntaxError as exc:
                self.add("error", "invalid_output_mapping", f"{path}: invalid XPath expression: {exc}", path)
                return None
            return OutputMappingIR(kind="xpath", source=mapping, argument=arg)
        self.add("error", "invalid_output_mapping", f"{path}: '{mapping}' is not a valid output mapping", path)
        return None

    def validation(self, raw: Any, path: str, ctx: _NodeCtx, seen: set[str]) -> ValidationIR | None:
        v = self.obj(raw, path, ("id", "check", "condition", "expected_values", "on_failure", "max_node_retries",
                                 "message"))
        if v is None:
            return None
        vid_raw = self.required(v, "id", path)
        vid = None if vid_raw is MISSING else self.identifier(vid_raw, f"{path}/id", "validation id")
        if vid is not None:
            if vid in seen:
                self.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate validation id '{vid}'",
                         f"{path}/id")
            seen.add(vid)
        check = self.enum(v, "check", path, ("custom", "value_in_range", "screen_text_contains", "element_exists"))
        if check is None and "check" in v:
            return None
        check = check or "custom"
        condition = None
        expected: list[str] = []
        binding = None
        if check in ("custom", "value_in_range"):
            cond = self.required(v, "condition", path)
            if cond is not MISSING:
                condition = self.expression(cond, f"{path}/condition")
        else:
            values = self.required(v, "expected_values", path)
            if values is not MISSING and self.expect(values, (list,), "array", f"{path}/expected_values"):
                if not values:
                    self.add("error", "invalid_value", f"{path}/expected_values: '[]' is not valid; expected at least "
                             "one value", f"{path}/expected_values")
                for i, item in enumerate(values):
                    if self.expect(item, (str,), "string", f"{path}/expected_values/{i}"):
                        expected.append(item)
            if ctx.orchestrator:
                self.add("error", "channel_required", f"Node '{ctx.node_id}': validation '{vid}' ({check}) needs an "
                         "agent channel", f"{path}/check")
                return None
            action = "wait_for_text" if check == "screen_text_contains" else "wait_for_element"
            binding = Binding(kind="channel", channel=ctx.channel, action=action)
        on_failure = self.enum(v, "on_failure", path, ("throw_exception", "fail_workflow", "retry_node"))
        retries = self.integer(v, "max_node_retries", path)
        message = self.opt_template(v, "message", path)
        if vid is None or (check in ("custom", "value_in_range") and condition is None):
            return None
        return ValidationIR(id=vid, check=check, condition=condition, expected_values=expected,
                            on_failure=on_failure or "throw_exception",
                            max_node_retries=1 if retries is None else retries, message=message, binding=binding)

    # -- error handlers, SLA, telemetry ---------------------------------------------------------------------
    def error_handlers(self, raw: Any, path: str, orchestrator: bool, channel: str | None) -> list[ErrorHandlerIR]:
        if not self.expect(raw, (list,), "array", path):
            return []
        out: list[ErrorHandlerIR] = []
        catch_all_at: int | None = None
        for i, raw_h in enumerate(raw):
            hp = f"{path}/{i}"
            h = self.obj(raw_h, hp, HANDLER_FIELDS)
            if h is None:
                continue
            error_type = self.string(h, "error_type", hp) or ""
            trigger = None
            if "trigger" in h:
                trigger = self.handler_trigger(h["trigger"], f"{hp}/trigger")
            action = self.enum(h, "action", hp, HANDLER_ACTIONS)
            if "action" not in h and "recovery_strategy" in h:
                strategy = self.enum(h, "recovery_strategy", hp, tuple(RECOVERY_STRATEGY))
                if strategy is not None:
                    action = RECOVERY_STRATEGY[strategy]
                    self.add("info", "alias_normalised", f"{hp}/recovery_strategy: '{strategy}' read as action "
                             f"'{action}'", f"{hp}/recovery_strategy")
            action = action or "fail"
            max_retries = self.integer(h, "max_retries", hp)
            if max_retries == 0 and action in ("retry", "retry_node"):
                self.add("warning", "retry_without_retries", f"Node '{self.node_id}': handler {i} retries 0 times", hp)
            delay = self.integer(h, "delay_ms", hp)
            policy = None
            if "retry_policy" in h:
                keys = self.retry_keys(h["retry_policy"], f"{hp}/retry_policy")
                policy = RetryPolicyIR(**keys)
            ctx = _NodeCtx(self.node_id or "", "sequence", hp, orchestrator, channel, None)
            recovery = self.steps(h.get("recovery_steps", []), f"{hp}/recovery_steps", ctx) or []
            fallback = self.node_ref(h, "fallback_node", hp)
            metadata = self.obj(h["error_metadata"], f"{hp}/error_metadata") if "error_metadata" in h else None
            handler = ErrorHandlerIR(
                index=i, error_type=error_type, trigger=trigger, action=action,
                max_retries=3 if max_retries is None else max_retries, delay_ms=1000 if delay is None else delay,
                retry_policy=policy, recovery_steps=recovery, fallback_node=fallback,
                notify_on_error=self.boolean(h, "notify_on_error", hp), error_metadata=metadata,
            )
            if catch_all_at is not None:
                self.add("warning", "shadowed_error_handler", f"Node '{self.node_id}': error handler {i} can never "
                         "match", hp, hint=f"handler {catch_all_at} matches every error")
            elif handler.catch_all:
                catch_all_at = i
            out.append(handler)
        return out

    def handler_trigger(self, raw: Any, path: str) -> HandlerTriggerIR | None:
        t = self.obj(raw, path, ("error_text_contains", "error_code", "http_status_codes"))
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
                    self.add("error", "invalid_type", f"{path}/{key}: expected string or array of strings, got "
                             f"{json_type_name(v)}", f"{path}/{key}")
        if "http_status_codes" in t:
            codes = t["http_status_codes"]
            if isinstance(codes, list) and all(isinstance(c, int) and not isinstance(c, bool) for c in codes):
                kw["http_status_codes"] = codes
            else:
                self.add("error", "invalid_type", f"{path}/http_status_codes: expected array of integers, got "
                         f"{json_type_name(codes)}", f"{path}/http_status_codes")
        return HandlerTriggerIR(**kw) if kw else None

    def sla(self, raw: Any, path: str, ntype: str) -> SlaIR | None:
        s = self.obj(raw, path, ("max_duration_ms", "on_breach", "escalation_handler", "enforce"))
        if s is None:
            return None
        limit = self.integer(s, "max_duration_ms", path, required=True)
        on_breach = self.enum(s, "on_breach", path, ("warn", "fail", "escalate")) or "warn"
        handler = self.node_ref(s, "escalation_handler", path)
        enforce = self.boolean(s, "enforce", path)
        if handler is not None and ntype == "terminate":
            self.add("error", "edge_not_allowed", f"Node '{self.node_id}' (terminate) must not have "
                     "sla.escalation_handler", f"{path}/escalation_handler")
            handler = None
        if on_breach == "escalate" and handler is None and ntype != "terminate":
            self.add("error", "sla_escalate_without_handler", f"Node '{self.node_id}': sla.on_breach 'escalate' "
                     "requires escalation_handler", f"{path}/on_breach")
        if enforce and on_breach == "warn":
            self.add("warning", "sla_enforce_with_warn", f"Node '{self.node_id}': an enforced SLA with on_breach "
                     "'warn' cancels the node without failing it", f"{path}/enforce")
        if limit is None:
            return None
        return SlaIR(max_duration_ms=limit, on_breach=on_breach, escalation_handler=handler,
                     enforce=enforce)

    def telemetry(self, raw: Any, path: str) -> TelemetryIR | None:
        t = self.obj(raw, path, ("track_duration", "track_retries", "custom_metrics", "trace_id", "span_id"))
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
            entries = [(k, v, f"{mp}/{pointer(k)[1:]}") for k, v in _strip(cm).items()]
        elif cm is not None:
            self.add("error", "invalid_type", f"{mp}: expected array or object, got {json_type_name(cm)}", mp)
        for name, value, ep in entries:
            if not (isinstance(name, str) and METRIC_RE.match(name)):
                self.add("warning", "invalid_custom_metric", f"Node '{self.node_id}': custom metric '{name}' is not a "
                         "valid metric name (^[a-z][a-z0-9_]{0,62}$)", ep)
                continue
            if not isinstance(value, int | float) or isinstance(value, bool):
                self.add("warning", "invalid_custom_metric", f"Node '{self.node_id}': custom metric '{name}' has a "
                         f"non-numeric value ({json_type_name(value)}); it counts 1", ep)
                value = 1
            try:
                amount = float(value)
            except OverflowError:  # an integer beyond a double's range
                self.add("warning", "invalid_custom_metric", f"Node '{self.node_id}': custom metric '{name}' has a "
                         "value too large for a number (beyond ±1.8e308); it counts 1", ep)
                amount = 1.0
            metrics.append(CustomMetricIR(name=name, value=amount))
        return TelemetryIR(track_duration=self.boolean(t, "track_duration", path, True),
                           track_retries=self.boolean(t, "track_retries", path, True), custom_metrics=metrics,
                           trace_id=self.string(t, "trace_id", path), span_id=self.string(t, "span_id", path))

    # -- other node types -----------------------------------------------------------------------------------
    def node_logic(self, ctx: _NodeCtx, n: dict[str, Any]) -> LogicPayload | None:
        rules_raw = n.get("rules", [])
        default = self.node_ref(n, "default_next_node", ctx.path)
        if not self.expect(rules_raw, (list,), "array", f"{ctx.path}/rules"):
            return None
        rules: list[RuleIR] = []
        for i, rule in enumerate(rules_raw):
            rp = f"{ctx.path}/rules/{i}"
            r = self.obj(rule, rp, ("condition", "next_node"))
            if r is None:
                continue
            cond = self.required(r, "condition", rp)
            target = self.node_ref(r, "next_node", rp, required=True)
            condition = None if cond is MISSING else self.expression(cond, f"{rp}/condition")
            if condition is not None and target is not None:
                rules.append(RuleIR(condition=condition, next_node=target))
        if not rules_raw and default is None:
            self.add("error", "empty_logic", f"Node '{ctx.node_id}': logic needs at least one rule or a "
                     "default_next_node", ctx.path)
        elif default is None:
            self.add("warning", "logic_without_default", f"Node '{ctx.node_id}': no default_next_node; an unmatched "
                     "run fails with logic_no_route", ctx.path)
        return LogicPayload(rules=rules, default_next_node=default)

    def node_loop(self, ctx: _NodeCtx, n: dict[str, Any]) -> LoopPayload | None:
        p = ctx.path
        it = self.required(n, "iterator", p)
        iterator = None if it is MISSING else self.expression(it, f"{p}/iterator")
        var = self.written_field(n, "iterator_variable", p, required=True)
        index = self.written_field(n, "index_variable", p)
        body = self.node_ref(n, "body_node", p, required=True)
        collect = self.written_field(n, "collect_variable", p)
        collect_expr = self.opt_template(n, "collect_expression", p)
        errors_var = self.written_field(n, "errors_variable", p)
        max_iter = self.integer(n, "max_iterations", p)
        if iterator is None or var is None or body is None:
            return None
        return LoopPayload(iterator=iterator, iterator_variable=var, index_variable=index, body_node=body,
                           collect_variable=collect, collect_expression=collect_expr, errors_variable=errors_var,
                           max_iterations=max_iter, continue_on_error=self.boolean(n, "continue_on_error", p))

    def node_parallel(self, ctx: _NodeCtx, n: dict[str, Any]) -> ParallelPayload | None:
        p = ctx.path
        raw = n.get("branches", [])
        branches: list[BranchIR] = []
        if self.expect(raw, (list,), "array", f"{p}/branches"):
            if not raw:
                self.add("error", "empty_parallel", f"Node '{ctx.node_id}': parallel needs at least one branch",
                         f"{p}/branches")
            seen: set[str] = set()
            for i, b in enumerate(raw):
                bp = f"{p}/branches/{i}"
                br = self.obj(b, bp, ("branch_id", "start_node"))
                if br is None:
                    continue
                bid_raw = self.required(br, "branch_id", bp)
                bid = None if bid_raw is MISSING else self.identifier(bid_raw, f"{bp}/branch_id", "branch id")
                start = self.node_ref(br, "start_node", bp, required=True)
                if bid is not None and bid in seen:
                    self.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate branch id '{bid}'",
                             f"{bp}/branch_id")
                if bid is not None:
                    seen.add(bid)
                if bid is not None and start is not None:
                    branches.append(BranchIR(branch_id=bid, start_node=start))
        wait = self.enum(n, "wait_strategy", p, ("all", "any"), aliases={"first": "any"})
        failure = n.get("branch_failure")
        if failure == "retry":
            self.add("error", "invalid_value", f"{p}/branch_failure: 'retry' is not valid; expected one of continue, "
                     "fail", f"{p}/branch_failure")
            bf = None
        else:
            bf = self.enum(n, "branch_failure", p, ("continue", "fail"), aliases={"stop": "fail"})
        conc = self.integer(n, "max_concurrency", p, minimum=1)
        self.produced.add("parallel_results")
        if not branches:
            return None
        return ParallelPayload(branches=branches, wait_strategy=wait or "all",
                               branch_failure=bf or "continue", max_concurrency=conc)

    def node_subflow(self, ctx: _NodeCtx, n: dict[str, Any]) -> SubflowPayload | None:
        p = ctx.path
        pid = self.string(n, "procedure_id", p, required=True)
        if pid is not None and not PROCEDURE_ID_RE.match(pid):
            self.add("error", "invalid_identifier", f"{p}/procedure_id: '{pid}' is not a valid procedure id",
                     f"{p}/procedure_id")
            pid = None
        version = self.string(n, "version", p)
        if version == "latest":
            version = None
        mapping: dict[str, Any] = {}
        if "input_mapping" in n:
            mapping = self.obj(n["input_mapping"], f"{p}/input_mapping") or {}
            mapping = dict(n["input_mapping"]) if mapping else {}
        outputs: dict[str, ExpressionIR] = {}
        if "output_mapping" in n:
            om = self.obj(n["output_mapping"], f"{p}/output_mapping") or {}
            for var, child_path in om.items():
                vp = f"{p}/output_mapping/{pointer(var)[1:]}"
                if self.written(var, vp) is None:
                    continue
                expr = self.path_expression(child_path, vp, check_roots=False)
                if expr is not None:
                    outputs[var] = expr
        else:
            self.produced.add("subflow_output")
        if not outputs:
            self.produced.add("subflow_output")
        on_failure = self.enum(n, "on_failure", p, ("fail_parent", "continue", "retry")) or "fail_parent"
        retries = self.integer(n, "max_retries", p)
        if pid is None:
            return None
        self.pending_subflows.append((ctx.node_id, mapping, f"{p}/input_mapping"))
        return SubflowPayload(procedure_id=pid, version=version, input_mapping=TemplateIR(source={}),
                              output_mapping=outputs, inherit_context=self.boolean(n, "inherit_context", p),
                              on_failure=on_failure, max_retries=1 if retries is None else retries)

    def node_processing(self, ctx: _NodeCtx, n: dict[str, Any]) -> ProcessingPayload | None:
        ops = self.operations(n.get("operations", []), f"{ctx.path}/operations", ctx)
        return None if ops is None else ProcessingPayload(operations=ops)

    def node_verification(self, ctx: _NodeCtx, n: dict[str, Any]) -> VerificationPayload | None:
        p = ctx.path
        raw = self.required(n, "checks", p)
        if raw is MISSING or not self.expect(raw, (list,), "array", f"{p}/checks"):
            return None
        if not raw:
            self.add("error", "invalid_value", f"{p}/checks: '[]' is not valid; expected at least one check",
                     f"{p}/checks")
            return None
        checks: list[CheckIR] = []
        seen: set[str] = set()
        for i, c in enumerate(raw):
            cp = f"{p}/checks/{i}"
            ch = self.obj(c, cp, ("id", "condition", "on_fail", "message"))
            if ch is None:
                continue
            cid_raw = self.required(ch, "id", cp)
            cid = None if cid_raw is MISSING else self.identifier(cid_raw, f"{cp}/id", "check id")
            if cid is not None:
                if cid in seen:
                    self.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate check id '{cid}'", f"{cp}/id")
                seen.add(cid)
            cond = self.required(ch, "condition", cp)
            condition = None if cond is MISSING else self.expression(cond, f"{cp}/condition")
            on_fail = self.enum(ch, "on_fail", cp, ("fail_workflow", "warn", "continue")) or "fail_workflow"
            message = self.string(ch, "message", cp)
            if cid is not None and condition is not None:
                checks.append(CheckIR(id=cid, condition=condition, on_fail=on_fail, message=message))
        return VerificationPayload(checks=checks) if checks else None

    def node_llm_action(self, ctx: _NodeCtx, n: dict[str, Any]) -> LlmActionPayload | None:
        p = ctx.path
        prompt_raw = self.required(n, "prompt", p)
        prompt = None if prompt_raw is MISSING else self.template(prompt_raw, f"{p}/prompt")
        system = self.opt_template(n, "system_prompt", p)
        attachments: list[AttachmentIR] = []
        raw_att = n.get("attachments", [])
        if self.expect(raw_att, (list,), "array", f"{p}/attachments"):
            for i, a in enumerate(raw_att):
                ap = f"{p}/attachments/{i}"
                at = self.obj(a, ap, ("type", "source", "description", "mime_type"))
                if at is None:
                    continue
                atype = self.enum(at, "type", ap, ("text", "json", "csv", "markdown", "image"))
                if "type" not in at:
                    self.required(at, "type", ap)
                src_raw = self.required(at, "source", ap)
                src = None if src_raw is MISSING else self.template(src_raw, f"{ap}/source")
                if atype is not None and src is not None:
                    attachments.append(AttachmentIR(type=atype, source=src,
                                                    description=self.string(at, "description", ap),
                                                    mime_type=self.string(at, "mime_type", ap)))
        retry = RetryPolicyIR(**self.retry_keys(n["retry"], f"{p}/retry")) if "retry" in n else None
        outputs = self.output_mappings(n.get("outputs"), f"{p}/outputs")
        if not outputs:
            self.produced.add("llm_output")
        orchestration = self.boolean(n, "orchestration_mode", p)
        branches: list[str] = []
        raw_br = n.get("branches", [])
        if self.expect(raw_br, (list,), "array", f"{p}/branches"):
            for i, b in enumerate(raw_br):
                if self.expect(b, (str,), "node id (string)", f"{p}/branches/{i}"):
                    branches.append(b)
        if orchestration and not branches:
            self.add("error", "orchestration_without_branches", f"Node '{ctx.node_id}': orchestration_mode needs "
                     "branches", f"{p}/branches" if "branches" in n else f"{p}/orchestration_mode")
        temperature = self.number(n, "temperature", p, minimum=0)
        max_tokens = self.integer(n, "max_tokens", p, minimum=1)
        if prompt is None:
            return None
        return LlmActionPayload(
            prompt=prompt, system_prompt=system, model=self.string(n, "model", p), temperature=temperature,
            max_tokens=max_tokens, json_mode=self.boolean(n, "json_mode", p), attachments=attachments, retry=retry,
            timeout_ms=self.integer(n, "timeout_ms", p),
            max_cost_per_llm_call_usd=self.number(n, "max_cost_per_llm_call_usd", p, minimum=0, exclusive=True),
            min_llm_quality=self.number(n, "min_llm_quality", p), outputs=outputs,
            orchestration_mode=orchestration, branches=branches,
        )

    def node_human_approval(self, ctx: _NodeCtx, n: dict[str, Any]) -> HumanApprovalPayload | None:
        p = ctx.path
        prompt = self.template(n.get("prompt", ""), f"{p}/prompt")
        decision_type = self.enum(n, "decision_type", p, ("approve_reject", "select_option", "provide_input"))
        if decision_type is None and "decision_type" in n:
            return None
        decision_type = decision_type or "approve_reject"
        options: list[str] = []
        if "options" in n and self.expect(n["options"], (list,), "array", f"{p}/options"):
            for i, o in enumerate(n["options"]):
                if self.expect(o, (str,), "string", f"{p}/options/{i}"):
                    if o in options:
                        self.add("error", "duplicate_id", f"Node '{ctx.node_id}': duplicate option id '{o}'",
                                 f"{p}/options/{i}")
                    options.append(o)
        routes: dict[str, str] = {}
        if "option_routes" in n:
            for opt, target in (self.obj(n["option_routes"], f"{p}/option_routes") or {}).items():
                op_ = f"{p}/option_routes/{pointer(opt)[1:]}"
                if not self.expect(target, (str,), "node id (string)", op_):
                    continue
                if opt not in options:
                    self.add("error", "invalid_option_route", f"Node '{ctx.node_id}': option_routes key '{opt}' is not "
                             "an option", op_)
                    continue
                routes[opt] = target
        on_approve = self.node_ref(n, "on_approve", p)
        on_reject = self.node_ref(n, "on_reject", p)
        on_timeout = self.node_ref(n, "on_timeout", p)
        if decision_type == "select_option":
            if not options:
                self.add("error", "missing_field" if "options" not in n else "invalid_value",
                         f"{p}: select_option requires a non-empty 'options' list", f"{p}/options")
            if on_approve is None and not all(o in routes for o in options):
                self.add("error", "approval_missing_route", f"Node '{ctx.node_id}': select_option requires on_approve "
                         "(or option_routes for every option)", f"{p}/on_approve")
        else:
            for fld, value in (("on_approve", on_approve), ("on_reject", on_reject)):
                if value is None:
                    self.add("error", "approval_missing_route", f"Node '{ctx.node_id}': {decision_type} requires "
                             f"{fld}", f"{p}/{fld}")
        input_schema: dict[str, Any] = {}
        if "input_schema" in n:
            raw_schema = n["input_schema"]
            if not isinstance(raw_schema, dict):
                self.add("error", "invalid_json_schema", f"{p}/input_schema: invalid schema: expected a flat "
                         f"variables_schema object, got {json_type_name(raw_schema)}", f"{p}/input_schema")
            else:
                entries = [(k, v, f"{p}/input_schema/{pointer(k)[1:]}", None) for k, v in raw_schema.items()]
                input_schema = self.variable_entries(entries)
        input_variable = self.written_field(n, "input_variable", p)
        decision_variable = self.written_field(n, "decision_variable", p)
        context = self.opt_template(n, "context_data", p)
        timeout = self.integer(n, "timeout_ms", p)
        timeout_action = self.enum(n, "timeout_action", p, ("auto_approve", "auto_reject", "escalate"))
        if timeout_action is not None and timeout is None:
            self.add("warning", "timeout_action_without_timeout", f"Node '{ctx.node_id}': timeout_action has no "
                     "effect without timeout_ms", f"{p}/timeout_action")
        if timeout is not None:
            route_field = {"auto_approve": "on_approve", "auto_reject": "on_reject",
                           "escalate": "on_timeout"}.get(timeout_action or "", "on_timeout")
            target = {"on_approve": on_approve, "on_reject": on_reject, "on_timeout": on_timeout}[route_field]
            if timeout_action is None and target is None:
                route_field, target = "on_reject", on_reject
            if target is None:
                self.add("error", "approval_timeout_unrouted", f"Node '{ctx.node_id}': a timeout would route to "
                         f"{route_field}, which is not set", f"{p}/timeout_ms")
        level = self.enum(n, "approval_level", p, ("standard", "manager", "executive"))
        if prompt is None:
            return None
        return HumanApprovalPayload(
            prompt=prompt, decision_type=decision_type, options=options, option_routes=routes,
            input_schema=input_schema, input_variable=input_variable, decision_variable=decision_variable,
            context_data=context, timeout_ms=timeout, timeout_action=timeout_action,
            escalation_contact=self.string(n, "escalation_contact", p), approval_level=level,
            on_approve=on_approve, on_reject=on_reject, on_timeout=on_timeout,
        )

    def node_transform(self, ctx: _NodeCtx, n: dict[str, Any]) -> TransformPayload | None:
        p = ctx.path
        raw = n.get("transformations", [])
        if not self.expect(raw, (list,), "array", f"{p}/transformations"):
            return None
        out: list[TransformationIR] = []
        ok = True
        for i, t in enumerate(raw):
            tp = f"{p}/transformations/{i}"
            tr = self.obj(t, tp, ("type", "source_variable", "expression", "output_variable", "params"))
            if tr is None:
                ok = False
                continue
            ttype = self.string(tr, "type", tp, required=True)
            if ttype == "unique":
                self.add("info", "alias_normalised", f"{tp}/type: 'unique' read as 'deduplicate'", f"{tp}/type")
                ttype = "deduplicate"
            if ttype is not None and ttype not in TRANSFORM_TYPES:
                self.add("error", "unknown_transform_type", f"Node '{ctx.node_id}': unknown transform type '{ttype}'",
                         f"{tp}/type")
                ttype = None
            out_var = self.written_field(tr, "output_variable", tp, required=True)
            source = self.path_expression(tr["source_variable"], f"{tp}/source_variable") \
                if "source_variable" in tr else None
            params_raw = tr.get("params", {})
            params = self.obj(params_raw, f"{tp}/params")
            params_tpl = self.template(params_raw, f"{tp}/params") if params is not None else None
            expression = None
            aggregates: list[AggregateIR] = []
            expr_src = tr.get("expression")
            if ttype in ("filter", "map", "reduce") and expr_src is None:
                self.required(tr, "expression", tp)
                ok = False
            if ttype == "aggregate":
                if expr_src is None:
                    self.required(tr, "expression", tp)
                    ok = False
                else:
                    aggregates = self.aggregates(expr_src, f"{tp}/expression")
                    ok = ok and bool(aggregates)
            elif expr_src is not None:
                expression = self.expression(expr_src, f"{tp}/expression", check_roots=False)
                ok = ok and expression is not None
            if ttype == "sort" and expr_src is None and not (params and "key" in params):
                self.add("error", "missing_field", f"{tp}: sort needs params.key or an expression",
                         f"{tp}/params/key")
                ok = False
            if ttype == "pivot":
                for key in ("index", "columns", "values"):
                    if not (params and key in params):
                        self.add("error", "missing_field", f"{tp}/params: required field '{key}' is missing",
                                 f"{tp}/params/{key}")
                        ok = False
                if params and "aggregate" in params and not _templated(params["aggregate"]):
                    ok = self.enum(params, "aggregate", f"{tp}/params", PIVOT_AGGREGATES) is not None and ok
            if ttype is None or out_var is None or params_tpl is None:
                ok = False
                continue
            out.append(TransformationIR(index=i, type=ttype, source_variable=source,
                                        expression=expression, aggregates=aggregates, output_variable=out_var,
                                        params=params_tpl))
        return TransformPayload(transformations=out) if ok else None

    def aggregates(self, source: Any, path: str) -> list[AggregateIR]:
        if not self.expect(source, (str,), "string", path):
            return []
        out: list[AggregateIR] = []
        for i, part in enumerate(source.split(",")):
            m = AGGREGATE_RE.match(part)
            if m is None or (m.group(1).lower() != "count" and m.group(2) is None):
                self.add("error", "expression_syntax_error", f"{path}: '{part.strip()}' is not an aggregate (count, "
                         f"count(f), sum(f), avg(f), min(f), max(f), optionally 'as <name>') at 1:{i + 1}", path)
                return []
            fn, fld, alias = m.group(1).lower(), m.group(2), m.group(3)
            name = alias or (fn if fld is None else f"{fn}_{fld.replace('.', '_')}")
            out.append(AggregateIR(function=fn, field=fld, name=name))
        return out

    def node_terminate(self, ctx: _NodeCtx, n: dict[str, Any]) -> TerminatePayload | None:
        p = ctx.path
        status = self.enum(n, "status", p, ("success", "failed"), aliases={"failure": "failed"})
        if status is None and "status" in n:
            return None
        outputs_raw = n.get("outputs", {})
        outputs = self.template(outputs_raw, f"{p}/outputs") \
            if self.expect(outputs_raw, (dict,), "object", f"{p}/outputs") else None
        cleanup = self.operations(n.get("cleanup_actions", []), f"{p}/cleanup_actions", ctx)
        error_actions = self.operations(n.get("error_actions", []), f"{p}/error_actions", ctx)
        audit = self.opt_template(n, "final_audit_log", p)
        if outputs is None or cleanup is None or error_actions is None or ("final_audit_log" in n and audit is None):
            return None
        return TerminatePayload(status=status or "success", outputs=outputs,
                                cleanup_actions=cleanup, error_actions=error_actions, final_audit_log=audit)

    # -- whole-document checks ------------------------------------------------------------------------------
    def finish_subflows(self, nodes: dict[str, NodeIR], variables: Mapping[str, VariableSpec],
                        trigger: TriggerIR | None) -> None:
        """Subflow input mappings need the complete set of parent variables (bare references, §3.9)."""
        known = set(variables) | self.produced | set(trigger.input_vars if trigger else ())
        for node_id, mapping, path in self.pending_subflows:
            self.node_id = node_id
            paths: dict[str, ExpressionIR] = {}
            rest: dict[str, Any] = {}
            for key, value in mapping.items():
                kp = f"{path}/{pointer(key)[1:]}"
                if isinstance(value, str) and BARE_PATH_RE.match(value.strip()) \
                        and value.strip().split(".")[0].split("[")[0] in known:
                    self.add("info", "bare_reference", f"{kp}: '{value}' is read as a variable; write "
                             f"'{{{{{value.strip()}}}}}'", kp)
                    expr = self.expression(value.strip(), kp)
                    if expr is not None:
                        paths[key] = expr
                else:
                    rest[key] = value
            tpl = self.template(rest, path)
            node = nodes.get(node_id)
            if node is not None and isinstance(node.payload, SubflowPayload) and tpl is not None:
                payload = node.payload.model_copy(update={"input_mapping": tpl, "input_paths": paths})
                nodes[node_id] = node.model_copy(update={"payload": payload})
            elif node is not None:
                del nodes[node_id]
        self.node_id = None

    def subflow_checks(self, procedure_id: str | None, refs: list[SubflowRefIR]) -> None:
        for ref in refs:
            self.node_id = ref.node_id
            path = pointer("workflow_graph", "nodes", ref.node_id, "procedure_id")
            if ref.procedure_id == procedure_id:
                self.add("error", "subflow_recursion", f"Node '{ref.node_id}': subflow '{ref.procedure_id}' calls "
                         f"itself ({procedure_id} -> {ref.procedure_id})", path)
                continue
            if self.lookup is None:
                continue
            child = self.lookup(ref.procedure_id, ref.version)
            if child is None:
                self.add("warning", "subflow_not_found", f"Node '{ref.node_id}': subflow "
                         f"'{ref.procedure_id}@{ref.version or 'latest'}' is not imported yet", path)
                continue
            chain = self.find_cycle(procedure_id, [procedure_id or "", ref.procedure_id], child, set())
            if chain is not None:
                self.add("error", "subflow_recursion", f"Node '{ref.node_id}': subflow '{ref.procedure_id}' calls "
                         f"itself ({' -> '.join(chain)})", path)
        self.node_id = None

    def find_cycle(self, root: str | None, chain: list[str], refs: list[SubflowRefIR],
                   seen: set[tuple[str, str | None]]) -> list[str] | None:
        assert self.lookup is not None
        for ref in refs:
            if ref.procedure_id == root:
                return [*chain, ref.procedure_id]
            key = (ref.procedure_id, ref.version)
            if key in seen or len(chain) > 32:
                continue
            seen.add(key)
            child = self.lookup(ref.procedure_id, ref.version)
            if child:
                found = self.find_cycle(root, [*chain, ref.procedure_id], child, seen)
                if found:
                    return found
        return None

    def reachability(self, start: str, node_ids: list[str], edges: list[EdgeIR], nodes: dict[str, NodeIR]) -> None:
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
                self.node_id = node_id
                self.add("warning", "unreachable_node", f"Node '{node_id}' is unreachable from start_node '{start}'",
                         pointer("workflow_graph", "nodes", node_id))
        self.node_id = None
        # Dead ends: reachable nodes from which the normal flow can never end the path (a cycle with no exit).
        if len(nodes) != len(node_ids):
            return
        flow_kinds = {"next", "condition", "default", "approve", "reject", "timeout", "option"}
        reverse: dict[str, list[str]] = {}
        for e in edges:
            if e.kind in flow_kinds:
                reverse.setdefault(e.target, []).append(e.source)
        can_end = {nid for nid, node in nodes.items() if _ends_path(node)}
        queue = deque(can_end)
        while queue:
            for prev in reverse.get(queue.popleft(), []):
                if prev not in can_end:
                    can_end.add(prev)
                    queue.append(prev)
        for node_id in node_ids:
            if node_id in seen and node_id not in can_end:
                self.node_id = node_id
                self.add("warning", "dead_end", f"Node '{node_id}': no route from here ever ends the path; it can only "
                         "stop at max_hops or through an error", pointer("workflow_graph", "nodes", node_id))
        self.node_id = None

    def undeclared(self, variables: Mapping[str, VariableSpec], trigger: TriggerIR | None) -> None:
        known = set(variables) | self.produced | BUILTIN_NAMES | set(trigger.input_vars if trigger else ())
        reported: set[tuple[str, str]] = set()
        for read in self.reads:
            if read.root not in known and (read.root, read.path) not in reported:
                reported.add((read.root, read.path))
                self.node_id, self.step_id = read.node_id, read.step_id
                self.add("warning", "undeclared_variable", f"{read.path}: '{read.root}' is not declared and no step "
                         "produces it; it renders as null", read.path)
        self.node_id = self.step_id = None

    def check_secret_aliases(self) -> None:
        reported: set[tuple[str, str]] = set()
        for alias, path, node_id, step_id in self.secret_uses:
            if alias not in self.secret_aliases and (alias, path) not in reported:
                reported.add((alias, path))
                self.node_id, self.step_id = node_id, step_id
                self.add("warning", "undeclared_secret_alias", f"{path}: secret alias '{alias}' is not declared; it is "
                         "resolved by name", path)
        self.node_id = self.step_id = None


@dataclass(frozen=True)
class _NodeCtx:
    node_id: str
    type: str
    path: str
    orchestrator: bool
    channel: str | None
    dispatch_mode: str | None


def _ends_path(node: NodeIR) -> bool:
    """Whether the node's normal completion can end its path (terminate, or no successor)."""
    p = node.payload
    if isinstance(p, TerminatePayload):
        return True
    if isinstance(p, LogicPayload):
        return False
    if isinstance(p, HumanApprovalPayload):
        return False
    if isinstance(p, LlmActionPayload) and p.orchestration_mode:
        return node.next_node is None and not p.branches
    return node.next_node is None


def _expression_code(exc: ExpressionSyntaxError) -> str:
    return {
        "UnknownFunctionError": "unknown_function",
        "FunctionArityError": "function_arity",
        "InvalidRegexError": "invalid_regex",
    }.get(type(exc).__name__, "expression_syntax_error")


def _regex_problem(pattern: str) -> str | None:
    if len(pattern.encode()) > 1024:
        return "pattern longer than 1 KiB"
    try:
        re2.compile(pattern)
    except re2.error as exc:
        return str(exc) or "does not compile"
    return None


def _valid_timezone(name: str) -> bool:
    if not name or name.startswith("/") or ".." in name:
        return False
    try:
        ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        return False
    return True


_CRON_NAMES = re.compile(r"^[A-Za-z0-9*/,\-?LW#]+$")


def _valid_cron(expr: Any) -> bool:
    if not isinstance(expr, str):
        return False
    parts = expr.split()
    if len(parts) != 5 or not all(_CRON_NAMES.match(p) for p in parts):
        return False
    try:
        return bool(croniter.is_valid(expr))
    except Exception:  # croniter raises assorted errors for malformed input
        return False


def _tags(meta: Mapping[str, Any] | None) -> list[str]:
    tags = meta.get("tags") if meta else None
    return [t for t in tags if isinstance(t, str)] if isinstance(tags, list) else []


def _edges_of(node: NodeIR) -> list[EdgeIR]:
    base = pointer("workflow_graph", "nodes", node.id)
    out: list[EdgeIR] = []

    def edge(target: str | None, kind: str, fld: str, label: str | None = None) -> None:
        if target is not None:
            out.append(EdgeIR(source=node.id, target=target, kind=kind, label=label, field=f"{base}/{fld}"))

    p = node.payload
    if isinstance(p, LogicPayload):
        for i, rule in enumerate(p.rules):
            edge(rule.next_node, "condition", f"rules/{i}/next_node", rule.condition.source)
        edge(p.default_next_node, "default", "default_next_node")
    elif isinstance(p, LoopPayload):
        edge(p.body_node, "loop_body", "body_node")
    elif isinstance(p, ParallelPayload):
        for i, br in enumerate(p.branches):
            edge(br.start_node, "branch", f"branches/{i}/start_node", br.branch_id)
    elif isinstance(p, LlmActionPayload) and p.orchestration_mode:
        for i, target in enumerate(p.branches):
            edge(target, "condition", f"branches/{i}", "_next_node")
    elif isinstance(p, HumanApprovalPayload):
        edge(p.on_approve, "approve", "on_approve")
        edge(p.on_reject, "reject", "on_reject")
        edge(p.on_timeout, "timeout", "on_timeout")
        for option, target in p.option_routes.items():
            edge(target, "option", f"option_routes/{pointer(option)[1:]}", option)
    edge(node.next_node, "next", "next_node")
    for h in node.error_handlers:
        edge(h.fallback_node, "fallback", f"error_handlers/{h.index}/fallback_node", h.error_type or "*")
    if node.sla is not None:
        edge(node.sla.escalation_handler, "fallback", "sla/escalation_handler", "sla")
    return out


def _edge_field_name(e: EdgeIR) -> str:
    """``rules[0].next_node`` style field name of an edge, for messages."""
    if e.kind == "on_failure":
        return "on_failure"
    parts = e.field.split("/")[4:]
    out = ""
    for part in parts:
        if part.isdigit():
            out += f"[{part}]"
        else:
            out += ("." if out else "") + part.replace("~1", "/").replace("~0", "~")
    return out


def _dialect(doc: dict[str, Any]) -> Diagnostic | None:
    wg = doc.get("workflow_graph")
    if isinstance(wg, dict) and isinstance(wg.get("nodes"), list):
        return Diagnostic(severity="error", code="unsupported_dialect", path="/workflow_graph/nodes",
                          message="unsupported CKP dialect: workflow_graph.nodes must be an object keyed by node id")
    if "workflow_graph" not in doc:
        if isinstance(doc.get("nodes"), list):
            return Diagnostic(severity="error", code="unsupported_dialect", path="/nodes",
                              message="unsupported CKP dialect: nodes must be inside workflow_graph as an object keyed "
                              "by node id (found a top-level 'nodes' array)")
        for key in ("start_node_id", "entry"):
            if key in doc:
                return Diagnostic(severity="error", code="unsupported_dialect", path=f"/{key}",
                                  message="unsupported CKP dialect: the entry node is workflow_graph.start_node "
                                  f"(found '{key}')")
    return None


MAX_NESTING = 128


def _document_problem(doc: Any) -> str | None:
    """Why a decoded document cannot be stored as canonical JSON: too deep, non-finite numbers, lone surrogates."""
    stack: list[tuple[Any, int]] = [(doc, 1)]
    while stack:
        value, depth = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_NESTING:
                return f"CKP document is nested deeper than {MAX_NESTING} levels"
            items = value.values() if isinstance(value, dict) else value
            stack.extend((item, depth + 1) for item in items if isinstance(item, dict | list))
    try:
        json.dumps(doc, allow_nan=False, ensure_ascii=False).encode("utf-8")
    except ValueError as exc:
        return f"CKP document holds a value JSON cannot represent: {exc}"
    except (TypeError, RecursionError) as exc:
        return f"CKP document is not JSON data: {exc}"
    return None


def compile_document(doc: Any, lookup: ProcedureLookup | None = None) -> CompileResult:
    """Compile a decoded CKP document. Never raises for bad input: problems come back as diagnostics."""
    if not isinstance(doc, dict):
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message="CKP document must be a JSON object")])
    problem = _document_problem(doc)
    if problem is not None:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="", message=problem)])
    dialect = _dialect(doc)
    if dialect is not None:
        return CompileResult([dialect])
    # Compiling allocates many small objects that all stay alive until the end: the cyclic collector would
    # only rescan them (about a third of the time on large documents). It is paused for this synchronous call.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _Compiler(_strip(doc), doc, lookup).run()
    finally:
        if collecting:
            gc.enable()


def compile_text(text: str | bytes, lookup: ProcedureLookup | None = None) -> CompileResult:
    """Decode JSON text (≤ 10 MiB) and compile it."""
    size = len(text.encode("utf-8", "surrogatepass") if isinstance(text, str) else text)
    if size > MAX_DOCUMENT_BYTES:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message=f"CKP document is {size} bytes; the limit is 10 MiB")])
    try:
        doc = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        return CompileResult([Diagnostic(severity="error", code="invalid_document", path="",
                                         message=f"CKP document is not valid JSON: {exc}")])
    return compile_document(doc, lookup)
