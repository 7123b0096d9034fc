"""One run's interpreter context: its IR, its ports, and what every layer above uses — the execution mode, template
scopes and rendering (ckp.md §2.4, §5), forced saves (§7.3), webhooks (§4.3, §4.10) and the frame tree with the
cancellation of frames ended by another one (§3.8 step 3, §3.15).

:class:`RunContext` holds the fields a :class:`~langorch_runtime.machine.Machine` is built with; the step runner,
the node lifecycle and the scheduler extend it layer by layer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ckp_core.events import ErrorObject, StepErrorNotification, TemplateWarning, format_time
from ckp_core.expressions import ExpressionError, MappingScope, evaluate
from ckp_core.ir import ExpressionIR, NodeIR, ProcedureIR, TemplateIR
from ckp_core.templates import render, render_text
from langorch_runtime.frames import (
    APPROVALS_KEY,
    Frame,
    RunState,
    SaveReason,
    descendants,
    json_equal,
    loop_context,
    vars_of,
)
from langorch_runtime.machine.outcomes import NodeFailure
from langorch_runtime.machine.policies import RECOVERY_GRACE_MS
from langorch_runtime.machine.ports import (
    ApprovalRequest,
    ArtifactStore,
    CallbackConfig,
    ChildRuns,
    Dispatcher,
    Emit,
    LanguageModel,
    Limiter,
    RunInfo,
    SecretsAccess,
    StepRecords,
    WebhookPoster,
)


async def _settled() -> None:
    """The default of ``RunContext.settle``: events emitted through a plain callable are stored already."""


@dataclass
class RunContext:
    """Executes the frames of one run against its IR (the fields of :class:`Machine`)."""

    ir: ProcedureIR
    run: RunInfo
    emit: Emit
    steps: StepRecords
    # waits until every event emitted so far is stored (RunWriter.flush): called before a checkpoint and before any
    # effect outside the run (an agent, tool or LLM call, an approval request, a child run)
    settle: Callable[[], Awaitable[None]] = _settled
    dispatcher: Dispatcher = field(default_factory=Dispatcher)
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep
    on_approval: ApprovalRequest | None = None  # publishes lo.cmd.approval.request
    callbacks: CallbackConfig | None = None
    children: ChildRuns | None = None
    secrets: SecretsAccess | None = None
    limiter: Limiter | None = None
    llm: LanguageModel | None = None  # langorch_runtime.llm.LlmClient
    artifacts: ArtifactStore | None = None
    affinity: dict[str, str] = field(default_factory=dict)  # channel → agent, mirrored into the run state
    on_sensitive: Callable[[set[str], set[str]], None] | None = None  # (variable names, values) to redact
    webhooks: WebhookPoster | None = None  # the server's notification and alert webhooks (scheduled POSTs)
    recovery_grace_ms: int = RECOVERY_GRACE_MS  # LANGORCH_RECOVERY_GRACE_S: the recovery path's time past the deadline
    _in_flight: dict[str, asyncio.Task[None]] = field(default_factory=dict, init=False, repr=False)
    _woken: set[str] = field(default_factory=set, init=False, repr=False)  # frames a child ended in while running
    _secrets_handed: set[str] = field(default_factory=set, init=False, repr=False)  # values and grants (§7.15)
    # frame id → (the frame owning its namespace, the variables as the node in progress found them: a shallow copy,
    # in memory only), so node_completed carries what the node changed that no step_completed carried
    _found_vars: dict[str, tuple[str, dict[str, Any]]] = field(default_factory=dict, init=False, repr=False)

    @property
    def root_run_id(self) -> str:
        """The root of this run's tree (itself unless it is a child run): owner of the artifacts it stores."""
        return str(self.run.run_created.get("root_run_id") or self.run.run_id)

    # -- execution mode (§7.9) and webhooks (§4.3 notify, §4.10 notify_on_error) -------------------------------
    def rehearsal(self) -> bool:
        """A dry run or a run under mocks: nothing is posted to the webhooks."""
        return self.dry_run() or self.ir.global_config.mock_external_calls

    def dry_run(self) -> bool:
        """§7.9: the document's mode, or the run's own (a child run of a dry run inherits it, §3.9)."""
        return self.ir.global_config.execution_mode == "dry_run" or \
            self.run.run_created.get("execution_mode") == "dry_run"

    def notifier(self) -> Callable[[dict[str, Any]], Awaitable[None]] | None:
        """The ``notify`` operation's webhook: schedules the POST and returns at once."""
        webhooks = self.webhooks
        if webhooks is None or self.rehearsal():
            return None

        async def post(payload: dict[str, Any]) -> None:
            webhooks.post("notify", payload)

        return post

    async def alert(self, event: StepErrorNotification) -> None:
        """Emit ``step_error_notification`` and post it to the alert webhook (best effort)."""
        await self.emit(event)
        if self.webhooks is not None and not self.rehearsal():
            self.webhooks.post("alert", event.model_dump(mode="json"))

    # -- scopes and templates -------------------------------------------------------------------------------
    def builtins(self, state: RunState, frame: Frame, node_id: str | None, step_id: str | None,
                 user_vars: dict[str, Any]) -> dict[str, Any]:
        """The built-in names (§2.4); ``user_vars`` is the namespace without engine-only keys (``vars``)."""
        now = datetime.now(UTC)
        rc = self.run.run_created
        namespace = vars_of(state, frame)
        loop = loop_context(state, frame)
        return {
            "run_id": self.run.run_id, "root_run_id": rc.get("root_run_id") or self.run.run_id,
            "parent_run_id": rc.get("parent_run_id"), "procedure_id": self.ir.procedure_id,
            "procedure_version": self.ir.version, "trigger_type": rc.get("trigger_type", "api"),
            "triggered_by": rc.get("triggered_by"), "node_id": node_id, "step_id": step_id,
            "loop_index": loop["index"] if loop else None, "loop_item": loop["item"] if loop else None,
            "error": frame.get("error"), "approval": dict(namespace.get(APPROVALS_KEY, {})),
            "now": format_time(now), "today": now.date().isoformat(), "run_started_at": self.run.started_at,
            "vars": user_vars,
        }

    def scope(self, state: RunState, frame: Frame, node_id: str | None, step_id: str | None = None,
              locals_: Mapping[str, Any] | None = None) -> MappingScope:
        namespace = {k: v for k, v in vars_of(state, frame).items() if k != APPROVALS_KEY}
        layers: list[Mapping[str, Any]] = [locals_] if locals_ else []
        return MappingScope(*layers, namespace, self.builtins(state, frame, node_id, step_id, namespace))

    def warnings(self, state: RunState, node_id: str, step_id: str | None, base: str) -> Warnings:
        return Warnings(state.setdefault("warned", []), node_id, step_id, base)

    async def render(self, tpl: TemplateIR, state: RunState, frame: Frame, node_id: str, step_id: str | None,
                     base: str, text: bool = False, locals_: Mapping[str, Any] | None = None) -> Any:
        warnings = self.warnings(state, node_id, step_id, base)
        try:
            scope = self.scope(state, frame, node_id, step_id, locals_)
            value = render_text(tpl.compiled, scope, warnings) if text else render(tpl.compiled, scope, warnings)
        except ExpressionError as exc:
            await warnings.flush(self.emit)
            raise NodeFailure(expression_error(exc, node_id, step_id)) from exc
        await warnings.flush(self.emit)
        return value

    async def evaluate(self, expr: ExpressionIR, state: RunState, frame: Frame, node_id: str, base: str,
                       step_id: str | None = None) -> Any:
        warnings = self.warnings(state, node_id, step_id, base)
        try:
            value = evaluate(expr.compiled, self.scope(state, frame, node_id, step_id),
                             lambda v, r: warnings(v, r))
        except ExpressionError as exc:
            await warnings.flush(self.emit)
            raise NodeFailure(expression_error(exc, node_id, step_id)) from exc
        await warnings.flush(self.emit)
        return value

    # -- variables written, for step_completed and node_completed -------------------------------------------------
    @staticmethod
    def vars_owner(state: RunState, frame: Frame) -> str:
        """The frame whose namespace ``frame`` uses (its own, or the nearest ancestor's with one; ``""``: the
        run's): frames with the same owner share their variables."""
        current: Frame | None = frame
        while current is not None:
            if current.get("vars") is not None:
                return str(current["id"])
            parent = current.get("parent")
            current = state["frames"].get(parent) if parent else None
        return ""

    def note_vars(self, state: RunState, frame: Frame) -> None:
        """Remember the frame's variables as the node in progress finds them (unless already remembered: a node
        continued in this process keeps the copy taken when it began)."""
        if frame["id"] not in self._found_vars:
            self._found_vars[frame["id"]] = (self.vars_owner(state, frame), dict(vars_of(state, frame)))

    def reported(self, owner: str, written: Mapping[str, Any]) -> None:
        """Variables an event just carried: no node in progress over the same namespace reports them again (a
        loop node does not repeat what the nodes of its iterations reported)."""
        for shared, found in self._found_vars.values():
            if shared == owner:
                found.update(written)

    def step_vars(self, state: RunState, frame: Frame, writes: Mapping[str, Any]) -> dict[str, Any]:
        """The top-level variables a step's ``writes`` changed, with their values now."""
        namespace = vars_of(state, frame)
        names = {path.split(".", 1)[0] for path in writes}
        written = {name: namespace[name] for name in names if name in namespace}
        self.reported(self.vars_owner(state, frame), written)
        return written

    def node_vars(self, state: RunState, frame: Frame) -> dict[str, Any]:
        """The variables the node ending now changed besides what its steps and inner nodes reported: a value
        that is neither the object the node found nor equal to it (the state is copied between super-steps, and a
        parallel merge copies every variable). Forgets the copy."""
        noted = self._found_vars.pop(frame["id"], None)
        if noted is None:
            return {}
        owner, found = noted
        changed = {name: value for name, value in vars_of(state, frame).items()
                   if name != APPROVALS_KEY and (name not in found or (found[name] is not value
                                                                        and not json_equal(found[name], value)))}
        self.reported(owner, changed)
        return changed

    # -- forced saves (§7.3) ------------------------------------------------------------------------------------
    def save(self, state: RunState, reason: SaveReason, node_id: str, fs: str) -> None:
        """Ask for a save when the super-step ends (``is_checkpoint``, ``set_checkpoint``; none under
        ``disabled``): the graph persists the state, then emits ``checkpoint_saved`` with the saved id."""
        if self.ir.global_config.checkpoint_strategy != "disabled":
            state.setdefault("saves", []).append({"reason": reason, "node_id": node_id, "frame": fs})

    # -- the frame tree and frames ended by another one ------------------------------------------------------------
    @staticmethod
    def runnable(state: RunState) -> list[Frame]:
        return [f for f in (state["frames"][fid] for fid in state.get("order", [])) if f.get("status") == "running"]

    def ancestors(self, state: RunState, frame: Frame) -> list[Frame]:
        out: list[Frame] = []
        parent = frame.get("parent")
        while parent is not None:
            f = state["frames"][parent]
            out.append(f)
            parent = f.get("parent")
        return out

    def cancel_frames(self, state: RunState, frames: list[Frame]) -> None:
        for f in frames:
            for d in [f, *descendants(state, f)]:
                if d.get("status") != "done":
                    d["status"] = "done"
                    d["result"] = {"status": "canceled", "error": None}
                    for wait_id in d.get("pending", []):
                        state.get("waits", {}).pop(wait_id, None)
                    self.abort_frame(d["id"])

    def abort_frame(self, frame_id: str) -> None:
        """Cancel the node in progress of a frame another frame just ended (§3.8 step 3, §3.15): its in-flight
        external call is aborted and, like one cut off by a run cancel (§7.10), stays ``started`` in the step
        store. Synchronous, so a canceled frame cannot record anything more. The scheduler registers the node
        tasks of a super-step in ``_in_flight``."""
        task = self._in_flight.get(frame_id)
        if task is not None and task is not asyncio.current_task() and not task.done():
            task.cancel()


class Warnings:
    """Collects template warnings so each (variable, location) is emitted once per run."""

    def __init__(self, warned: list[str], node_id: str, step_id: str | None, base: str) -> None:
        self.warned = warned
        self.pending: list[TemplateWarning] = []
        self.node_id = node_id
        self.step_id = step_id
        self.base = base

    def __call__(self, variable: str, reason: str, path: str = "") -> None:
        field_path = self.base + path
        key = f"{variable}|{self.node_id}|{self.step_id}|{field_path}"
        if key in self.warned:
            return
        self.warned.append(key)
        self.pending.append(TemplateWarning(variable=variable, reason=reason, location={
            "node_id": self.node_id, "step_id": self.step_id, "field": field_path}))

    async def flush(self, emit: Emit) -> None:
        for w in self.pending:
            await emit(w)
        self.pending.clear()


def expression_error(exc: ExpressionError, node_id: str, step_id: str | None) -> ErrorObject:
    return ErrorObject(code="expression_error", message=str(exc), node_id=node_id, step_id=step_id,
                       details=exc.details())


def path_in_node(node: NodeIR, item: object) -> str | None:
    """The JSON path of a step, validation, check or recovery step inside its node: ``location.field`` of a
    ``template_warning`` is the template's JSON path in the node (ckp.md §5.1), so ``/steps/0/body``, not the id."""
    for name in ("steps", "validations", "checks"):
        for i, candidate in enumerate(getattr(node.payload, name, None) or []):
            if candidate is item:
                return f"/{name}/{i}"
    for handler in node.error_handlers:
        for i, candidate in enumerate(handler.recovery_steps):
            if candidate is item:
                return f"/error_handlers/{handler.index}/recovery_steps/{i}"
    return None


def collector(into: list[tuple[str, str]]) -> Callable[[str, str], None]:
    def collect(variable: str, reason: str) -> None:
        into.append((variable, reason))

    return collect


def join(path: str, segment: str) -> str:
    return f"{path}/{segment}" if path else segment


def compact_json(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)
