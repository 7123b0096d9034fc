"""Internal operations (ckp.md §4.3) through ``langorch_runtime.operations`` with compiled IR."""

from __future__ import annotations

import asyncio
import base64
import datetime as dt
import hashlib
import hmac
import io
import json
import re
import uuid
import zipfile
from typing import Any

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from ckp_core.events import Log, NotificationRequested, ScreenshotRequested
from ckp_core.expressions import MappingScope
from langorch_runtime.errors import StepError
from langorch_runtime.operations import (
    ArtifactRequest,
    OpContext,
    OpOutcome,
    SecretRef,
    apply_writes,
    derive_key,
    run_operation,
)
from runtime_ir_support import operation, render_params, step

pytestmark = pytest.mark.unit

FIXED_NOW = dt.datetime(2026, 3, 14, 15, 9, 26, 535000, tzinfo=dt.UTC)


async def run(raw: dict[str, Any], variables: dict[str, Any] | None = None, **ctx: Any) -> OpOutcome:
    op = operation(raw)
    variables = variables or {}
    params = render_params(op.params, variables)
    ctx.setdefault("clock", lambda: FIXED_NOW)
    return await run_operation(op, params, variables, OpContext(node_id="n", step_id=None, **ctx))


async def fails(raw: dict[str, Any], variables: dict[str, Any] | None = None, **ctx: Any) -> dict[str, Any]:
    with pytest.raises(StepError) as info:
        await run(raw, variables, **ctx)
    return info.value.error.model_dump()


# -- log, wait -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "logging_level", "expected"), [
    ({"action": "log", "message": "hello {{who}}"}, "INFO", ("INFO", "hello world")),
    ({"action": "log", "value": "alias", "level": "warning"}, "INFO", ("WARNING", "alias")),
    ({"action": "log", "message": "{{n}}", "level": "ERROR"}, "WARNING", ("ERROR", "3")),
    ({"action": "log", "message": "{{obj}}"}, "DEBUG", ("INFO", '{"a":1}')),
    ({"action": "log", "message": "quiet", "level": "DEBUG"}, "INFO", None),
    ({"action": "log", "message": "quiet", "level": "INFO"}, "error", None),
])
async def test_log(raw: dict[str, Any], logging_level: str, expected: tuple[str, str] | None) -> None:
    out = await run(raw, {"who": "world", "n": 3, "obj": {"a": 1}}, logging_level=logging_level)
    assert out.result is None
    if expected is None:
        assert out.events == []
    else:
        assert len(out.events) == 1
        event = out.events[0]
        assert isinstance(event, Log)
        assert (event.level, event.message, event.node_id) == (*expected, "n")


async def test_log_truncates_to_8_kib_and_rejects_bad_level() -> None:
    out = await run({"action": "log", "message": "{{m}}"}, {"m": "é" * 5000})
    event = out.events[0]
    assert isinstance(event, Log)
    assert len(event.message.encode()) <= 8192
    assert event.message == "é" * 4096
    error = await fails({"action": "log", "message": "x", "level": "{{lvl}}"}, {"lvl": "LOUD"})
    assert error["code"] == "operation_failed"
    assert error["details"] == {"reason": "invalid_value", "field": "level", "action": "log", "index": 0}


async def test_wait_uses_the_context_sleep_and_is_cancellable() -> None:
    slept: list[float] = []

    async def fake_sleep(seconds: float) -> None:
        slept.append(seconds)

    out = await run({"action": "wait", "value": 1500}, sleep=fake_sleep)
    assert out.result == {"waited_ms": 1500}
    assert slept == [1.5]
    out = await run({"action": "wait", "duration_ms": "{{ms}}"}, {"ms": "250"}, sleep=fake_sleep)
    assert out.result == {"waited_ms": 250}
    task = asyncio.ensure_future(run({"action": "wait", "duration_ms": 60_000}))
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    error = await fails({"action": "wait", "duration_ms": "{{ms}}"}, {"ms": "soon"})
    assert error["details"]["reason"] == "invalid_value"


# -- variables -------------------------------------------------------------------------------------------------


async def test_set_variable_plain_and_dotted_paths() -> None:
    variables: dict[str, Any] = {"cfg": {"a": {"keep": 1}}, "n": 2}
    out = await run({"action": "set_variable", "variable": "total", "value": "{{n}}"}, variables)
    assert (out.result, out.writes) == (2, {"total": 2})
    shared = variables["cfg"]
    out = await run({"action": "set_variable", "variable": "cfg.a.b.c", "value": [1, "{{n}}"]}, variables)
    assert out.writes == {"cfg.a.b.c": [1, 2]}
    apply_writes(variables, out.writes)
    assert variables["cfg"] == {"a": {"keep": 1, "b": {"c": [1, 2]}}}
    assert shared == {"a": {"keep": 1}}, "objects along the path are copied, never mutated"
    fresh: dict[str, Any] = {}
    apply_writes(fresh, {"x.y": 1, "z": None})
    assert fresh == {"x": {"y": 1}, "z": None}


@pytest.mark.parametrize("variables", [{"cfg": 5}, {"cfg": {"a": "text"}}, {"cfg": None}, {"cfg": [1]}])
async def test_set_variable_across_a_non_object_fails(variables: dict[str, Any]) -> None:
    error = await fails({"action": "set_variable", "variable": "cfg.a.b", "value": 1}, variables)
    assert error["code"] == "operation_failed"
    assert error["details"]["reason"] == "not_an_object"
    assert error["details"]["action"] == "set_variable"
    with pytest.raises(StepError):
        apply_writes(dict(variables), {"cfg.a.b": 1})


@pytest.mark.parametrize(("variables", "expected"), [
    ({}, [{"id": 1}]),
    ({"items": None}, [{"id": 1}]),
    ({"items": ["a"]}, ["a", {"id": 1}]),
])
async def test_append_to_array(variables: dict[str, Any], expected: list[Any]) -> None:
    before = json.dumps(variables)
    out = await run({"action": "append_to_array", "array": "items", "value": {"id": "{{one}}"}},
                    {**variables, "one": 1})
    assert out.result == expected
    assert out.writes == {"items": expected}
    assert json.dumps(variables) == before


async def test_append_to_a_non_list_fails() -> None:
    error = await fails({"action": "append_to_array", "array": "items", "value": 1}, {"items": {"a": 1}})
    assert error["details"]["reason"] == "not_a_list"


# -- parsing ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("source", "expected"), [
    ('{"a": [1, 2.5, null]}', {"a": [1, 2.5, None]}),
    ('```json\n{"a": 1}\n```', {"a": 1}),
    ("```\n[1]\n```", [1]),
    ("  42 ", 42),
    ({"already": "object"}, {"already": "object"}),
    ([1, 2], [1, 2]),
])
async def test_parse_json(source: Any, expected: Any) -> None:
    out = await run({"action": "parse_json", "source": "{{src}}"}, {"src": source})
    assert out.result == expected


@pytest.mark.parametrize("source", ["{bad", "NaN", "", 5, None, "```json\n{oops\n```"])
async def test_parse_json_invalid(source: Any) -> None:
    error = await fails({"action": "parse_json", "source": "{{src}}"}, {"src": source})
    assert (error["code"], error["details"]["reason"]) == ("operation_failed", "invalid_json")


async def test_parse_xml_shapes() -> None:
    xml = ('<?xml version="1.0" encoding="ISO-8859-1"?><order id="7" xmlns:x="urn:x"><item sku="a">Pen</item>'
           "<item>Ink</item><note/><total> 3.50 </total><x:tag>t</x:tag><!-- c -->mixed</order>")
    out = await run({"action": "parse_xml", "source": "{{x}}"}, {"x": xml})
    assert out.result == {"order": {
        "@id": "7", "#text": "mixed", "item": [{"@sku": "a", "#text": "Pen"}, "Ink"], "note": None,
        "total": "3.50", "x:tag": "t",
    }}
    leaf = await run({"action": "parse_xml", "source": "<a>v</a>"})
    assert leaf.result == {"a": "v"}


@pytest.mark.parametrize("source", [
    '<!DOCTYPE a [<!ENTITY e "boom">]><a>&e;</a>',
    '<!DOCTYPE a SYSTEM "http://example.invalid/a.dtd"><a/>',
    '<!DOCTYPE a [<!ENTITY x SYSTEM "file:///etc/passwd">]><a>&x;</a>',
    "<a>&undefined;</a>",
    "<a><b></a>",
    "not xml",
    "",
])
async def test_parse_xml_refuses_dtds_entities_and_malformed_input(source: str) -> None:
    error = await fails({"action": "parse_xml", "source": "{{x}}"}, {"x": source})
    assert error["details"]["reason"] == "invalid_xml"


@pytest.mark.parametrize(("raw", "expected"), [
    ({"source": "a,b\n1,2\n\n3\n"}, [{"a": "1", "b": "2"}, {"a": "3", "b": None}]),
    ({"source": "a;b\n'x;y';true\n", "delimiter": ";", "quotechar": "'", "infer_types": True},
     [{"a": "x;y", "b": True}]),
    ({"source": "n,f,s\n-1,2.5e1,007x\n", "infer_types": True}, [{"n": -1, "f": 25.0, "s": "007x"}]),
    ({"source": "1,2\n\n3,4,5\n", "header": False}, [["1", "2"], ["3", "4", "5"]]),
    ({"source": "1,FALSE\n", "header": False, "infer_types": True}, [[1, False]]),
    ({"source": ""}, []),
    ({"source": "only,header\n"}, []),
])
async def test_parse_csv(raw: dict[str, Any], expected: list[Any]) -> None:
    out = await run({"action": "parse_csv", **raw})
    assert out.result == expected


async def test_parse_csv_errors() -> None:
    error = await fails({"action": "parse_csv", "source": "a\n1,2\n"})
    assert error["details"]["reason"] == "invalid_csv"
    assert error["details"]["row"] == 2
    error = await fails({"action": "parse_csv", "source": 'a\n"unterminated\n'})
    assert error["details"]["reason"] == "invalid_csv"
    error = await fails({"action": "parse_csv", "source": "a", "delimiter": "{{d}}"}, {"d": "::"})
    assert error["details"]["reason"] == "invalid_value"


# -- Excel -----------------------------------------------------------------------------------------------------


def workbook(sheets: dict[str, list[list[Any]]]) -> bytes:
    import openpyxl

    book = openpyxl.Workbook()
    book.remove(book.active)
    for name, rows in sheets.items():
        sheet = book.create_sheet(name)
        for row in rows:
            sheet.append(row)
    buf = io.BytesIO()
    book.save(buf)
    return buf.getvalue()


EXCEL_DATE = dt.datetime(2024, 5, 1, 8, 30, tzinfo=dt.UTC).replace(tzinfo=None)  # Excel cells hold naive times
BOOK = workbook({
    "People": [["name", "age", "member", "joined", None], ["Ann", 31, True, EXCEL_DATE],
               [None, None, None, None], ["Bob", 2.5, False, None, "extra"]],
    "Second": [["title"], ["skip me"], ["k", "v"], [1, 2]],
})
B64 = base64.b64encode(BOOK).decode()


@pytest.mark.parametrize(("extra", "expected"), [
    ({}, [{"name": "Ann", "age": 31, "member": True, "joined": "2024-05-01T08:30:00"},
          {"name": "Bob", "age": 2.5, "member": False, "joined": None, "E": "extra"}]),
    ({"sheet_name": "Second", "header_row": 3}, [{"k": 1, "v": 2}]),
    ({"sheet_name": "Second", "header": False}, [["title", None], ["skip me", None], ["k", "v"], [1, 2]]),
])
async def test_parse_excel_data(extra: dict[str, Any], expected: list[Any]) -> None:
    out = await run({"action": "parse_excel_data", "source": "{{src}}", **extra}, {"src": B64})
    assert out.result == expected


async def test_parse_excel_source_forms() -> None:
    single = [{"k": 1, "v": 2}]
    forms = [f"data:application/vnd.openxmlformats-officedocument.spreadsheetml.sheet;base64,{B64}",
             {"content_base64": B64}, {"artifact_id": "art-1"}]
    loaded: list[Any] = []

    async def load(ref: Any) -> bytes:
        loaded.append(dict(ref))
        return BOOK

    for form in forms:
        out = await run({"action": "parse_excel_data", "source": "{{src}}", "sheet_name": "Second", "header_row": 3},
                        {"src": form}, load_artifact=load)
        assert out.result == single
    assert loaded == [{"artifact_id": "art-1"}]
    out = await run({"action": "parse_excel_data", "source": "{{src}}", "sheet_name": "Second", "header_row": 3},
                    {"src": [B64, {"content_base64": B64}]})
    assert out.result == single + single


def _zip(files: dict[str, bytes]) -> str:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name, data in files.items():
            z.writestr(name, data)
    return base64.b64encode(buf.getvalue()).decode()


@pytest.mark.parametrize(("source", "extra", "reason"), [
    ("/tmp/report.xlsx", {}, "unsupported_source"),
    ("C:\\data\\report.xlsx", {}, "unsupported_source"),
    ({"artifact_id": "a1"}, {}, "unsupported_source"),
    (42, {}, "unsupported_source"),
    (base64.b64encode(b"name,age\nAnn,3\n").decode(), {}, "unsupported_format"),
    (base64.b64encode(b"\xd0\xcf\x11\xe0legacy xls").decode(), {}, "unsupported_format"),
    (_zip({"word/document.xml": b"<w/>"}), {}, "unsupported_format"),
    (_zip({"xl/workbook.xml": b"garbage", "[Content_Types].xml": b"<x/>"}), {}, "invalid_workbook"),
    (B64, {"sheet_name": "Missing"}, "sheet_not_found"),
])
async def test_parse_excel_errors(source: Any, extra: dict[str, Any], reason: str) -> None:
    error = await fails({"action": "parse_excel_data", "source": "{{src}}", **extra}, {"src": source})
    assert (error["code"], error["details"]["reason"]) == ("operation_failed", reason)


# -- calculate, format_string, extract_regex -------------------------------------------------------------------


async def test_calculate_reads_variables_and_the_context_scope() -> None:
    out = await run({"action": "calculate", "expression": "if(vip, total * 1.2, total)"}, {"vip": True, "total": 100})
    assert out.result == 120.0
    out = await run({"action": "calculate", "expression": "run_id + ':' + str(n)"}, {"n": 1},
                    scope=MappingScope({"n": 1}, {"run_id": "r-9"}))
    assert out.result == "r-9:1"
    unresolved: list[tuple[str, str]] = []
    out = await run({"action": "calculate", "expression": "missing.key"}, {},
                    on_unresolved=lambda root, reason: unresolved.append((root, reason)))
    assert out.result is None
    assert unresolved == [("missing", "undefined")]


async def test_calculate_expression_error() -> None:
    error = await fails({"action": "calculate", "expression": "total / zero"}, {"total": 1, "zero": 0})
    assert error["code"] == "expression_error"
    assert error["details"]["expression"] == "total / zero"
    assert "zero" in error["details"]["reason"]
    assert error["details"]["action"] == "calculate"


@pytest.mark.parametrize(("template", "expected"), [
    ("{{n}}", "3"), ("Total: {{f}} for {{tags}}", "Total: 120.0 for [\"a\"]"), ("{{missing}}", ""), ("plain", "plain"),
])
async def test_format_string(template: str, expected: str) -> None:
    out = await run({"action": "format_data", "value": template}, {"n": 3, "f": 120.0, "tags": ["a"]})
    assert out.result == expected


@pytest.mark.parametrize(("raw", "expected"), [
    ({"source": "order #123 and #456", "pattern": "#(\\d+)"}, "123"),
    ({"source": "order #123", "pattern": "#\\d+"}, "#123"),
    ({"source": "order #123", "pattern": "#(\\d+)", "group": 0}, "#123"),
    ({"source": "id=ab-7", "pattern": "(?P<word>[a-z]+)-(?P<num>\\d)", "group": "num"}, "7"),
    ({"source": "a1 b2 c3", "pattern": "([a-z])(\\d)", "group": 2, "all": True}, ["1", "2", "3"]),
    ({"source": "a1 b2", "pattern": "[a-z]\\d", "all": True}, ["a1", "b2"]),
    ({"source": "none here", "pattern": "(\\d+)"}, None),
    ({"source": "none here", "pattern": "\\d", "all": True}, []),
    ({"source": "HELLO", "pattern": "hello", "flags": "i"}, "HELLO"),
    ({"source": "x\ny", "pattern": "^y$"}, None),
    ({"source": "x\ny", "pattern": "^y$", "flags": "m"}, "y"),
    ({"source": "a\nb", "pattern": "a.b"}, None),
    ({"source": "a\nb", "pattern": "a.b", "flags": "s"}, "a\nb"),
    ({"source": "{{num}}", "pattern": "\\d\\.(\\d)"}, "5"),
    ({"source": "x", "pattern": "(y)?x", "group": 1}, None),
])
async def test_extract_regex(raw: dict[str, Any], expected: Any) -> None:
    out = await run({"action": "extract_regex", **raw}, {"num": 2.5})
    assert out.result == expected


@pytest.mark.parametrize(("raw", "reason"), [
    ({"pattern": "{{p}}"}, "invalid_regex"),
    ({"pattern": "(a)", "group": 2}, "invalid_regex"),
    ({"pattern": "(a)", "group": "name"}, "invalid_regex"),
    ({"pattern": "a", "flags": "{{bad_flags}}"}, "invalid_value"),
])
async def test_extract_regex_errors(raw: dict[str, Any], reason: str) -> None:
    error = await fails({"action": "extract_regex", "source": "abc", **raw}, {"p": "(a(?=b))", "bad_flags": "x"})
    assert error["details"]["reason"] == reason


# -- notify, screenshot, set_checkpoint ------------------------------------------------------------------------


async def test_notify_emits_and_calls_the_webhook_best_effort() -> None:
    posted: list[dict[str, Any]] = []

    async def notifier(payload: dict[str, Any]) -> None:
        posted.append(payload)
        raise RuntimeError("webhook down")

    out = await run({"action": "notify", "channel": "email", "recipients": "{{who}}", "subject": "Hi {{n}}",
                     "message": "done", "metadata": {"k": "{{n}}"}}, {"who": "ops@example.com", "n": 2},
                    notifier=notifier)
    (event,) = out.events
    assert isinstance(event, NotificationRequested)
    assert out.result == {"notification_id": event.notification_id}
    assert (event.channel, event.recipients, event.subject, event.message, event.metadata) == (
        "email", ["ops@example.com"], "Hi 2", "done", {"k": 2})
    assert posted == [{"notification_id": event.notification_id, "channel": "email",
                       "recipients": ["ops@example.com"], "subject": "Hi 2", "message": "done", "metadata": {"k": 2}}]
    out = await run({"action": "notify", "recipients": ["a", "b"]})
    assert out.events[0].model_dump()["recipients"] == ["a", "b"]


async def test_a_hanging_notification_webhook_is_abandoned(monkeypatch: pytest.MonkeyPatch) -> None:
    import langorch_runtime.operations as operations

    monkeypatch.setattr(operations, "NOTIFY_TIMEOUT_S", 0.01)

    async def hang(payload: dict[str, Any]) -> None:
        await asyncio.sleep(60)

    out = await run({"action": "notify", "message": "x"}, notifier=hang)
    assert set(out.result) == {"notification_id"}


async def test_screenshot_and_checkpoint() -> None:
    out = await run({"action": "screenshot", "artifact_uri": "s3://bucket/shot.png", "name": "final"})
    assert out.result == {"screenshot": "s3://bucket/shot.png"}
    assert out.artifacts == [ArtifactRequest(kind="screenshot", uri="s3://bucket/shot.png", name="final")]
    assert out.events == []
    out = await run({"action": "screenshot"})
    assert out.result is None
    (event,) = out.events
    assert isinstance(event, ScreenshotRequested)
    assert event.reason == "orchestrator_step"
    out = await run({"action": "set_checkpoint"})
    assert (out.result, out.checkpoint) == (None, True)


# -- encrypt, decrypt, hash ------------------------------------------------------------------------------------

RAW_KEY = bytes(range(32))
B64_KEY = base64.b64encode(RAW_KEY).decode()


def _unb64url(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@pytest.mark.parametrize(("secret", "key"), [
    (B64_KEY, RAW_KEY),
    ("correct horse battery staple", HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                          info=b"langorch-encrypt").derive(b"correct horse battery staple")),
    (base64.b64encode(b"short").decode(), HKDF(algorithm=hashes.SHA256(), length=32, salt=None,
                                               info=b"langorch-encrypt").derive(base64.b64encode(b"short"))),
])
async def test_encrypt_format_and_key_derivation(secret: str, key: bytes) -> None:
    assert derive_key(secret) == key
    out = await run({"action": "encrypt", "value": "{{v}}", "key": "{{k}}"}, {"v": {"card": "4111"}, "k": secret})
    version, nonce, sealed = out.result.split(".")
    assert version == "v1"
    assert re.fullmatch(r"[A-Za-z0-9_-]+", nonce + sealed)
    plain = AESGCM(key).decrypt(_unb64url(nonce), _unb64url(sealed), None)
    assert json.loads(plain) == {"card": "4111"}
    again = await run({"action": "encrypt", "value": "{{v}}", "key": "{{k}}"}, {"v": {"card": "4111"}, "k": secret})
    assert again.result != out.result, "a fresh nonce per encryption"


async def test_decrypt_round_trip_marks_output_sensitive() -> None:
    token = (await run({"action": "encrypt", "value": "s3cret-value", "key": "{{k}}"}, {"k": "pw"})).result
    out = await run({"action": "decrypt", "value": "{{t}}", "key": "{{k}}", "output_variable": "plain"},
                    {"t": token, "k": "pw"})
    assert out.result == "s3cret-value"
    assert out.sensitive_outputs == {"plain"}
    assert "s3cret-value" in out.sensitive_values
    token = (await run({"action": "encrypt", "value": {"a": [1]}, "key": "pw"})).result
    out = await run({"action": "decrypt", "value": token, "key": "pw", "output_type": "json"})
    assert out.result == {"a": [1]}


async def test_decrypt_failures() -> None:
    token = (await run({"action": "encrypt", "value": "x", "key": "right"})).result
    v, nonce, sealed = token.split(".")
    tampered = f"{v}.{nonce}.{sealed[:-2]}{'A' if sealed[-2] != 'A' else 'B'}{sealed[-1]}"
    for value, key in [(token, "wrong"), (tampered, "right"), ("v2.a.b", "right"), ("garbage", "right"),
                       ("v1.!!.??", "right")]:
        error = await fails({"action": "decrypt", "value": "{{t}}", "key": "{{k}}"}, {"t": value, "k": key})
        assert error["code"] == "decryption_failed", value
    not_json = (await run({"action": "encrypt", "value": "plain text", "key": "k"})).result
    error = await fails({"action": "decrypt", "value": not_json, "key": "k", "output_type": "json"})
    assert (error["code"], error["details"]["reason"]) == ("decryption_failed", "invalid_json")


async def test_missing_key_and_secret_references() -> None:
    error = await fails({"action": "encrypt", "value": "x", "key": "{{nothing}}"})
    assert error["code"] == "secret_not_found"
    resolved: list[tuple[str, str | None]] = []

    async def resolver(alias: str, field: str | None) -> str:
        resolved.append((alias, field))
        return "resolved-secret"

    op = operation({"action": "hash", "value": "data", "key": "k"})
    out = await run_operation(op, {"value": "data", "key": SecretRef("signing", "hmac")}, {},
                              OpContext(secret_resolver=resolver))
    assert out.result == hmac.new(b"resolved-secret", b"data", "sha256").hexdigest()
    assert resolved == [("signing", "hmac")]
    assert out.sensitive_values == {"resolved-secret"}
    with pytest.raises(StepError) as info:
        await run_operation(op, {"value": "data", "key": SecretRef("signing")}, {}, OpContext())
    assert info.value.error.code == "secret_not_found"


@pytest.mark.parametrize(("raw", "expected"), [
    ({"value": "abc"}, hashlib.sha256(b"abc").hexdigest()),
    ({"value": "abc", "algorithm": "sha512"}, hashlib.sha512(b"abc").hexdigest()),
    ({"value": "abc", "algorithm": "sha1"}, hashlib.sha1(b"abc").hexdigest()),
    ({"value": "abc", "algorithm": "md5"}, hashlib.md5(b"abc").hexdigest()),
    ({"value": "abc", "algorithm": "blake2b"}, hashlib.blake2b(b"abc").hexdigest()),
    ({"value": "abc", "encoding": "base64"}, base64.b64encode(hashlib.sha256(b"abc").digest()).decode()),
    ({"value": {"b": 1, "a": [1.5, "é"]}}, hashlib.sha256('{"a":[1.5,"é"],"b":1}'.encode()).hexdigest()),
    ({"value": 7}, hashlib.sha256(b"7").hexdigest()),
    ({"value": "abc", "key": "k"}, hmac.new(b"k", b"abc", "sha256").hexdigest()),
    ({"value": "abc", "key": "k", "algorithm": "blake2b", "encoding": "base64"},
     base64.b64encode(hmac.new(b"k", b"abc", "blake2b").digest()).decode()),
])
async def test_hash(raw: dict[str, Any], expected: str) -> None:
    out = await run({"action": "hash", **raw})
    assert out.result == expected


# -- validate_schema, convert_type -----------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["id"],
          "properties": {"id": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}}}


async def test_validate_schema() -> None:
    out = await run({"action": "validate_schema", "source": "{{v}}", "schema": SCHEMA}, {"v": {"id": 1}})
    assert out.result == {"valid": True, "errors": []}
    bad = {"tags": ["a", 2]}
    out = await run({"action": "validate_schema", "value": "{{v}}", "schema": SCHEMA, "on_invalid": "report"},
                    {"v": bad})
    assert out.result == {"valid": False, "errors": [
        {"path": "", "message": "'id' is a required property"},
        {"path": "/tags/1", "message": "2 is not of type 'string'"},
    ]}
    error = await fails({"action": "validate_schema", "value": "{{v}}", "schema": SCHEMA}, {"v": bad})
    assert error["code"] == "schema_validation_failed"
    assert error["details"]["errors"] == out.result["errors"]
    assert error["details"]["action"] == "validate_schema"


async def test_validate_schema_never_fetches_remote_references() -> None:
    error = await fails({"action": "validate_schema", "value": 1,
                         "schema": {"$ref": "https://schemas.example.invalid/order.json"}})
    assert (error["code"], error["details"]["reason"]) == ("operation_failed", "invalid_schema")


@pytest.mark.parametrize(("value", "target", "expected"), [
    (None, "integer", None), (None, "json_string", None),
    (12, "string", "12"), (2.0, "string", "2.0"), (True, "string", "true"), ({"a": 1}, "string", '{"a":1}'),
    ("5", "number", 5), (" 2.5 ", "number", 2.5), (3, "number", 3),
    ("3", "integer", 3), (3.0, "integer", 3), ("4.0", "integer", 4),
    ("Yes", "boolean", True), ("no", "boolean", False), ("1", "boolean", True), (0, "boolean", False),
    (1.0, "boolean", True), (False, "boolean", False), (" TRUE ", "boolean", True),
    ([1], "array", [1]), ("[1, 2]", "array", [1, 2]), ({"a": 1}, "object", {"a": 1}), ('{"a": 1}', "object", {"a": 1}),
    ("x", "json_string", '"x"'), ({"a": [1, None]}, "json_string", '{"a":[1,null]}'), (1.5, "json_string", "1.5"),
])
async def test_convert_type(value: Any, target: str, expected: Any) -> None:
    out = await run({"action": "convert_type", "source": "{{v}}", "target_type": target}, {"v": value})
    assert out.result == expected
    assert type(out.result) is type(expected)


@pytest.mark.parametrize(("value", "target"), [
    ("abc", "number"), (True, "number"), ([1], "number"), ("1e999", "number"), ("NaN", "number"),
    (2.5, "integer"), ("2.5", "integer"), ("maybe", "boolean"), (2, "boolean"), ([], "boolean"),
    ("{}", "array"), ("not json", "object"), (5, "array"), ([1], "object"),
])
async def test_convert_type_failures(value: Any, target: str) -> None:
    error = await fails({"action": "convert_type", "value": "{{v}}", "target_type": target}, {"v": value})
    assert error["code"] == "conversion_failed"
    assert error["details"]["target_type"] == target


# -- ids and time ----------------------------------------------------------------------------------------------


async def test_generate_id() -> None:
    out = await run({"action": "generate_id"})
    assert uuid.UUID(out.result).version == 4
    out = await run({"action": "generate_id", "format": "uuid7", "prefix": "run_"})
    assert out.result.startswith("run_")
    assert uuid.UUID(out.result[4:]).version == 7
    ids = {(await run({"action": "generate_id", "format": "short"})).result for _ in range(20)}
    assert len(ids) == 20
    assert all(re.fullmatch(r"[a-z2-7]{12}", i) for i in ids)


@pytest.mark.parametrize(("raw", "expected"), [
    ({}, "2026-03-14T15:09:26.535Z"),
    ({"format": "iso", "timezone": "Europe/Paris"}, "2026-03-14T16:09:26.535+01:00"),
    ({"format": "date", "timezone": "Pacific/Kiritimati"}, "2026-03-15"),
    ({"format": "epoch_ms"}, 1773500966535),
    ({"format": "epoch_s"}, 1773500966),
    ({"format": "%Y/%m/%d %H:%M", "timezone": "America/New_York"}, "2026/03/14 11:09"),
])
async def test_get_timestamp(raw: dict[str, Any], expected: Any) -> None:
    out = await run({"action": "get_timestamp", **raw})
    assert out.result == expected


async def test_get_timestamp_invalid_timezone() -> None:
    for tz in ("Mars/Olympus", "../etc/passwd", ""):
        error = await fails({"action": "get_timestamp", "timezone": "{{tz}}"}, {"tz": tz})
        assert error["details"]["reason"] == "invalid_timezone"


# -- steps -----------------------------------------------------------------------------------------------------


async def test_steps_run_like_operations_without_an_index() -> None:
    compiled = step({"action": "set_variable", "variable": "a.b", "value": 1, "output_variable": "r"})
    out = await run_operation(compiled, render_params(compiled.params), {}, OpContext(step_id="s1"))
    assert (out.result, out.writes) == (1, {"a.b": 1})
    with pytest.raises(StepError) as info:
        await run_operation(compiled, render_params(compiled.params), {"a": 1}, OpContext(step_id="s1"))
    assert info.value.error.details == {"reason": "not_an_object", "variable": "a.b", "action": "set_variable"}
    compiled = step({"action": "get_timestamp", "format": "epoch_s"})
    out = await run_operation(compiled, render_params(compiled.params), {}, OpContext(clock=lambda: FIXED_NOW))
    assert out.result == 1773500966
