"""The CKP interpreter (ckp.md §3, §4.7, §7): executes a run's frames node by node.

Layers, each importing only those below it:

- :mod:`.scheduler` — :class:`Machine`: super-steps, frames as concurrent tasks, cancellation, the run deadline,
  resumes;
- :mod:`.lifecycle` — a frame's node from entry to outcome: node-scope handlers, SLA, state limits, frames ending;
- :mod:`.nodes` — one module per node kind;
- :mod:`.steps` — step execution (identity, replay, attempts, retries, step-scope handlers, completion);
- :mod:`.dispatch` — executor resolution, dispatches, screenshots, artifacts, secrets;
- :mod:`.context` — the run's fields and ports, execution mode, scopes and templates, the frame tree;
- :mod:`.policies` — retry and backoff, handler matching and budgets, SLA, deadline and state-limit decisions;
- :mod:`.outcomes` and :mod:`.ports` — node outcomes, and the interfaces to agents, the step store, child runs,
  events and the other collaborators.
"""

from langorch_runtime.errors import StepError
from langorch_runtime.machine.outcomes import (
    Next,
    NodeFailure,
    Outcome,
    Pause,
    RetryNode,
    Routed,
    Spawn,
    Terminate,
)
from langorch_runtime.machine.policies import (
    HANDLER_NAME_ALIASES,
    MAX_NAMESPACE_BYTES,
    MAX_VARIABLE_BYTES,
    NEVER_RETRIED,
    RECOVERY_GRACE_MS,
    after_retry_after,
    forget_retries,
    handler_matches,
    retry_allowed,
    retry_delay,
)
from langorch_runtime.machine.ports import (
    ApprovalRequest,
    ArtifactStore,
    CallbackConfig,
    CallbackInfo,
    ChildRuns,
    ContentArtifacts,
    Delegated,
    Dispatcher,
    DispatchRequest,
    Emit,
    LanguageModel,
    Limiter,
    RunInfo,
    SecretsAccess,
    StepRecords,
    WebhookPoster,
)
from langorch_runtime.machine.scheduler import WAIT_FIELDS, Machine

__all__ = [
    "HANDLER_NAME_ALIASES",
    "MAX_NAMESPACE_BYTES",
    "MAX_VARIABLE_BYTES",
    "NEVER_RETRIED",
    "RECOVERY_GRACE_MS",
    "WAIT_FIELDS",
    "ApprovalRequest",
    "ArtifactStore",
    "CallbackConfig",
    "CallbackInfo",
    "ChildRuns",
    "ContentArtifacts",
    "Delegated",
    "DispatchRequest",
    "Dispatcher",
    "Emit",
    "LanguageModel",
    "Limiter",
    "Machine",
    "Next",
    "NodeFailure",
    "Outcome",
    "Pause",
    "RetryNode",
    "Routed",
    "RunInfo",
    "SecretsAccess",
    "Spawn",
    "StepError",
    "StepRecords",
    "Terminate",
    "WebhookPoster",
    "after_retry_after",
    "forget_retries",
    "handler_matches",
    "retry_allowed",
    "retry_delay",
]
