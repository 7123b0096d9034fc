"""Run state as data (ckp.md §3.2, §7.3): frames, their cursors and the waits a run is suspended on.

The interpreter keeps every path it executes — the main path, loop iterations, parallel branches and the
recovery path — as a *frame* record inside the LangGraph state. Each super-step advances every runnable frame by
one node, and the state is checkpointed after it (``checkpoint_strategy: every_node``; the other strategies persist
fewer points, §7.3), so a run resumes exactly where it was (also inside loops and branches) after a crash or a
pause. Frames are plain JSON-able dicts so the checkpointer stores them as they are.
"""

from __future__ import annotations

from typing import Any, Literal, NotRequired, TypedDict

FrameKind = Literal["main", "iteration", "branch", "recovery"]
FrameStatus = Literal["running", "waiting", "paused", "done"]

APPROVALS_KEY = "\x00approval"  # approval records live in the namespace (so branch copies merge them) but can
# never be named by a CKP identifier.


class NodeState(TypedDict):
    """A frame's node in progress (``Frame.node``): entered at ``started`` (epoch seconds) on its ``visit``-th
    entry in the frame; ``data`` is what its node kind keeps between super-steps (a loop's iteration, a parallel
    node's branches, a sequence's step index, retry budgets, the wait it is paused on)."""

    id: str
    visit: int
    started: float
    data: dict[str, Any]
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
    error: dict[str, Any] | None  # the built-in ``error`` in this frame (fallback and recovery paths)
    loop: dict[str, Any] | None  # iteration frames: {"index", "item"}
    node: NodeState | None  # the node in progress
    result: dict[str, Any] | None  # when done: {"status": completed|failed|canceled, "error"}
    pending: list[str]  # wait ids this frame is paused on
    retries: dict[str, int]  # node-scope retry budgets used ("<node_id>#handler<i>", "<node_id>#validation:<id>")


class RunState(TypedDict, total=False):
    """The persisted state of a run (LangGraph channels)."""

    vars: dict[str, Any]
    frames: dict[str, Frame]
    order: list[str]
    waits: dict[str, dict[str, Any]]  # wait id → {kind, node_id, step_id, frame_id, ...}
    resolutions: dict[str, Any]  # wait id → resume payload
    outcome: dict[str, Any] | None
    warned: list[str]
    seq: int  # frame id counter
    recovery: dict[str, Any] | None  # {"node", "error"} once the recovery path started
    failure_point: dict[str, Any] | None
    executed_ms: int  # executing time used against the run deadline (§7.11), summed over resumes
    deadline_hit: int | None  # executed_ms when the deadline passed (the recovery path's grace starts there)
    llm: dict[str, Any]  # the run's LLM counters: prompt_tokens, completion_tokens, cost_usd
    affinity: dict[str, str]  # channel → the agent this run used there (preferred while healthy and free)
    saves: list[dict[str, Any]]  # forced saves asked by the last super-step: {"reason", "node_id", "frame"}


def new_frame(state: RunState, kind: FrameKind, parent: Frame | None, path: str, cursor: str | None,
              stop_at: str | None, vars_: dict[str, Any] | None = None,
              loop: dict[str, Any] | None = None, error: dict[str, Any] | None = None) -> Frame:
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


def loop_context(state: RunState, frame: Frame) -> dict[str, Any] | None:
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
