"""Run ownership between runtime replicas (langorch_runtime.ownership): the runs of an owner gone from NATS are
released and their commands sent back at once by a live replica, while an owner that answers, or is only slow to,
keeps its runs."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import pytest
from nats.aio.client import Client as NATS
from nats.js.errors import KeyNotFoundError

from ckp_core.subjects import LOCKS_BUCKET
from langorch_infra.jetstream import connect, ensure_topology
from langorch_runtime.ownership import ASK_TIMEOUT_S, OWNER_SUBJECT, RunHeld, RunOwnership, owner_key

pytestmark = pytest.mark.integration

DEADLINE_S = 20.0


@asynccontextmanager
async def owners(nats_url: str, *names: str) -> AsyncIterator[list[tuple[NATS, RunOwnership]]]:
    out: list[tuple[NATS, RunOwnership]] = []
    try:
        for name in names:
            nc = await connect(nats_url, f"ownership-test-{name}")
            await ensure_topology(nc.jetstream())
            ownership = RunOwnership(nc, nc.jetstream(), name)
            await ownership.start()
            out.append((nc, ownership))
        yield out
    finally:
        for nc, ownership in out:
            await ownership.stop()
            await nc.close()


async def until(condition: object, what: str) -> None:
    deadline = time.monotonic() + DEADLINE_S
    while not condition():  # type: ignore[operator]
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.02)


async def test_the_runs_of_an_owner_gone_from_nats_are_released_and_their_commands_sent_back(nats_url: str) -> None:
    run_id = str(uuid.uuid4())
    async with owners(nats_url, "a", "b") as [(nc_a, a), (_, b)]:
        watcher = await connect(nats_url, "ownership-test-ack")
        try:
            ack = watcher.new_inbox()
            acks = await watcher.subscribe(ack)
            await watcher.flush()
            await a.acquire(run_id, ack)
            # and a command whose run a is taking right now (no key of its own yet): sent back as well
            taking = watcher.new_inbox()
            takings = await watcher.subscribe(taking)
            await watcher.flush()
            a.acquiring.add(taking)
            a._changed.set()
            await until(lambda: run_id in b.peers.get(a.owner_id, {}) and b.peer_acquiring.get(a.owner_id),
                        "b to learn what a holds")
            with pytest.raises(RunHeld):  # a answers that it holds the run
                await b.acquire(run_id)
            await nc_a.close()  # a SIGKILLed replica: its connection is gone, nobody answers for it
            nak = await acks.next_msg(timeout=DEADLINE_S)
            assert nak.data == b"-NAK"  # JetStream delivers the command again at once
            assert (await takings.next_msg(timeout=DEADLINE_S)).data == b"-NAK"
            assert a.owner_id in b.gone_owners
            assert b.taken_over == 1
            kv = await b.js.key_value(LOCKS_BUCKET)
            with pytest.raises(KeyNotFoundError):
                await kv.get(owner_key(run_id))
            await b.acquire(run_id)  # the command's next delivery takes the released key
            entry = await kv.get(owner_key(run_id))
            assert json.loads(entry.value or b"{}")["owner"] == b.owner_id
        finally:
            await watcher.close()


async def test_an_owner_that_answers_or_is_slow_to_keeps_its_runs(nats_url: str) -> None:
    run_id = str(uuid.uuid4())
    async with owners(nats_url, "a", "b") as [(nc_a, a), (_, b)]:
        await a.acquire(run_id, "$JS.ACK.unused")
        await until(lambda: run_id in b.peers.get(a.owner_id, {}), "b to learn what a holds")
        kv = await b.js.key_value(LOCKS_BUCKET)
        revision = (await kv.get(owner_key(run_id))).revision
        loop = asyncio.get_running_loop()

        b.silent_since[a.owner_id] = loop.time() - 60  # as if it had been silent for long: it answers now
        await b.check_owners()
        assert a.owner_id not in b.silent_since
        assert a.owner_id not in b.gone_owners

        # a alive but too slow to answer within the question's timeout: its run stays its own
        await a._subs[0].unsubscribe()

        async def slow(msg: object) -> None:
            await asyncio.sleep(ASK_TIMEOUT_S * 3)

        await nc_a.subscribe(f"{OWNER_SUBJECT}.{a.owner_id}", cb=slow)
        await nc_a.flush()
        b.silent_since[a.owner_id] = loop.time() - 60
        await b.check_owners()
        assert a.owner_id not in b.gone_owners
        assert b.taken_over == 0
        with pytest.raises(RunHeld):
            await b.acquire(run_id)
        assert (await kv.get(owner_key(run_id))).revision == revision
        await a.fence(run_id)  # still a's: no OwnershipLost
