"""Registrations from documents' ``trigger`` blocks on activation, promotion and rollback (api.md §10.1 ``source:
ckp``): the triggers service's ``triggers_sync`` consumer on the real stack, and the decisions it shares with
``POST /api/triggers/sync``."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ckp_core.commands import UpsertTrigger
from ckp_core.events import Actor
from ckp_core.ir import ProcedureIR, TriggerIR
from ckp_core.triggers import desired_registration, sync_action, trigger_id
from langorch_infra import messaging
from langorch_triggers.sync import activated_version, sync_command_id
from tests.helpers import Platform, platform_of, procedure_doc, wait_until

SCHEDULED = {"type": "scheduled", "schedule": "0  6 1 1 *", "timezone": "Europe/Berlin",
             "input_vars": {"greeting": "tick"}}
WEBHOOK = {"type": "webhook", "webhook_secret": "sync_hook_key", "input_vars": {"greeting": "hook"}}
EVENT = {"type": "event", "event_source": "nats://lo.ext.sync.orders"}


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, agents=False,
                           triggers=True) as p:
        yield p


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:10]}"


async def imported(p: Platform, procedure_id: str, version: str = "1.0.0",
                   trigger: dict[str, Any] | None = None) -> None:
    extra = {"trigger": trigger} if trigger is not None else {}
    r = await p.client.post("/api/procedures", json={"ckp_json": procedure_doc(procedure_id, version, **extra)})
    assert r.status_code == 201, r.text


async def set_status(p: Platform, procedure_id: str, version: str, status: str) -> None:
    r = await p.client.patch(f"/api/procedures/{procedure_id}/{version}/status", json={"status": status})
    assert r.status_code == 200, r.text


async def registration(p: Platform, procedure_id: str, version: str = "1.0.0",
                       done: Any = lambda body: True) -> dict[str, Any]:
    """The registration once it exists and ``done`` holds for it."""
    r = await wait_until(lambda: p.client.get(f"/api/triggers/{procedure_id}/{version}"),
                         lambda r: r.status_code == 200 and done(r.json()), timeout=60)
    return r.json()  # type: ignore[no-any-return]


async def caught_up(p: Platform) -> None:
    """Wait until the sync consumer has handled (acked) every activation event in the stream."""
    js = p.triggers_service.js
    consumer = messaging.PROCEDURE_ACTIVATIONS

    async def pending() -> tuple[int, int]:
        info = await js.consumer_info(consumer.stream, consumer.durable)
        return info.num_pending or 0, info.num_ack_pending or 0

    await wait_until(pending, lambda counts: counts == (0, 0), timeout=60)


async def history(p: Platform, procedure_id: str, version: str) -> list[Any]:
    return [e.envelope for e in await p.triggers_service.store.read("trigger", trigger_id(procedure_id, version))]


@pytest.mark.integration
async def test_activation_registers_the_block_and_deprecation_makes_it_dormant(platform: Platform) -> None:
    pid = unique("sync_act")
    await imported(platform, pid, trigger=SCHEDULED)
    await caught_up(platform)
    absent = await platform.client.get(f"/api/triggers/{pid}/1.0.0")
    assert absent.status_code == 404, absent.text  # a draft's block registers nothing

    await set_status(platform, pid, "1.0.0", "active")
    got = await registration(platform, pid)
    assert (got["source"], got["dormant"], got["enabled"], got["trigger_type"]) == ("ckp", False, True, "scheduled")
    assert (got["schedule"], got["timezone"], got["input_vars"]) == ("0 6 1 1 *", "Europe/Berlin",
                                                                      {"greeting": "tick"})
    assert got["created_by"] == "system:triggers"
    [registered] = await history(platform, pid, "1.0.0")
    assert registered.type == "trigger_registered"

    await set_status(platform, pid, "1.0.0", "deprecated")
    dormant = await registration(platform, pid, done=lambda body: body["dormant"])
    assert (dormant["source"], dormant["revision"]) == ("ckp", 1)

    await set_status(platform, pid, "1.0.0", "active")  # the same block: nothing to change
    await caught_up(platform)
    again = await registration(platform, pid, done=lambda body: not body["dormant"])
    assert again["revision"] == 1
    assert [e.type for e in await history(platform, pid, "1.0.0")] == ["trigger_registered"]


@pytest.mark.integration
async def test_promotion_registers_the_promoted_version_and_rollback_restores_the_previous(
        platform: Platform) -> None:
    pid = unique("sync_promo")
    await imported(platform, pid, "1.0.0", WEBHOOK)
    await imported(platform, pid, "2.0.0", EVENT)
    promote = f"/api/procedures/{pid}/{{}}/promote"

    r = await platform.client.post(promote.format("1.0.0"), json={"target_channel": "qa"})
    assert r.status_code == 200, r.text
    first = await registration(platform, pid, "1.0.0")
    assert (first["trigger_type"], first["webhook_secret"], first["source"], first["dormant"]) == (
        "webhook", "sync_hook_key", "ckp", False)
    assert first["webhook_url"].endswith(f"/api/triggers/webhook/{pid}")

    r = await platform.client.post(promote.format("2.0.0"), json={"target_channel": "qa"})
    assert r.status_code == 200, r.text
    second = await registration(platform, pid, "2.0.0")
    assert (second["trigger_type"], second["event_source"], second["dormant"]) == (
        "event", "nats://lo.ext.sync.orders", False)
    await registration(platform, pid, "1.0.0", done=lambda body: body["dormant"])  # displaced, kept

    r = await platform.client.post(f"/api/procedures/{pid}/2.0.0/rollback", json={"target_channel": "qa"})
    assert r.status_code == 200, r.text
    await registration(platform, pid, "1.0.0", done=lambda body: not body["dormant"])
    rolled_back = await registration(platform, pid, "2.0.0", done=lambda body: body["dormant"])
    assert rolled_back["source"] == "ckp"
    listed = (await platform.client.get("/api/triggers", params={"procedure_id": pid, "source": "ckp"})).json()
    assert [(t["version"], t["dormant"]) for t in listed["items"]] == [("1.0.0", False), ("2.0.0", True)]


@pytest.mark.integration
async def test_an_api_registration_is_never_touched_by_an_activation(platform: Platform) -> None:
    pid = unique("sync_api")
    await imported(platform, pid, trigger=SCHEDULED)
    mine = await platform.client.post(f"/api/triggers/{pid}/1.0.0",
                                      json={"trigger_type": "webhook", "webhook_secret": "operator_key"})
    assert mine.status_code == 201, mine.text

    await set_status(platform, pid, "1.0.0", "active")
    await caught_up(platform)
    got = await registration(platform, pid, done=lambda body: not body["dormant"])
    assert (got["source"], got["trigger_type"], got["webhook_secret"], got["revision"]) == (
        "api", "webhook", "operator_key", 1)
    assert [e.type for e in await history(platform, pid, "1.0.0")] == ["trigger_registered"]


@pytest.mark.integration
async def test_an_activated_version_without_a_block_loses_its_ckp_registration(platform: Platform) -> None:
    pid = unique("sync_manual")
    await imported(platform, pid, trigger={"type": "manual"})
    # a registration left by a document's block (as after a re-compile that dropped it)
    await platform.triggers_service.on_upsert(UpsertTrigger(
        actor=Actor.system("test"), procedure_id=pid, version="1.0.0", trigger_type="webhook",
        webhook_secret="old_key", source="ckp"))
    assert (await registration(platform, pid))["source"] == "ckp"

    await set_status(platform, pid, "1.0.0", "active")
    await wait_until(lambda: platform.client.get(f"/api/triggers/{pid}/1.0.0"), lambda r: r.status_code == 404,
                     timeout=60)
    types = [e.type for e in await history(platform, pid, "1.0.0")]
    assert types == ["trigger_registered", "trigger_deleted"]


@pytest.mark.integration
async def test_an_invalid_block_is_refused_on_the_registration_and_the_sync_goes_on(platform: Platform) -> None:
    bad, good = unique("sync_bad"), unique("sync_good")
    await imported(platform, bad, trigger={"type": "event", "event_source": "nats://lo.ext.orders.>.late"})
    await imported(platform, good, trigger=WEBHOOK)
    await set_status(platform, bad, "1.0.0", "active")
    await set_status(platform, good, "1.0.0", "active")
    assert (await registration(platform, good))["source"] == "ckp"
    await caught_up(platform)
    [refused] = await history(platform, bad, "1.0.0")
    assert (refused.type, refused.data["code"]) == ("command_rejected", "unsupported_event_source")
    assert (await platform.client.get(f"/api/triggers/{bad}/1.0.0")).status_code == 404


@pytest.mark.integration
async def test_a_redelivered_activation_decides_nothing_twice(platform: Platform) -> None:
    pid = unique("sync_redeliver")
    await imported(platform, pid, trigger=WEBHOOK)
    await set_status(platform, pid, "1.0.0", "active")
    await registration(platform, pid)
    [activation] = [e.envelope for e in await platform.triggers_service.store.read("procedure", pid)
                    if e.envelope.type == "procedure_status_changed"]
    [registered] = await history(platform, pid, "1.0.0")
    assert registered.causation_id == sync_command_id(activation.event_id)

    typed = messaging.PROCEDURE_ACTIVATIONS.messages["lo.evt.procedure.*.procedure_status_changed"]
    await platform.triggers_service.sync.on_event(typed.model_validate(activation.model_dump()))
    assert [e.type for e in await history(platform, pid, "1.0.0")] == ["trigger_registered"]


# -- the shared decisions ---------------------------------------------------------------------------------------


def _ir(trigger: dict[str, Any] | None) -> ProcedureIR:
    return ProcedureIR.model_construct(trigger=TriggerIR(**trigger) if trigger is not None else None)


@pytest.mark.unit
def test_desired_registration_follows_the_block() -> None:
    assert desired_registration(_ir(None)) is None
    assert desired_registration(_ir({"type": "manual"})) is None
    scheduled = desired_registration(_ir({"type": "scheduled", "schedule": "0  9 * * MON", "timezone": "UTC"}))
    assert scheduled is not None
    assert (scheduled["schedule"], scheduled["signature_scheme"], scheduled["event_source"]) == (
        "0 9 * * MON", "timestamped", None)
    watched = desired_registration(_ir({"type": "file_watch", "file_watch_path": "/data/in.csv"}))
    assert watched is not None
    assert (watched["trigger_type"], watched["event_source"], watched["timezone"]) == ("file_watch", "/data/in.csv",
                                                                                       "UTC")


@pytest.mark.unit
def test_sync_action_never_touches_api_registrations() -> None:
    desired = desired_registration(_ir({"type": "webhook", "webhook_secret": "k"}))
    assert desired is not None
    current = {**desired, "enabled": False, "source": "ckp"}
    assert sync_action(None, None) == "keep"
    assert sync_action(None, desired) == "register"
    assert sync_action(current, desired) == "keep"  # enabled is the operator's
    assert sync_action({**current, "webhook_secret": "other"}, desired) == "register"
    assert sync_action(current, None) == "remove"
    assert sync_action({**current, "source": "api"}, None) == "keep"
    assert sync_action({**current, "source": "api", "webhook_secret": "other"}, desired) == "keep"


@pytest.mark.unit
def test_the_versions_an_event_activates() -> None:
    assert activated_version("procedure_status_changed", {"version": "1", "status": "active"}) == "1"
    assert activated_version("procedure_status_changed", {"version": "1", "status": "deprecated"}) is None
    assert activated_version("procedure_promoted", {"version": "2"}) == "2"
    assert activated_version("procedure_rolled_back", {"version": "2", "restored_version": "1"}) == "1"
    assert sync_command_id("e1") == sync_command_id("e1") != sync_command_id("e2")
