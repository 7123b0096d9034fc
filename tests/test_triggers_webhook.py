"""The webhook intake (api.md §10.5) over the real stack: signed deliveries start runs with the body as inputs;
unsigned, forged, stale and unverifiable ones are refused before anything is published on NATS; dedupe,
concurrency, size and media limits; which registration a delivery fires."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import secrets
import shlex
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from typer.testing import CliRunner

from ckp_core.subjects import AUDIT_STREAM, COMMAND_STREAM, EVENT_STREAM
from ckp_core.webhook_signing import SIGNATURE_HEADER, TIMESTAMP_HEADER, sign, signature_headers
from langorch.cli import app as cli_app
from langorch_gateway.fires import DEFAULT_RETRY_AFTER_S, retry_after, skipped_problem
from langorch_infra.jetstream import connect
from tests.helpers import Platform, platform_of, problem, procedure_doc, wait_status, wait_until

VERSION = "1.0.0"


@pytest.fixture(scope="module")
async def platform(module_nats_url: str, module_database_url: str) -> AsyncIterator[Platform]:
    async with platform_of(module_nats_url, module_database_url, approvals=False, agents=False,
                           triggers=True) as p:
        yield p


@dataclass
class Hook:
    procedure_id: str
    secret_name: str
    secret: str

    @property
    def url(self) -> str:
        return f"/api/triggers/webhook/{self.procedure_id}"


def unique(name: str) -> str:
    return f"wh_{name}_{uuid.uuid4().hex[:8]}"


async def add_version(c: httpx.AsyncClient, doc: dict[str, Any], *, active: bool = True) -> None:
    r = await c.post("/api/procedures", json={"ckp_json": doc})
    assert r.status_code == 201, r.text
    if active:
        r = await c.patch(f"/api/procedures/{doc['procedure_id']}/{doc['version']}/status",
                          json={"status": "active"})
        assert r.status_code == 200, r.text


async def register(c: httpx.AsyncClient, procedure_id: str, secret_name: str, version: str = VERSION,
                   **registration: Any) -> dict[str, Any]:
    r = await c.post(f"/api/triggers/{procedure_id}/{version}",
                     json={"trigger_type": "webhook", "webhook_secret": secret_name, **registration})
    assert r.status_code in (200, 201), r.text
    return r.json()  # type: ignore[no-any-return]


async def webhook_procedure(c: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, name: str, *,
                            doc: dict[str, Any] | None = None, **registration: Any) -> Hook:
    """An active version with a webhook registration whose secret the env provider holds."""
    procedure_id = unique(name)
    await add_version(c, {**(doc or procedure_doc(procedure_id)), "procedure_id": procedure_id, "version": VERSION})
    hook = Hook(procedure_id, f"{procedure_id}_key", secrets.token_hex(24))
    monkeypatch.setenv(f"LANGORCH_SECRET_{hook.secret_name.upper()}", hook.secret)
    await register(c, procedure_id, hook.secret_name, **registration)
    return hook


async def deliver(c: httpx.AsyncClient, hook: Hook, body: bytes, *, scheme: str = "timestamped",
                  timestamp: int | None = None, content_type: str = "application/json",
                  headers: dict[str, str] | None = None) -> httpx.Response:
    signed = signature_headers(hook.secret, body, scheme=scheme, timestamp=timestamp)
    return await c.post(hook.url, content=body, headers={"Content-Type": content_type, **signed, **(headers or {})})


def counter(text: str, outcome: str) -> float:
    found = re.search(rf'^langorch_webhook_requests_total\{{outcome="{outcome}"\}} (\S+)$', text, re.MULTILINE)
    return float(found.group(1)) if found else 0.0


async def webhook_counts(c: httpx.AsyncClient) -> str:
    r = await c.get("/metrics")
    assert r.status_code == 200
    return r.text


async def runs_of(c: httpx.AsyncClient, procedure_id: str) -> list[dict[str, Any]]:
    r = await c.get("/api/runs", params={"procedure_id": procedure_id})
    assert r.status_code == 200, r.text
    return r.json()["items"]  # type: ignore[no-any-return]


# -- signed deliveries -------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_signed_webhook_starts_a_run_that_completes_with_the_body_as_inputs(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "signed", input_vars={"greeting": "static", "source": "hook"})
    before = counter(await webhook_counts(c), "accepted")
    body = b'{"greeting": "hello from the sender", "order": 7}'
    r = await deliver(c, hook, body, headers={"X-Request-ID": f"req-{hook.procedure_id}"})
    assert r.status_code == 202, r.text
    out = r.json()
    assert out == {"run_id": out["run_id"], "procedure_id": hook.procedure_id, "procedure_version": VERSION,
                   "trigger_type": "webhook", "triggered_by": "webhook:127.0.0.1", "status": "created"}
    assert r.headers["Location"] == f"/api/runs/{out['run_id']}"
    visible = await c.get(f"/api/runs/{out['run_id']}")  # the run is visible when the answer arrives
    assert visible.status_code == 200, visible.text
    assert (visible.json()["trigger_type"], visible.json()["triggered_by"]) == ("webhook", "webhook:127.0.0.1")

    done = await wait_status(c, out["run_id"], timeout=60)
    assert done["status"] == "completed", done
    assert {k: done["input_vars"].get(k) for k in ("greeting", "order", "source")} == {
        "greeting": "hello from the sender", "order": 7, "source": "hook"}
    events = (await c.get(f"/api/runs/{out['run_id']}/events")).text
    assert "hello from the sender" in events  # the step used the delivered value

    [fire] = (await c.get(f"/api/triggers/{hook.procedure_id}/{VERSION}/fires")).json()["items"]
    assert (fire["outcome"], fire["run_id"], fire["trigger_type"]) == ("started", out["run_id"], "webhook")
    assert fire["source_detail"] == {"request_id": f"req-{hook.procedure_id}", "client_ip": "127.0.0.1",
                                     "content_type": "application/json",
                                     "body_sha256": hashlib.sha256(body).hexdigest()}
    assert counter(await webhook_counts(c), "accepted") == before + 1


@pytest.mark.integration
async def test_the_curl_command_langorch_webhook_sign_prints_starts_a_run(
        platform: Platform, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The sender's path of the docs, as written: ``langorch webhook sign --url`` and the curl line it prints."""
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "cli")
    body_file = tmp_path / "body.json"
    body_file.write_bytes(b'{"greeting": "signed by the CLI"}\n')
    result = CliRunner().invoke(cli_app, ["webhook", "sign", "--secret-env", "SENDER_SECRET", "--url",
                                          f"{platform.base_url}{hook.url}", str(body_file)],
                                env={"SENDER_SECRET": hook.secret})
    assert result.exit_code == 0, result.output
    curl = shlex.split(result.stdout.splitlines()[-1])
    assert curl[0] == "curl"
    process = await asyncio.create_subprocess_exec(*curl, "-w", "\n%{http_code}", stdout=asyncio.subprocess.PIPE)
    out, _ = await asyncio.wait_for(process.communicate(), 60)
    answer, status = out.decode().rsplit("\n", 1)
    assert status == "202", answer
    done = await wait_status(c, json.loads(answer)["run_id"], timeout=60)
    assert (done["status"], done["input_vars"]["greeting"]) == ("completed", "signed by the CLI")


@pytest.mark.integration
async def test_other_bodies_arrive_as_payload_or_text(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "bodies")
    listed = await deliver(c, hook, b'[1, 2, 3]')
    assert listed.status_code == 202, listed.text
    text = await deliver(c, hook, "plain text, ünïcode".encode(), content_type="text/plain; charset=utf-8")
    assert text.status_code == 202, text.text
    as_list = await wait_status(c, listed.json()["run_id"], timeout=60)
    assert as_list["input_vars"]["payload"] == [1, 2, 3]
    as_text = await wait_status(c, text.json()["run_id"], timeout=60)
    assert (as_text["input_vars"]["payload_text"], as_text["input_vars"]["content_type"]) == (
        "plain text, ünïcode", "text/plain; charset=utf-8")


@pytest.mark.integration
async def test_the_body_scheme_needs_no_timestamp(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "body_scheme", signature_scheme="body",
                                   dedupe_window_seconds=600)
    body = b'{"greeting": "no clock here"}'
    r = await c.post(hook.url, content=body, headers={
        "Content-Type": "application/json", SIGNATURE_HEADER: f"sha256={sign(hook.secret, body, scheme='body')}"})
    assert r.status_code == 202, r.text
    done = await wait_status(c, r.json()["run_id"], timeout=60)
    assert (done["status"], done["input_vars"]["greeting"]) == ("completed", "no clock here")


@pytest.mark.integration
async def test_a_repeated_request_id_is_not_a_duplicate_delivery(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    """The sender chooses X-Request-ID: two deliveries carrying the same one (dedupe off) are two fires, not one
    message JetStream drops as a duplicate."""
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "same_request_id")
    request_id = f"req-{uuid.uuid4().hex}"
    answers = [await deliver(c, hook, b'{"greeting": "' + word + b'"}', headers={"X-Request-ID": request_id})
               for word in (b"first", b"second")]
    assert [a.status_code for a in answers] == [202, 202], [a.text for a in answers]
    assert [a.json().get("status") for a in answers] == ["created", "created"], [a.text for a in answers]
    assert answers[0].json()["run_id"] != answers[1].json()["run_id"]


@pytest.mark.integration
async def test_a_rotated_pair_passes_when_the_second_signature_matches(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "rotated")
    body = b'{"greeting": "rotating"}'
    ts = int(time.time())
    old = sign("the sender's retired secret", body, timestamp=ts)
    new = sign(hook.secret, body, timestamp=ts)
    r = await c.post(hook.url, content=body, headers={"Content-Type": "application/json", TIMESTAMP_HEADER: str(ts),
                                                      SIGNATURE_HEADER: f"sha256={old}, sha256={new}"})
    assert r.status_code == 202, r.text
    only_old = await c.post(hook.url, content=body, headers={
        "Content-Type": "application/json", TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: f"sha256={old}"})
    problem(only_old, 401, "invalid_signature")


# -- refusals before NATS ----------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_unsigned_forged_stale_and_unverifiable_webhooks_never_reach_nats(
        nats_url: str, database_url: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A platform of its own (its own NATS account), so every message on ``lo.>`` during a request is the
    request's doing: there must be none, and no fire and no run."""
    async with platform_of(nats_url, database_url, approvals=False, agents=False, triggers=True) as p:
        c = p.client
        nc = await connect(nats_url, "test-webhook-silence")
        try:
            seen: list[Msg] = []

            async def record(msg: Msg) -> None:
                seen.append(msg)

            await nc.subscribe("lo.>", cb=record)
            await nc.flush()
            hook = await webhook_procedure(c, monkeypatch, "refused")
            unknown = await webhook_procedure(c, monkeypatch, "unknown_secret")
            await settled(seen, nc)
            before = await stream_heads(nc)
            assert {COMMAND_STREAM, EVENT_STREAM, AUDIT_STREAM} <= set(before), before
            await refuse_all(c, nc, seen, hook, unknown, caplog, monkeypatch)
            assert await stream_heads(nc) == before  # nothing was stored either
        finally:
            await nc.close()
        assert any(unknown.secret_name in rec.getMessage() for rec in caplog.records), caplog.text
        assert hook.secret not in caplog.text
        for target in (hook, unknown):
            fires = (await c.get(f"/api/triggers/{target.procedure_id}/{VERSION}/fires")).json()
            assert fires["total"] == 0, fires
            assert await runs_of(c, target.procedure_id) == []
        text = await webhook_counts(c)
        assert counter(text, "invalid_signature") == 5
        assert counter(text, "stale_signature") == 2


async def stream_heads(nc: NATS) -> dict[str, int]:
    """The last sequence of each ``LO_*`` stream of the test's account (commands, events, audit, external)."""
    return {name: info.state.last_seq for info in await nc.jetstream().streams_info()
            if (name := info.config.name or "").startswith("LO_")}


async def refuse_all(c: httpx.AsyncClient, nc: NATS, seen: list[Msg], hook: Hook, unknown: Hook,
                     caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each refused request, with nothing on ``lo.>`` while it is answered."""
    monkeypatch.delenv(f"LANGORCH_SECRET_{unknown.secret_name.upper()}")
    body = b'{"greeting": "forged"}'
    now = int(time.time())
    forged = Hook(hook.procedure_id, hook.secret_name, "not the registration's secret")
    cases: list[tuple[str, Hook, dict[str, str], str]] = [
        ("bad signature", hook, signature_headers(forged.secret, body, timestamp=now), "invalid_signature"),
        ("stale timestamp", hook, signature_headers(hook.secret, body, timestamp=now - 3600), "stale_signature"),
        ("future timestamp", hook, signature_headers(hook.secret, body, timestamp=now + 3600),
         "stale_signature"),
        ("no signature header", hook, {TIMESTAMP_HEADER: str(now)}, "invalid_signature"),
        ("no timestamp header", hook, {SIGNATURE_HEADER: signature_headers(hook.secret, body, timestamp=now)[
            SIGNATURE_HEADER]}, "invalid_signature"),
        ("malformed signature", hook, {TIMESTAMP_HEADER: str(now), SIGNATURE_HEADER: "sha1=abc"},
         "invalid_signature"),
        ("unknown secret", unknown, signature_headers("anything", body, timestamp=now), "invalid_signature"),
    ]
    for what, target, headers, code in cases:
        seen.clear()
        with caplog.at_level(logging.WARNING, logger="langorch_gateway.routes_webhooks"):
            r = await c.post(target.url, content=body, headers={"Content-Type": "application/json", **headers})
        assert problem(r, 401, code), what
        await nc.flush()  # what the server routed to this subscriber before the flush has arrived
        assert [m.subject for m in seen] == [], what


async def settled(seen: list[Msg], nc: NATS) -> None:
    """Wait until the set-up's commands are all decided and audited: each command on ``lo.cmd.>`` has its one
    audit record on ``lo.audit.>`` (api.md §12), the last message a command causes."""
    async def audited() -> bool:
        await nc.flush()
        subjects = [m.subject for m in seen]
        commands = sum(1 for s in subjects if s.startswith("lo.cmd."))
        return commands > 0 and commands == sum(1 for s in subjects if s.startswith("lo.audit."))

    await wait_until(audited, timeout=30)


# -- dedupe ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_a_replay_inside_the_tolerance_is_a_duplicate_delivery(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "replay", dedupe_window_seconds=600)
    body = b'{"greeting": "once only"}'
    headers = {"Content-Type": "application/json", **signature_headers(hook.secret, body)}
    first = await c.post(hook.url, content=body, headers=headers)
    assert first.status_code == 202, first.text
    replay = await c.post(hook.url, content=body, headers=headers)
    dup = problem(replay, 409, "duplicate_delivery")
    assert dup["existing_run_id"] == first.json()["run_id"]
    assert dup["first_seen_at"]
    stale = await deliver(c, hook, body, timestamp=int(time.time()) - 3600)  # the same body replayed much later
    problem(stale, 401, "stale_signature")
    assert [r["run_id"] for r in await runs_of(c, hook.procedure_id)] == [first.json()["run_id"]]


@pytest.mark.integration
async def test_ten_identical_concurrent_webhooks_start_one_run(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "burst", dedupe_window_seconds=600)
    body = b'{"greeting": "burst"}'
    headers = {"Content-Type": "application/json", **signature_headers(hook.secret, body)}
    answers = await asyncio.gather(*(c.post(hook.url, content=body, headers=headers) for _ in range(10)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202] + [409] * 9, [a.text for a in answers]
    [started] = [a.json() for a in answers if a.status_code == 202]
    assert {a.json()["existing_run_id"] for a in answers if a.status_code == 409} == {started["run_id"]}
    done = await wait_status(c, started["run_id"], timeout=60)
    assert done["status"] == "completed", done
    assert [r["run_id"] for r in await runs_of(c, hook.procedure_id)] == [started["run_id"]]
    fires = await wait_until(lambda: c.get(f"/api/triggers/{hook.procedure_id}/{VERSION}/fires"),
                             lambda r: r.json()["total"] == 10)
    assert sorted(f["outcome"] for f in fires.json()["items"]) == ["duplicate"] * 9 + ["started"]


# -- limits ------------------------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_size_and_media_limits(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "limits")
    big = b'{"greeting": "' + b"x" * (2 * 1024 * 1024) + b'"}'
    problem(await deliver(c, hook, big), 413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: the cap applies while reading
        for start in range(0, len(big), 64 * 1024):
            yield big[start:start + 64 * 1024]

    chunked = await c.post(hook.url, content=chunks(), headers={
        "Content-Type": "application/json", **signature_headers(hook.secret, big)})
    problem(chunked, 413, "payload_too_large")

    latin1 = "grüße".encode("latin-1")
    problem(await deliver(c, hook, latin1, content_type="text/plain"), 415, "unsupported_media_type")
    unsigned_latin1 = await c.post(hook.url, content=latin1, headers={"Content-Type": "text/plain"})
    problem(unsigned_latin1, 401, "invalid_signature")  # only a signed sender learns about its body

    at_limit = b'{"greeting": "' + b"y" * (1024 * 1024 - 16) + b'"}'
    assert len(at_limit) <= 1024 * 1024
    # within the body cap, but a run's inputs travel in one NATS message: the test server's max_payload is 1 MiB
    assert "max_payload" in problem(await deliver(c, hook, at_limit), 413, "payload_too_large")["detail"]
    half = b'{"greeting": "' + b"y" * (512 * 1024) + b'"}'
    r = await deliver(c, hook, half)
    assert r.status_code == 202, r.text[:500]
    done = await wait_status(c, r.json()["run_id"], timeout=60)
    assert len(done["input_vars"]["greeting"]) == 512 * 1024


@pytest.mark.integration
async def test_a_sender_that_goes_away_mid_body_is_no_server_error(
        platform: Platform, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "gone")
    before = counter(await webhook_counts(c), "refused")
    host, port = platform.base_url.removeprefix("http://").split(":")
    _, writer = await asyncio.open_connection(host, int(port))
    writer.write(f"POST {hook.url} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 "Content-Length: 1000\r\n\r\n{\"greeting\": ".encode())
    await writer.drain()
    writer.close()
    await writer.wait_closed()
    with caplog.at_level(logging.ERROR, logger="langorch_gateway"):
        await wait_until(lambda: webhook_counts(c), lambda text: counter(text, "refused") == before + 1)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], caplog.text
    assert await runs_of(c, hook.procedure_id) == []


@pytest.mark.integration
async def test_inputs_are_validated_after_the_merge(platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "invalid", input_vars={"greeting": "a valid default"})
    wrong = await deliver(c, hook, b'{"greeting": ["not", "a", "string"]}')
    assert problem(wrong, 422, "invalid_input_vars")["errors"] == {"input_vars.greeting": ["Must be a string"]}
    nul = await deliver(c, hook, b'{"greeting": "nul \\u0000 inside"}')
    assert problem(nul, 422, "invalid_input_vars")["errors"] == {
        "input_vars.greeting": ["Must not contain the NUL character (U+0000)"]}
    fine = await deliver(c, hook, b'{"other": 1}')  # the registration's greeting fills in
    assert fine.status_code == 202, fine.text
    done = await wait_status(c, fine.json()["run_id"], timeout=60)
    assert done["input_vars"]["greeting"] == "a valid default"
    outcomes = [f["outcome"] for f in (await c.get(f"/api/triggers/{hook.procedure_id}/{VERSION}/fires")).json()[
        "items"]]
    assert sorted(outcomes) == ["invalid", "started"]  # the NUL body never left the gateway


# -- which registration fires ------------------------------------------------------------------------------------


@pytest.mark.integration
async def test_no_enabled_webhook_registration_on_an_active_version_is_404(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    body = b'{"greeting": "nobody home"}'
    nowhere = Hook(unique("nowhere"), "nowhere_key", "s3cret")
    problem(await deliver(c, nowhere, body), 404, "not_found")
    problem(await deliver(c, Hook("bad%20id", "k", "s"), body), 404, "not_found")

    disabled = await webhook_procedure(c, monkeypatch, "disabled")
    assert (await c.post(f"/api/triggers/{disabled.procedure_id}/{VERSION}/disable")).status_code == 200
    problem(await deliver(c, disabled, body), 404, "not_found")

    draft = Hook(unique("draft"), "draft_key", secrets.token_hex(8))
    monkeypatch.setenv(f"LANGORCH_SECRET_{draft.secret_name.upper()}", draft.secret)
    await add_version(c, procedure_doc(draft.procedure_id), active=False)
    assert (await register(c, draft.procedure_id, draft.secret_name))["dormant"] is True
    problem(await deliver(c, draft, body), 404, "not_found")

    other_type = await webhook_procedure(c, monkeypatch, "other_type")
    r = await c.post(f"/api/triggers/{other_type.procedure_id}/{VERSION}",
                     json={"trigger_type": "file_watch", "event_source": "/tmp/in.csv"})
    assert r.status_code == 200, r.text
    problem(await deliver(c, other_type, body), 404, "not_found")
    assert counter(await webhook_counts(c), "not_found") >= 5


@pytest.mark.integration
async def test_the_most_recently_updated_registration_fires(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    hook = await webhook_procedure(c, monkeypatch, "versions")  # 1.0.0 active in dev
    await add_version(c, procedure_doc(hook.procedure_id, "2.0.0"), active=False)
    promoted = await c.post(f"/api/procedures/{hook.procedure_id}/2.0.0/promote", json={"target_channel": "prod"})
    assert promoted.status_code == 200, promoted.text  # two active versions, one per channel
    await register(c, hook.procedure_id, hook.secret_name, "2.0.0")
    r = await deliver(c, hook, b'{"greeting": "to the newest"}')
    assert r.status_code == 202, r.text
    assert r.json()["procedure_version"] == "2.0.0"
    await register(c, hook.procedure_id, hook.secret_name, VERSION, input_vars={"touched": True})
    r = await deliver(c, hook, b'{"greeting": "to the updated one"}')
    assert r.status_code == 202, r.text
    assert r.json()["procedure_version"] == VERSION
    assert (await c.post(f"/api/triggers/{hook.procedure_id}/{VERSION}/disable")).status_code == 200
    r = await deliver(c, hook, b'{"greeting": "back to the enabled one"}')
    assert r.status_code == 202, r.text
    assert r.json()["procedure_version"] == "2.0.0"


# -- concurrency -------------------------------------------------------------------------------------------------


def waiting_doc(procedure_id: str) -> dict[str, Any]:
    """A run that stays active for a minute (its only step waits)."""
    return {"procedure_id": procedure_id, "version": VERSION, "workflow_graph": {"start_node": "w", "nodes": {
        "w": {"type": "sequence", "next_node": "done", "steps": [
            {"step_id": "pause", "action": "wait", "duration_ms": 60_000}]},
        "done": {"type": "terminate"}}}}


@pytest.mark.integration
async def test_max_concurrent_runs_with_a_run_active_is_429_with_retry_after(
        platform: Platform, monkeypatch: pytest.MonkeyPatch) -> None:
    c = platform.client
    procedure_id = unique("limited")
    hook = await webhook_procedure(c, monkeypatch, "limited", doc=waiting_doc(procedure_id), max_concurrent_runs=1)
    first = await deliver(c, hook, b'{"n": 1}')
    assert first.status_code == 202, first.text
    run_id = first.json()["run_id"]
    try:
        await wait_status(c, run_id, ("running",), timeout=60)
        second = await deliver(c, hook, b'{"n": 2}')
        refused = problem(second, 429, "max_concurrent_runs")
        assert (refused["active_runs"], refused["limit"]) == (1, 1), refused
        assert int(second.headers["Retry-After"]) >= 1
        [throttled] = (await c.get(f"/api/triggers/{hook.procedure_id}/{VERSION}/fires",
                                   params={"outcome": "throttled"})).json()["items"]
        assert throttled["reason"] == "max_concurrent_runs"
        assert [r["run_id"] for r in await runs_of(c, hook.procedure_id)] == [run_id]
    finally:
        await c.post(f"/api/runs/{run_id}/cancel", json={})
    assert counter(await webhook_counts(c), "throttled") >= 1


# -- the outcome mapping shared with the manual fire -------------------------------------------------------------


@pytest.mark.unit
def test_a_throttled_skip_is_429_with_the_services_retry_after() -> None:
    refused = skipped_problem({"outcome": "throttled", "reason": "max_concurrent_runs", "detail": "at the limit",
                               "extra": {"active_runs": 3, "limit": 3, "retry_after_s": 12.2}})
    assert (refused.code, refused.status, refused.extra) == ("max_concurrent_runs", 429,
                                                             {"active_runs": 3, "limit": 3})
    assert refused.headers == {"Retry-After": "13"}
    bare = skipped_problem({"outcome": "throttled", "reason": "max_concurrent_runs", "extra": {}})
    assert bare.headers == {"Retry-After": str(DEFAULT_RETRY_AFTER_S)}
    assert [retry_after(v) for v in (None, 0, -1, float("nan"), True, "7", 0.2)] == [DEFAULT_RETRY_AFTER_S] * 6 + [1]


@pytest.mark.unit
def test_duplicate_and_invalid_skips_keep_their_members() -> None:
    dup = skipped_problem({"outcome": "duplicate", "reason": "duplicate_delivery", "detail": "again",
                           "extra": {"existing_run_id": "r1", "first_seen_at": "2026-01-01T00:00:00.000000Z"}})
    assert (dup.code, dup.status, dup.extra["existing_run_id"]) == ("duplicate_delivery", 409, "r1")
    invalid = skipped_problem({"outcome": "invalid", "reason": "invalid_input_vars", "detail": "bad",
                               "extra": {"errors": {"input_vars.x": ["Must be a string"]}}})
    assert (invalid.code, invalid.status, invalid.errors) == ("invalid_input_vars", 422,
                                                              {"input_vars.x": ["Must be a string"]})
