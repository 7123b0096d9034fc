"""Issue 2 acceptance: the internal-only example (internal_variables) imported over HTTP, run with defaults, followed
over SSE; its inputs validated at run creation."""

from __future__ import annotations

import pytest

from tests.helpers import Platform, example, follow_run, import_procedure

pytestmark = pytest.mark.integration


async def test_default_run_completes_with_typed_outputs(platform: Platform) -> None:
    c = platform.client
    detail = await import_procedure(c, example("internal_variables.ckp.json"))
    assert detail["procedure_id"] == "internal-variables"
    assert detail["status"] == "draft"
    assert detail["variables_schema"]["post_id"]["required"] is True

    r = await c.post("/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "1.0.0"})
    assert r.status_code == 201, r.text
    run = r.json()
    assert run["status"] in ("created", "running", "completed")  # the runtime may already have begun
    assert run["input_vars"] == {"post_id": 1}
    assert r.headers["Location"] == f"/api/runs/{run['run_id']}"

    # read-your-writes: the run is visible to the very next GET
    assert (await c.get(f"/api/runs/{run['run_id']}")).status_code == 200

    events, end = await follow_run(c, run["run_id"])
    assert end == "completed"
    types = [e["event_type"] for e in events]
    assert types[0] == "run_created"
    assert types[-1] == "run_completed"
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    outputs = events[-1]["payload"]["outputs"]
    assert outputs["result"] == "ok"
    assert outputs["response"]["id"] == 1
    assert type(outputs["response"]["id"]) is int
    assert outputs["response"]["title"] == "Demo post 1"
    log_events = [e for e in events if e["event_type"] == "log"]
    assert log_events[0]["payload"]["message"] == "Prepared response for post 1"
    route = [e["node_id"] for e in events if e["event_type"] == "node_started"]
    assert route == ["fetch_data", "check_response", "success"]

    # the stream runs ahead of the projection; X-LangOrch-Min-Position makes the read wait for it
    ryw = {"X-LangOrch-Min-Position": str(events[-1]["stream_seq"])}
    final = (await c.get(f"/api/runs/{run['run_id']}", headers=ryw)).json()
    assert final["status"] == "completed"
    assert final["output_vars"] == outputs
    page = (await c.get(f"/api/runs/{run['run_id']}/events", params={"limit": 500})).json()
    assert page["total"] == len(events)
    assert [e["event_id"] for e in page["items"]] == [e["event_id"] for e in events]


@pytest.mark.parametrize(("post_id", "message"), [
    (0, "Must be at least 1"), (101, "Must be at most 100"), ("abc", "Must be a number"),
    # not JSON numbers (json.loads reads the first three, 1e999 overflows to infinity): NaN passed both bounds and
    # created a run, the infinities were refused with a bounds message
    ("NaN", "Must be a number"), ("Infinity", "Must be a number"), ("-Infinity", "Must be a number"),
    ("1e999", "Must be a number"),
])
async def test_bad_input_is_refused_with_a_per_field_error(platform: Platform, post_id: object,
                                                           message: str) -> None:
    c = platform.client
    await import_procedure(c, example("internal_variables.ckp.json"))
    r = await c.post("/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "1.0.0",
                                        "input_vars": {"post_id": post_id}})
    assert r.status_code == 422
    assert r.headers["content-type"].startswith("application/problem+json")
    body = r.json()
    assert body["code"] == "invalid_input_vars"
    assert body["errors"] == {"input_vars.post_id": [message]}
    assert (await c.get("/api/runs")).json()["total"] == 0


async def test_numeric_string_input_is_coerced(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, example("internal_variables.ckp.json"))
    r = await c.post("/api/runs", json={"procedure_id": "internal-variables", "procedure_version": "latest",
                                        "input_vars": {"post_id": "42"}})
    assert r.status_code == 201, r.text
    events, end = await follow_run(c, r.json()["run_id"])
    assert end == "completed"
    assert events[-1]["payload"]["outputs"]["response"]["id"] == 42


async def test_rejected_document_gives_422_with_diagnostics(platform: Platform) -> None:
    c = platform.client
    r = await c.post("/api/procedures", json={"ckp_json": example("rejected/unknown_node_type_hil.json")})
    assert r.status_code == 422
    body = r.json()
    assert body["code"] == "compile_failed"
    [diag] = [d for d in body["diagnostics"] if d["severity"] == "error"]
    assert diag["code"] == "unknown_node_type"
    assert diag["path"] == "/workflow_graph/nodes/gate/type"
    assert (await c.get("/api/procedures")).json()["total"] == 0


async def test_second_import_of_a_version_conflicts(platform: Platform) -> None:
    c = platform.client
    doc = example("minimal_greeting.ckp.json")
    await import_procedure(c, doc)
    r = await c.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 409
    assert r.json()["code"] == "procedure_version_exists"
    assert r.json()["identical"] is True


async def test_minimal_greeting_runs_without_inputs(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, example("minimal_greeting.ckp.json"))
    r = await c.post("/api/runs", json={"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"})
    events, end = await follow_run(c, r.json()["run_id"])
    assert end == "completed"
    assert [e["payload"]["message"] for e in events if e["event_type"] == "log"] == ["e2e test run: hello e2e"]
