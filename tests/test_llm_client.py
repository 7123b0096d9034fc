"""LLM calls of llm_action (ckp.md §3.12, §7.13, §9.3; api.md §15.5) against a real OpenAI-compatible server."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import re
from collections.abc import AsyncIterator
from typing import Any

import pytest

from ckp_core.events import BudgetExceeded, EventData, LlmUsage
from ckp_core.ir import AttachmentIR, GlobalConfigIR, LlmActionPayload, TemplateIR
from langorch_infra.settings import LlmModelConfig, RuntimeSettings
from langorch_runtime.errors import StepError
from langorch_runtime.llm import (
    LlmClient,
    LlmRequest,
    build_messages,
    estimate_tokens,
    json_mode_of,
    orchestration_instruction,
    prompt_text,
    request_for,
    resolve_image_artifacts,
)
from tests.llm_server import LlmServerState, RunningLlmServer, running_llm_server
from tests.ports import free_port

pytestmark = pytest.mark.unit

USER = [{"role": "user", "content": "Say hello"}]


@pytest.fixture(scope="module")
async def llm_server() -> AsyncIterator[RunningLlmServer]:
    async with running_llm_server() as srv:
        yield srv


@pytest.fixture
def srv(llm_server: RunningLlmServer) -> RunningLlmServer:
    llm_server.state.reset()
    return llm_server


class Clock:
    """A manual monotonic clock for the circuit windows (no sleeping, no timing flakiness)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Events:
    def __init__(self) -> None:
        self.items: list[EventData] = []

    async def __call__(self, event: EventData) -> None:
        self.items.append(event)

    def of(self, cls: type[EventData]) -> list[Any]:
        return [e for e in self.items if isinstance(e, cls)]


def client_for(srv: RunningLlmServer, models: dict[str, dict[str, Any]] | None = None, **kw: Any) -> LlmClient:
    secrets: Any = kw.pop("secrets", None)
    circuit: dict[str, Any] = {k: kw.pop(k) for k in ("circuit_open_s", "circuit_failures", "clock") if k in kw}
    settings = RuntimeSettings(llm_base_url=srv.base_url(), llm_default_model=kw.pop("default", "m-default"),
                               llm_models={k: LlmModelConfig(**v) for k, v in (models or {}).items()}, **kw)
    return LlmClient(settings, secrets=secrets, **circuit)


def state(srv: RunningLlmServer) -> LlmServerState:
    return srv.state


def payload(**kw: Any) -> LlmActionPayload:
    return LlmActionPayload(prompt=TemplateIR(source="p"), **kw)


def att(type_: str, description: str | None = None) -> AttachmentIR:
    return AttachmentIR.model_validate({"type": type_, "source": TemplateIR(source="x"), "description": description})


# --- request shape -------------------------------------------------------------------------------------------


async def test_request_body_and_headers(srv: RunningLlmServer) -> None:
    async def lookup(name: str) -> str | None:
        return {"LLM_ORG_TOKEN": "tok-123"}.get(name)

    state(srv).model("m-default").provider_model = "m-default-2024"
    async with client_for(srv, llm_api_key="sk-test", secrets=lookup,
                          llm_extra_headers={"X-Org": "acme", "X-Token": "t={{ secrets.LLM_ORG_TOKEN }}"}) as c:
        result = await c.complete(LlmRequest(messages=USER, idempotency_key="run-1:n1:llm:1"))
        await c.complete(LlmRequest(messages=USER, model="m2", temperature=0.2, max_tokens=50,
                                    request_id="req-9", traceparent="00-" + "a" * 32 + "-" + "b" * 16 + "-01"))
    first, second = state(srv).requests
    assert first["prefix"] == "v1"
    assert first["body"] == {"model": "m-default", "messages": USER, "stream": False}
    h = first["headers"]
    assert h["authorization"] == "Bearer sk-test"
    assert h["idempotency-key"] == "run-1:n1:llm:1"
    assert h["x-request-id"] == "run-1:n1:llm:1"
    assert re.fullmatch(r"00-[0-9a-f]{32}-[0-9a-f]{16}-01", h["traceparent"])
    assert h["x-org"] == "acme"
    assert h["x-token"] == "t=tok-123"
    assert h["content-type"] == "application/json"
    assert result.text == "hello"
    assert (result.model, result.requested_model, result.provider_model) == ("m-default", "m-default", "m-default-2024")
    assert result.fallback_attempt == 0
    assert result.failures == []
    assert second["body"] == {"model": "m2", "messages": USER, "temperature": 0.2, "max_tokens": 50, "stream": False}
    assert "idempotency-key" not in second["headers"]
    assert second["headers"]["x-request-id"] == "req-9"
    assert second["headers"]["traceparent"] == "00-" + "a" * 32 + "-" + "b" * 16 + "-01"


async def test_api_keys_per_model_and_base_url(srv: RunningLlmServer) -> None:
    async def lookup(name: str) -> str | None:
        return {"OTHER_KEY": "sk-other"}.get(name)

    models = {"own": {"base_url": srv.base_url("alt"), "api_key_secret": "OTHER_KEY"},
              "elsewhere": {"base_url": srv.base_url("alt")},
              "missing": {"api_key_secret": "NOT_THERE"}}
    async with client_for(srv, models, llm_api_key="sk-global", secrets=lookup) as c:
        await c.complete(LlmRequest(messages=USER, model="own"))
        await c.complete(LlmRequest(messages=USER, model="elsewhere"))
        await c.complete(LlmRequest(messages=USER, model="plain"))
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="missing"))
    own, elsewhere, plain = state(srv).requests
    assert own["prefix"] == "alt"
    assert own["headers"]["authorization"] == "Bearer sk-other"
    # the global key never goes to another host/base URL
    assert elsewhere["prefix"] == "alt"
    assert "authorization" not in elsewhere["headers"]
    assert plain["prefix"] == "v1"
    assert plain["headers"]["authorization"] == "Bearer sk-global"
    assert err.value.error.code == "secret_not_found"
    assert err.value.error.details == {"secret_name": "NOT_THERE"}
    assert "sk-" not in json.dumps(err.value.error.model_dump())


async def test_protocol_headers_win_over_extra_headers(srv: RunningLlmServer) -> None:
    async with client_for(srv, llm_api_key="sk-1",
                          llm_extra_headers={"authorization": "Bearer other", "idempotency-key": "x"}) as c:
        await c.complete(LlmRequest(messages=USER, idempotency_key="k"))
    raw = state(srv).requests[0]["raw_headers"]
    assert [v for k, v in raw if k == "authorization"] == ["Bearer sk-1"]
    assert [v for k, v in raw if k == "idempotency-key"] == ["k"]


async def test_no_authorization_without_key(srv: RunningLlmServer) -> None:
    async with client_for(srv) as c:
        await c.complete(LlmRequest(messages=USER))
    assert "authorization" not in state(srv).requests[0]["headers"]


async def test_json_mode_sends_response_format(srv: RunningLlmServer) -> None:
    state(srv).model("m-default").answer = '{"a": 1}'
    async with client_for(srv) as c:
        result = await c.complete(LlmRequest(messages=USER, json_mode=True))
    assert state(srv).requests[0]["body"]["response_format"] == {"type": "json_object"}
    assert state(srv).requests[0]["body"]["stream"] is False
    assert json.loads(result.text) == {"a": 1}


# --- messages ------------------------------------------------------------------------------------------------


async def test_attachments_become_parts_and_reach_the_provider(srv: RunningLlmServer) -> None:
    attachments = [(att("text", "Notes"), "plain notes"),
                   (att("markdown", "Doc"), "# Title"),
                   (att("csv"), [["a", "b"], [1, 2]]),
                   (att("json", "Order"), {"id": 7, "name": "Zoë"}),
                   (att("json", "Raw"), '{"already": "json"}'),
                   (att("json", "Word"), "not json"),
                   (att("image", "Photo"), "https://example.com/cat.png"),
                   (att("image"), "data:image/png;base64,iVBORw0KGgo=")]
    messages = build_messages(payload(), "Be brief.", "Describe", attachments)
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [
            {"type": "text", "text": "Describe"},
            {"type": "text", "text": "Attachment: Notes\nplain notes"},
            {"type": "text", "text": "Attachment: Doc\n# Title"},
            {"type": "text", "text": 'Attachment: csv\n[["a", "b"], [1, 2]]'},
            {"type": "text", "text": 'Attachment: Order\n{"id": 7, "name": "Zoë"}'},
            {"type": "text", "text": 'Attachment: Raw\n{"already": "json"}'},
            {"type": "text", "text": 'Attachment: Word\n"not json"'},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}},
            {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}]}]
    async with client_for(srv) as c:
        await c.complete(LlmRequest(messages=messages))
    assert state(srv).requests[0]["body"]["messages"] == messages


def test_messages_without_system_or_attachments() -> None:
    assert build_messages(payload(), None, "Hi", []) == [{"role": "user", "content": "Hi"}]
    assert build_messages(payload(), "", "Hi", []) == [{"role": "user", "content": "Hi"}]


@pytest.mark.parametrize(("source", "problem"), [
    ("ftp://example.com/a.png", "an image source must be an http(s) or data: URL"),
    ("cat.png", "an image source must be an http(s) or data: URL"),
    (42, "an image source must be an http(s) or data: URL"),
    ({"artifact_id": "art-1"}, "this runtime has no artifact store to read the image from"),
    ({"screenshot": "s-1"}, "this runtime has no artifact store to read the image from"),
])
def test_invalid_image_attachment(source: Any, problem: str) -> None:
    with pytest.raises(StepError) as err:
        build_messages(payload(), None, "Look", [(att("text"), "ok"), (att("image"), source)])
    e = err.value.error
    assert (e.code, e.retryable) == ("llm_error", False)
    assert e.details == {"reason": "invalid_attachment", "index": 1, "type": "image", "problem": problem}


PNG_BYTES = b"\x89PNG\r\n\x1a\n" + b"\x00" * 16


class FakeArtifacts:
    """Artifact content by id (the object store's role), recording the reads."""

    def __init__(self, objects: dict[str, bytes], sizes: dict[str, int] | None = None) -> None:
        self.objects = objects
        self.sizes = sizes or {}
        self.reads: list[str] = []

    async def size(self, artifact_id: str, *, root_run_id: str | None = None) -> int | None:
        if artifact_id not in self.objects or root_run_id not in (None, "root-1"):
            return None
        return self.sizes.get(artifact_id, len(self.objects[artifact_id]))

    async def read(self, artifact_id: str) -> bytes:
        self.reads.append(artifact_id)
        return self.objects[artifact_id]


async def test_image_attachments_from_stored_artifacts_become_data_urls() -> None:
    store = FakeArtifacts({"a1": PNG_BYTES, "a2": b"GIF89a...", "a3": b"whatever"})
    declared = AttachmentIR.model_validate({"type": "image", "source": TemplateIR(source="x"),
                                            "mime_type": "image/webp"})
    resolved = await resolve_image_artifacts([
        (att("text"), {"artifact_id": "a1"}),  # not an image attachment: left as it is
        (att("image"), {"artifact_id": "a1"}),
        (att("image"), {"uri": "lo-artifact://a2"}),
        (att("image"), {"screenshot": "https://example.com/s.png"}),
        (declared, {"artifact_id": "a3"}),
        (att("image"), {"uri": "lo-artifact://a1", "mime_type": "image/jpeg"}),
        (att("image"), "https://example.com/cat.png"),
    ], store)
    b64 = base64.b64encode
    assert [src for _, src in resolved] == [
        {"artifact_id": "a1"}, f"data:image/png;base64,{b64(PNG_BYTES).decode()}",
        f"data:image/gif;base64,{b64(b'GIF89a...').decode()}", "https://example.com/s.png",
        f"data:image/webp;base64,{b64(b'whatever').decode()}", f"data:image/jpeg;base64,{b64(PNG_BYTES).decode()}",
        "https://example.com/cat.png"]
    messages = build_messages(payload(), None, "Look", resolved[1:])
    assert messages[0]["content"][1] == {"type": "image_url", "image_url": {"url": resolved[1][1]}}


@pytest.mark.parametrize(("source", "problem"), [
    ({"artifact_id": "gone"}, "no stored artifact 'gone' of this run"),
    ({"uri": "lo-artifact://big"}, "artifact 'big' has 20971521 bytes, more than the 20971520 allowed for an image"),
    ({"artifact_id": "notes"}, "artifact 'notes' is not an image"),
    ({"artifact_id": "pdf", "mime_type": "application/pdf"}, "artifact 'pdf' is not an image (application/pdf)"),
])
async def test_unusable_artifact_images_are_invalid_attachments(source: dict[str, Any], problem: str) -> None:
    store = FakeArtifacts({"big": b"", "notes": b"plain text", "pdf": b"%PDF-1.7"}, {"big": 20 * 1024 * 1024 + 1})
    with pytest.raises(StepError) as err:
        await resolve_image_artifacts([(att("text"), "ok"), (att("image"), source)], store)
    e = err.value.error
    assert (e.code, e.retryable) == ("llm_error", False)
    assert e.details == {"reason": "invalid_attachment", "index": 1, "type": "image", "problem": problem}
    assert "big" not in store.reads  # the size is checked before the content is read


async def test_an_artifact_of_another_run_tree_is_not_found() -> None:
    store = FakeArtifacts({"a1": PNG_BYTES})  # owned by the tree of "root-1"
    ok = await resolve_image_artifacts([(att("image"), {"artifact_id": "a1"})], store, "root-1")
    assert ok[0][1].startswith("data:image/png;base64,")
    with pytest.raises(StepError) as err:
        await resolve_image_artifacts([(att("image"), {"artifact_id": "a1"})], store, "root-2")
    assert err.value.error.details["problem"] == "no stored artifact 'a1' of this run"
    assert store.reads == ["a1"]  # the refused one was never read


def test_orchestration_mode_instruction_and_json() -> None:
    p = payload(orchestration_mode=True, branches=["approve", "reject"])
    instruction = 'Respond with a JSON object that includes the key "_next_node" set to one of: approve, reject.'
    assert orchestration_instruction(["approve", "reject"]) == instruction
    assert build_messages(p, "You route tickets.", "Ticket 1", [])[0] == {
        "role": "system", "content": "You route tickets.\n\n" + instruction}
    assert build_messages(p, None, "Ticket 1", []) == [{"role": "system", "content": instruction},
                                                        {"role": "user", "content": "Ticket 1"}]
    assert build_messages(p, None, "T", [], ["x"])[0]["content"].endswith("one of: x.")
    assert json_mode_of(p) is True
    assert json_mode_of(payload()) is False
    assert json_mode_of(payload(json_mode=True)) is True
    # outside orchestration mode no instruction, whatever the branches
    assert build_messages(payload(branches=["a"]), None, "T", []) == [{"role": "user", "content": "T"}]


def test_request_for_takes_node_values_then_global_ones() -> None:
    p = payload(orchestration_mode=True, branches=["a"], model="m1", temperature=0.1, max_tokens=20,
                timeout_ms=1500, min_llm_quality=0.7)
    gc = GlobalConfigIR(max_cost_usd=2.0, max_cost_per_llm_call_usd=0.05, min_llm_quality=0.2)
    r = request_for(p, gc, USER, spent_usd=0.5, idempotency_key="k", node_id="n1", attempt=2)
    assert (r.model, r.temperature, r.max_tokens, r.timeout_ms, r.json_mode) == ("m1", 0.1, 20, 1500, True)
    assert (r.max_cost_usd, r.spent_usd, r.max_cost_per_llm_call_usd, r.min_llm_quality) == (2.0, 0.5, 0.05, 0.7)
    assert (r.idempotency_key, r.node_id, r.attempt, r.step_id) == ("k", "n1", 2, "llm")


# --- fallback chain ------------------------------------------------------------------------------------------

CHAIN = {"a": {"fallbacks": ["b", "c"]}, "b": {}, "c": {}}


@pytest.mark.parametrize(("failure", "reason"), [
    ((503, None, {}), "http_error"), ((429, None, {"Retry-After": "1"}), "http_error"),
    ((408, None, {}), "http_error"), ((500, "boom", {}), "http_error"), ("delay", "timeout")])
async def test_retryable_failure_moves_to_the_next_model(srv: RunningLlmServer, failure: Any, reason: str) -> None:
    if failure == "delay":
        state(srv).model("a").delay_s = 2.0
    else:
        state(srv).model("a").script.append(failure)
    state(srv).model("b").answer = "from b"
    events = Events()
    async with client_for(srv, CHAIN) as c:
        result = await c.complete(LlmRequest(messages=USER, model="a", timeout_ms=250, idempotency_key="k1",
                                             emit=events, node_id="n", frame="/n#1", attempt=1))
    assert (result.text, result.model, result.requested_model, result.fallback_attempt) == ("from b", "b", "a", 1)
    assert result.failures[0]["model"] == "a"
    assert result.failures[0]["reason"] == reason
    assert [r["model"] for r in state(srv).requests] == ["a", "b"]
    assert state(srv).requests[0]["headers"]["idempotency-key"] == "k1"
    assert state(srv).requests[1]["headers"]["idempotency-key"] == "k1:b"
    (usage,) = events.of(LlmUsage)
    assert (usage.model, usage.requested_model, usage.fallback_attempt) == ("b", "a", 1)
    assert (usage.node_id, usage.step_id, usage.frame, usage.attempt) == ("n", "llm", "/n#1", 1)


async def test_transport_failure_moves_to_the_next_model(srv: RunningLlmServer) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    async with client_for(srv, {"a": {"base_url": dead, "fallbacks": ["b"]}}) as c:
        result = await c.complete(LlmRequest(messages=USER, model="a"))
    assert result.model == "b"
    assert result.failures == [{"model": "a", "reason": "transport", "error": "ConnectError"}]


async def test_non_retryable_4xx_fails_at_once(srv: RunningLlmServer) -> None:
    state(srv).model("a").script.append((400, {"error": {"message": "bad messages"}}, {}))
    events = Events()
    async with client_for(srv, CHAIN) as c:
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="a", emit=events))
        assert c.circuit_state("a") == "closed"
    e = err.value.error
    assert (e.code, e.retryable, e.http_status) == ("llm_error", False, 400)
    assert e.details["reason"] == "http_error"
    assert e.details["provider_message"] == "bad messages"
    assert [r["model"] for r in state(srv).requests] == ["a"]
    assert events.items == []


async def test_exhausted_chain_is_retryable_with_retry_after(srv: RunningLlmServer) -> None:
    state(srv).model("a").status = 503
    state(srv).model("b").script.append((429, None, {"Retry-After": "7"}))
    state(srv).model("c").status = 502
    async with client_for(srv, CHAIN) as c:
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="a"))
    e = err.value.error
    assert (e.code, e.retryable, e.http_status) == ("llm_error", True, 502)
    assert e.details["reason"] == "chain_exhausted"
    assert e.details["retry_after_s"] == 7.0
    assert e.details["retry_after_ms"] == 7000
    assert [(a["model"], a["http_status"]) for a in e.details["attempts"]] == [("a", 503), ("b", 429), ("c", 502)]
    assert [r["model"] for r in state(srv).requests] == ["a", "b", "c"]


async def test_invalid_answer_is_not_retryable(srv: RunningLlmServer) -> None:
    state(srv).model("a").script.append((200, {"object": "nothing"}, {}))
    async with client_for(srv, CHAIN) as c:
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="a"))
    assert err.value.error.details["reason"] == "invalid_response"
    assert err.value.error.retryable is False
    assert len(state(srv).requests) == 1


async def test_quality_and_call_cost_filters_skip_models(srv: RunningLlmServer) -> None:
    models: dict[str, dict[str, Any]] = {"a": {"quality": 0.9, "fallbacks": ["low", "pricey", "unknown", "good"]},
              "low": {"quality": 0.3},
              "pricey": {"quality": 0.9, "prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 20.0},
              "unknown": {"quality": 0.8, "base_url": f"http://127.0.0.1:{free_port()}/v1"},
              "good": {"quality": 0.8, "prompt_usd_per_1k": 0.1, "completion_usd_per_1k": 0.2}}
    state(srv).model("a").status = 503
    async with client_for(srv, models) as c:
        result = await c.complete(LlmRequest(messages=USER, model="a", max_tokens=1000, min_llm_quality=0.5,
                                             max_cost_per_llm_call_usd=0.5))
        assert result.model == "good"
        assert result.fallback_attempt == 4
        assert [(f["model"], f["reason"]) for f in result.failures] == [
            ("a", "http_error"), ("low", "below_min_quality"), ("pricey", "above_max_call_cost"),
            ("unknown", "transport")]
        # projected call cost of 'pricey': (3 prompt tokens * 1.0 + 1000 * 20.0) / 1000
        assert result.failures[2]["projected_usd"] == pytest.approx(20.003)
        assert [r["model"] for r in state(srv).requests] == ["a", "good"]
        # every model filtered: nothing is sent and retrying cannot help
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="low", min_llm_quality=0.5))
    assert (err.value.error.code, err.value.error.retryable) == ("llm_error", False)
    assert err.value.error.details["reason"] == "no_eligible_model"
    assert len(state(srv).requests) == 2


# --- circuit breakers ----------------------------------------------------------------------------------------


async def test_circuit_opens_after_five_failures_and_skips_the_model(srv: RunningLlmServer) -> None:
    state(srv).model("a").status = 503
    async with client_for(srv, {"a": {"fallbacks": ["b"]}, "b": {"quality": 0.1}}) as c:
        for _ in range(4):
            await c.complete(LlmRequest(messages=USER, model="a"))
        assert c.circuit_state("a") == "closed"
        await c.complete(LlmRequest(messages=USER, model="a"))
        assert c.circuit_state("a") == "open"
        assert c.circuits() == {(srv.base_url(), "a"): "open", (srv.base_url(), "b"): "closed"}
        result = await c.complete(LlmRequest(messages=USER, model="a"))
        assert result.model == "b"
        assert result.failures == [{"model": "a", "reason": "circuit_open"}]
        assert len(state(srv).calls("a")) == 5
        assert len(state(srv).calls("b")) == 6
        # another model on the same provider is not blocked
        other = await c.complete(LlmRequest(messages=USER, model="c"))
        assert other.model == "c"
        # open circuit and the fallback filtered out: the chain is exhausted, retryable, nothing sent
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="a", min_llm_quality=0.5))
        assert (err.value.error.code, err.value.error.retryable) == ("llm_error", True)
        assert err.value.error.details["attempts"] == [{"model": "a", "reason": "circuit_open"},
                                                       {"model": "b", "reason": "below_min_quality", "quality": 0.1}]
    assert len(state(srv).calls("a")) == 5


async def test_success_resets_the_failure_count(srv: RunningLlmServer) -> None:
    b = state(srv).model("a")
    b.script.extend([(503, None, {})] * 4 + [(200, None, {})] + [(503, None, {})] * 4)
    async with client_for(srv, {"a": {"fallbacks": ["b"]}}) as c:
        models = [(await c.complete(LlmRequest(messages=USER, model="a"))).model for _ in range(9)]
        assert models == ["b"] * 4 + ["a"] + ["b"] * 4
        assert c.circuit_state("a") == "closed"


async def test_half_open_probe_closes_or_reopens_the_circuit(srv: RunningLlmServer) -> None:
    clock = Clock()
    a = state(srv).model("a")
    a.status = 503
    async with client_for(srv, {"a": {"fallbacks": ["b"]}}, clock=clock) as c:
        for _ in range(5):
            await c.complete(LlmRequest(messages=USER, model="a"))
        assert c.circuit_state("a") == "open"
        clock.now += 59.9  # open for 60 s
        assert c.circuit_state("a") == "open"
        assert (await c.complete(LlmRequest(messages=USER, model="a"))).failures[0]["reason"] == "circuit_open"
        clock.now += 0.1
        assert c.circuit_state("a") == "half_open"
        # a failing probe opens the circuit again at once
        assert (await c.complete(LlmRequest(messages=USER, model="a"))).model == "b"
        assert len(state(srv).calls("a")) == 6
        assert c.circuit_state("a") == "open"
        assert (await c.complete(LlmRequest(messages=USER, model="a"))).failures[0]["reason"] == "circuit_open"
        clock.now += 60.0
        # a successful probe closes it
        a.status = 200
        a.answer = "back"
        result = await c.complete(LlmRequest(messages=USER, model="a"))
        assert (result.model, result.text) == ("a", "back")
        assert c.circuit_state("a") == "closed"
        assert len(state(srv).calls("a")) == 7


async def test_half_open_lets_one_probe_through(srv: RunningLlmServer) -> None:
    clock = Clock()
    a = state(srv).model("a")
    a.status = 503
    async with client_for(srv, {"a": {"fallbacks": ["b"]}}, clock=clock) as c:
        for _ in range(5):
            await c.complete(LlmRequest(messages=USER, model="a"))
        clock.now += 60.0
        a.status, a.delay_s = 200, 0.2
        results = await asyncio.gather(*(c.complete(LlmRequest(messages=USER, model="a")) for _ in range(3)))
    assert sorted(r.model for r in results) == ["a", "b", "b"]
    assert len(state(srv).calls("a")) == 6


# --- usage, cost, budget -------------------------------------------------------------------------------------


async def test_usage_event_with_provider_usage(srv: RunningLlmServer) -> None:
    state(srv).model("m").usage = {"prompt_tokens": 1000, "completion_tokens": 2000, "total_tokens": 3000}
    events = Events()
    models = {"m": {"prompt_usd_per_1k": 0.5, "completion_usd_per_1k": 1.5}}
    async with client_for(srv, models) as c:
        result = await c.complete(LlmRequest(messages=USER, model="m", emit=events, node_id="n", attempt=3))
    (usage,) = events.of(LlmUsage)
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (1000, 2000, 3000)
    assert usage.usage_reported is True
    assert usage.estimated_cost_usd == pytest.approx(3.5)  # 1000/1000*0.5 + 2000/1000*1.5
    assert usage.provider_host == srv.root.removeprefix("http://")
    assert usage.model == "m"
    assert usage.requested_model == "m"
    assert usage.fallback_attempt == 0
    assert usage.latency_ms >= 0
    assert usage.attempt == 3
    assert result.estimated_cost_usd == pytest.approx(3.5)
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.usage_reported) == (
        1000, 2000, True)


async def test_usage_estimated_without_provider_usage_and_null_cost_without_prices(srv: RunningLlmServer) -> None:
    b = state(srv).model("m")
    b.usage = None
    b.answer = "x" * 41
    events = Events()
    messages: list[dict[str, Any]] = [{"role": "system", "content": "s" * 10}, {"role": "user", "content": [
        {"type": "text", "text": "u" * 9}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]}]
    async with client_for(srv) as c:
        result = await c.complete(LlmRequest(messages=messages, model="m", emit=events))
    (usage,) = events.of(LlmUsage)
    prompt = math.ceil(len("s" * 10 + "\n" + "u" * 9) / 4)
    assert prompt_text(messages) == "s" * 10 + "\n" + "u" * 9
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (prompt, 11, prompt + 11)
    assert usage.usage_reported is False
    assert usage.estimated_cost_usd is None
    assert result.estimated_cost_usd is None
    assert estimate_tokens("") == 0
    assert estimate_tokens("abcd") == 1
    assert estimate_tokens("abcde") == 2


async def test_budget_exceeded_before_the_call(srv: RunningLlmServer) -> None:
    models = {"m": {"prompt_usd_per_1k": 1.0, "completion_usd_per_1k": 2.0, "fallbacks": ["free"]}, "free": {}}
    events = Events()
    prompt_tokens = estimate_tokens(prompt_text(USER))
    async with client_for(srv, models) as c:
        with pytest.raises(StepError) as err:
            await c.complete(LlmRequest(messages=USER, model="m", max_tokens=500, max_cost_usd=1.0, spent_usd=0.5,
                                        emit=events, node_id="n", frame="/n#1", attempt=1))
        projected = 0.5 + (prompt_tokens * 1.0 + 500 * 2.0) / 1000
        e = err.value.error
        assert (e.code, e.retryable) == ("budget_exceeded", False)
        assert e.details == {"max_cost_usd": 1.0, "spent_usd": 0.5, "projected_usd": pytest.approx(projected)}
        (ev,) = events.of(BudgetExceeded)
        assert (ev.max_cost_usd, ev.spent_usd) == (1.0, 0.5)
        assert ev.projected_usd == pytest.approx(projected)
        assert (ev.node_id, ev.frame, ev.attempt) == ("n", "/n#1", 1)
        assert state(srv).requests == []
        assert events.of(LlmUsage) == []
        # within the budget the call is made
        ok = await c.complete(LlmRequest(messages=USER, model="m", max_tokens=200, max_cost_usd=1.0, spent_usd=0.5))
        assert ok.model == "m"
        # a run already over budget fails even on an unpriced model
        with pytest.raises(StepError) as over:
            await c.complete(LlmRequest(messages=USER, model="free", max_cost_usd=1.0, spent_usd=1.25))
        assert over.value.error.details["projected_usd"] == 1.25
    assert len(state(srv).requests) == 1


# --- cancellation and timeouts -------------------------------------------------------------------------------


async def test_cancellation_aborts_the_request(srv: RunningLlmServer) -> None:
    state(srv).model("slow").delay_s = 5.0
    events = Events()
    async with client_for(srv, {"slow": {"fallbacks": ["b"]}}) as c:
        task = asyncio.create_task(c.complete(LlmRequest(messages=USER, model="slow", emit=events)))
        for _ in range(200):
            if state(srv).requests:
                break
            await asyncio.sleep(0.005)
        assert state(srv).requests, "the request never reached the server"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        for _ in range(200):
            if state(srv).requests[0]["disconnected"]:
                break
            await asyncio.sleep(0.005)
        record = state(srv).requests[0]
        assert record["disconnected"] is True
        assert record["finished"] is False
        assert c.circuit_state("slow") == "closed"
    assert [r["model"] for r in state(srv).requests] == ["slow"]
    assert events.items == []


async def test_settings_timeout_applies_without_node_timeout(srv: RunningLlmServer) -> None:
    state(srv).model("a").delay_s = 2.0
    async with client_for(srv, {"a": {"fallbacks": ["b"]}}, llm_timeout_s=0.25) as c:
        result = await c.complete(LlmRequest(messages=USER, model="a"))
    assert result.model == "b"
    assert result.failures == [{"model": "a", "reason": "timeout", "timeout_ms": 250}]
    for _ in range(200):
        if state(srv).requests[0]["disconnected"]:
            break
        await asyncio.sleep(0.005)
    assert state(srv).requests[0]["disconnected"] is True  # the timed-out request was aborted, not left running


# --- settings ------------------------------------------------------------------------------------------------


def test_llm_settings_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LANGORCH_LLM_BASE_URL", "http://llm.internal/v1")
    monkeypatch.setenv("LANGORCH_LLM_API_KEY", "sk-env")
    monkeypatch.setenv("LANGORCH_LLM_TIMEOUT_S", "12.5")
    monkeypatch.setenv("LANGORCH_LLM_EXTRA_HEADERS", '{"X-Org": "acme"}')
    monkeypatch.setenv("LANGORCH_LLM_MODELS", json.dumps({
        "gpt-4o": {"prompt_usd_per_1k": 0.0025, "completion_usd_per_1k": 0.01, "quality": 0.9,
                   "fallbacks": ["local"]},
        "local": {"base_url": "http://ollama:11434/v1", "api_key_secret": "OLLAMA_KEY"}}))
    s = RuntimeSettings()
    assert s.llm_base_url == "http://llm.internal/v1"
    assert s.llm_default_model == "gpt-4o"
    assert s.llm_api_key is not None
    assert s.llm_api_key.get_secret_value() == "sk-env"
    assert "sk-env" not in repr(s)
    assert s.llm_timeout_s == 12.5
    assert s.llm_extra_headers == {"X-Org": "acme"}
    assert s.llm_models["gpt-4o"].fallbacks == ["local"]
    assert s.llm_models["gpt-4o"].quality == 0.9
    assert s.llm_models["local"].api_key_secret == "OLLAMA_KEY"
    assert not s.llm_models["local"].priced
    monkeypatch.setenv("LANGORCH_LLM_MODELS", '{"m": {"fallback": ["x"]}}')
    with pytest.raises(ValueError, match="fallback"):
        RuntimeSettings()
