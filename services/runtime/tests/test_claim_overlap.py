"""A dispatched step's ``started`` record (the claim, ckp.md §7.4) is written while the agent is chosen, not before:
it is stored before ``step_started`` is emitted and before the agent is called, and a claim that fails stops the
step before any call."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from ckp_core.events import EventData
from langorch_runtime.machine import Dispatcher, DispatchRequest
from langorch_runtime.steps import MemoryStepStore, StepRecord
from runtime_harness import doc, run_doc

pytestmark = pytest.mark.unit


class SlowClaims(MemoryStepStore):
    """A step store whose ``started`` records are stored only once ``release`` is set."""

    def __init__(self) -> None:
        super().__init__("run-1")
        self.release = asyncio.Event()
        self.claim_begun = asyncio.Event()
        self.fail_with: Exception | None = None

    async def put(self, identity: str, record: StepRecord) -> None:
        if record.status == "started":
            self.claim_begun.set()
            await self.release.wait()
            if self.fail_with is not None:
                raise self.fail_with
        await super().put(identity, record)


class ChoosingAgent(Dispatcher):
    """Announces the agent it chose, as the real dispatcher does; notes what was stored when it chose and called."""

    announces_agent = True

    def __init__(self, store: SlowClaims, events: list[str]) -> None:
        self.store = store
        self.events = events
        self.claimed_while_choosing: bool | None = None
        self.claimed_at_call: bool | None = None
        self.started_before_call: bool | None = None
        self.calls = 0

    def claimed(self) -> bool:
        return any(r.status == "started" for r in self.store.records.values())

    async def dispatch(self, request: DispatchRequest) -> Any:
        await self.store.claim_begun.wait()
        self.claimed_while_choosing = self.claimed()  # the lease is taken while the claim is being written
        self.store.release.set()
        assert request.on_selected is not None
        await request.on_selected("agent-1", "agent")
        self.claimed_at_call = self.claimed()
        self.started_before_call = "step_started" in self.events
        self.calls += 1
        return {"ok": True}


def one_agent_step() -> dict[str, Any]:
    return doc({"a": {"type": "sequence", "agent": "API", "next_node": "z", "steps": [
        {"step_id": "s", "action": "fetch", "output_variable": "r"}]},
        "z": {"type": "terminate", "outputs": {"r": "{{r}}"}}})


async def test_the_claim_is_written_while_the_agent_is_chosen_and_stored_before_the_call() -> None:
    store, seen = SlowClaims(), []
    agent = ChoosingAgent(store, seen)

    async def appending(event: EventData) -> None:
        seen.append(event.TYPE)

    # bounded: a claim awaited before the agent is chosen would wait for ever for the release the choosing gives
    run = await asyncio.wait_for(run_doc(one_agent_step(), dispatcher=agent, appending=appending, steps=store), 10)
    assert run.outcome is not None
    assert run.outcome["status"] == "completed"
    assert agent.claimed_while_choosing is False  # overlapped with choosing the agent
    assert agent.claimed_at_call is True
    assert agent.started_before_call is True
    assert agent.calls == 1
    assert [r.status for r in store.records.values()] == ["completed"]


async def test_a_claim_that_fails_stops_the_step_before_the_agent_is_called() -> None:
    store, seen = SlowClaims(), []
    store.fail_with = RuntimeError("the step store is gone")
    agent = ChoosingAgent(store, seen)

    async def appending(event: EventData) -> None:
        seen.append(event.TYPE)

    with pytest.raises(RuntimeError, match="the step store is gone"):
        await asyncio.wait_for(run_doc(one_agent_step(), dispatcher=agent, appending=appending, steps=store), 10)
    assert agent.calls == 0
    assert "node_started" in seen
    assert "step_started" not in seen
