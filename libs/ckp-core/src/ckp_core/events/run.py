"""Events of the run aggregate (owned by the runtime; ckp.md §8).

Node- and step-level payloads carry the position fields ``node_id``, ``step_id``, ``frame`` and ``attempt`` where
they apply (absent ones are ``null``). ``approval_requested`` is written on the run and, with the run's identity,
on the approval aggregate too (api.md §6).
"""

from __future__ import annotations

from typing import Any

from pydantic import Field

from ckp_core.events.envelope import ErrorObject, EventData


class RunCreated(EventData):
    TYPE = "run_created"
    AGGREGATE = "run"

    procedure_id: str
    procedure_version: str
    release_channel: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    trigger_type: str = "api"
    triggered_by: str | None = None
    parent_run_id: str | None = None
    parent_node_id: str | None = None
    root_run_id: str
    rerun_of: str | None = None
    execution_mode: str = "production"
    project_id: str | None = None


class ExecutionStarted(EventData):
    TYPE = "execution_started"
    AGGREGATE = "run"

    entry_node_id: str
    execution_mode: str
    runtime_instance: str | None = None  # the runtime replica executing the run (diagnostics, api.md §5.8)


class ExecutionRecovered(EventData):
    TYPE = "execution_recovered"
    AGGREGATE = "run"

    delivery_count: int
    checkpoint_id: str | None
    runtime_instance: str | None = None  # the replica that took the run over


class RunCompleted(EventData):
    TYPE = "run_completed"
    AGGREGATE = "run"

    outputs: dict[str, Any] = Field(default_factory=dict)
    recovered_via: str | None = None


class RunFailed(EventData):
    TYPE = "run_failed"
    AGGREGATE = "run"

    error: ErrorObject
    outputs: dict[str, Any] = Field(default_factory=dict)
    recovered_via: str | None = None
    recovery_error: ErrorObject | None = None


class NodeStarted(EventData):
    TYPE = "node_started"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    node_type: str
    node_name: str | None
    visit: int


class NodeCompleted(EventData):
    TYPE = "node_completed"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    node_type: str
    next_node: str | None
    duration_ms: int
    # the variables the node changed outside its steps' own ``step_completed`` (transforms, approvals, loops,
    # subflows, LLM outputs, merges, internal operations): top-level name → value after the node, redacted, bounded
    variables: dict[str, Any] = Field(default_factory=dict)


class NodeError(EventData):
    TYPE = "node_error"
    AGGREGATE = "run"

    node_id: str
    frame: str = "-"
    error: ErrorObject
    routed_to: str | None = None


class StepStarted(EventData):
    TYPE = "step_started"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    binding_kind: str
    channel: str | None = None
    agent_id: str | None = None
    idempotency_key: str
    params: dict[str, Any] = Field(default_factory=dict)


class StepCompleted(EventData):
    TYPE = "step_completed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    output_variable: str | None = None
    duration_ms: int
    retry_count: int = 0
    suppressed_error: ErrorObject | None = None
    # the variables the step wrote (output_variable, output_mapping, operation writes): top-level name → value after
    # the step, redacted and bounded like every payload (a run replay rebuilds the variables from them)
    variables: dict[str, Any] = Field(default_factory=dict)


class StepReplayed(EventData):
    TYPE = "step_replayed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    action: str
    output_variable: str | None = None
    original_attempt: int


class StepFailed(EventData):
    TYPE = "step_failed"
    AGGREGATE = "run"

    node_id: str
    step_id: str
    frame: str = "-"
    attempt: int
    action: str
    error: ErrorObject


class Log(EventData):
    TYPE = "log"
    AGGREGATE = "run"

    node_id: str | None = None
    step_id: str | None = None
    level: str
    message: str


class TemplateWarning(EventData):
    TYPE = "template_warning"
    AGGREGATE = "run"

    variable: str
    reason: str
    location: dict[str, Any]


class _RunEvent(EventData):
    AGGREGATE = "run"


class _Positioned(_RunEvent):
    node_id: str | None = None
    step_id: str | None = None
    frame: str | None = None
    attempt: int | None = None


class ExecutionResumed(_RunEvent):
    TYPE = "execution_resumed"
    entry_node_id: str | None = None
    resume_reason: str
    runtime_instance: str | None = None  # the runtime replica executing the run (diagnostics, api.md §5.8)


class RunSuspended(_RunEvent):
    TYPE = "run_suspended"
    status: str
    waiting_on: list[dict[str, Any]] = Field(default_factory=list)


class RunCancelRequested(_RunEvent):
    TYPE = "run_cancel_requested"
    reason: str | None = None
    requested_by: str | None = None


class RunCanceled(_RunEvent):
    TYPE = "run_canceled"
    reason: str | None = None
    requested_by: str | None = None


class RunRetryRequested(_RunEvent):
    TYPE = "run_retry_requested"
    retry_count: int
    automatic: bool = False
    failure_node_id: str | None = None
    input_vars: dict[str, Any] | None = None


class RunDeleted(_RunEvent):
    TYPE = "run_deleted"


class RecoveryStarted(_RunEvent):
    TYPE = "recovery_started"
    on_failure_node: str
    error: ErrorObject


class CheckpointSaved(_Positioned):
    TYPE = "checkpoint_saved"
    reason: str
    checkpoint_id: str | None = None


class NodePaused(_Positioned):
    TYPE = "node_paused"
    reason: str
    wait_id: str


class SlaBreached(_Positioned):
    TYPE = "sla_breached"
    limit_ms: int
    elapsed_ms: int
    on_breach: str
    escalation_handler: str | None = None
    enforced: bool = False


class StepRetrying(_Positioned):
    TYPE = "step_retrying"
    action: str
    delay_ms: int
    next_attempt: int
    source: str
    error: ErrorObject


class StepTimeout(_Positioned):
    TYPE = "step_timeout"
    action: str
    timeout_ms: int
    binding_kind: str


class StepEscalated(_Positioned):
    TYPE = "step_escalated"
    handler_index: int
    fallback_node: str | None = None
    error: ErrorObject


class StepErrorNotification(_Positioned):
    TYPE = "step_error_notification"
    error_type: str
    error: ErrorObject
    handler_action: str


class StepTestOverrideApplied(_Positioned):
    TYPE = "step_test_override_applied"
    override_key: str


class StepMockApplied(_Positioned):
    TYPE = "step_mock_applied"
    action: str
    binding_kind: str
    channel: str | None = None


class DryRunStepSkipped(_Positioned):
    TYPE = "dry_run_step_skipped"
    action: str
    binding_kind: str
    channel: str | None = None


class ScreenshotRequested(_Positioned):
    TYPE = "screenshot_requested"
    reason: str
    error: ErrorObject | None = None


class ArtifactCreated(_Positioned):
    TYPE = "artifact_created"
    artifact_id: str
    kind: str
    name: str | None = None
    uri: str | None = None
    mime_type: str | None = None
    size_bytes: int | None = None
    stored: bool = False


class PoolSaturated(_Positioned):
    TYPE = "pool_saturated"
    agent_id: str | None = None
    channel: str | None = None
    resource_key: str
    pool_id: str | None = None


class RateLimitWait(_Positioned):
    TYPE = "rate_limit_wait"
    limiter: str
    waited_ms: int


class ValidationFailed(_Positioned):
    TYPE = "validation_failed"
    validation_id: str
    message: str | None = None
    on_failure: str


class VerificationWarning(_Positioned):
    TYPE = "verification_warning"
    check_id: str
    message: str | None = None


class NotificationRequested(_Positioned):
    TYPE = "notification_requested"
    notification_id: str
    channel: str | None = None
    recipients: list[str] = Field(default_factory=list)
    subject: str | None = None
    message: str | None = None
    metadata: dict[str, Any] | None = None


class AuditLog(_Positioned):
    TYPE = "audit_log"
    entry: Any = None


class LoopStarted(_Positioned):
    TYPE = "loop_started"
    total: int
    iterations: int


class LoopIteration(_Positioned):
    TYPE = "loop_iteration"
    iteration: int
    total: int
    item_preview: str | None = None
    # the loop's iterator variable (and index variable) as the iteration starts: name → value, redacted and bounded
    # like step_completed's (a run replay shows each iteration's item)
    variables: dict[str, Any] = Field(default_factory=dict)


class LoopIterationFailed(_Positioned):
    TYPE = "loop_iteration_failed"
    iteration: int
    error: ErrorObject


class LoopCompleted(_Positioned):
    TYPE = "loop_completed"
    iterations: int
    succeeded: int
    failed: int


class ParallelStarted(_Positioned):
    TYPE = "parallel_started"
    branches: list[str]
    wait_strategy: str


class ParallelBranchCompleted(_Positioned):
    TYPE = "parallel_branch_completed"
    branch_id: str
    status: str
    error: ErrorObject | None = None


class ParallelMergeConflict(_Positioned):
    TYPE = "parallel_merge_conflict"
    variable: str
    branches: list[str]


class ParallelCompleted(_Positioned):
    TYPE = "parallel_completed"
    succeeded: int
    failed: int
    canceled: int
    winner: str | None = None


class SubflowStarted(_Positioned):
    TYPE = "subflow_started"
    child_run_id: str
    procedure_id: str
    version: str
    attempt: int = 1
    suspends_run: bool = True


class SubflowCompleted(_Positioned):
    TYPE = "subflow_completed"
    child_run_id: str
    procedure_id: str
    version: str
    resumes_run: bool = True
    mapped_variables: list[str] = Field(default_factory=list)


class SubflowFailed(_Positioned):
    TYPE = "subflow_failed"
    child_run_id: str
    procedure_id: str
    version: str
    resumes_run: bool = True
    on_failure: str
    error: ErrorObject | None = None


class ApprovalRequested(_Positioned):
    TYPE = "approval_requested"
    approval_id: str
    node_name: str | None = None
    decision_type: str
    options: list[str] = Field(default_factory=list)
    prompt: str = ""
    context_data: Any = None
    expires_at: str | None = None
    timeout_action: str | None = None
    approval_level: str | None = None
    escalation_contact: str | None = None
    input_schema: dict[str, Any] = Field(default_factory=dict)
    suspends_run: bool = True
    # on the approval aggregate (api.md §6), the same event also carries the run's identity:
    run_id: str | None = None
    procedure_id: str | None = None
    procedure_version: str | None = None
    project_id: str | None = None


class ApprovalDecisionReceived(_Positioned):
    TYPE = "approval_decision_received"
    approval_id: str | None = None
    status: str
    decision: str | None = None
    decided_by: str | None = None
    comment: str | None = None
    source: str
    routed_to: str | None = None
    resumes_run: bool = True


class ApprovalAutoResolved(_Positioned):
    TYPE = "approval_auto_resolved"
    decision: str
    payload: Any = None
    routed_to: str | None = None


class WorkflowDelegated(_Positioned):
    TYPE = "workflow_delegated"
    delegation_id: str
    action: str
    agent_id: str | None = None
    agent_url: str | None = None
    callback_url: str | None = None
    expires_at: str | None = None
    dispatch_mode: str = "async"
    suspends_run: bool = True


class WorkflowCallbackReceived(_Positioned):
    TYPE = "workflow_callback_received"
    delegation_id: str
    status: str
    output: Any = None
    error: Any = None
    error_code: str | None = None
    resumes_run: bool = True


class CallbackTimedOut(_Positioned):
    TYPE = "callback_timed_out"
    delegation_id: str
    timeout_s: float
    resumes_run: bool = True


class LlmUsage(_Positioned):
    TYPE = "llm_usage"
    model: str
    requested_model: str | None = None
    provider_host: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0
    estimated_cost_usd: float | None = None
    usage_reported: bool = True
    latency_ms: int = 0
    fallback_attempt: int = 0


class LlmRouteSelected(_Positioned):
    TYPE = "llm_route_selected"
    requested: str | None = None
    chosen: str
    valid: bool


class BudgetExceeded(_Positioned):
    TYPE = "budget_exceeded"
    max_cost_usd: float
    spent_usd: float
    projected_usd: float


EVENTS: tuple[type[EventData], ...] = (
    RunCreated, ExecutionStarted, ExecutionRecovered, RunCompleted, RunFailed, NodeStarted, NodeCompleted, NodeError,
    StepStarted, StepCompleted, StepReplayed, StepFailed, Log, TemplateWarning,
    ExecutionResumed, RunSuspended, RunCancelRequested, RunCanceled, RunRetryRequested, RunDeleted,
    RecoveryStarted, CheckpointSaved, NodePaused, SlaBreached, StepRetrying, StepTimeout, StepEscalated,
    StepErrorNotification, StepTestOverrideApplied, StepMockApplied, DryRunStepSkipped, ScreenshotRequested,
    ArtifactCreated, PoolSaturated, RateLimitWait, ValidationFailed, VerificationWarning, NotificationRequested,
    AuditLog, LoopStarted, LoopIteration, LoopIterationFailed, LoopCompleted, ParallelStarted,
    ParallelBranchCompleted, ParallelMergeConflict, ParallelCompleted, SubflowStarted, SubflowCompleted,
    SubflowFailed, ApprovalRequested, ApprovalDecisionReceived, ApprovalAutoResolved, WorkflowDelegated,
    WorkflowCallbackReceived, CallbackTimedOut, LlmUsage, LlmRouteSelected, BudgetExceeded,
)
