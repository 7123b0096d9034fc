"""Run state as data (ckp.md §3.2, §7.3): frames, their cursors and the waits a run is suspended on.

The interpreter keeps every path it executes — the main path, loop iterations, parallel branches and the
recovery path — as a *frame* record inside the LangGraph state. Each super-step advances every runnable frame by
one node, and the state is checkpointed after it (``checkpoint_strategy: every_node``; the other strategies persist
fewer points, §7.3), so a run resumes exactly where it was (also inside loops and branches) after a crash or a
pause. Frames are plain JSON-able dicts so the checkpointer stores them as they are: the records below are
TypedDicts, types for the checker only.
"""

from __future__ import annotations

import copy
from typing import Any, Literal, NotRequired, TypedDict, TypeVar, cast

FrameKind = Literal["main", "iteration", "branch", "recovery"]
FrameStatus = Literal["running", "waiting", "paused", "done"]
EndStatus = Literal["completed", "failed", "canceled"]  # how a frame ended (``FrameResult.status``)
WaitKind = Literal["approval", "callback", "child_run"]
SaveReason = Literal["is_checkpoint", "set_checkpoint"]

APPROVALS_KEY = "\x00approval"  # approval records live in the namespace (so branch copies merge them) but can
# never be named by a CKP identifier.


class ErrorDict(TypedDict):
    """An error object (ckp.md §7.16) as the state keeps it: ``ErrorObject.model_dump(mode="json")`` (every field
    is present; the model allows extra keys, which come along). ``ErrorObject.model_validate`` reads it back."""

    code: str
    message: str
    retryable: bool
    node_id: str | None
    step_id: str | None
    frame: str | None
    attempt: int | None
    type: str | None
    error_code: str | None
    http_status: int | None
    details: dict[str, Any]
    cause: dict[str, Any] | None


class LoopContext(TypedDict):
    """An iteration frame's loop values (``Frame.loop``): the built-ins ``loop_index`` and ``loop_item``."""

    index: int
    item: Any


class FrameResult(TypedDict):
    """How a frame ended (``Frame.result``); ``error`` is None unless it failed."""

    status: EndStatus
    error: ErrorDict | None


class StepBudget(TypedDict):
    """The retry budget of one step instance (``StepData.retry_budgets``): the run retry ``epoch`` it counts for,
    the retry-policy retries used and each handler's retries used (handler index → used)."""

    epoch: int
    policy: int
    handlers: dict[str, int]


class StepData(TypedDict, total=False):
    """What the step runner keeps in the data of any node it runs steps of (a ``sequence``'s steps, the recovery
    steps of any node's handlers)."""

    idempotency_key: str  # the node's rendered ``idempotency_key`` (rendered once per visit)
    retry_budgets: dict[str, StepBudget]  # step identity → its retry budget


class SequenceData(StepData, total=False):
    """A ``sequence`` node's data."""

    index: int  # the step in progress


class ApprovalData(StepData, total=False):
    """A ``human_approval`` node's data."""

    wait_id: str  # the approval id, once asked


class SubflowData(StepData, total=False):
    """A ``subflow`` node's data, once its child run started."""

    child: str  # the child run's id
    version: str  # the procedure version it runs
    attempt: int  # 1, then one more per ``on_failure: retry``


class LoopError(TypedDict):
    """A failed iteration in a loop's ``errors_variable`` (``continue_on_error``)."""

    iteration: int
    error: ErrorDict


class LoopData(StepData, total=False):
    """A ``loop`` node's data between super-steps (set at its first execution of a visit)."""

    items: list[Any]  # the iterator's value
    n: int  # iterations to run (``max_iterations`` caps it)
    i: int  # the iteration in progress (or next)
    collected: list[Any]  # ``collect_variable`` values so far
    errors: list[LoopError]  # failed iterations (``continue_on_error``)
    child: str | None  # the frame id of the iteration in progress
    succeeded: int
    failed: int


class ParallelData(StepData, total=False):
    """A ``parallel`` node's data between super-steps (set at its first execution of a visit)."""

    snapshot: dict[str, Any]  # the variables when the node started: each branch's copy, the merge's base
    frames: dict[str, str]  # branch id → its frame id (started branches)
    queue: list[str]  # branch ids not started yet (``max_concurrency``)
    status: dict[str, EndStatus]  # branch id → how it ended (finished branches)
    errors: dict[str, ErrorDict | None]  # branch id → its error
    winner: str | None  # ``wait_strategy: any``: the first branch that completed


# What a node keeps between super-steps, by its kind (the other kinds keep at most the step runner's keys). The
# data does not say its kind (the node's IR payload does), so a node kind takes its own with a cast.
NodeData = SequenceData | ApprovalData | SubflowData | LoopData | ParallelData | StepData


class NodeState(TypedDict):
    """A frame's node in progress (``Frame.node``): entered at ``started`` (epoch seconds) on its ``visit``-th
    entry in the frame; ``data`` is what its node kind keeps between super-steps (a loop's iteration, a parallel
    node's branches, a sequence's step index, retry budgets, the wait it is paused on)."""

    id: str
    visit: int
    started: float
    data: NodeData
    sla_reported: NotRequired[bool]  # its SLA breach was reported (once per visit)


class Frame(TypedDict, total=False):
    id: str
    kind: FrameKind
    parent: str | None
    path: str  # the frame string's segments from main inward ("" for main), e.g. "each_sku[1]", "fanout/b1"
    stop_at: str | None
    cursor: str | None
    hops: int
    visits: dict[str, int]
    status: FrameStatus
    vars: dict[str, Any] | None  # branch frames: private copy of the variables; others: None (shared)
    error: ErrorDict | None  # the built-in ``error`` in this frame (fallback and recovery paths)
    loop: LoopContext | None  # iteration frames
    node: NodeState | None  # the node in progress
    result: FrameResult | None  # when done
    pending: list[str]  # wait ids this frame is paused on
    retries: dict[str, int]  # node-scope retry budgets used ("<node_id>#handler<i>", "<node_id>#validation:<id>")


class Wait(TypedDict):
    """Something a frame is paused on (``RunState.waits``, keyed by ``id``): an approval, the callback of an async
    workflow step (``id`` is its delegation id) or a child run (``id`` is its run id)."""

    kind: WaitKind
    id: str
    node_id: str
    step_id: str | None  # callbacks: the step's identity step id
    frame_id: str
    frame: str  # the node's frame string
    expires_at: str | None
    suspends_run: bool  # no other frame could run when it was added
    announced: NotRequired[bool]  # reported in a ``run_suspended``


class RunOutcome(TypedDict):
    """How the run ended (``RunState.outcome``): its ``run_completed`` / ``run_failed``."""

    status: Literal["completed", "failed"]
    outputs: dict[str, Any]
    error: NotRequired[ErrorDict | None]  # failed: the main path's error
    recovered_via: NotRequired[str | None]  # the recovery path ran: its ``on_failure`` node
    recovery_error: NotRequired[ErrorDict | None]  # the recovery path failed too: its error


class Recovery(TypedDict):
    """The recovery path (``global_config.on_failure``, §7.12) started at ``node`` for the main path's ``error``."""

    node: str
    error: ErrorDict | None


class FailurePoint(TypedDict):
    """The node a retry restarts (§7.12). ``restore``: under the strategies that do not persist every node, the
    state from just before it started (a retry restores it)."""

    node_id: str
    frame_id: str
    restore: NotRequired[RunState]


class LlmCounters(TypedDict):
    """The run's LLM usage (§7.13), against ``max_cost_usd``."""

    prompt_tokens: int
    completion_tokens: int
    cost_usd: float


class ForcedSave(TypedDict):
    """A save asked by a super-step (§7.3): ``checkpoint_saved`` is emitted for it once the state is persisted."""

    reason: SaveReason
    node_id: str
    frame: str


class RunState(TypedDict, total=False):
    """The persisted state of a run (LangGraph channels)."""

    vars: dict[str, Any]
    frames: dict[str, Frame]
    order: list[str]
    waits: dict[str, Wait]  # wait id → the wait
    resolutions: dict[str, Any]  # wait id → resume payload
    outcome: RunOutcome | None
    warned: list[str]
    seq: int  # frame id counter
    recovery: Recovery | None  # once the recovery path started
    failure_point: FailurePoint | None
    executed_ms: int  # executing time used against the run deadline (§7.11), summed over resumes
    deadline_hit: int | None  # executed_ms when the deadline passed (the recovery path's grace starts there)
    llm: LlmCounters  # the run's LLM counters
    affinity: dict[str, str]  # channel → the agent this run used there (preferred while healthy and free)
    saves: list[ForcedSave]  # forced saves asked by the last super-step


def new_frame(state: RunState, kind: FrameKind, parent: Frame | None, path: str, cursor: str | None,
              stop_at: str | None, vars_: dict[str, Any] | None = None,
              loop: LoopContext | None = None, error: ErrorDict | None = None) -> Frame:
    seq = state.get("seq", 0) + 1
    state["seq"] = seq
    frame: Frame = {
        "id": f"f{seq}", "kind": kind, "parent": parent["id"] if parent else None, "path": path,
        "stop_at": stop_at, "cursor": cursor, "hops": 0, "visits": {}, "status": "running", "vars": vars_,
        "error": error if error is not None else (parent.get("error") if parent else None), "loop": loop,
        "node": None, "result": None, "pending": [],
    }
    state.setdefault("frames", {})[frame["id"]] = frame
    state.setdefault("order", []).append(frame["id"])
    return frame


def frame_string(frame: Frame, node_id: str | None = None, visit: int = 1) -> str:
    """The ``F`` of ckp.md §7.4 for a node of this frame: frame segments, then ``#<visit>`` on revisits."""
    out = frame.get("path", "")
    if node_id is not None and visit > 1:
        out += f"#{visit}"
    return out or "-"


def vars_of(state: RunState, frame: Frame) -> dict[str, Any]:
    """The namespace a frame reads and writes: its own copy (branches) or the nearest ancestor's."""
    frames = state["frames"]
    current: Frame | None = frame
    while current is not None:
        own = current.get("vars")
        if own is not None:
            return own
        parent = current.get("parent")
        current = frames.get(parent) if parent else None
    return state.setdefault("vars", {})


def loop_context(state: RunState, frame: Frame) -> LoopContext | None:
    """The innermost enclosing loop iteration (``loop_index``/``loop_item``)."""
    frames = state["frames"]
    current: Frame | None = frame
    while current is not None:
        if current.get("loop") is not None:
            return current["loop"]
        parent = current.get("parent")
        current = frames.get(parent) if parent else None
    return None


def children_of(state: RunState, frame: Frame) -> list[Frame]:
    return [state["frames"][fid] for fid in state.get("order", []) if state["frames"][fid].get("parent") ==
            frame["id"]]


def descendants(state: RunState, frame: Frame) -> list[Frame]:
    out: list[Frame] = []
    for child in children_of(state, frame):
        out.append(child)
        out.extend(descendants(state, child))
    return out


T = TypeVar("T")
_ATOMS = (str, int, float, bool, type(None))


def tree_copy(value: T) -> T:
    """A deep copy of a run's state (dicts and lists of JSON values), built directly instead of by
    ``copy.deepcopy``, which keeps a memo of every object and dispatches by type for each (about a fifth of a
    super-step's own time). Anything else in the tree is copied by ``copy.deepcopy``. Two places holding one object
    get copies of their own: the state has no such sharing that outlives a checkpoint anyway."""
    kind = type(value)
    if kind is dict:
        return cast(T, {k: tree_copy(v) for k, v in cast(dict[Any, Any], value).items()})
    if kind is list:
        return cast(T, [tree_copy(v) for v in cast(list[Any], value)])
    if kind in _ATOMS:
        return value
    return copy.deepcopy(value)


def json_equal(a: Any, b: Any) -> bool:
    """Deep equality of JSON values (§3.8 merge deltas): booleans never equal numbers (Python's ``True == 1``
    does), numbers compare by value (``2 == 2.0``), objects by keys and lists by position."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(v, b[k]) for k, v in a.items())
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and bool(a == b)
