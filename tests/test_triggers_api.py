"""Trigger registrations and manual fires over the real stack (api.md §10.2–10.3): the gateway's routes, the triggers
service deciding the commands, the runtime creating and executing the fired runs, and the projections."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from tests.helpers import Platform, platform_of, problem, procedure_doc, wait_status, wait_until

pytestmark = pytest.mark.integration

DOC = procedure_doc("trig_greeting", "1.0.0")
OTHER = procedure_doc("trig_other", "1.0.0")
THIRD = procedure_doc("trig_third", "1.0.0")


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, agents=False,
                           triggers=True) as p:
        for doc in (DOC, OTHER, THIRD):
            r = await p.client.post("/api/procedures", json={"ckp_json": doc})
            assert r.status_code == 201, r.text
        yield p


def url(version: str = "1.0.0", procedure_id: str = "trig_greeting") -> str:
    return f"/api/triggers/{procedure_id}/{version}"


async def register(p: Platform, body: dict[str, Any], *, procedure_id: str = "trig_greeting",
                   headers: dict[str, str] | None = None) -> dict[str, Any]:
    r = await p.client.post(url(procedure_id=procedure_id), json=body, headers=headers or {})
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


async def test_register_replace_with_if_match_and_read_back(platform: Platform) -> None:
    c = platform.client
    r = await c.post(url(procedure_id="trig_third"), json={"trigger_type": "webhook", "webhook_secret": "hook_key",
                                                           "input_vars": {"greeting": "from hook"}})
    assert r.status_code == 201, r.text
    assert r.headers["ETag"] == '"1"'
    body = r.json()
    assert body["trigger_type"] == "webhook"
    assert body["webhook_secret"] == "hook_key"
    assert body["signature_scheme"] == "timestamped"
    assert body["webhook_url"].endswith("/api/triggers/webhook/trig_third")
    assert (body["enabled"], body["dormant"], body["source"], body["revision"]) == (True, True, "api", 1)
    assert body["created_by"] == "anonymous"

    got = await c.get(url(procedure_id="trig_third"))
    assert got.status_code == 200
    assert got.headers["ETag"] == '"1"'
    assert got.json() == body

    replaced = await c.post(url(procedure_id="trig_third"), headers={"If-Match": '"1"'},
                            json={"trigger_type": "event", "event_source": "nats://lo.ext.orders.*"})
    assert replaced.status_code == 200, replaced.text
    assert replaced.headers["ETag"] == '"2"'
    assert replaced.json()["event_source"] == "nats://lo.ext.orders.*"
    assert replaced.json()["webhook_url"] is None

    stale = await c.post(url(procedure_id="trig_third"), headers={"If-Match": '"1"'},
                         json={"trigger_type": "file_watch", "event_source": "/tmp/in.csv"})
    assert problem(stale, 412, "precondition_failed")["current_revision"] == 2
    assert (await c.get(url(procedure_id="trig_third"))).json()["event_source"] == "nats://lo.ext.orders.*"

    listed = (await c.get("/api/triggers", params={"procedure_id": "trig_third"})).json()
    assert [t["version"] for t in listed["items"]] == ["1.0.0"]
    assert listed["total"] == 1
    assert (await c.get("/api/triggers", params={"trigger_type": "scheduled",
                                                 "procedure_id": "trig_third"})).json()["total"] == 0

    problem(await c.post(url("9.9.9"), json={"trigger_type": "webhook", "webhook_secret": "k"}), 404, "not_found")
    problem(await c.get(url("9.9.9")), 404, "not_found")


@pytest.mark.parametrize(("body", "code", "fields"), [
    ({"trigger_type": "scheduled", "schedule": "every minute", "timezone": "Mars/Olympus"}, "validation_failed",
     {"schedule", "timezone"}),
    ({"trigger_type": "webhook"}, "validation_failed", {"webhook_secret"}),
    ({"trigger_type": "webhook", "webhook_secret": "k", "signature_scheme": "body"}, "validation_failed",
     {"dedupe_window_seconds"}),
    ({"trigger_type": "event", "event_source": "kafka://orders"}, "unsupported_event_source", {"event_source"}),
    ({"trigger_type": "file_watch"}, "validation_failed", {"event_source"}),
    ({"trigger_type": "webhook", "webhook_secret": "k", "max_concurrent_runs": 0}, "validation_failed",
     {"max_concurrent_runs"}),
    ({"trigger_type": "webhook", "webhook_secret": "k", "dedupe_window_seconds": -1}, "validation_failed",
     {"dedupe_window_seconds"}),
])
async def test_invalid_registrations_name_the_failing_fields(platform: Platform, body: dict[str, Any], code: str,
                                                             fields: set[str]) -> None:
    r = await platform.client.post(url("1.0.0", "trig_other"), json=body)
    answer = problem(r, 422, code)
    assert set(answer["errors"]) == fields, answer


async def test_an_unknown_member_is_refused(platform: Platform) -> None:
    r = await platform.client.post(url(), json={"trigger_type": "webhook", "webhook_secret": "k", "secret": "x"})
    assert problem(r, 422, "unknown_field")["errors"]


async def test_manual_fire_creates_a_run_that_completes_and_is_in_the_history(platform: Platform) -> None:
    c = platform.client
    await register(platform, {"trigger_type": "webhook", "webhook_secret": "hook_key",
                              "input_vars": {"greeting": "static"}})
    disabled = await c.post(f"{url()}/disable")
    assert disabled.status_code == 200, disabled.text
    assert disabled.json()["enabled"] is False
    assert disabled.headers["ETag"] == f'"{disabled.json()["revision"]}"'
    assert (await c.get("/api/triggers", params={"enabled": "false", "procedure_id": "trig_greeting"})).json()[
        "total"] == 1
    enabled = await c.post(f"{url()}/enable")
    assert enabled.status_code == 200
    assert enabled.json()["enabled"] is True
    assert enabled.json()["revision"] == disabled.json()["revision"] + 1

    fired = await c.post(f"{url()}/fire", json={"input_vars": {"greeting": "fired by hand"}})
    assert fired.status_code == 202, fired.text
    out = fired.json()
    assert out == {"run_id": out["run_id"], "procedure_id": "trig_greeting", "procedure_version": "1.0.0",
                   "trigger_type": "manual", "triggered_by": "anonymous", "status": "created"}
    run = await c.get(f"/api/runs/{out['run_id']}")  # visible when the answer arrives
    assert run.status_code == 200
    assert (run.json()["trigger_type"], run.json()["triggered_by"]) == ("manual", "anonymous")
    done = await wait_status(c, out["run_id"], timeout=60)
    assert done["status"] == "completed", done
    assert done["input_vars"]["greeting"] == "fired by hand"

    trigger = (await c.get(url())).json()
    assert trigger["last_run_id"] == out["run_id"]
    assert trigger["last_fired_at"]
    fires = (await c.get(f"{url()}/fires")).json()
    assert fires["total"] == 1
    [fire] = fires["items"]
    assert (fire["outcome"], fire["run_id"], fire["trigger_type"], fire["reason"]) == (
        "started", out["run_id"], "manual", None)

    bad = await c.post(f"{url()}/fire", json={"input_vars": {"greeting": ["not", "a", "string"]}})
    assert problem(bad, 422, "invalid_input_vars")["errors"] == {"input_vars.greeting": ["Must be a string"]}
    history = (await c.get(f"{url()}/fires", params={"outcome": "invalid"})).json()
    assert [f["reason"] for f in history["items"]] == ["invalid_input_vars"]
    assert (await c.get(f"{url()}/fires")).json()["total"] == 2


async def test_a_repeated_fire_within_the_dedupe_window_is_a_duplicate(platform: Platform) -> None:
    c = platform.client
    await register(platform, {"trigger_type": "webhook", "webhook_secret": "k", "dedupe_window_seconds": 600},
                   procedure_id="trig_other")
    first = await c.post(f"{url(procedure_id='trig_other')}/fire", json={"input_vars": {"greeting": "once"}})
    assert first.status_code == 202, first.text
    again = await c.post(f"{url(procedure_id='trig_other')}/fire", json={"input_vars": {"greeting": "once"}})
    dup = problem(again, 409, "duplicate_delivery")
    assert dup["existing_run_id"] == first.json()["run_id"]
    assert dup["first_seen_at"]
    other = await c.post(f"{url(procedure_id='trig_other')}/fire", json={"input_vars": {"greeting": "twice"}})
    assert other.status_code == 202, other.text
    outcomes = await wait_until(lambda: c.get(f"{url(procedure_id='trig_other')}/fires"),
                                lambda r: r.json()["total"] == 3)
    assert sorted(f["outcome"] for f in outcomes.json()["items"]) == ["duplicate", "started", "started"]


async def test_delete_removes_the_registration_and_its_history(platform: Platform) -> None:
    c = platform.client
    r = await c.post(url("1.0.0", "trig_greeting"), json={"trigger_type": "file_watch",
                                                          "event_source": "/tmp/watched.csv"})
    assert r.status_code in (200, 201), r.text
    gone = await c.delete(url())
    assert gone.status_code == 204, gone.text
    problem(await c.get(url()), 404, "not_found")
    problem(await c.get(f"{url()}/fires"), 404, "not_found")
    problem(await c.post(f"{url()}/fire", json={}), 404, "not_found")
    problem(await c.post(f"{url()}/enable"), 404, "not_found")
    problem(await c.delete(url()), 404, "not_found")
    again = await c.post(url(), json={"trigger_type": "webhook", "webhook_secret": "k"})
    assert again.status_code == 201, again.text
    assert again.json()["revision"] == 1
    assert again.json()["last_run_id"] is None
    assert (await c.get(f"{url()}/fires")).json()["total"] == 0


async def test_sync_registers_active_versions_blocks_and_never_touches_api_registrations(platform: Platform) -> None:
    c = platform.client
    scheduled = procedure_doc("trig_sync", "1.0.0", trigger={"type": "scheduled", "schedule": "*/5 * * * *",
                                                            "timezone": "Europe/Berlin",
                                                            "input_vars": {"greeting": "tick"}})
    limited = procedure_doc("trig_sync_limited", "1.0.0", trigger={"type": "webhook", "webhook_secret": "k",
                                                                  "max_concurrent_runs": 2})
    by_api = procedure_doc("trig_sync_api", "1.0.0", trigger={"type": "file_watch",
                                                              "file_watch": {"path": "/tmp/doc.csv"}})
    refused = procedure_doc("trig_sync_refused", "1.0.0", trigger={"type": "event",
                                                                  "event_source": "nats://lo.ext.orders.>.created"})
    for doc in (scheduled, limited, by_api, refused):
        r = await c.post("/api/procedures", json={"ckp_json": doc})
        assert r.status_code == 201, r.text
    mine = await c.post(url(procedure_id="trig_sync_api"), json={"trigger_type": "webhook", "webhook_secret": "x"})
    assert mine.status_code == 201, mine.text
    for doc in (scheduled, limited, by_api, refused):
        r = await c.patch(f"/api/procedures/{doc['procedure_id']}/1.0.0/status", json={"status": "active"})
        assert r.status_code == 200, r.text

    # the triggers service registers the blocks on activation; the manual sync repairs a removed registration
    for pid in ("trig_sync", "trig_sync_limited"):
        await wait_until(lambda pid=pid: c.get(url(procedure_id=pid)), lambda r: r.status_code == 200)
    assert (await c.delete(url(procedure_id="trig_sync"))).status_code == 204
    first = await c.post("/api/triggers/sync")
    assert first.status_code == 200, first.text
    body = first.json()
    assert (body["registered"], body["updated"], body["removed"]) == (1, 0, 0), body
    assert [(e["procedure_id"], [d["path"] for d in e["diagnostics"]]) for e in body["errors"]] == [
        ("trig_sync_refused", ["/trigger/event_source"])]
    assert (await c.get(url(procedure_id="trig_sync_limited"))).json()["max_concurrent_runs"] == 2
    got = (await c.get(url(procedure_id="trig_sync"))).json()
    assert (got["source"], got["dormant"], got["schedule"], got["timezone"]) == (
        "ckp", False, "*/5 * * * *", "Europe/Berlin")
    assert got["input_vars"] == {"greeting": "tick"}
    untouched = (await c.get(url(procedure_id="trig_sync_api"))).json()
    assert (untouched["source"], untouched["trigger_type"], untouched["revision"]) == ("api", "webhook", 1)

    again = (await c.post("/api/triggers/sync")).json()
    assert (again["registered"], again["updated"], again["removed"]) == (0, 0, 0), again
    assert (await c.get(url(procedure_id="trig_sync"))).json()["revision"] == 1

    r = await c.patch("/api/procedures/trig_sync/1.0.0/status", json={"status": "deprecated"})
    assert r.status_code == 200, r.text
    dormant = await wait_until(lambda: c.get(url(procedure_id="trig_sync")), lambda r: r.json()["dormant"])
    assert dormant.json()["source"] == "ckp"
