"""Agent dispatch from the dispatcher's followed views of KV ``lo_presence`` and ``lo_leases`` (ckp.md §7.5): no
read while the views are current, a stale view never double-books a slot (the lease write stays conditional on the
revision), a presence change made elsewhere is honoured once the view has it, and this replica's own release is
in its view at once."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.js.kv import KeyValue

from ckp_core.subjects import LEASES_BUCKET, PRESENCE_BUCKET, agent_presence_key, agent_probe_key, lease_key
from langorch_infra.embedded import EmbeddedNats
from langorch_infra.jetstream import ensure_topology
from langorch_infra.kv import put_with_ttl
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.agent_dispatch import AgentDispatcher
from langorch_runtime.dispatch_view import KvView, ttl_seconds
from tests.agent_server import AgentBehaviour, running_agent
from tests.helpers import wait_until
from tests.test_agent_dispatch import Harness, harness

pytestmark = pytest.mark.integration


class Reads:
    """Counts the KV reads (``get``) a dispatcher makes of ``lo_presence`` and ``lo_leases``."""

    def __init__(self, dispatcher: AgentDispatcher, monkeypatch: pytest.MonkeyPatch) -> None:
        self.keys: list[str] = []
        for kv in (dispatcher.presence, dispatcher.leases):
            monkeypatch.setattr(kv, "get", self._counting(kv, kv.get))

    def _counting(self, kv: KeyValue, get: Any) -> Any:
        async def counted(key: str, *args: Any, **kwargs: Any) -> Any:
            self.keys.append(key)
            return await get(key, *args, **kwargs)
        return counted


async def frozen(view: KvView | None) -> KvView:
    """Stop a view's watch but keep it current: it misses whatever happens from now on (a view that lags)."""
    assert view is not None
    await view.stop()
    view.current = True
    return view


@contextlib.asynccontextmanager
async def other_dispatcher(h: Harness, instance: str) -> AsyncIterator[AgentDispatcher]:
    """Another runtime replica's dispatcher on the same NATS, its registry caught up with the first's."""
    other = AgentDispatcher(RuntimeSettings(nats_url=h.dispatcher.settings.nats_url, instance_id=instance))
    await other.start()
    try:
        yield other
    finally:
        await other.stop()


def pool_saturated(h: Harness) -> list[Any]:
    return [e for e in h.events if e.TYPE == "pool_saturated"]


async def test_a_dispatch_reads_nothing_while_the_views_are_current(nats_url: str,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, concurrency_limit=3)
        d = h.dispatcher
        assert d.presence_view is not None
        assert d.presence_view.current
        assert d.leases_view is not None
        assert d.leases_view.current
        reads = Reads(d, monkeypatch)
        nc = d._nc
        assert nc is not None
        for _ in range(5):
            before = nc.stats["out_msgs"]
            assert (await d.dispatch(h.request()))["agent"] == "agent"
            await d.settled()
            assert nc.stats["out_msgs"] - before == 2  # the conditional create and the delete, nothing read
        assert reads.keys == []
        assert await h.leases() == {}


async def test_a_slot_another_replica_took_unseen_is_not_double_booked_the_next_slot_is_used(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    behaviour = AgentBehaviour(execute_delay_s=2.0)  # the other replica's call holds slot 0 throughout
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("pair", agent.base_url, resource_key="pair", concurrency_limit=2)
        view = await frozen(h.dispatcher.leases_view)  # it will not see the other replica's lease
        async with other_dispatcher(h, "runtime-other") as other:
            theirs = asyncio.create_task(other.dispatch(h.request()))
            await h.until(lambda: len(behaviour.executions) == 1)
            assert view.free_revision(lease_key("pair", 0), time.monotonic()) == 0  # it still looks free here
            lease_values: list[dict[str, Any]] = []
            real_try = h.dispatcher.try_acquire

            async def recorded(c: Any, request: Any) -> Any:
                lease = await real_try(c, request)
                if lease is not None:
                    lease_values.append({"key": lease.key, "holder": lease.value["holder"]})
                return lease

            monkeypatch.setattr(h.dispatcher, "try_acquire", recorded)
            mine = await h.dispatcher.dispatch(h.request())
            assert mine["agent"] == "agent"
            # slot 0 was refused by its revision (the other replica holds it): slot 1 was taken, nothing waited
            assert lease_values == [{"key": lease_key("pair", 1), "holder": "runtime-test"}]
            assert pool_saturated(h) == []
            assert (await theirs)["agent"] == "agent"
        assert await h.leases() == {}


async def test_the_only_slot_another_replica_took_unseen_is_waited_for(nats_url: str) -> None:
    behaviour = AgentBehaviour(execute_delay_s=0.5)
    async with running_agent(behaviour) as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, resource_key="solo", concurrency_limit=1)
        await frozen(h.dispatcher.leases_view)  # it will not see the other replica's lease nor its release
        async with other_dispatcher(h, "runtime-other") as other:
            theirs = asyncio.create_task(other.dispatch(h.request()))
            await h.until(lambda: len(behaviour.executions) == 1)
            mine = await h.dispatcher.dispatch(h.request())  # refused by revision, read afresh: waits its turn
            assert mine["agent"] == "agent"
            assert theirs.done()
            assert len(pool_saturated(h)) == 1
        first, second = sorted((e["started"], e["ended"]) for e in behaviour.executions)
        assert second[0] >= first[1]  # never two calls at once on the one slot
        assert await h.leases() == {}


async def test_an_agent_marked_down_elsewhere_is_not_chosen_once_the_view_has_it(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    b_x, b_y = AgentBehaviour(name="x"), AgentBehaviour(name="y")
    async with running_agent(b_x) as x, running_agent(b_y) as y, harness(nats_url) as h:
        await h.register("x", x.base_url, capabilities=["ping"])
        await h.register("y", y.base_url, capabilities=["ping"])
        d = h.dispatcher
        assert d.presence_view is not None
        nc = await nats.connect(nats_url)  # someone else: the elected prober of another replica, the agent itself
        try:
            presence = await nc.jetstream().key_value(PRESENCE_BUCKET)
            await presence.put(agent_probe_key("x"), json.dumps({"ok": False, "consecutive_failures": 3}).encode())
            await wait_until(lambda: d.presence_view.json(agent_probe_key("x")) if d.presence_view else None,
                             timeout=5)
            reads = Reads(d, monkeypatch)
            served = [(await d.dispatch(h.request("ping")))["agent"] for _ in range(4)]
            assert served == ["y"] * 4
            assert reads.keys == []  # decided by the view, no read
            # back up, then draining by its own heartbeat: the view follows both
            await presence.put(agent_probe_key("x"), json.dumps({"ok": True, "consecutive_failures": 0}).encode())
            await wait_until(lambda: (d.presence_view.json(agent_probe_key("x")) or {}).get("ok")
                             if d.presence_view else None, lambda ok: ok is True, timeout=5)
            await presence.put(agent_presence_key("x"), json.dumps({"agent_id": "x", "status": "draining"}).encode())
            await wait_until(lambda: (d.presence_view.json(agent_presence_key("x")) or {}).get("status")
                             if d.presence_view else None, lambda status: status == "draining", timeout=5)
            served = [(await d.dispatch(h.request("ping")))["agent"] for _ in range(4)]
            assert served == ["y"] * 4
            assert reads.keys == []
        finally:
            await nc.close()


async def test_after_its_own_release_the_next_acquire_of_the_slot_reads_nothing_and_does_not_wait(
        nats_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    async with running_agent() as agent, harness(nats_url) as h:
        await h.register("solo", agent.base_url, resource_key="solo", concurrency_limit=1)
        d = h.dispatcher
        view = await frozen(d.leases_view)  # only this replica's own writes reach it now
        reads = Reads(d, monkeypatch)
        key = lease_key("solo", 0)
        [c] = await d.candidates("web", "extract_text")
        lease = await d.try_acquire(c, h.request())
        assert lease is not None
        assert lease.key == key
        assert view.free_revision(key, time.monotonic()) is None  # its own write: held in the view at once
        await d.release(lease)
        marker = view.free_revision(key, time.monotonic())
        assert marker is not None
        assert marker > lease.revision
        for _ in range(5):  # back to back: each starts while the previous release may still be on the wire
            assert (await d.dispatch(h.request()))["agent"] == "agent"
        assert reads.keys == []
        assert pool_saturated(h) == []
        assert len(agent.behaviour.executions) == 5
        assert await h.leases() == {}


async def test_a_presence_value_counts_until_its_ttl_and_an_expired_lease_frees_its_slot(nats_url: str) -> None:
    async with harness(nats_url) as h:
        d = h.dispatcher
        assert d.presence_view is not None
        assert d.leases_view is not None
        await put_with_ttl(d.js, PRESENCE_BUCKET, agent_presence_key("gone"), b'{"status": "online"}', 1)
        written = await put_with_ttl(d.js, LEASES_BUCKET, "res.0", b'{"holder": "crashed"}', 1, last=0)
        presence, leases = d.presence_view, d.leases_view
        await wait_until(lambda: presence.json(agent_presence_key("gone")), timeout=5)
        await wait_until(lambda: leases.get("res.0"), lambda entry: entry is not None and entry.revision == written,
                         timeout=5)
        assert leases.free_revision("res.0", time.monotonic()) is None
        # the buckets keep no expiry marker: the view lets the values go by their TTL itself
        await wait_until(lambda: presence.json(agent_presence_key("gone")), lambda value: value is None, timeout=5)
        await wait_until(lambda: leases.free_revision("res.0", time.monotonic()), lambda rev: rev == 0, timeout=5)
        assert await put_with_ttl(d.js, LEASES_BUCKET, "res.0", b'{"holder": "next"}', 5, last=0) > written


@pytest.mark.unit
def test_ttl_headers() -> None:
    assert ttl_seconds("60") == 60
    assert ttl_seconds("1m30s") == 90
    assert ttl_seconds("1.5s") == 1.5
    assert ttl_seconds("never") is None
    assert ttl_seconds(None) is None


async def test_a_view_follows_again_after_nats_restarts(tmp_path: Path) -> None:
    server = EmbeddedNats(tmp_path / "nats").start()
    writer = follower = None
    view: KvView | None = None
    try:
        writer = await nats.connect(server.url)
        await ensure_topology(writer.jetstream())
        kv = await writer.jetstream().key_value(LEASES_BUCKET)
        before = await kv.put("res.0", b'{"n": 0}')
        await writer.close()
        follower = await nats.connect(server.url, max_reconnect_attempts=-1, reconnect_time_wait=0.5)
        view = KvView(follower.jetstream(), LEASES_BUCKET)
        assert await view.start(timeout_s=10)
        assert view.free_revision("res.0", time.monotonic()) is None
        server.kill()
        server.start()
        writer = await nats.connect(server.url)
        kv = await writer.jetstream().key_value(LEASES_BUCKET)
        assert await kv.delete("res.0", last=before)  # while the follower reconnects
        await kv.put("res.1", b'{"n": 1}')
        following = view

        def marker() -> int:
            return (following.free_revision("res.0", time.monotonic()) or 0) if following.current else 0

        await wait_until(marker, lambda revision: revision > before, timeout=30)
        assert view.free_revision("res.1", time.monotonic()) is None
    finally:
        if view is not None:
            await view.stop()
        for nc in (writer, follower):
            if nc is not None:
                with contextlib.suppress(Exception):  # the server may be gone already
                    await nc.close()
        server.stop()


async def test_a_view_is_current_at_once_when_only_other_keys_are_in_the_bucket(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    view: KvView | None = None
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        presence = await js.key_value(PRESENCE_BUCKET)
        for renewal in range(2):  # a service replica's key, renewed (the bucket's first message is gone)
            await presence.put("service.runtime.one", json.dumps({"renewal": renewal}).encode())
        view = KvView(js, PRESENCE_BUCKET, ("agent.>", "probe.>"))
        assert await view.start(timeout_s=5)
        assert view.entries == {}
        await presence.put(agent_presence_key("a"), b'{"status": "online"}')
        await wait_until(lambda: view.json(agent_presence_key("a")) if view else None, timeout=5)
    finally:
        if view is not None:
            await view.stop()
        await nc.close()
