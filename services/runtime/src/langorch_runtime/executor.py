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
from collections.abc import Callable
from typing import Any

from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.types import interrupt

from ckp_core.events import Actor, EventData, make_event
from ckp_core.eventstore import AggregateHead, EventStore
from ckp_core.redaction import Redactor, bound_payload
from langorch_runtime.frames import RunState
from langorch_runtime.machine import Machine

log = logging.getLogger(__name__)


class RunWriter:
    """Appends a run's events in order, as the run's single writer."""

    def __init__(self, store: EventStore, run_id: str, head: AggregateHead, redactor: Redactor,
                 actor: Actor, causation_id: str | None) -> None:
        self.store = store
        self.run_id = run_id
        self.seq = head.seq
        self.position = head.position
        self.redactor = redactor
        self.actor = actor
        self.causation_id = causation_id
        self.lock = asyncio.Lock()
        self.observer: Callable[[EventData, float], None] | None = None  # metrics, after each append

    async def refresh(self) -> None:
        """Re-read the run's head (another replica appended to it, e.g. ``run_cancel_requested``)."""
        head = await self.store.head("run", self.run_id)
        if head is not None:
            self.seq, self.position = head.seq, head.position

    async def emit(self, data: EventData) -> int:
        async with self.lock:
            return await self._emit(data)

    async def _emit(self, data: EventData) -> int:
        envelope = make_event(data, aggregate_id=self.run_id, seq=self.seq + 1, actor=self.actor,
                              causation_id=self.causation_id, correlation_id=self.run_id)
        envelope.data = bound_payload(self.redactor.redact(envelope.data))
        [position] = await self.store.append([envelope], expected_position=self.position)
        self.seq += 1
        self.position = position
        if self.observer is not None:
            try:
                self.observer(data, time.time())
            except Exception:  # metrics never break a run
                log.warning("metrics observer failed on %s", data.TYPE, exc_info=True)
        return position


def build_graph(machine: Machine, checkpointer: BaseCheckpointSaver[Any]) -> Any:
    """The LangGraph graph of one run.

    ``advance`` executes one node of every runnable frame per super-step (checkpointed after each); when no
    frame can run and waits are pending, ``suspend`` calls ``interrupt()`` — the run is durably suspended until
    a ``Command(resume=…)`` carrying ``{"wait_id": …}`` and the decision, callback or child outcome arrives.
    """
    graph: StateGraph[RunState] = StateGraph(RunState)

    async def advance(state: RunState) -> RunState:
        return await machine.advance(state)

    async def suspend(state: RunState) -> RunState:
        waiting = [{k: v for k, v in w.items() if k != "announced"} for w in state.get("waits", {}).values()]
        resolution = interrupt({"waits": waiting})
        return machine.resolve(state, resolution if isinstance(resolution, dict) else {})

    def route(state: RunState) -> str:
        if state.get("outcome") is not None:
            return END
        if machine.runnable(state):
            return "advance"
        if state.get("waits"):
            return "suspend"
        return END

    graph.add_node("advance", advance)
    graph.add_node("suspend", suspend)
    graph.add_edge(START, "advance")
    graph.add_conditional_edges("advance", route, ["advance", "suspend", END])
    graph.add_edge("suspend", "advance")
    return graph.compile(checkpointer=checkpointer)
