"""Issue 2 acceptance: a JetStream duplicate publish (same Nats-Msg-Id) does not create a second run."""

from __future__ import annotations

import pytest

from ckp_core.commands import StartRun
from ckp_core.events import ANONYMOUS
from langorch_infra.jetstream import JetStreamEventStore, encode_envelope, publish_command
from tests.helpers import Platform, example, follow_run, import_procedure

pytestmark = pytest.mark.integration


async def test_duplicate_run_created_and_start_are_dropped(platform: Platform) -> None:
    c = platform.client
    await import_procedure(c, example("minimal_greeting.ckp.json"))
    r = await c.post("/api/runs", json={"procedure_id": "e2e_test_procedure", "procedure_version": "1.0.0"})
    run_id = r.json()["run_id"]
    command_id = r.headers["X-LangOrch-Command-ID"]
    events, end = await follow_run(c, run_id)
    assert end == "completed"

    js = platform.app.state.js
    store = JetStreamEventStore(js)
    [created] = [e for e in await store.read("run", run_id) if e.envelope.type == "run_created"]
    env = created.envelope
    ack = await js.publish(f"lo.evt.run.{run_id}.run_created", encode_envelope(env),
                           headers={"Nats-Msg-Id": env.event_id})
    assert ack.duplicate is True
    assert ack.seq == created.position
    # the start command, published again with its id, is dropped too: the run is not executed twice
    seq = await publish_command(js, StartRun(command_id=command_id, actor=ANONYMOUS, run_id=run_id))
    info = await js.stream_info("LO_CMD")
    assert info.state.last_seq == seq

    after = await store.read("run", run_id)
    assert [e.envelope.seq for e in after] == [e["seq"] for e in events]
    ryw = {"X-LangOrch-Min-Position": str(after[-1].position)}
    runs = (await c.get("/api/runs", headers=ryw)).json()
    assert runs["total"] == 1
    assert [e.envelope.type for e in after].count("run_completed") == 1
