"""The triggers service's in-memory view of registrations and version statuses, replayed from and kept current by
the real event stream: a registration is live only when it exists, is enabled and its version is active."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from ckp_core.events import (
    Actor,
    EventData,
    ProcedureImported,
    ProcedurePromoted,
    ProcedureStatusChanged,
    TriggerDisabled,
    TriggerRegistered,
    make_event,
)
from ckp_core.triggers import trigger_id
from langorch_infra.jetstream import JetStreamEventStore, connect, ensure_topology
from langorch_triggers.registry import Registry
from tests.helpers import wait_until

pytestmark = pytest.mark.integration

ACTOR = Actor(kind="user", id="tester")


class Stream:
    """Appends events to aggregates of the real ``LO_EVT``, tracking each aggregate's position."""

    def __init__(self, store: JetStreamEventStore) -> None:
        self.store = store
        self.seqs: dict[str, int] = {}
        self.positions: dict[str, int] = {}

    async def append(self, aggregate_id: str, data: EventData) -> None:
        seq = self.seqs.get(aggregate_id, 0) + 1
        event = make_event(data, aggregate_id=aggregate_id, seq=seq, actor=ACTOR)
        [position] = await self.store.append([event], expected_position=self.positions.get(aggregate_id, 0))
        self.seqs[aggregate_id], self.positions[aggregate_id] = seq, position


def imported(procedure_id: str, version: str) -> ProcedureImported:
    return ProcedureImported(procedure_id=procedure_id, version=version, name=None, description=None,
                             content_hash="h", compiler_version="t", ir_key="k", ckp_json={}, variables_schema={})


def activated(procedure_id: str, version: str, displaced: str | None = None) -> ProcedureStatusChanged:
    return ProcedureStatusChanged(procedure_id=procedure_id, version=version, from_status="draft", status="active",
                                  release_channel="dev", displaced_version=displaced)


def scheduled(procedure_id: str, version: str) -> TriggerRegistered:
    return TriggerRegistered(procedure_id=procedure_id, version=version, trigger_type="scheduled",
                             schedule="* * * * *")


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[tuple[Stream, Registry]]:
    nc = await connect(nats_url, "registry-test")
    js = nc.jetstream()
    await ensure_topology(js)
    registry = Registry(js)
    try:
        yield Stream(JetStreamEventStore(js)), registry
    finally:
        await registry.stop()
        await nc.close()


async def test_an_empty_stream_is_caught_up_at_once(stream: tuple[Stream, Registry]) -> None:
    _, registry = stream
    await registry.start(timeout_s=10)
    assert registry.live() == []


async def test_replay_then_follow_live_changes(stream: tuple[Stream, Registry]) -> None:
    events, registry = stream
    tid = trigger_id("reg_a", "1.0.0")
    await events.append("reg_a", imported("reg_a", "1.0.0"))
    await events.append(tid, scheduled("reg_a", "1.0.0"))
    await registry.start(timeout_s=30)
    # replayed before start() returned: the registration exists, but its version is a draft (dormant)
    assert registry.triggers[tid].exists
    assert registry.status_of("reg_a", "1.0.0") == "draft"
    assert registry.live() == []

    changed: list[str] = []
    registry.listeners.append(changed.append)
    await events.append("reg_a", activated("reg_a", "1.0.0"))
    await wait_until(lambda: registry.is_live(tid), timeout=20)
    assert [s.trigger_id for s in registry.live("scheduled")] == [tid]
    assert registry.live("webhook") == []
    assert tid in changed

    await events.append(tid, TriggerDisabled(procedure_id="reg_a", version="1.0.0"))
    await wait_until(lambda: not registry.is_live(tid), timeout=20)


async def test_activation_and_promotion_deprecate_the_displaced_version(stream: tuple[Stream, Registry]) -> None:
    events, registry = stream
    await registry.start(timeout_s=10)
    old, new = trigger_id("reg_b", "1.0.0"), trigger_id("reg_b", "2.0.0")
    for version in ("1.0.0", "2.0.0", "3.0.0"):
        await events.append("reg_b", imported("reg_b", version))
    await events.append(old, scheduled("reg_b", "1.0.0"))
    await events.append(new, scheduled("reg_b", "2.0.0"))
    await events.append("reg_b", activated("reg_b", "1.0.0"))
    await wait_until(lambda: registry.is_live(old), timeout=20)

    await events.append("reg_b", activated("reg_b", "2.0.0", displaced="1.0.0"))
    await wait_until(lambda: registry.is_live(new) and not registry.is_live(old), timeout=20)
    assert registry.status_of("reg_b", "1.0.0") == "deprecated"

    await events.append("reg_b", ProcedurePromoted(procedure_id="reg_b", version="3.0.0", deployment_id="d1",
                                                   from_channel="dev", from_status="draft", target_channel="prod",
                                                   displaced_version="2.0.0"))
    await wait_until(lambda: registry.status_of("reg_b", "3.0.0") == "active" and not registry.is_live(new),
                     timeout=20)
