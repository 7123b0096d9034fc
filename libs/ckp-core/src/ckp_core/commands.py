"""Command bodies published on ``LO_CMD`` (one pydantic model per message)."""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel, ConfigDict, Field

from ckp_core.events import Actor
from ckp_core.ids import new_id


class Command(BaseModel):
    model_config = ConfigDict(extra="allow")

    AGGREGATE: ClassVar[str]
    VERB: ClassVar[str]

    command_id: str = Field(default_factory=new_id)
    actor: Actor
    causation_id: str | None = None


class ImportProcedure(Command):
    """``lo.cmd.procedure.import``: compile and store a procedure version."""

    AGGREGATE = "procedure"
    VERB = "import"

    ckp_json: dict[str, Any]
    project_id: str | None = None


class StartRun(Command):
    """``lo.cmd.run.start``: execute a created run (its ``run_created`` event is already appended)."""

    AGGREGATE = "run"
    VERB = "start"

    run_id: str


class CreateRun(Command):
    """``lo.cmd.run.create``: create a run (``run_created``) and start it. The runtime, the run's single writer,
    decides it: the version must exist and be runnable and effective, and ``input_vars`` must validate against
    its variables; else ``command_rejected`` (``procedure_not_runnable``, ``procedure_not_effective``,
    ``invalid_input_vars``). Then it publishes the run's ``lo.cmd.run.start`` with THIS command's id, so the
    run's first events share one causation id whoever submitted the creation (the gateway, a parent run, later
    a trigger).

    ``procedure_version`` is the version the submitter resolved (a channel's active version, ``latest`` …);
    ``input_vars`` are the inputs as given (the runtime validates and fills defaults); ``execution_mode`` None
    runs the version's own mode (a dry-run parent's child says ``dry_run``).
    """

    AGGREGATE = "run"
    VERB = "create"

    run_id: str
    procedure_id: str
    procedure_version: str
    release_channel: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    trigger_type: str = "api"
    triggered_by: str | None = None
    parent_run_id: str | None = None
    parent_node_id: str | None = None
    root_run_id: str | None = None
    rerun_of: str | None = None
    execution_mode: str | None = None
    project_id: str | None = None
    call_chain: list[str] | None = None

    @property
    def msg_id(self) -> str:
        """``Nats-Msg-Id`` of the creation: a republish is dropped, and the start, which carries the command id as
        its own message id, is not."""
        return f"create:{self.command_id}"

    def start(self) -> StartRun:
        """The run's start command: this command's id, actor and causation (the run's events share them)."""
        return StartRun(command_id=self.command_id, actor=self.actor, causation_id=self.causation_id,
                        run_id=self.run_id)


class ResumeRun(Command):
    """``lo.cmd.run.resume``: resolve one wait of a suspended run (ckp.md §7.2).

    ``resolution`` carries ``wait_id`` plus the decision (approvals: ``status``, ``decision``, ``decided_by``,
    ``comment``, ``payload``, ``source``), the callback or the child outcome; ``resume_reason`` is the
    ``execution_resumed`` reason.
    """

    AGGREGATE = "run"
    VERB = "resume"

    run_id: str
    resume_reason: str
    resolution: dict[str, Any]


class CancelRun(Command):
    """``lo.cmd.run.cancel``: cancel a run (api.md §5.4)."""

    AGGREGATE = "run"
    VERB = "cancel"

    run_id: str
    reason: str | None = None


class RetryRun(Command):
    """``lo.cmd.run.retry``: resume a failed or canceled run at its failure point (ckp.md §7.12)."""

    AGGREGATE = "run"
    VERB = "retry"

    run_id: str
    automatic: bool = False


class RequestApproval(Command):
    """``lo.cmd.approval.request``: a run reached a ``human_approval`` node (api.md §6); the approvals service
    appends the approval aggregate's ``approval_requested`` and owns its timer. ``approval_id`` is the run's
    wait id: the decision resumes the run with ``ResumeRun.resolution.wait_id = approval_id``."""

    AGGREGATE = "approval"
    VERB = "request"

    approval_id: str
    run_id: str
    procedure_id: str
    procedure_version: str
    project_id: str | None = None
    node_id: str
    node_name: str | None = None
    prompt: str = ""
    context_data: Any = None
    decision_type: str = "approve_reject"
    options: list[str] = Field(default_factory=list)
    input_schema: dict[str, Any] = Field(default_factory=dict)
    expires_at: str | None = None
    timeout_action: str | None = None
    approval_level: str | None = None
    escalation_contact: str | None = None


class DecideApproval(Command):
    """``lo.cmd.approval.decide``: a principal's decision on a pending approval (api.md §6.3)."""

    AGGREGATE = "approval"
    VERB = "decide"

    approval_id: str
    decision: str
    comment: str | None = None
    payload: Any = None


class ReplaceProcedure(Command):
    """``lo.cmd.procedure.replace``: replace a draft version's document (``expected_revision`` from If-Match)."""

    AGGREGATE = "procedure"
    VERB = "replace"

    procedure_id: str
    version: str
    ckp_json: dict[str, Any]
    expected_revision: int | None = None


class DeleteProcedureVersion(Command):
    """``lo.cmd.procedure.delete``: remove a draft, deprecated or archived version."""

    AGGREGATE = "procedure"
    VERB = "delete"

    procedure_id: str
    version: str
    expected_revision: int | None = None


class SetProcedureStatus(Command):
    """``lo.cmd.procedure.set_status``: move a version through the lifecycle of api.md §4.4."""

    AGGREGATE = "procedure"
    VERB = "set_status"

    procedure_id: str
    version: str
    status: str
    reason: str | None = None


class PromoteProcedure(Command):
    """``lo.cmd.procedure.promote``: activate a version in ``target_channel`` (api.md §4.5)."""

    AGGREGATE = "procedure"
    VERB = "promote"

    procedure_id: str
    version: str
    target_channel: str
    reason: str | None = None


class RollbackProcedure(Command):
    """``lo.cmd.procedure.rollback``: restore an earlier version of ``target_channel`` (api.md §4.5)."""

    AGGREGATE = "procedure"
    VERB = "rollback"

    procedure_id: str
    version: str
    target_channel: str
    rollback_to_version: str | None = None
    reason: str | None = None


class RegisterAgent(Command):
    """``lo.cmd.agent.register``: a new agent (capabilities already probed by the gateway when none given)."""

    AGGREGATE = "agent"
    VERB = "register"

    agent_id: str
    name: str
    channel: str
    protocol: str = "http"
    base_url: str
    concurrency_limit: int = 1
    resource_key: str
    pool_id: str
    capabilities: list[dict[str, Any]] = Field(default_factory=list)
    labels: dict[str, str] = Field(default_factory=dict)
    auth: dict[str, Any] = Field(default_factory=dict)
    token_sha256: str


class UpdateAgent(Command):
    """``lo.cmd.agent.update``: change fields (``changes``), replace synced capabilities, or rotate the token.

    ``operation`` selects the resulting event: ``update`` → ``agent_updated`` (+ ``agent_status_changed`` when
    ``status`` changes), ``sync_capabilities`` → ``agent_capabilities_synced``, ``rotate_token`` →
    ``agent_token_rotated``.
    """

    AGGREGATE = "agent"
    VERB = "update"

    agent_id: str
    operation: str = "update"
    changes: dict[str, Any] = Field(default_factory=dict)
    capabilities: list[dict[str, Any]] | None = None
    token_sha256: str | None = None
    reason: str | None = None


class RemoveAgent(Command):
    """``lo.cmd.agent.remove``."""

    AGGREGATE = "agent"
    VERB = "remove"

    agent_id: str


class ReleaseLease(Command):
    """``lo.cmd.lease.release``: force-release one lease key of ``lo_leases`` (revision-checked)."""

    AGGREGATE = "lease"
    VERB = "release"

    lease_id: str
    key: str
    revision: int
    reason: str | None = None


class DeleteRun(Command):
    """``lo.cmd.run.delete``: delete a terminal run and, with it, its child runs (api.md §5.6)."""

    AGGREGATE = "run"
    VERB = "delete"

    run_id: str
    cleanup_id: str | None = None


class UpsertTrigger(Command):
    """``lo.cmd.trigger.upsert``: register or replace the trigger of one procedure version (api.md §10.2).

    ``expected_revision`` (from ``If-Match``) must equal the registration's revision, and 0 means "must not
    exist yet"; None: unconditional."""

    AGGREGATE = "trigger"
    VERB = "upsert"

    procedure_id: str
    version: str
    trigger_type: str
    schedule: str | None = None
    timezone: str | None = None
    webhook_secret: str | None = None
    signature_scheme: str | None = None
    event_source: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    dedupe_window_seconds: int = 0
    max_concurrent_runs: int | None = None
    enabled: bool = True
    source: str = "api"
    expected_revision: int | None = None


class DeleteTrigger(Command):
    """``lo.cmd.trigger.delete``: remove a registration."""

    AGGREGATE = "trigger"
    VERB = "delete"

    procedure_id: str
    version: str


class EnableTrigger(Command):
    """``lo.cmd.trigger.enable``."""

    AGGREGATE = "trigger"
    VERB = "enable"

    procedure_id: str
    version: str


class DisableTrigger(Command):
    """``lo.cmd.trigger.disable``."""

    AGGREGATE = "trigger"
    VERB = "disable"

    procedure_id: str
    version: str


class FireTrigger(Command):
    """``lo.cmd.trigger.fire``: fire a registration once (api.md §10.2–10.3). The triggers service checks the
    dedupe window, creates the run through ``lo.cmd.run.create`` (``run_id`` chosen by the submitter, so a
    redelivery creates the same run) and appends ``trigger_fired`` or ``trigger_fire_skipped``.

    ``trigger_type`` is how the run starts (``manual`` for an operator's fire); ``dedupe_key`` is the delivery's
    identity for the dedupe window (None: not deduplicated)."""

    AGGREGATE = "trigger"
    VERB = "fire"

    procedure_id: str
    version: str
    run_id: str
    trigger_type: str = "manual"
    triggered_by: str | None = None
    input_vars: dict[str, Any] = Field(default_factory=dict)
    dedupe_key: str | None = None
    source_detail: dict[str, Any] = Field(default_factory=dict)
    project_id: str | None = None

    @property
    def msg_id(self) -> str:
        """``Nats-Msg-Id`` of the fire: ``fire:<command id>``."""
        return f"fire:{self.command_id}"
