"""What the interpreter talks to (ckp.md §4.5, §4.6, §3.9, §7.4, §8): the ports a :class:`Machine` is built with.

Agents and MCP tools (:class:`Dispatcher` and its request/answer types), the step store, child runs, the run's
event stream (:data:`Emit`), artifacts, secrets, rate limits, webhooks and the LLM client. The service wires the
real adapters (``agent_dispatch``, ``steps.StepStore``, ``children``, ``executor.RunWriter``, …); the unit
harness wires in-memory ones. Nothing here depends on the rest of the interpreter.
"""

from __future__ import annotations

import contextlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from ckp_core.events import ErrorObject, EventData
from ckp_core.ir import NodeIR
from langorch_runtime.errors import StepError
from langorch_runtime.llm import LlmRequest, LlmResult
from langorch_runtime.steps import StepRecord

# -- events ----------------------------------------------------------------------------------------------------

Emit = Callable[[EventData], Awaitable[int]]  # appends one run event; returns its position
ApprovalRequest = Callable[[dict[str, Any]], Awaitable[None]]  # publishes lo.cmd.approval.request


# -- agents and MCP tools (§4.5, §4.6, api.md §15) -----------------------------------------------------------------


@dataclass
class DispatchRequest:
    node: NodeIR
    step_id: str
    action: str
    channel: str | None
    params: dict[str, Any]
    attempt: int
    idempotency_key: str
    frame: str
    timeout_ms: int | None
    dispatch_mode: str
    run_id: str = ""
    procedure_id: str = ""
    emit: Emit | None = None  # for dispatch-time events (pool_saturated, rate_limit_wait, artifact_created)
    deadline_at: str | None = None
    callback: CallbackInfo | None = None  # for async workflow capabilities (api.md §15.2)
    affinity: str | None = None  # the agent this run used on this channel before (kept in run state)
    agent_id: str | None = None  # set by the dispatcher: the agent chosen
    on_selected: Callable[[str | None, str | None], Awaitable[None]] | None = None  # called by dispatchers that
    # announce the agent (``announces_agent``) once it is chosen and its lease held, before the call, with the agent
    # and the binding (agent_http, agent_workflow, mcp_tool): emits step_started


@dataclass
class CallbackInfo:
    """The delegation an async workflow dispatch would create: its id, callback URL and token."""

    delegation_id: str
    url: str
    token: str
    expires_at: str


@dataclass
class ContentArtifacts:
    """A dispatch result with artifacts that are not keys of it (MCP ``image``/``resource`` content, api.md
    §15.4): ``value`` is the step output; each of ``artifacts`` (an artifact spec, §4.12, inline content or a
    link) is recorded, and when the spec's ``at`` is set the output list item at that index becomes the link
    ``{type, artifact_id, uri, name, mime_type}``."""

    value: Any
    artifacts: list[dict[str, Any]]


class Delegated(Exception):
    """Raised by a dispatcher when an agent accepted an async workflow step (202 / ``status: accepted``)."""

    def __init__(self, delegation_id: str, agent_id: str | None = None, agent_url: str | None = None) -> None:
        super().__init__(delegation_id)
        self.delegation_id = delegation_id
        self.agent_id = agent_id
        self.agent_url = agent_url


class Dispatcher:
    """Executes external dispatches (agents, MCP tools). The default has no executors (``no_executor``)."""

    announces_agent = False  # True: calls ``request.on_selected(agent_id)`` once the agent is chosen

    async def dispatch(self, request: DispatchRequest) -> Any:
        raise StepError(ErrorObject(
            code="no_executor", retryable=True, message=f"no executor for action '{request.action}' on channel "
            f"'{request.channel}': no agent is registered for it", details={"channel": request.channel,
                                                                             "action": request.action}))


@dataclass
class CallbackConfig:
    key: bytes
    public_url: str
    timeout_s: float


class Limiter(Protocol):
    """Admits external dispatches under the procedure's rate limits (§7.6)."""

    def admit(self, procedure_id: str, limits: Any, emit: Emit | None,
              position: dict[str, Any]) -> contextlib.AbstractAsyncContextManager[None]: ...


# -- the step store (§7.4) -------------------------------------------------------------------------------------


class StepRecords(Protocol):
    """Step identities and their records (``steps.StepStore`` on KV ``lo_steps``, ``MemoryStepStore``)."""

    async def get(self, identity: str) -> StepRecord | None: ...

    async def put(self, identity: str, record: StepRecord) -> None: ...

    def put_soon(self, identity: str, record: StepRecord) -> None: ...


# -- child runs (§3.9) ---------------------------------------------------------------------------------------------


class ChildRuns(Protocol):
    """Creates child runs for subflow nodes (run_created on the child, then its start command)."""

    async def start(self, *, parent_run_id: str, parent_node_id: str, root_run_id: str, call_chain: list[str],
                    procedure_id: str, version: str | None, inputs: dict[str, Any], child_run_id: str,
                    rerun_of: str | None, dry_run: bool, project_id: str | None) -> str:
        """Start (idempotently) the child run; returns the version it runs. Raises StepError for
        ``subflow_not_found`` and ``subflow_input_invalid``."""
        ...


# -- artifacts, secrets, webhooks, the LLM -------------------------------------------------------------------------


class ArtifactStore(Protocol):
    """Stores inline artifact content (≤ 50 MiB) owned by a run tree (its root run); returns its URI and size.
    ``size`` with ``root_run_id`` answers None for an artifact of another run tree, as for a missing one."""

    async def put(self, artifact_id: str, spec: dict[str, Any], *, run_id: str, root_run_id: str
                  ) -> tuple[str, int]: ...

    async def size(self, artifact_id: str, *, root_run_id: str | None = None) -> int | None: ...

    async def read(self, artifact_id: str) -> bytes: ...


class SecretsAccess(Protocol):
    """Secrets at the moment of use (§7.14): values for internal keys and MCP, grants for HTTP agents."""

    async def value(self, name: str) -> str | None: ...

    async def resolve(self, name: str, *, provider: str | None, url: str | None, field: str | None) -> str:
        """The value from its provider now; raises :class:`StepError` ``secret_not_found`` or
        ``secret_unavailable`` (retryable) with the provider's reason, never the value."""
        ...

    def grant(self, *, run_id: str, secret_name: str, node_id: str, step_id: str, field: str | None,
              provider: str | None = None, url: str | None = None) -> str: ...


class WebhookPoster(Protocol):
    """Schedules a best-effort POST to the server's ``notify`` or ``alert`` webhook (:mod:`.webhooks`)."""

    def post(self, kind: Literal["notify", "alert"], payload: dict[str, Any]) -> None: ...


class LanguageModel(Protocol):
    """The LLM client of ``llm_action`` nodes (:class:`langorch_runtime.llm.LlmClient`, §3.12, §7.13)."""

    async def complete(self, request: LlmRequest) -> LlmResult: ...


# -- the run ---------------------------------------------------------------------------------------------------------


@dataclass
class RunInfo:
    run_id: str
    run_created: dict[str, Any]
    started_at: str
    retry_epoch: int = 0  # accepted retries of the run (approvals are requested anew after a retry)
