"""Concurrency slots (api.md §10.3) on a real NATS KV: the check of ``max_concurrent_runs`` and the taking of a slot
are one atomic step under concurrent fires, a fire's redelivery finds its own slot, a release frees it, and a
holder whose run ended (or never appeared) is freed when a fire finds the limit reached."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest
from nats.aio.client import Client as NATS

from ckp_core.events import Actor, EventEnvelope, RunCompleted, RunCreated, format_time, make_event
from ckp_core.ids import new_id
from ckp_core.subjects import LOCKS_BUCKET
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_topology
from langorch_triggers.slots import Slots, slots_key

pytestmark = pytest.mark.integration


@pytest.fixture
async def nc(module_nats_url: str) -> AsyncIterator[NATS]:
    client = await connect(module_nats_url, "test-trigger-slots")
    await ensure_topology(client.jetstream())
    yield client
    await client.close()


async def slots_of(nc: NATS, *, stale_after_s: float = 60.0, verify_after_s: float = 10.0) -> Slots:
    js = nc.jetstream()
    return Slots(js, await js.key_value(LOCKS_BUCKET), stale_after_s=stale_after_s, verify_after_s=verify_after_s)


async def test_twenty_concurrent_acquires_with_limit_three_grant_exactly_three(nc: NATS) -> None:
    slots, procedure = await slots_of(nc), f"slots_race_{new_id()}"
    runs = [new_id() for _ in range(20)]
    answers = await asyncio.gather(*(slots.acquire(procedure, run, 3) for run in runs))
    granted = [run for run, (ok, _) in zip(runs, answers, strict=True) if ok]
    assert len(granted) == 3
    assert all(active == 3 for ok, active in answers if not ok)
    assert set(await slots.held(procedure)) == set(granted)


async def test_a_redelivered_fire_finds_its_own_slot_and_a_release_frees_it(nc: NATS) -> None:
    slots, procedure = await slots_of(nc), f"slots_again_{new_id()}"
    first, second = new_id(), new_id()
    assert await slots.acquire(procedure, first, 1) == (True, 1)
    assert await slots.acquire(procedure, first, 1) == (True, 1)  # the same fire again
    assert await slots.acquire(procedure, second, 1) == (False, 1)
    assert await slots.release(procedure, first) == 0
    assert await slots.release(procedure, first) == 0  # a second release changes nothing
    assert await slots.acquire(procedure, second, 1) == (True, 1)


async def test_runs_of_any_origin_count_and_concurrent_releases_all_land(nc: NATS) -> None:
    slots, procedure = await slots_of(nc), f"slots_track_{new_id()}"
    runs = [new_id() for _ in range(10)]
    await asyncio.gather(*(slots.track(procedure, run) for run in runs))
    assert set(await slots.held(procedure)) == set(runs)
    assert await slots.acquire(procedure, new_id(), 10) == (False, 10)
    await asyncio.gather(*(slots.release(procedure, run) for run in runs[:7]))
    assert set(await slots.held(procedure)) == set(runs[7:])
    assert (await slots.acquire(procedure, new_id(), 10))[0]


async def test_at_the_limit_a_holder_whose_run_ended_or_never_appeared_is_freed(nc: NATS) -> None:
    """A lost release (the end seen before the creation, a fire that crashed before creating its run) does not
    hold the procedure at its limit for ever."""
    js = nc.jetstream()
    store = JetStreamEventStore(js)
    slots, procedure = await slots_of(nc, stale_after_s=60.0, verify_after_s=10.0), f"slots_heal_{new_id()}"
    ended, active, ghost, fresh = new_id(), new_id(), new_id(), new_id()
    actor = Actor.system("test")

    def created(run_id: str) -> EventEnvelope:
        return make_event(RunCreated(procedure_id=procedure, procedure_version="1.0.0", root_run_id=run_id),
                          aggregate_id=run_id, seq=1, actor=actor)

    await store.append([created(ended), make_event(RunCompleted(), aggregate_id=ended, seq=2, actor=actor)],
                       expected_position=0)
    await store.append([created(active)], expected_position=0)
    old = format_time(datetime.now(UTC) - timedelta(minutes=5))
    young = format_time(datetime.now(UTC))
    await slots.kv.create(slots_key(procedure), json.dumps({ended: old, active: old, ghost: old,
                                                            fresh: young}).encode())

    assert await slots.procedure_of(ended) == procedure
    assert await slots.acquire(procedure, new_id(), 4) == (True, 3)  # ended and ghost freed, this one added
    held = await slots.held(procedure)
    assert {active, fresh} <= set(held)
    assert not {ended, ghost} & set(held)
    # the young holder is not checked (its run may be on its way): the limit stays reached
    assert await slots.acquire(procedure, new_id(), 3) == (False, 3)
