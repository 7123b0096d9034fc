"""The server's notification and alert webhooks (ckp.md §4.3 ``notify``, §4.10 ``notify_on_error``) against a real
HTTP receiver: payloads, headers (a secret reference resolved), one retry, redaction, nothing in dry runs, and a
receiver that hangs or is down never holds up or fails a run."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from fastapi import FastAPI, Request
from fastapi.responses import Response

from tests.helpers import events_of, platform_of, serve_app, start_document, wait_status
from tests.ports import free_port

pytestmark = pytest.mark.integration

TOKEN = "hook-token-4711"
PASSWORD = "pw-s3cr3t-value"


@dataclass
class Receiver:
    url: str = ""
    posts: list[dict[str, Any]] = field(default_factory=list)
    fail_first: int = 0  # answer 503 to this many POSTs first
    hang_s: float = 0.0


@contextlib.asynccontextmanager
async def receiving(receiver: Receiver) -> AsyncIterator[Receiver]:
    app = FastAPI()

    @app.post("/{kind}")
    async def hook(kind: str, request: Request) -> Response:
        receiver.posts.append({"kind": kind, "body": await request.json(), "headers": dict(request.headers)})
        if receiver.hang_s:
            await asyncio.sleep(receiver.hang_s)
        if receiver.fail_first > 0:
            receiver.fail_first -= 1
            return Response(status_code=503)
        return Response(status_code=204)

    async with serve_app(app) as base_url:
        receiver.url = base_url
        yield receiver


DOC = {
    "procedure_id": "notify_and_alert", "version": "1",
    "variables_schema": {"who": {"type": "string", "default": "ops@example.com"},
                         "password": {"type": "string", "default": "", "sensitive": True}},
    "workflow_graph": {"start_node": "tell", "nodes": {
        "tell": {"type": "sequence", "next_node": "risky", "steps": [
            {"step_id": "mail", "action": "notify", "channel": "email", "recipients": "{{who}}",
             "subject": "Run {{run_id}}", "message": "login with {{password}}", "metadata": {"k": 1}}]},
        "risky": {"type": "sequence", "next_node": "done",
                  "error_handlers": [{"action": "ignore", "notify_on_error": True}],
                  "steps": [{"step_id": "div", "action": "calculate", "expression": "1 / 0"}]},
        "done": {"type": "terminate", "outputs": {"ok": True}}}},
}


async def wait_posts(receiver: Receiver, count: int, timeout: float = 10) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while len(receiver.posts) < count:
        assert asyncio.get_running_loop().time() < deadline, receiver.posts
        await asyncio.sleep(0.05)


async def test_notify_and_alert_post_to_the_webhooks(nats_url: str, database_url: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_SECRET_HOOK_TOKEN", TOKEN)
    async with receiving(Receiver(fail_first=1)) as hooks, platform_of(nats_url, database_url, runtime_settings={
            "notify_webhook_url": f"{hooks.url}/notify", "alert_webhook_url": f"{hooks.url}/alert",
            "notify_webhook_headers": {"Authorization": "Bearer {{secrets.hook_token}}", "X-Team": "ops"}}) as p:
        c = p.client
        run_id = await start_document(c, DOC, {"password": PASSWORD})
        run = await wait_status(c, run_id)
        assert run["status"] == "completed", run["error"]
        await wait_posts(hooks, 3)  # the notification (refused once, then posted again) and the alert
        events = await events_of(c, run_id)
        # a dry run posts nothing
        dry_id = await start_document(c, {**DOC, "procedure_id": "notify_dry",
                                          "global_config": {"execution_mode": "dry_run"}})
        assert (await wait_status(c, dry_id))["status"] == "completed"
        assert "notification_requested" in [e["event_type"] for e in await events_of(c, dry_id)]
        await asyncio.sleep(0.5)
    notified = [e["payload"] for e in events if e["event_type"] == "notification_requested"]
    [event] = notified
    notes = [x for x in hooks.posts if x["kind"] == "notify"]
    assert len(notes) == 2  # 503, then the one retry
    assert notes[0]["body"] == notes[1]["body"]
    body = notes[1]["body"]
    assert body["notification_id"] == event["notification_id"]
    assert (body["channel"], body["recipients"], body["subject"]) == ("email", ["ops@example.com"], f"Run {run_id}")
    assert body["metadata"] == {"k": 1}
    assert PASSWORD not in str(body)  # redacted like the event
    assert body["message"] == event["message"]
    headers = notes[1]["headers"]
    assert headers["authorization"] == f"Bearer {TOKEN}"
    assert headers["x-team"] == "ops"
    assert (headers["x-langorch-event"], headers["x-langorch-run-id"]) == ("notification_requested", run_id)
    assert headers["x-langorch-procedure-id"] == "notify_and_alert"
    [alert] = [x for x in hooks.posts if x["kind"] == "alert"]
    [emitted] = [e["payload"] for e in events if e["event_type"] == "step_error_notification"]
    assert alert["body"]["error"]["code"] == emitted["error"]["code"]
    assert (alert["body"]["node_id"], alert["body"]["step_id"], alert["body"]["handler_action"]) == (
        "risky", "div", "ignore")
    assert alert["headers"]["x-langorch-event"] == "step_error_notification"
    assert len(hooks.posts) == 3  # nothing from the dry run


async def test_a_hanging_or_missing_webhook_never_holds_up_a_run(nats_url: str, database_url: str) -> None:
    async with receiving(Receiver(hang_s=7)) as hooks, platform_of(nats_url, database_url, runtime_settings={
            "notify_webhook_url": f"{hooks.url}/notify",
            "alert_webhook_url": f"http://127.0.0.1:{free_port()}/alert"}) as p:
        c = p.client
        loop = asyncio.get_running_loop()
        began = loop.time()
        run = await wait_status(c, await start_document(c, DOC))
        assert run["status"] == "completed", run["error"]
        assert loop.time() - began < 10  # the webhook timeout (5 s) twice would be more
        await wait_posts(hooks, 1)
