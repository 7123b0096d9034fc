"""Executes one run: the compiled IR runs in a LangGraph ``StateGraph`` checkpointed with the PostgreSQL saver
under ``thread_id = run_id``; the interpreter (:mod:`langorch_runtime.machine`) keeps the run's frames as state.

Nodes append run events as they go through a :class:`RunWriter`, the run's single writer: every append
carries the expected position of the run's last event, so a second replica working on the same run fails
instead of interleaving.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque
from collections.abc import Callable
from typing import Any, cast

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.runtime import Runtime
from langgraph.types import interrupt

from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, CheckpointSaved, EventData, EventEnvelope, make_event
from ckp_core.eventstore import AggregateHead, EventStore
from ckp_core.redaction import Redactor, bound_payload
from langorch_infra.cancel import stop_if_cancelled
from langorch_runtime.frames import RunState
from langorch_runtime.machine import Machine

log = logging.getLogger(__name__)


class RunWriter:
    """Appends a run's events in order, as the run's single writer.

    The interpreter emits with :meth:`emit_soon`: the event is built, redacted and numbered at once, and a
    background task appends the queued events one by one, each with its expected position, while the run goes on
    computing. :meth:`flush` waits until every queued event is stored; the run calls it before anything outside
    the run can see or depend on what it did — before an agent, tool or LLM call, an approval request or a child
    run, and before the command is acknowledged. A checkpoint (the end of a super-step) does not wait for the
    appends to begin: it is written while they go on and committed once they are done (:meth:`stored`, the run's
    checkpoint barrier). So no event is ever behind the state persisted after it, and an append that fails
    (another writer appended to the run) stops every later one and the checkpoint after it: the run's events never
    interleave with another writer's. :meth:`emit` appends and waits."""

    def __init__(self, store: EventStore, run_id: str, head: AggregateHead, redactor: Redactor,
                 actor: Actor, causation_id: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.seq = head.seq  # of the last event stored
        self.position = head.position
        self.numbered = head.seq  # of the last event queued
        self.redactor = redactor
        self.actor = actor
        self.causation_id = causation_id
        self.queue: deque[tuple[EventEnvelope, EventData, list[asyncio.Task[Any]]]] = deque()
        self.before: Callable[[], list[asyncio.Task[Any]]] = list  # writes an event must wait for (StepStore.pending)
        self.appender: asyncio.Task[None] | None = None
        self.failure: BaseException | None = None
        self.epoch = 0  # bumped by refresh(): events queued before it may have been dropped
        self.observer: Callable[[EventData, float], None] | None = None  # metrics, after each append

    async def refresh(self) -> None:
        """Re-read the run's head (another replica appended to it, e.g. ``run_cancel_requested``). Events still
        queued are appended first; one refused because of that other append is dropped with the rest."""
        await self._settled()
        self.queue.clear()
        self.failure = None
        self.epoch += 1
        head = await self.store.head("run", self.run_id)
        if head is not None:
            self.seq, self.position = head.seq, head.position
        self.numbered = self.seq

    async def emit(self, data: EventData) -> int:
        """Append one event (after those queued before it) and wait until it is stored."""
        seq = await self.emit_soon(data)
        await self.flush()
        return seq

    async def emit_soon(self, data: EventData) -> int:
        """Queue one event for appending; returns its sequence number in the run."""
        if self.failure is not None:
            raise self.failure
        envelope = make_event(data, aggregate_id=self.run_id, seq=self.numbered + 1, actor=self.actor,
                              causation_id=self.causation_id, correlation_id=self.run_id)
        envelope.data = bound_payload(self.redactor.redact(envelope.data))
        self.numbered += 1
        self.queue.append((envelope, data, self.before()))
        if self.appender is None or self.appender.done():
            self.appender = asyncio.create_task(self._append_queued(), name=f"append-{self.run_id}")
        return self.numbered

    async def flush(self) -> None:
        """Wait until every queued event (and every write it waits for) is stored; raises the failure of one.

        The run flushes before every effect outside it, so this is also where a frame whose cancellation a library
        dropped (Python 3.11's ``wait_for`` inside nats-py) stops instead of calling an agent."""
        stop_if_cancelled()
        await self._settled()
        if self.failure is not None:
            raise self.failure
        for write in self.before():
            await asyncio.shield(write)

    async def stored(self) -> None:
        """The barrier of the run's next checkpoint (:class:`~langorch_runtime.checkpoints.GroupCommitSaver`):
        ends once every event emitted until now, and every write it waits for, is stored; raises when one of
        them will not be (an append failed, or :meth:`refresh` dropped what was queued)."""
        through, epoch, writes = self.numbered, self.epoch, self.before()
        await self._settled()
        if self.failure is not None:
            raise self.failure
        if self.epoch != epoch or self.seq < through:
            raise ConcurrencyError(f"run {self.run_id}: events {self.seq + 1}..{through} were not stored")
        for write in writes:
            await asyncio.shield(write)

    async def _settled(self) -> None:
        # shielded: a frame canceled while it waits here (a parallel ``any`` loser) leaves the appends running
        while self.appender is not None and not self.appender.done():
            await asyncio.shield(asyncio.wait([self.appender]))

    async def _append_queued(self) -> None:
        while self.queue:
            envelope, data, before = self.queue[0]
            try:
                for write in before:
                    await write
                [position] = await self.store.append([envelope], expected_position=self.position)
            except BaseException as exc:  # any failure is kept for the next emit or flush, which raise it
                self.failure = exc
                self.queue.clear()
                if isinstance(exc, asyncio.CancelledError):
                    raise
                return
            self.queue.popleft()
            self.seq += 1
            self.position = position
            if self.observer is not None:
                try:
                    self.observer(data, time.time())
                except Exception:  # metrics never break a run
                    log.warning("metrics observer failed on %s", data.TYPE, exc_info=True)


class RunGraph:
    """The runs' compiled graph bound to one run's :class:`Machine`: ``ainvoke`` and ``astream`` pass it as the
    graph's context; everything else (``aget_state``, ``aupdate_state``, …) is the compiled graph's."""

    def __init__(self, graph: Any, machine: Machine) -> None:
        self.graph = graph
        self.machine = machine

    def ainvoke(self, value: Any, config: Any = None, **kwargs: Any) -> Any:
        return self.graph.ainvoke(value, config, context=self.machine, **kwargs)

    def astream(self, value: Any, config: Any = None, **kwargs: Any) -> Any:
        return self.graph.astream(value, config, context=self.machine, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.graph, name)


_COMPILED: weakref.WeakKeyDictionary[BaseCheckpointSaver[Any], Any] = weakref.WeakKeyDictionary()


def build_graph(machine: Machine, checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """The LangGraph graph of one run: the graph every run shares (compiled once per checkpointer, not per run)
    bound to the run's machine, which its nodes receive as ``runtime.context``."""
    compiled = _COMPILED.get(checkpointer)
    if compiled is None:
        compiled = _COMPILED[checkpointer] = compile_graph(checkpointer)
    return RunGraph(compiled, machine)


def compile_graph(checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """The LangGraph graph of every run, invoked with the run's :class:`Machine` as its context.

    ``advance`` executes the run up to its next persisted point (:meth:`Machine.advance`: one super-step under
    ``checkpoint_strategy: every_node``), and LangGraph persists the state after it. When a save was forced
    there (``is_checkpoint``, ``set_checkpoint``), ``saved`` emits ``checkpoint_saved`` with the id of the
    checkpoint just written. When no frame can run and waits are pending, ``suspend`` calls ``interrupt()`` —
    the run is durably suspended until a ``Command(resume=…)`` carrying ``{"wait_id": …}`` and the decision,
    callback or child outcome arrives. Run it with ``durability="sync"``, so a node starts only once the
    previous state is stored, and with a saver holding the run's barrier (:meth:`RunWriter.stored`), so that
    state is committed only once the events emitted before it are stored.
    """
    graph: StateGraph[RunState, Machine] = StateGraph(RunState, context_schema=Machine)

    async def advance(state: RunState, runtime: Runtime[Machine]) -> RunState:
        # a new state: ``state`` is left as it was. Its events are still being appended: the checkpoint LangGraph
        # writes now commits only once they are stored (the run's barrier, GroupCommitSaver)
        advanced = await runtime.context.advance(state)
        # only the channels that changed: each returned one is a write and a blob of the checkpoint
        return cast(RunState, {k: v for k, v in advanced.items() if k not in state or state[k] != v})  # type: ignore[literal-required]

    async def saved(state: RunState, runtime: Runtime[Machine]) -> RunState:
        thread = runtime.context.run.run_id  # the run's thread
        latest = await checkpointer.aget_tuple({"configurable": {"thread_id": thread, "checkpoint_ns": ""}})
        checkpoint_id = latest.checkpoint["id"] if latest is not None else None
        for save in state.get("saves") or []:
            await runtime.context.emit(CheckpointSaved(node_id=save.get("node_id"), frame=save.get("frame"),
                                                       reason=save["reason"], checkpoint_id=checkpoint_id))
        await runtime.context.settle()
        return {"saves": []}

    async def suspend(state: RunState, runtime: Runtime[Machine]) -> RunState:
        waiting = [{k: v for k, v in w.items() if k != "announced"} for w in state.get("waits", {}).values()]
        resolution = interrupt({"waits": waiting})
        return runtime.context.resolve(state, resolution if isinstance(resolution, dict) else {})

    async def route(state: RunState) -> str:  # async: LangGraph runs a synchronous route in a thread
        if state.get("saves"):
            return "saved"
        if state.get("outcome") is not None:
            return END
        if Machine.runnable(state):
            return "advance"
        if state.get("waits"):
            return "suspend"
        return END

    graph.add_node("advance", advance)
    graph.add_node("saved", saved)
    graph.add_node("suspend", suspend)
    graph.add_edge(START, "advance")
    graph.add_conditional_edges("advance", route, ["advance", "saved", "suspend", END])
    graph.add_conditional_edges("saved", route, ["advance", "saved", "suspend", END])
    graph.add_edge("suspend", "advance")
    return graph.compile(checkpointer=checkpointer)


_STATE_DEFAULTS: RunState = {
    "vars": {}, "frames": {}, "order": [], "waits": {}, "resolutions": {}, "outcome": None, "warned": [], "seq": 0,
    "recovery": None, "failure_point": None, "executed_ms": 0, "deadline_hit": None,
    "llm": {"prompt_tokens": 0, "completion_tokens": 0, "cost_usd": 0.0}, "affinity": {}, "saves": []}


async def retry_target(graph: Any, config: dict[str, Any]) -> Any | None:
    """The checkpoint a retry restarts from (ckp.md §7.12): the state just before the failing node started.

    Under ``every_node`` that is a checkpoint of the run's history (the failing node's frame at that node, not
    yet started; else the newest checkpoint outside the recovery path). Under the other strategies the state
    persisted at the failure point carries that image (:meth:`Machine.keep_failure_image`): it is written as
    the run's newest checkpoint, every channel set (nothing of the failed state leaks into it)."""
    current = await graph.aget_state(config)
    point = current.values.get("failure_point") or {}
    image = point.get("restore")
    if image is not None:
        restored = {**_STATE_DEFAULTS, **image}
        return await graph.aget_state(await graph.aupdate_state(current.config, restored, as_node="advance"))
    fallback = None
    async for past in graph.aget_state_history(config):  # newest first
        values = past.values
        if values.get("outcome") is not None or values.get("recovery") or not past.next:
            continue
        fallback = fallback or past
        frame = (values.get("frames") or {}).get(point.get("frame_id"))
        if frame is not None and frame.get("node") is None and frame.get("cursor") == point.get("node_id"):
            return past  # just before the failing node started: it runs again as a whole (§7.12)
    return fallback
