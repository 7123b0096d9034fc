"""api.md §4.2–4.5, §4.7: replace, delete, status lifecycle, promote, rollback, summary, versions and
deployments — through the gateway, decided by the compiler service on the procedure aggregate."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import httpx
import nats
import pytest
from nats.js.errors import KeyNotFoundError, NotFoundError

from ckp_core.subjects import PROCEDURES_BUCKET, procedure_key
from tests import helpers
from tests.helpers import Platform, platform_of, procedure_doc

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    # no runtime: runs stay `created`, which is what the in-use checks need
    async with platform_of(module_nats_url, module_database_url, runtime=False) as p:
        yield p


async def imported(c: httpx.AsyncClient, pid: str, version: str = "1.0.0", **extra: Any) -> dict[str, Any]:
    r = await c.post("/api/procedures", json={"ckp_json": procedure_doc(pid, version, **extra)})
    assert r.status_code == 201, r.text
    return r.json()  # type: ignore[no-any-return]


async def set_status(c: httpx.AsyncClient, pid: str, version: str, status: str) -> httpx.Response:
    return await c.patch(f"/api/procedures/{pid}/{version}/status", json={"status": status})


def problem(r: httpx.Response, status: int, code: str) -> dict[str, Any]:
    body = helpers.problem(r, status, code)
    assert body["type"] == f"urn:langorch:problem:{code}"
    assert body["instance"] == r.request.url.path
    return body


async def ir_exists(nats_url: str, pid: str, version: str) -> bool:
    nc = await nats.connect(nats_url)
    try:
        kv = await nc.jetstream().key_value(PROCEDURES_BUCKET)
        try:
            await kv.get(procedure_key(pid, version))
        except (KeyNotFoundError, NotFoundError):
            return False
        return True
    finally:
        await nc.close()


async def stream_head(nats_url: str) -> int:
    nc = await nats.connect(nats_url)
    try:
        return int((await nc.jetstream().stream_info("LO_EVT")).state.last_seq)
    finally:
        await nc.close()


# -- PUT -----------------------------------------------------------------------------------------------


async def test_replace_a_draft_bumps_the_revision_and_honours_if_match(platform: Platform) -> None:
    c = platform.client
    first = await imported(c, "put_draft")
    assert first["revision"] == 1
    new_doc = procedure_doc("put_draft", description="replaced text")
    r = await c.put("/api/procedures/put_draft/1.0.0", json={"ckp_json": new_doc}, headers={"If-Match": '"1"'})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["revision"] == 2
    assert r.headers["ETag"] == '"2"'
    assert body["description"] == "replaced text"
    assert body["ckp_json"] == new_doc
    assert body["content_hash"] != first["content_hash"]
    assert r.headers["X-LangOrch-Command-ID"]

    stale = await c.put("/api/procedures/put_draft/1.0.0", json={"ckp_json": new_doc}, headers={"If-Match": '"1"'})
    assert problem(stale, 412, "precondition_failed")["current_revision"] == 2
    got = await c.get("/api/procedures/put_draft/1.0.0")
    assert got.headers["ETag"] == '"2"'
    assert got.json()["description"] == "replaced text"


async def test_concurrent_replaces_with_the_same_if_match_give_one_winner(platform: Platform) -> None:
    c = platform.client
    await imported(c, "put_race")
    docs = [procedure_doc("put_race", description=f"writer {i}") for i in range(2)]
    responses = await asyncio.gather(*[
        c.put("/api/procedures/put_race/1.0.0", json={"ckp_json": d}, headers={"If-Match": '"1"'}) for d in docs])
    assert sorted(r.status_code for r in responses) == [200, 412]
    winner = next(r for r in responses if r.status_code == 200).json()
    assert (await c.get("/api/procedures/put_race/1.0.0")).json()["description"] == winner["description"]


async def test_replace_refusals(platform: Platform) -> None:
    c = platform.client
    await imported(c, "put_bad")
    url = "/api/procedures/put_bad/1.0.0"
    other_version = procedure_doc("put_bad", "9.9.9")
    body = problem(await c.put(url, json={"ckp_json": other_version}), 422, "validation_failed")
    assert body["errors"] == {"ckp_json.version": ["Must match the path"]}

    broken = procedure_doc("put_bad")
    broken["workflow_graph"]["start_node"] = "nowhere"
    body = problem(await c.put(url, json={"ckp_json": broken}), 422, "compile_failed")
    assert any(d["severity"] == "error" for d in body["diagnostics"])

    body = problem(await c.put(url, json={"ckp_json": procedure_doc("put_bad"), "extra": 1}), 422, "unknown_field")
    assert body["errors"] == {"extra": ["Unknown field"]}
    problem(await c.put(url, json={"ckp_json": procedure_doc("put_bad")}, headers={"If-Match": "yesterday"}),
            412, "precondition_failed")
    problem(await c.put("/api/procedures/put_bad/2.0.0", json={"ckp_json": procedure_doc("put_bad", "2.0.0")}),
            404, "not_found")

    assert (await set_status(c, "put_bad", "1.0.0", "active")).status_code == 200
    body = problem(await c.put(url, json={"ckp_json": procedure_doc("put_bad")}), 409, "version_not_draft")
    assert body["current_status"] == "active"
    assert (await c.get(url)).json()["revision"] == 2  # only the activation changed it


# -- DELETE --------------------------------------------------------------------------------------------


async def test_delete_removes_the_version_and_its_ir(platform: Platform) -> None:
    c = platform.client
    await imported(c, "del_ok")
    assert await ir_exists(platform.nats_url, "del_ok", "1.0.0")
    r = await c.delete("/api/procedures/del_ok/1.0.0", headers={"If-Match": '"1"'})
    assert r.status_code == 200, r.text
    assert r.json() == {"deleted": True, "procedure_id": "del_ok", "version": "1.0.0"}
    problem(await c.get("/api/procedures/del_ok/1.0.0"), 404, "not_found")
    problem(await c.get("/api/procedures/del_ok"), 404, "not_found")
    assert not await ir_exists(platform.nats_url, "del_ok", "1.0.0")
    problem(await c.delete("/api/procedures/del_ok/1.0.0"), 404, "not_found")
    # the version can be imported again after deletion
    assert (await imported(c, "del_ok"))["revision"] == 1


async def test_delete_refuses_active_in_use_and_stale_versions(platform: Platform) -> None:
    c = platform.client
    await imported(c, "del_refused")
    problem(await c.delete("/api/procedures/del_refused/1.0.0", headers={"If-Match": '"7"'}), 412,
            "precondition_failed")
    run = await c.post("/api/runs", json={"procedure_id": "del_refused", "procedure_version": "1.0.0"})
    assert run.status_code == 201, run.text
    body = problem(await c.delete("/api/procedures/del_refused/1.0.0"), 409, "procedure_version_in_use")
    assert body["run_ids"] == [run.json()["run_id"]]

    assert (await set_status(c, "del_refused", "1.0.0", "active")).status_code == 200
    body = problem(await c.delete("/api/procedures/del_refused/1.0.0"), 409, "procedure_version_active")
    assert body["current_status"] == "active"
    assert (await c.get("/api/procedures/del_refused/1.0.0")).status_code == 200


# -- PATCH status --------------------------------------------------------------------------------------


async def test_status_lifecycle_and_refused_transitions(platform: Platform) -> None:
    c = platform.client
    await imported(c, "st_flow")
    r = await set_status(c, "st_flow", "1.0.0", "active")
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["status"] == "active"
    assert out["revision"] == 2
    assert "ckp_json" not in out  # ProcedureOut, not the detail

    body = problem(await set_status(c, "st_flow", "1.0.0", "draft"), 409, "invalid_status_transition")
    assert body["current_status"] == "active"
    assert body["allowed"] == ["deprecated", "archived"]

    head = await stream_head(platform.nats_url)
    noop = await set_status(c, "st_flow", "1.0.0", "active")
    assert noop.status_code == 200
    assert noop.json()["revision"] == 2
    await asyncio.sleep(0.2)
    assert await stream_head(platform.nats_url) == head  # nothing was appended

    assert (await set_status(c, "st_flow", "1.0.0", "deprecated")).json()["status"] == "deprecated"
    assert (await set_status(c, "st_flow", "1.0.0", "active")).json()["status"] == "active"  # re-activation
    assert (await set_status(c, "st_flow", "1.0.0", "archived")).json()["status"] == "archived"
    body = problem(await set_status(c, "st_flow", "1.0.0", "active"), 409, "invalid_status_transition")
    assert body["current_status"] == "archived"
    assert body["allowed"] == []

    body = problem(await c.patch("/api/procedures/st_flow/1.0.0/status", json={"status": "gone"}), 422,
                   "validation_failed")
    assert list(body["errors"]) == ["status"]
    problem(await set_status(c, "st_flow", "4.0.0", "active"), 404, "not_found")


async def test_activation_deprecates_the_active_version_of_the_channel_in_one_event(platform: Platform) -> None:
    c = platform.client
    await imported(c, "st_swap", "1.0.0")
    await imported(c, "st_swap", "2.0.0")
    assert (await set_status(c, "st_swap", "1.0.0", "active")).status_code == 200
    r = await set_status(c, "st_swap", "2.0.0", "active")
    assert r.status_code == 200
    position = int(r.headers["X-LangOrch-Position"])
    v1 = (await c.get("/api/procedures/st_swap/1.0.0")).json()
    assert v1["status"] == "deprecated"
    assert v1["revision"] == 3
    # the displacement is part of the very event that activated 2.0.0
    nc = await nats.connect(platform.nats_url)
    try:
        msg = await nc.jetstream().get_msg("LO_EVT", position)
    finally:
        await nc.close()
    assert msg.subject.endswith(".procedure_status_changed")
    assert b'"displaced_version":"1.0.0"' in msg.data
    summary = (await c.get("/api/procedures/st_swap")).json()
    assert summary["channels"] == {"dev": "2.0.0", "qa": None, "prod": None}


# -- promote, rollback, deployments ---------------------------------------------------------------------


async def test_promote_through_channels_and_roll_back(platform: Platform) -> None:
    c = platform.client
    await imported(c, "rel", "1.0.0")
    await imported(c, "rel", "2.0.0")
    url = "/api/procedures/rel/{}/promote"

    r = await c.post(url.format("1.0.0"), json={"target_channel": "qa", "reason": "first release"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["previous_channel_version"] is None
    assert body["diagnostics"] == []
    promoted = body["promoted"]
    assert (promoted["status"], promoted["release_channel"]) == ("active", "qa")
    assert promoted["promoted_from_version"] is None
    assert promoted["promoted_by"] == "anonymous"
    assert promoted["promoted_at"].endswith("Z")

    noop = await c.post(url.format("1.0.0"), json={"target_channel": "qa"})
    assert noop.status_code == 200
    assert noop.json()["promoted"]["revision"] == promoted["revision"]

    r = await c.post(url.format("2.0.0"), json={"target_channel": "qa"})
    assert r.status_code == 200, r.text
    assert r.json()["previous_channel_version"] == "1.0.0"
    assert r.json()["promoted"]["promoted_from_version"] == "1.0.0"
    assert (await c.get("/api/procedures/rel/1.0.0")).json()["status"] == "deprecated"

    body = problem(await c.post(url.format("2.0.0"), json={"target_channel": "dev"}), 409, "invalid_promotion")
    assert body["current_channel"] == "qa"
    problem(await c.post(url.format("2.0.0"), json={"target_channel": "staging"}), 422, "validation_failed")

    r = await c.post("/api/procedures/rel/2.0.0/rollback", json={"target_channel": "qa", "reason": "bad build"})
    assert r.status_code == 200, r.text
    assert r.json()["replaced_version"] == "2.0.0"
    restored = r.json()["restored"]
    assert (restored["version"], restored["status"], restored["release_channel"]) == ("1.0.0", "active", "qa")
    assert restored["promoted_from_version"] == "2.0.0"
    assert (await c.get("/api/procedures/rel/2.0.0")).json()["status"] == "deprecated"
    summary = (await c.get("/api/procedures/rel")).json()
    assert summary == {"procedure_id": "rel", "name": "rel", "project_id": None, "versions_count": 2,
                       "latest_version": "2.0.0", "channels": {"dev": None, "qa": "1.0.0", "prod": None}}

    deployments = (await c.get("/api/procedures/rel/deployments")).json()
    assert deployments["total"] == 3
    assert [(d["action"], d["deployed_version"], d["replaced_version"]) for d in deployments["items"]] == [
        ("rollback", "1.0.0", "2.0.0"), ("promote", "2.0.0", "1.0.0"), ("promote", "1.0.0", None)]
    first = deployments["items"][-1]
    assert set(first) == {"deployment_id", "action", "target_channel", "deployed_version", "replaced_version",
                          "deployed_by", "deployed_at", "reason"}
    assert (first["target_channel"], first["reason"], first["deployed_by"]) == ("qa", "first release", "anonymous")
    rollbacks = (await c.get("/api/procedures/rel/deployments", params={"action": "rollback"})).json()
    assert [d["reason"] for d in rollbacks["items"]] == ["bad build"]
    assert (await c.get("/api/procedures/rel/deployments", params={"release_channel": "prod"})).json()["total"] == 0
    problem(await c.get("/api/procedures/rel/deployments", params={"action": "deploy"}), 422, "validation_failed")
    problem(await c.get("/api/procedures/nope/deployments"), 404, "not_found")


async def test_invalid_rollbacks_and_archived_promotion(platform: Platform) -> None:
    c = platform.client
    for v in ("1.0.0", "2.0.0", "3.0.0"):
        await imported(c, "rb_bad", v)
    rollback = "/api/procedures/rb_bad/{}/rollback"
    # not active in the channel
    problem(await c.post(rollback.format("1.0.0"), json={"target_channel": "dev"}), 409, "invalid_rollback")
    assert (await set_status(c, "rb_bad", "1.0.0", "active")).status_code == 200
    # active, but nothing to go back to
    body = problem(await c.post(rollback.format("1.0.0"), json={"target_channel": "dev"}), 409, "invalid_rollback")
    assert "rollback_to_version" in body["detail"]
    # a draft is not a rollback target, nor is the version itself, nor a missing one
    for target in ("2.0.0", "1.0.0", "8.0.0"):
        problem(await c.post(rollback.format("1.0.0"), json={"target_channel": "dev", "rollback_to_version": target}),
                409, "invalid_rollback")
    assert (await set_status(c, "rb_bad", "3.0.0", "archived")).status_code == 200
    problem(await c.post("/api/procedures/rb_bad/3.0.0/promote", json={"target_channel": "qa"}), 409,
            "invalid_promotion")
    # an explicit deprecated target is allowed
    assert (await set_status(c, "rb_bad", "2.0.0", "active")).status_code == 200  # deprecates 1.0.0
    r = await c.post(rollback.format("2.0.0"), json={"target_channel": "dev", "rollback_to_version": "1.0.0"})
    assert r.status_code == 200, r.text
    assert r.json()["restored"]["version"] == "1.0.0"


async def test_summary_and_versions(platform: Platform) -> None:
    c = platform.client
    await imported(c, "sum", "1.0.0", name="First name")
    await imported(c, "sum", "1.1.0", name="Second name")
    assert (await set_status(c, "sum", "1.0.0", "archived")).status_code == 200
    summary = (await c.get("/api/procedures/sum")).json()
    assert summary["name"] == "Second name"
    assert summary["versions_count"] == 2
    assert summary["latest_version"] == "1.1.0"
    assert summary["channels"] == {"dev": None, "qa": None, "prod": None}

    versions = (await c.get("/api/procedures/sum/versions")).json()
    assert [v["version"] for v in versions["items"]] == ["1.1.0", "1.0.0"]
    assert (versions["total"], versions["limit"], versions["offset"]) == (2, 100, 0)
    archived = (await c.get("/api/procedures/sum/versions", params={"status": "archived"})).json()
    assert [v["version"] for v in archived["items"]] == ["1.0.0"]
    paged = (await c.get("/api/procedures/sum/versions", params={"limit": 1, "offset": 1})).json()
    assert [v["version"] for v in paged["items"]] == ["1.0.0"]
    assert paged["total"] == 2
    problem(await c.get("/api/procedures/sum/versions", params={"limit": 0}), 422, "validation_failed")
    problem(await c.get("/api/procedures/missing"), 404, "not_found")
    problem(await c.get("/api/procedures/missing/versions"), 404, "not_found")
    latest = await c.get("/api/procedures/sum/latest")
    assert latest.json()["version"] == "1.1.0"
    assert latest.headers["ETag"] == '"1"'
