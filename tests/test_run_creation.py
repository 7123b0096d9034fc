"""One writer of runs: the runtime decides ``lo.cmd.run.create`` (the gateway, rerun and parent runs submit it)
on its own consumer, with OCC through the command handler, and starts the run it created with the creating
command's id; refusals are ``command_rejected`` on the run; a redelivered creation changes nothing."""

from __future__ import annotations

import asyncio
import contextlib
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from nats.js.api import AckPolicy, ConsumerConfig, ConsumerInfo

from ckp_core.commands import CreateRun, SetProcedureStatus
from ckp_core.events import ANONYMOUS, EventEnvelope
from ckp_core.eventstore import StoredEvent
from ckp_core.ids import new_id
from ckp_core.subjects import COMMAND_STREAM, PROCEDURES_BUCKET, procedure_key
from langorch_gateway import app as gateway_app
from langorch_infra.jetstream import JetStreamEventStore, ensure_topology, publish_command
from langorch_infra.settings import RuntimeSettings
from langorch_runtime.creation import CREATE_CONSUMER, CREATE_SUBJECTS, EXECUTE_SUBJECTS, RUN_CONSUMER
from langorch_runtime.service import RuntimeService
from tests.helpers import Platform, imported, platform_of, wait_status, wait_until

pytestmark = pytest.mark.integration

SIMPLE = {
    "procedure_id": "rc_simple", "version": "1",
    "variables_schema": {"n": {"type": "integer", "required": True},
                         "pin": {"type": "string", "sensitive": True, "default": "0000"}},
    "workflow_graph": {"start_node": "calc", "nodes": {
        "calc": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "s", "action": "set_variable", "variable": "m", "value": "{{n}}"}]},
        "done": {"type": "terminate", "outputs": {"m": "{{m}}"}}}},
}


def slow(seconds: float) -> dict[str, Any]:
    return {"procedure_id": "rc_slow", "version": "1", "workflow_graph": {"start_node": "w", "nodes": {
        "w": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "pause", "action": "wait", "duration_ms": int(seconds * 1000)}]},
        "done": {"type": "terminate"}}}}


async def run_events(p: Platform, run_id: str) -> list[EventEnvelope]:
    return [e.envelope for e in await JetStreamEventStore(p.app.state.js).read("run", run_id)]


async def submitted(p: Platform, command: CreateRun, *, msg_id: str | None = None) -> EventEnvelope:
    """Publish a creation straight to LO_CMD (as a trigger would) and return its outcome on the run."""
    await publish_command(p.app.state.js, command, msg_id=msg_id or command.msg_id)

    async def read() -> list[EventEnvelope]:
        return await run_events(p, command.run_id)

    events: list[EventEnvelope] = await wait_until(read, timeout=20)
    return events[0]


async def audit_records(c: httpx.AsyncClient, request_id: str, at_least: int = 1) -> list[dict[str, Any]]:
    """The audit records of one request, once there are ``at_least`` of them."""
    async def read() -> list[dict[str, Any]]:
        return list((await c.get("/api/audit", params={"request_id": request_id})).json()["items"])

    return await wait_until(read, lambda items: len(items) >= at_least)


def create(**fields: Any) -> CreateRun:
    run_id = new_id()
    return CreateRun(actor=ANONYMOUS, causation_id="rc-test", run_id=run_id, root_run_id=run_id,
                     procedure_id="rc_simple", procedure_version="1", **fields)


async def test_the_runtime_creates_the_run_and_starts_it_with_the_creating_command(platform: Platform) -> None:
    c = platform.client
    await imported(c, SIMPLE)
    r = await c.post("/api/runs", json={"procedure_id": "rc_simple", "procedure_version": "1",
                                        "input_vars": {"n": "4", "pin": "9876"}}, headers={"X-Request-ID": "rc-1"})
    assert r.status_code == 201, r.text
    run_id = r.json()["run_id"]
    assert r.headers["Location"] == f"/api/runs/{run_id}"
    command_id = r.headers["X-LangOrch-Command-ID"]
    assert (await wait_status(c, run_id))["status"] == "completed"
    events = await run_events(platform, run_id)
    created, started = events[0], events[1]
    assert (created.type, started.type) == ("run_created", "execution_started")
    assert created.actor == ANONYMOUS  # the submitter, not the runtime that appended it
    assert started.actor.render() == "system:runtime"
    assert created.causation_id == started.causation_id == command_id
    assert created.correlation_id == run_id
    assert created.data["input_vars"] == {"n": 4, "pin": "9876"}  # validated (coerced) by the runtime
    assert int(r.headers["X-LangOrch-Position"]) == (await JetStreamEventStore(platform.app.state.js).read(
        "run", run_id))[0].position
    js = platform.app.state.js
    runtime = await js.consumer_info(COMMAND_STREAM, RUN_CONSUMER)
    assert sorted(runtime.config.filter_subjects or []) == sorted(EXECUTE_SUBJECTS)
    creation = await js.consumer_info(COMMAND_STREAM, CREATE_CONSUMER)
    assert list(creation.config.filter_subjects or [creation.config.filter_subject]) == list(CREATE_SUBJECTS)
    # the run's start record is written once, by the runtime, with the sensitive input redacted
    [record] = await audit_records(c, "rc-1")
    assert (record["category"], record["action"], record["outcome"]) == ("run", "start", "accepted")
    assert (record["command_id"], record["resource_id"]) == (command_id, run_id)
    assert record["meta"]["input_vars"] == {"n": 4, "pin": "***REDACTED***"}


async def test_a_creation_is_decided_while_every_run_slot_is_busy(nats_url: str, database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime_settings={"max_concurrent_runs": 1}) as p:
        c = p.client
        await imported(c, slow(6))
        await imported(c, SIMPLE)
        r = await c.post("/api/runs", json={"procedure_id": "rc_slow", "procedure_version": "1"})
        assert r.status_code == 201, r.text
        busy = r.json()["run_id"]
        await wait_status(c, busy, ("running",))
        started = time.monotonic()
        r = await c.post("/api/runs", json={"procedure_id": "rc_simple", "procedure_version": "1",
                                            "input_vars": {"n": 1}})
        decided_in = time.monotonic() - started
        assert r.status_code == 201, r.text
        assert decided_in < 3, decided_in  # not behind the 6 s run holding the only slot
        queued = r.json()["run_id"]
        assert (await c.get(f"/api/runs/{busy}")).json()["status"] == "running"
        assert (await c.get(f"/api/runs/{queued}")).json()["status"] == "created"
        assert (await wait_status(c, queued))["status"] == "completed"


async def test_refusals_of_the_runtime_are_command_rejected_on_the_run(platform: Platform) -> None:
    c = platform.client
    await imported(c, SIMPLE)
    future = (datetime.now(UTC) + timedelta(days=30)).date().isoformat()
    await imported(c, {**SIMPLE, "procedure_id": "rc_later", "effective_date": future})
    await imported(c, {**SIMPLE, "procedure_id": "rc_archived"})
    r = await c.patch("/api/procedures/rc_archived/1/status", json={"status": "archived"})
    assert r.status_code == 200, r.text

    bad = await submitted(platform, create(input_vars={"n": "many"}))
    assert (bad.type, bad.seq, bad.data["code"]) == ("command_rejected", 1, "invalid_input_vars")
    assert list(bad.data["extra"]["errors"]) == ["input_vars.n"]
    assert bad.data["command_type"] == "create_run"
    archived = await submitted(platform, create(input_vars={"n": 1}).model_copy(
        update={"procedure_id": "rc_archived"}))
    assert (archived.data["code"], archived.data["detail"]) == ("procedure_not_runnable", "version 1 is archived")
    missing = await submitted(platform, create(input_vars={"n": 1}).model_copy(update={"procedure_version": "9"}))
    assert (missing.data["code"], missing.data["detail"]) == ("procedure_not_runnable", "version 9 is deleted")
    later = await submitted(platform, create(input_vars={"n": 1}).model_copy(update={"procedure_id": "rc_later"}))
    assert (later.data["code"], later.data["detail"]) == ("procedure_not_effective",
                                                          f"version 1 is effective from {future}")
    for refused in (bad, archived, missing, later):
        assert refused.actor == ANONYMOUS
        assert len(await run_events(platform, refused.aggregate_id)) == 1  # no run, no start
        assert (await c.get(f"/api/runs/{refused.aggregate_id}")).status_code == 404


async def test_a_version_archived_after_the_gateways_check_is_refused_by_the_runtime(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """The race the gateway's pre-check cannot see: the version is archived between the gateway's look-up and the
    runtime's decision. The runtime refuses; the gateway answers the problem of its ``command_rejected``, and the
    refusal is audited once (by the runtime)."""
    c = platform.client
    await imported(c, {**SIMPLE, "procedure_id": "rc_race"})
    original = gateway_app._resolve_version

    async def procedure_events() -> list[StoredEvent]:
        return await JetStreamEventStore(platform.app.state.js).read("procedure", "rc_race")

    async def resolve_then_archive(db: Any, body: Any, default_channel: str | None) -> Any:
        row = await original(db, body, default_channel)
        await publish_command(platform.app.state.js, SetProcedureStatus(
            actor=ANONYMOUS, procedure_id="rc_race", version="1", status="archived"))
        changed: list[StoredEvent] = await wait_until(
            procedure_events, lambda events: events[-1].envelope.type == "procedure_status_changed", timeout=20)
        assert changed
        return row

    monkeypatch.setattr(gateway_app, "_resolve_version", resolve_then_archive)
    r = await c.post("/api/runs", json={"procedure_id": "rc_race", "procedure_version": "1", "input_vars": {"n": 1}},
                     headers={"X-Request-ID": "rc-race"})
    assert r.status_code == 409, r.text
    assert (r.json()["code"], r.json()["status"]) == ("procedure_not_runnable", 409)
    await audit_records(c, "rc-race")
    await asyncio.sleep(0.5)  # no second record follows
    [record] = await audit_records(c, "rc-race")
    assert (record["category"], record["action"], record["outcome"]) == ("run", "start", "rejected")
    assert record["meta"]["code"] == "procedure_not_runnable"
    assert record["actor"] == "anonymous"


async def test_a_redelivered_creation_creates_and_starts_the_run_once(platform: Platform) -> None:
    c = platform.client
    await imported(c, SIMPLE)
    command = create(input_vars={"n": 2})
    first = await submitted(platform, command)
    await wait_status(c, command.run_id)
    # the same command again, as after a crash before its ack (another message id, so JetStream keeps it)
    await publish_command(platform.app.state.js, command, msg_id=f"again-{command.command_id}")
    async def consumer() -> ConsumerInfo:
        info: ConsumerInfo = await platform.app.state.js.consumer_info(COMMAND_STREAM, CREATE_CONSUMER)
        return info

    settled: ConsumerInfo = await wait_until(
        consumer, lambda info: info.num_pending == 0 and info.num_ack_pending == 0, timeout=20)
    assert settled.num_pending == 0
    await asyncio.sleep(0.5)
    events = await run_events(platform, command.run_id)
    types = [e.type for e in events]
    assert types.count("run_created") == 1
    assert types.count("execution_started") == 1
    assert types.count("run_completed") == 1
    assert events[0].event_id == first.event_id
    assert {e.causation_id for e in events} == {command.command_id}


async def test_an_older_runtime_consumer_is_narrowed_and_keeps_its_settings(nats_url: str,
                                                                           database_url: str) -> None:
    """A state directory of an older version has ``runtime`` on ``lo.cmd.run.>``; LO_CMD is a work queue, whose
    consumers may not overlap, so the creation side narrows it (keeping its ack wait) before it declares its own."""
    import nats

    nc = await nats.connect(nats_url)
    try:
        js = nc.jetstream()
        await ensure_topology(js)
        await js.add_consumer(COMMAND_STREAM, ConsumerConfig(
            durable_name=RUN_CONSUMER, ack_policy=AckPolicy.EXPLICIT, ack_wait=7, filter_subject="lo.cmd.run.>",
            max_ack_pending=1000))
    finally:
        await nc.close()
    async with platform_of(nats_url, database_url, runtime=False) as p:
        c = p.client
        js = p.app.state.js
        info = await js.consumer_info(COMMAND_STREAM, RUN_CONSUMER)
        assert sorted(info.config.filter_subjects or []) == sorted(EXECUTE_SUBJECTS)
        assert (info.config.ack_wait, info.config.max_ack_pending) == (7, 1000)
        await imported(c, SIMPLE)
        r = await c.post("/api/runs", json={"procedure_id": "rc_simple", "procedure_version": "1",
                                            "input_vars": {"n": 3}})
        assert r.status_code == 201, r.text  # created without any runtime executing runs
        run_id = r.json()["run_id"]
        runtime = RuntimeService(RuntimeSettings(nats_url=nats_url, database_url=database_url, ack_wait_s=5))
        await runtime.start()
        task = asyncio.create_task(runtime.run())
        try:
            assert (await wait_status(c, run_id))["status"] == "completed"
        finally:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            await runtime.stop()
        assert (await js.consumer_info(COMMAND_STREAM, RUN_CONSUMER)).config.ack_wait == 5


async def test_without_the_creation_side_a_creation_is_pending_then_decided(nats_url: str,
                                                                           database_url: str) -> None:
    async with platform_of(nats_url, database_url, runtime=False, creation=False,
                           gateway_settings={"command_timeout_s": 0.5}) as p:
        c = p.client
        await imported(c, SIMPLE)
        r = await c.post("/api/runs", json={"procedure_id": "rc_simple", "procedure_version": "1",
                                            "input_vars": {"n": 5}})
        assert r.status_code == 202, r.text
        location = r.json()["location"]
        assert (await c.get(location)).json()["status"] == "pending"
    async with platform_of(nats_url, database_url, runtime=False) as p:
        async def read() -> dict[str, Any]:
            return dict((await p.client.get(location)).json())

        command: dict[str, Any] = await wait_until(read, lambda body: body["status"] != "pending")
        assert (command["status"], command["command_type"]) == ("accepted", "start_run")


async def test_a_creation_waits_for_the_versions_ir_to_be_stored(platform: Platform) -> None:
    """The compiler stores a version's IR right after its event: a creation that comes in between is decided
    again shortly (redelivered), not refused."""
    c = platform.client
    await imported(c, SIMPLE)
    js = platform.app.state.js
    kv = await js.key_value(PROCEDURES_BUCKET)
    key = procedure_key("rc_simple", "1")
    ir = (await kv.get(key)).value
    await kv.delete(key)
    command = create(input_vars={"n": 6})
    await publish_command(js, command, msg_id=command.msg_id)
    await asyncio.sleep(1.0)
    assert await run_events(platform, command.run_id) == []  # not decided while the IR is missing
    await kv.put(key, ir)
    created = await submitted(platform, command)  # (republished: dropped as a duplicate)
    assert (created.type, created.causation_id) == ("run_created", command.command_id)
    assert (await wait_status(c, command.run_id))["status"] == "completed"
