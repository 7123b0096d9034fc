"""Webhook signatures (api.md §10.5), the body and event-message input mappings (§10.4) and the dedupe keys (§10.3).

Expected signatures are computed here with ``hmac``/``hashlib`` directly, independently of the module."""

from __future__ import annotations

import base64
import hashlib
import hmac
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ckp_core.webhook_signing import (
    MAX_SIGNATURE_VALUES,
    SIGNATURE_HEADER,
    TIMESTAMP_HEADER,
    SignatureOutcome,
    WebhookBodyNotUtf8,
    WebhookBodyTooLarge,
    check_body_size,
    event_dedupe_key,
    event_message_inputs,
    parse_signature_header,
    sign,
    signature_headers,
    signed_bytes,
    verify_signature,
    webhook_body_inputs,
    webhook_dedupe_key,
)

pytestmark = pytest.mark.unit

SECRET = "whsec-test-0123456789"
BODY = b'{"order_id": "A-17", "amount": 12.5}'
TS = 1_767_225_600  # 2026-01-01T00:00:00Z


def expected_hex(secret: str, message: bytes) -> str:
    return hmac.new(secret.encode(), message, hashlib.sha256).hexdigest()


def clock(value: float):
    return lambda: value


def timestamped_headers(secret: str = SECRET, body: bytes = BODY, ts: int = TS) -> dict[str, str]:
    return {TIMESTAMP_HEADER: str(ts),
            SIGNATURE_HEADER: "sha256=" + expected_hex(secret, f"{ts}.".encode() + body)}


def test_known_answer_vectors_for_both_schemes() -> None:
    assert signed_bytes(BODY, "timestamped", TS) == b"1767225600." + BODY
    assert signed_bytes(BODY, "body") == BODY
    assert sign(SECRET, BODY, scheme="timestamped", timestamp=TS) == expected_hex(SECRET, b"1767225600." + BODY)
    assert sign(SECRET, BODY, scheme="body") == expected_hex(SECRET, BODY)
    # a fixed vector, written out: HMAC-SHA256(key="key", "1.x")
    assert sign("key", b"x", timestamp=1) == hmac.new(b"key", b"1.x", hashlib.sha256).hexdigest()
    assert sign(b"key", b"x", timestamp=1) == sign("key", b"x", timestamp=1)


def test_signature_headers_match_what_a_sender_computes() -> None:
    headers = signature_headers(SECRET, BODY, timestamp=TS)
    assert headers == timestamped_headers()
    body_only = signature_headers(SECRET, BODY, scheme="body")
    assert body_only == {SIGNATURE_HEADER: "sha256=" + expected_hex(SECRET, BODY)}
    rotating = signature_headers(["old-secret", "new-secret"], BODY, timestamp=TS)
    msg = f"{TS}.".encode() + BODY
    assert rotating[SIGNATURE_HEADER] == (f"sha256={expected_hex('old-secret', msg)},"
                                          f"sha256={expected_hex('new-secret', msg)}")


def test_timestamped_signature_is_valid_and_round_trips() -> None:
    check = verify_signature(SECRET, BODY, timestamped_headers(), now=clock(TS + 10))
    assert check.ok
    assert check.outcome is SignatureOutcome.VALID
    assert check.problem_code is None
    assert check.matched_index == 0


def test_headers_are_found_whatever_their_case() -> None:
    headers = {k.lower(): v for k, v in timestamped_headers().items()}
    assert verify_signature(SECRET, BODY, headers, now=clock(TS)).ok


@pytest.mark.parametrize("mutate", [
    lambda b: b + b" ",
    lambda b: b.replace(b"12.5", b"12.6"),
    lambda b: b[:-1],
])
def test_any_change_to_the_body_is_invalid(mutate) -> None:
    check = verify_signature(SECRET, mutate(BODY), timestamped_headers(), now=clock(TS))
    assert check.outcome is SignatureOutcome.INVALID
    assert check.problem_code == "invalid_signature"


def test_wrong_secret_and_changed_timestamp_are_invalid() -> None:
    assert verify_signature("another-secret", BODY, timestamped_headers(), now=clock(TS)).problem_code == \
        "invalid_signature"
    moved = timestamped_headers()
    moved[TIMESTAMP_HEADER] = str(TS + 1)
    assert verify_signature(SECRET, BODY, moved, now=clock(TS)).problem_code == "invalid_signature"


@pytest.mark.parametrize(("headers", "detail"), [
    ({}, "X-LangOrch-Signature header is missing"),
    ({TIMESTAMP_HEADER: str(TS)}, "X-LangOrch-Signature header is missing"),
    ({SIGNATURE_HEADER: "sha256=" + "0" * 64}, "X-LangOrch-Timestamp header is missing"),
    ({SIGNATURE_HEADER: "sha256=" + "0" * 64, TIMESTAMP_HEADER: "soon"}, "not unix seconds"),
    ({SIGNATURE_HEADER: "sha256=" + "0" * 64, TIMESTAMP_HEADER: "-5"}, "not unix seconds"),
    ({SIGNATURE_HEADER: "sha1=abc", TIMESTAMP_HEADER: str(TS)}, "no 'sha256=<64 hex digits>' value"),
    ({SIGNATURE_HEADER: "sha256=abc", TIMESTAMP_HEADER: str(TS)}, "no 'sha256=<64 hex digits>' value"),
    ({SIGNATURE_HEADER: "  ", TIMESTAMP_HEADER: str(TS)}, "X-LangOrch-Signature header is missing"),
])
def test_missing_or_malformed_headers_are_invalid_signature(headers, detail) -> None:
    check = verify_signature(SECRET, BODY, headers, now=clock(TS))
    assert check.problem_code == "invalid_signature"
    assert detail in check.detail


def test_an_empty_or_absent_secret_fails_closed() -> None:
    for secrets in ("", b"", []):
        check = verify_signature(secrets, BODY, timestamped_headers(), now=clock(TS))
        assert check.problem_code == "invalid_signature"
    with pytest.raises(ValueError, match="empty"):
        sign("", BODY, timestamp=TS)


def test_rotation_any_of_several_signatures_passes() -> None:
    msg = f"{TS}.".encode() + BODY
    header = f"sha256={expected_hex('old', msg)}, sha256={expected_hex('new', msg)}"
    headers = {TIMESTAMP_HEADER: str(TS), SIGNATURE_HEADER: header}
    old = verify_signature("old", BODY, headers, now=clock(TS))
    new = verify_signature("new", BODY, headers, now=clock(TS))
    assert (old.ok, old.matched_index) == (True, 0)
    assert (new.ok, new.matched_index) == (True, 1)
    # the receiver holding two keys while it rotates accepts either signature alone
    only_new = {TIMESTAMP_HEADER: str(TS), SIGNATURE_HEADER: f"sha256={expected_hex('new', msg)}"}
    assert verify_signature(["old", "new"], BODY, only_new, now=clock(TS)).ok
    assert verify_signature(["old", "other"], BODY, only_new, now=clock(TS)).problem_code == "invalid_signature"
    # malformed values among them are ignored, uppercase hex is accepted
    mixed = {TIMESTAMP_HEADER: str(TS),
             SIGNATURE_HEADER: f"v1=zzz,sha256=short,SHA256={expected_hex('new', msg).upper()}"}
    assert verify_signature("new", BODY, mixed, now=clock(TS)).ok


def test_too_many_signature_values_are_refused() -> None:
    msg = f"{TS}.".encode() + BODY
    values = ["sha256=" + "0" * 64] * MAX_SIGNATURE_VALUES + ["sha256=" + expected_hex(SECRET, msg)]
    headers = {TIMESTAMP_HEADER: str(TS), SIGNATURE_HEADER: ",".join(values)}
    check = verify_signature(SECRET, BODY, headers, now=clock(TS))
    assert check.problem_code == "invalid_signature"
    assert f"at most {MAX_SIGNATURE_VALUES}" in check.detail


@pytest.mark.parametrize(("offset", "outcome"), [
    (0, SignatureOutcome.VALID),
    (300, SignatureOutcome.VALID),
    (-300, SignatureOutcome.VALID),
    (300.9, SignatureOutcome.STALE),
    (301, SignatureOutcome.STALE),
    (-301, SignatureOutcome.STALE),
    (86_400, SignatureOutcome.STALE),
])
def test_tolerance_window_edges(offset, outcome) -> None:
    check = verify_signature(SECRET, BODY, timestamped_headers(), now=clock(TS + offset))
    assert check.outcome is outcome
    if outcome is SignatureOutcome.STALE:
        assert check.problem_code == "stale_signature"
        assert "at most 300 s" in check.detail


def test_tolerance_is_configurable() -> None:
    headers = timestamped_headers()
    assert verify_signature(SECRET, BODY, headers, tolerance_s=30, now=clock(TS + 30)).ok
    assert verify_signature(SECRET, BODY, headers, tolerance_s=30, now=clock(TS + 31)).problem_code == \
        "stale_signature"


def test_a_forged_stale_request_is_invalid_not_stale() -> None:
    forged = {TIMESTAMP_HEADER: str(TS), SIGNATURE_HEADER: "sha256=" + "ab" * 32}
    assert verify_signature(SECRET, BODY, forged, now=clock(TS + 10_000)).problem_code == "invalid_signature"


def test_body_scheme_ignores_the_timestamp() -> None:
    headers = {SIGNATURE_HEADER: "sha256=" + expected_hex(SECRET, BODY)}
    assert verify_signature(SECRET, BODY, headers, scheme="body", now=clock(TS)).ok
    # a timestamped signature does not pass as a body signature, and vice versa
    assert verify_signature(SECRET, BODY, timestamped_headers(), scheme="body").problem_code == "invalid_signature"
    headers[TIMESTAMP_HEADER] = str(TS)
    assert verify_signature(SECRET, BODY, headers, scheme="timestamped", now=clock(TS)).problem_code == \
        "invalid_signature"


def test_parse_signature_header() -> None:
    a, b = "a" * 64, "B" * 64
    assert parse_signature_header(f"sha256={a}") == [a]
    assert parse_signature_header(f" sha256={a} ,, sha256={b} ") == [a, b.lower()]
    assert parse_signature_header("sha512=" + a + ",sha256=xyz") == []


# --- body → inputs ----------------------------------------------------------------------------------------------


def test_json_object_body_is_the_inputs() -> None:
    assert webhook_body_inputs(BODY, "application/json") == {"order_id": "A-17", "amount": 12.5}


@pytest.mark.parametrize(("body", "value"), [
    (b"[1, 2, 3]", [1, 2, 3]),
    (b'"text"', "text"),
    (b"42", 42),
    (b"null", None),
    (b"true", True),
])
def test_other_json_is_wrapped_as_payload(body, value) -> None:
    assert webhook_body_inputs(body, "application/json") == {"payload": value}


@pytest.mark.parametrize(("body", "ctype"), [
    (b"a=1&b=2", "application/x-www-form-urlencoded"),
    ("grüße, not json".encode(), "text/plain; charset=utf-8"),
    (b"NaN", None),
    (b"", "text/plain"),
    (b"{broken", "application/json"),
])
def test_other_utf8_text_is_payload_text(body, ctype) -> None:
    assert webhook_body_inputs(body, ctype) == {"payload_text": body.decode(), "content_type": ctype}


def test_deeply_nested_json_is_treated_as_text_not_an_error() -> None:
    body = b"[" * 100_000 + b"]" * 100_000
    assert webhook_body_inputs(body, "application/json")["payload_text"] == body.decode()


def test_non_utf8_body_is_415() -> None:
    with pytest.raises(WebhookBodyNotUtf8, match="offset 1") as info:
        webhook_body_inputs(b"a\xff\xfe", "application/octet-stream")
    assert (info.value.status, info.value.code) == (415, "unsupported_media_type")


def test_body_size_limit_is_413() -> None:
    limit = 1024 * 1024
    assert webhook_body_inputs(b'{"x": "' + b"a" * (limit - 10) + b'"}') != {}
    with pytest.raises(WebhookBodyTooLarge) as info:
        webhook_body_inputs(b"a" * (limit + 1))
    assert (info.value.status, info.value.code) == (413, "payload_too_large")
    assert str(limit + 1) in str(info.value)
    check_body_size(10, max_bytes=10)
    with pytest.raises(WebhookBodyTooLarge):
        check_body_size(11, max_bytes=10)


# --- dedupe keys and event inputs -------------------------------------------------------------------------------


def test_dedupe_keys() -> None:
    assert webhook_dedupe_key(BODY) == "body-" + hashlib.sha256(BODY).hexdigest()
    assert webhook_dedupe_key(BODY) != webhook_dedupe_key(BODY + b" ")
    assert event_dedupe_key(b"{}", {"Nats-Msg-Id": "order-17"}) == "msgid-order-17"
    assert event_dedupe_key(b"other", {"nats-msg-id": "order-17"}) == "msgid-order-17"
    odd = "order 17/β.x"
    assert event_dedupe_key(b"{}", {"Nats-Msg-Id": odd}) == "msgidx-" + hashlib.sha256(odd.encode()).hexdigest()
    assert event_dedupe_key(b"payload", {}) == "body-" + hashlib.sha256(b"payload").hexdigest()
    assert event_dedupe_key(b"payload") == event_dedupe_key(b"payload", {"Other": "x"})


def test_event_inputs_for_a_json_object() -> None:
    headers = {"Nats-Msg-Id": "m-1", "X-Tenant": "acme"}
    inputs = event_message_inputs("lo.ext.orders.created", b'{"id": 7}', headers, stream_sequence=41)
    assert inputs == {"event_source": "nats://lo.ext.orders.created", "event_message_id": "m-1",
                      "event_payload": {"id": 7}, "event_attributes": headers}


@pytest.mark.parametrize(("payload", "expected"), [
    (b"[1, 2]", {"value": [1, 2]}),
    (b"3.5", {"value": 3.5}),
    (b'"s"', {"value": "s"}),
    (b"null", {"value": None}),
    (b"hello world", {"raw_body": "hello world"}),
    (b"", {"raw_body": ""}),
    (b"\xff\x00", {"raw_body": base64.b64encode(b"\xff\x00").decode(), "raw_body_encoding": "base64"}),
])
def test_event_payload_mapping(payload, expected) -> None:
    inputs = event_message_inputs("lo.ext.a", payload, None, stream_sequence=9)
    assert inputs["event_payload"] == expected
    assert inputs["event_message_id"] == "LO_EXT:9"
    assert inputs["event_attributes"] == {}
    json.dumps(inputs)  # the inputs are JSON


def test_event_message_id_absent_without_header_or_sequence() -> None:
    assert event_message_inputs("lo.ext.a", b"{}")["event_message_id"] is None


# --- properties -------------------------------------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(secret=st.binary(min_size=1, max_size=64), body=st.binary(max_size=512),
       ts=st.integers(min_value=0, max_value=10**11), flip=st.integers(min_value=0))
def test_property_sign_verify_round_trip_and_any_flipped_byte_fails(secret, body, ts, flip) -> None:
    headers = signature_headers(secret, body, timestamp=ts)
    digest = hmac.new(secret, f"{ts}.".encode() + body, hashlib.sha256).hexdigest()
    assert headers == {TIMESTAMP_HEADER: str(ts), SIGNATURE_HEADER: f"sha256={digest}"}
    assert verify_signature(secret, body, headers, now=lambda: ts).ok
    if body:
        i = flip % len(body)
        tampered = body[:i] + bytes([body[i] ^ 0x01]) + body[i + 1:]
        assert verify_signature(secret, tampered, headers, now=lambda: ts).problem_code == "invalid_signature"
