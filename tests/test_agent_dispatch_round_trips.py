"""The NATS round trips of one agent dispatch (ckp.md §7.5, DESIGN §4): no read while the dispatcher's followed
views of ``lo_presence`` and ``lo_leases`` are current (the liveness and slot reads in one concurrent round
otherwise), one conditional write to take a slot (also over the delete marker of the slot's last release), one
delete to release it, which the step's answer does not wait for; the next dispatch on the resource never finds its
own released slot held."""

from __future__ import annotations

import asyncio
import json

import pytest

from ckp_core.subjects import lease_key
from tests.agent_server import AgentBehaviour, running_agent
from tests.test_agent_dispatch import harness

pytestmark = pytest.mark.integration


async def test_a_dispatch_sends_no_read_and_one_write_each_to_take_and_release(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, concurrency_limit=3)
        assert (await h.dispatcher.dispatch(h.request()))["agent"] == "agent"  # the slot now has a delete marker
        await h.dispatcher.settled()
        nc = h.dispatcher._nc
        assert nc is not None
        for _ in range(5):
            before = nc.stats["out_msgs"]
            assert (await h.dispatcher.dispatch(h.request()))["agent"] == "agent"
            await h.dispatcher.settled()
            # the conditional create, the delete (liveness and free slots come from the followed views)
            assert nc.stats["out_msgs"] - before == 1 + 1
        assert await h.leases() == {}


async def test_back_to_back_dispatches_on_one_slot_never_wait(nats_url: str) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, resource_key="printer", concurrency_limit=1)
        for _ in range(10):  # each starts while the previous release may still be on the wire
            assert (await h.dispatcher.dispatch(h.request()))["agent"] == "agent"
        assert [e for e in h.events if e.TYPE == "pool_saturated"] == []
        assert len(agent.behaviour.executions) == 10
        assert await h.leases() == {}


async def test_a_slot_taken_between_the_read_and_the_write_is_skipped(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=0.3)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("pair", agent.base_url, resource_key="pair", concurrency_limit=2)
        [candidate] = await h.dispatcher.candidates("web", "extract_text")
        assert [slot for slot, _ in candidate.free] == [0, 1]
        # another replica takes slot 0 after this one read it free
        await h.dispatcher.leases.create(lease_key("pair", 0), json.dumps({"holder": "elsewhere"}).encode())
        lease = await h.dispatcher.try_acquire(candidate, h.request())
        assert lease is not None
        assert lease.key == lease_key("pair", 1)
        # nothing left: the candidate's reading is stale for both slots now
        assert await h.dispatcher.try_acquire(candidate, h.request()) is None
        await h.dispatcher.release(lease)
        # a fresh read sees slot 1 free again (over its delete marker) and slot 0 held
        [candidate] = await h.dispatcher.candidates("web", "extract_text", fresh=True)
        assert [slot for slot, _ in candidate.free] == [1]
        assert (await h.dispatcher.try_acquire(candidate, h.request())) is not None


async def test_concurrent_dispatches_share_the_slots_without_a_double_take(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=0.2)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("pool", agent.base_url, resource_key="pool", concurrency_limit=2)
        results = await asyncio.gather(*(h.dispatcher.dispatch(h.request()) for _ in range(6)))
        assert [r["agent"] for r in results] == ["agent"] * 6
        spans = sorted((e["started"], e["ended"]) for e in behaviour.executions)
        for i, (started, _) in enumerate(spans):  # never more than 2 calls at once
            assert sum(1 for s, e in spans[:i] if e > started) <= 1
        assert await h.leases() == {}
