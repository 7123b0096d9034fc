"""The compiled form of a procedure version (ckp.md §6.6): frozen, versioned, JSON-serialisable pydantic models.

Everything the runtime needs is here with aliases resolved and defaults filled. Expressions and templates carry
their parsed syntax trees, so loading an IR never parses CKP text again: :meth:`ExpressionIR.compiled` and
:meth:`TemplateIR.compiled` rebuild the evaluable objects from the trees (once per loaded model).
"""

from __future__ import annotations

from functools import cached_property
from typing import Any, Literal, TypeAlias, TypeVar

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.diagnostics import Diagnostic
from ckp_core.expressions import Expression, expression_from_json
from ckp_core.templates import Template, template_from_json
from ckp_core.variables import VariableSpec

IR_VERSION = 1

NodeType: TypeAlias = Literal[
    "sequence", "logic", "loop", "parallel", "subflow", "processing", "verification", "llm_action",
    "human_approval", "transform", "terminate",
]
EdgeKind: TypeAlias = Literal[
    "next", "condition", "default", "approve", "reject", "timeout", "option", "branch", "loop_body", "fallback",
    "on_failure",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, ignored_types=(cached_property,))


_M = TypeVar("_M", bound=BaseModel)
# BaseModel's slots, set through their descriptors: object.__setattr__ would look each name up along the MRO.
_SLOTS = type.__getattribute__(BaseModel, "__dict__")
_set_dict = _SLOTS["__dict__"].__set__
_set_fields_set = _SLOTS["__pydantic_fields_set__"].__set__
_set_extra = _SLOTS["__pydantic_extra__"].__set__
_set_private = _SLOTS["__pydantic_private__"].__set__
_new = object.__new__
_all_fields: dict[type[BaseModel], set[str]] = {}


def construct(cls: type[_M], fields: dict[str, Any]) -> _M:
    """A model of values the compiler has already checked and normalised, without validating them again (a
    third of the cost of ``cls(**fields)``, and IR models are the most numerous objects of a compilation).

    ``fields`` must hold every field of ``cls`` with exactly what validation would store: the annotated types
    (a float as a float), nested models as models, fresh lists and dicts. The dict becomes the model's own.
    The models of a class share one set of field names as their ``model_fields_set`` (every field is set):
    IR models are frozen, and ``model_copy`` copies the set before adding to it.
    """
    model = _new(cls)
    _set_dict(model, fields)
    try:
        names = _all_fields[cls]
    except KeyError:
        names = _all_fields[cls] = set(cls.model_fields)
    _set_fields_set(model, names)
    _set_extra(model, None)
    _set_private(model, None)
    return model


# -- expressions and templates -----------------------------------------------------------------------------


class ExpressionIR(_Frozen):
    """An expression (§5.3): source text, syntax tree (JSON) and the root names it reads."""

    source: str
    ast: Any
    roots: list[str] = Field(default_factory=list)

    @cached_property
    def compiled(self) -> Expression:
        return expression_from_json(self.source, self.ast, self.roots)


class TemplateIR(_Frozen):
    """A template (§5.1): the source JSON value and its compiled strings (placeholder trees with JSON paths)."""

    source: Any
    strings: list[dict[str, Any]] = Field(default_factory=list)

    @cached_property
    def compiled(self) -> Template:
        return template_from_json({"source": self.source, "strings": self.strings})

    @property
    def is_constant(self) -> bool:
        return not self.strings

    @property
    def roots(self) -> set[str]:
        out: set[str] = set()
        for entry in self.strings:
            for part in entry["parts"]:
                if isinstance(part, dict):
                    out.update(part["ph"]["roots"])
        return out


# -- policies ------------------------------------------------------------------------------------------------


class RetryPolicyIR(_Frozen):
    """A resolved retry policy (§4.8)."""

    max_retries: int = 3
    strategy: Literal["fixed", "linear", "exponential_backoff", "fibonacci"] = "exponential_backoff"
    retry_delay_ms: int = 1000
    backoff_multiplier: float = 2.0
    max_delay_ms: int = 300_000
    jitter: float = 0.0
    retry_on: list[str] | None = None  # None: errors with retryable=true


class SlaIR(_Frozen):
    max_duration_ms: int
    on_breach: Literal["warn", "fail", "escalate"] = "warn"
    escalation_handler: str | None = None
    enforce: bool = False


class CustomMetricIR(_Frozen):
    name: str
    value: float = 1.0


class TelemetryIR(_Frozen):
    track_duration: bool = True
    track_retries: bool = True
    custom_metrics: list[CustomMetricIR] = Field(default_factory=list)
    trace_id: str | None = None
    span_id: str | None = None


class OutputMappingIR(_Frozen):
    """One output mapping (§5.6), aliases resolved: ``text`` | ``json`` | ``jmespath`` | ``regex`` | ``xpath`` |
    ``template``. ``argument`` is the checked path/expression/pattern text."""

    kind: Literal["text", "json", "jmespath", "regex", "xpath", "template"]
    source: str
    argument: str | None = None
    path: ExpressionIR | None = None
    template: TemplateIR | None = None


class Binding(_Frozen):
    """Where a step runs (§6.5): ``internal:<operation>`` or ``channel:<channel>:<action>``."""

    kind: Literal["internal", "channel"]
    channel: str | None = None
    action: str

    @property
    def plan(self) -> str:
        return f"internal:{self.action}" if self.kind == "internal" else f"channel:{self.channel}:{self.action}"


class SecretRefIR(_Frozen):
    """A ``{{secrets.<alias>[.<field>]}}`` use: where it is and what it resolves through."""

    alias: str
    field: str | None = None
    path: str


# -- steps and operations ------------------------------------------------------------------------------------


class OperationIR(_Frozen):
    """An internal operation (§4.3) of a processing node or terminate action list, or an internal step's body.

    ``params`` holds every rendered field; ``names`` the name fields (``variable``, ``array``) that are never
    rendered; ``expression`` the parsed ``calculate.expression``.
    """

    index: int = 0
    action: str
    params: TemplateIR
    names: dict[str, str] = Field(default_factory=dict)
    expression: ExpressionIR | None = None
    output_variable: str | None = None
    secrets: list[SecretRefIR] = Field(default_factory=list)


class StepIR(_Frozen):
    step_id: str
    action: str
    description: str | None = None
    binding: Binding
    params: TemplateIR
    names: dict[str, str] = Field(default_factory=dict)
    expression: ExpressionIR | None = None
    timeout_ms: int | None = None  # effective: step, else global default_step_timeout_ms
    wait_ms: int = 0
    wait_after_ms: int = 0
    retry: RetryPolicyIR | None = None  # effective policy; None when retries are not enabled
    output_variable: str | None = None
    output_mapping: dict[str, OutputMappingIR] = Field(default_factory=dict)
    idempotency_key: TemplateIR | None = None
    dispatch_mode: Literal["async", "sync"] = "async"  # effective preference for workflow capabilities
    screenshot_on_complete: bool = False
    secrets: list[SecretRefIR] = Field(default_factory=list)

    def as_operation(self) -> OperationIR:
        return OperationIR(action=self.action, params=self.params, names=self.names, expression=self.expression,
                           output_variable=self.output_variable)


class HandlerTriggerIR(_Frozen):
    error_text_contains: list[str] = Field(default_factory=list)
    error_code: list[str] = Field(default_factory=list)
    http_status_codes: list[int] = Field(default_factory=list)


class ErrorHandlerIR(_Frozen):
    index: int
    error_type: str = ""
    trigger: HandlerTriggerIR | None = None
    action: Literal["retry", "retry_node", "fail", "screenshot_and_fail", "ignore", "escalate"] = "fail"
    max_retries: int = 3
    delay_ms: int = 1000
    retry_policy: RetryPolicyIR | None = None
    recovery_steps: list[StepIR] = Field(default_factory=list)
    fallback_node: str | None = None
    notify_on_error: bool = False
    error_metadata: dict[str, Any] | None = None

    @property
    def catch_all(self) -> bool:
        return self.error_type in ("", "*") and self.trigger is None


class ValidationIR(_Frozen):
    id: str
    check: Literal["custom", "value_in_range", "screen_text_contains", "element_exists"] = "custom"
    condition: ExpressionIR | None = None
    expected_values: list[str] = Field(default_factory=list)
    on_failure: Literal["throw_exception", "fail_workflow", "retry_node"] = "throw_exception"
    max_node_retries: int = 1
    message: TemplateIR | None = None
    binding: Binding | None = None  # screen checks: channel:<channel>:wait_for_text|wait_for_element


# -- node payloads (one per type; mirror the field tables of §3) ----------------------------------------------


class SequencePayload(_Frozen):
    kind: Literal["sequence"] = "sequence"
    steps: list[StepIR] = Field(default_factory=list)
    validations: list[ValidationIR] = Field(default_factory=list)


class RuleIR(_Frozen):
    condition: ExpressionIR
    next_node: str


class LogicPayload(_Frozen):
    kind: Literal["logic"] = "logic"
    rules: list[RuleIR] = Field(default_factory=list)
    default_next_node: str | None = None


class LoopPayload(_Frozen):
    kind: Literal["loop"] = "loop"
    iterator: ExpressionIR
    iterator_variable: str
    index_variable: str | None = None
    body_node: str
    collect_variable: str | None = None
    collect_expression: TemplateIR | None = None
    errors_variable: str | None = None
    max_iterations: int | None = None
    continue_on_error: bool = False


class BranchIR(_Frozen):
    branch_id: str
    start_node: str


class ParallelPayload(_Frozen):
    kind: Literal["parallel"] = "parallel"
    branches: list[BranchIR]
    wait_strategy: Literal["all", "any"] = "all"
    branch_failure: Literal["continue", "fail"] = "continue"
    max_concurrency: int | None = None


class SubflowPayload(_Frozen):
    kind: Literal["subflow"] = "subflow"
    procedure_id: str
    version: str | None = None  # None: newest active
    input_mapping: TemplateIR  # object {child_var: value}; bare-path values are in input_paths
    input_paths: dict[str, ExpressionIR] = Field(default_factory=dict)
    output_mapping: dict[str, ExpressionIR] = Field(default_factory=dict)
    inherit_context: bool = False
    on_failure: Literal["fail_parent", "continue", "retry"] = "fail_parent"
    max_retries: int = 1


class ProcessingPayload(_Frozen):
    kind: Literal["processing"] = "processing"
    operations: list[OperationIR] = Field(default_factory=list)


class CheckIR(_Frozen):
    id: str
    condition: ExpressionIR
    on_fail: Literal["fail_workflow", "warn", "continue"] = "fail_workflow"
    message: str | None = None


class VerificationPayload(_Frozen):
    kind: Literal["verification"] = "verification"
    checks: list[CheckIR]


class AttachmentIR(_Frozen):
    type: Literal["text", "json", "csv", "markdown", "image"]
    source: TemplateIR
    description: str | None = None
    mime_type: str | None = None


class LlmActionPayload(_Frozen):
    kind: Literal["llm_action"] = "llm_action"
    prompt: TemplateIR
    system_prompt: TemplateIR | None = None
    model: str | None = None
    temperature: float | None = None
    max_tokens: int | None = None
    json_mode: bool = False
    attachments: list[AttachmentIR] = Field(default_factory=list)
    retry: RetryPolicyIR | None = None
    timeout_ms: int | None = None
    max_cost_per_llm_call_usd: float | None = None
    min_llm_quality: float | None = None
    outputs: dict[str, OutputMappingIR] = Field(default_factory=dict)
    orchestration_mode: bool = False
    branches: list[str] = Field(default_factory=list)


class HumanApprovalPayload(_Frozen):
    kind: Literal["human_approval"] = "human_approval"
    prompt: TemplateIR
    decision_type: Literal["approve_reject", "select_option", "provide_input"] = "approve_reject"
    options: list[str] = Field(default_factory=list)
    option_routes: dict[str, str] = Field(default_factory=dict)
    input_schema: dict[str, VariableSpec] = Field(default_factory=dict)
    input_variable: str | None = None
    decision_variable: str | None = None
    context_data: TemplateIR | None = None
    timeout_ms: int | None = None
    timeout_action: Literal["auto_approve", "auto_reject", "escalate"] | None = None
    escalation_contact: str | None = None
    approval_level: Literal["standard", "manager", "executive"] | None = None
    on_approve: str | None = None
    on_reject: str | None = None
    on_timeout: str | None = None


class AggregateIR(_Frozen):
    function: Literal["count", "sum", "avg", "min", "max"]
    field: str | None = None
    name: str


class TransformationIR(_Frozen):
    index: int
    type: Literal["filter", "map", "reduce", "join", "aggregate", "pivot", "sort", "deduplicate"]
    source_variable: ExpressionIR | None = None
    expression: ExpressionIR | None = None
    aggregates: list[AggregateIR] = Field(default_factory=list)
    output_variable: str
    params: TemplateIR


class TransformPayload(_Frozen):
    kind: Literal["transform"] = "transform"
    transformations: list[TransformationIR] = Field(default_factory=list)


class TerminatePayload(_Frozen):
    kind: Literal["terminate"] = "terminate"
    status: Literal["success", "failed"] = "success"
    outputs: TemplateIR
    cleanup_actions: list[OperationIR] = Field(default_factory=list)
    error_actions: list[OperationIR] = Field(default_factory=list)
    final_audit_log: TemplateIR | None = None


Payload: TypeAlias = (
    SequencePayload | LogicPayload | LoopPayload | ParallelPayload | SubflowPayload | ProcessingPayload
    | VerificationPayload | LlmActionPayload | HumanApprovalPayload | TransformPayload | TerminatePayload
)


class NodeIR(_Frozen):
    id: str
    type: NodeType
    description: str | None = None
    agent: str | None = None
    channel: str | None = None
    orchestrator: bool = True
    next_node: str | None = None
    error_handlers: list[ErrorHandlerIR] = Field(default_factory=list)
    is_checkpoint: bool = False
    sla: SlaIR | None = None
    telemetry: TelemetryIR | None = None
    idempotency_key: TemplateIR | None = None
    dispatch_mode: Literal["async", "sync"] | None = None
    payload: Payload = Field(discriminator="kind")


class EdgeIR(_Frozen):
    source: str = Field(alias="from")
    target: str = Field(alias="to")
    kind: EdgeKind
    label: str | None = None
    field: str = ""  # JSON Pointer of the field that declares the edge

    model_config = ConfigDict(frozen=True, populate_by_name=True)


# -- document level ------------------------------------------------------------------------------------------


class TriggerIR(_Frozen):
    type: Literal["manual", "scheduled", "webhook", "event", "file_watch"] = "manual"
    schedule: str | None = None
    timezone: str = "UTC"
    webhook_secret: str | None = None
    signature_scheme: Literal["timestamped", "body"] = "timestamped"
    event_source: str | None = None
    event_filter: ExpressionIR | None = None
    file_watch_path: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    dedupe_window_seconds: int = 0
    max_concurrent_runs: int | None = None


class RateLimitingIR(_Frozen):
    enabled: bool = False
    max_requests_per_minute: int | None = None
    max_concurrent_operations: int | None = None
    max_wait_ms: int = 30_000


class SecretsConfigIR(_Frozen):
    provider: Literal["env", "vault", "aws", "azure", "langorch"] | None = None
    vault_url: str | None = None


class SecretReferenceIR(_Frozen):
    key: str
    provider: Literal["env", "vault", "aws", "azure", "langorch"] | None = None
    field: str | None = None


class GlobalConfigIR(_Frozen):
    max_retries: int = 3
    retry_delay_ms: int = 1000
    backoff_multiplier: float = 2.0
    retry_policy: RetryPolicyIR = Field(default_factory=RetryPolicyIR)  # effective default step policy
    timeout_ms: int | None = None
    default_step_timeout_ms: int | None = None
    max_hops: int = 10000
    on_failure: str | None = None
    screenshot_on_fail: bool = False
    logging_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    telemetry_enabled: bool = True
    checkpoint_strategy: Literal["every_node", "critical_nodes_only", "disabled"] = "every_node"
    resume_on_failure: bool = False
    execution_mode: Literal["production", "dry_run", "validation_only"] = "production"
    mock_external_calls: bool = False
    test_data_overrides: dict[str, Any] = Field(default_factory=dict)
    rate_limiting: RateLimitingIR = Field(default_factory=RateLimitingIR)
    secrets_config: SecretsConfigIR = Field(default_factory=SecretsConfigIR)
    audit_enabled: bool = True
    redacted_fields: list[str] = Field(default_factory=list)
    workflow_dispatch_mode: Literal["async", "sync"] = "async"
    max_cost_usd: float | None = None
    max_cost_per_llm_call_usd: float | None = None
    min_llm_quality: float | None = None


class SubflowRefIR(_Frozen):
    node_id: str
    procedure_id: str
    version: str | None = None


class ProcedureIR(_Frozen):
    ir_version: int = IR_VERSION
    procedure_id: str
    version: str
    name: str
    description: str | None = None
    status: str | None = None
    effective_date: str | None = None
    content_hash: str
    compiler_version: str
    trigger: TriggerIR | None = None
    global_config: GlobalConfigIR = Field(default_factory=GlobalConfigIR)
    variables: dict[str, VariableSpec] = Field(default_factory=dict)
    secrets: dict[str, SecretReferenceIR] = Field(default_factory=dict)
    start_node: str
    nodes: dict[str, NodeIR]
    edges: list[EdgeIR] = Field(default_factory=list)
    subflow_refs: list[SubflowRefIR] = Field(default_factory=list)
    retrieval_metadata: dict[str, Any] | None = None
    provenance: dict[str, Any] | None = None
    tags: list[str] = Field(default_factory=list)
    diagnostics: list[Diagnostic] = Field(default_factory=list)

    def variables_schema(self) -> dict[str, Any]:
        """The normalised flat ``variables_schema`` view (api.md ProcedureDetail)."""
        return {
            name: spec.model_dump(mode="json", exclude={"has_default"}, exclude_none=True)
            for name, spec in self.variables.items()
        }

    def trigger_view(self) -> dict[str, Any] | None:
        """The normalised trigger block (null for manual or absent triggers' API view)."""
        if self.trigger is None:
            return None
        out = self.trigger.model_dump(mode="json", exclude_none=True)
        if self.trigger.event_filter is not None:
            out["event_filter"] = self.trigger.event_filter.source
        return out
