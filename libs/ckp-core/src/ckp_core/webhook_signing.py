"""Webhook signatures and the trigger inputs of a webhook body or an external NATS message (api.md §10.3–§10.5).

Pure functions, no I/O: the gateway resolves the secret, reads the body and maps the outcomes to problem responses.

Signing (what a sender does)
----------------------------
``X-LangOrch-Signature: sha256=<lowercase hex>`` is HMAC-SHA256 with the shared secret over

* ``timestamped`` (the default): the ASCII bytes ``"<timestamp>."`` followed by the raw body, where
  ``X-LangOrch-Timestamp`` carries ``<timestamp>`` in unix seconds;
* ``body``: the raw body alone (no timestamp; replay protection rests on the trigger's dedupe window).

The header may carry several comma-separated ``sha256=`` values (a sender rotating its secret signs with the old
and the new one); the request passes when any of them matches.

Verifying (what the gateway does)
---------------------------------
:func:`verify_signature` checks, in this order: a signature header is present with at least one well-formed
``sha256=`` value; for ``timestamped`` a timestamp header of unix seconds is present; one of the signatures equals
the expected HMAC (``hmac.compare_digest`` for every candidate, so the time taken does not depend on where a
forged signature differs); for ``timestamped`` the timestamp is within the tolerance of now. A missing or
malformed header and a wrong signature are ``invalid_signature``; an authentic signature whose timestamp is out
of the window is ``stale_signature``. The signature is checked before the timestamp, so ``stale_signature`` is
only ever said about a request signed with the right secret.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

SIGNATURE_HEADER = "X-LangOrch-Signature"
TIMESTAMP_HEADER = "X-LangOrch-Timestamp"
NATS_MSG_ID_HEADER = "Nats-Msg-Id"
DEFAULT_TOLERANCE_S = 300
DEFAULT_MAX_BODY_BYTES = 1024 * 1024
MAX_SIGNATURE_VALUES = 16
"""More ``sha256=`` values than this in one header are refused (bounds the work a request can cause)."""

_HEX_DIGEST = re.compile(r"[0-9a-fA-F]{64}")
_UNIX_SECONDS = re.compile(r"[0-9]{1,12}")
_SAFE_MESSAGE_ID = re.compile(r"[A-Za-z0-9_=-]{1,128}")


class SignatureScheme(StrEnum):
    TIMESTAMPED = "timestamped"
    BODY = "body"


class SignatureOutcome(StrEnum):
    """The result of :func:`verify_signature`; the failures are the problem codes of the 401 answer."""

    VALID = "valid"
    INVALID = "invalid_signature"
    STALE = "stale_signature"


@dataclass(frozen=True)
class SignatureCheck:
    outcome: SignatureOutcome
    detail: str
    matched_index: int | None = None
    """Which of the header's ``sha256=`` values matched (0-based), when valid."""

    @property
    def ok(self) -> bool:
        return self.outcome is SignatureOutcome.VALID

    @property
    def problem_code(self) -> str | None:
        """``invalid_signature`` / ``stale_signature`` for a failure (HTTP 401), ``None`` when valid."""
        return None if self.ok else self.outcome.value


def _key(secret: bytes | str) -> bytes:
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    if not key:
        raise ValueError("the webhook secret is empty")
    return key


def signed_bytes(body: bytes, scheme: SignatureScheme | str, timestamp: int | None = None) -> bytes:
    """The exact bytes the HMAC covers: ``b"<timestamp>." + body`` (``timestamped``) or ``body`` (``body``)."""
    scheme = SignatureScheme(scheme)
    if scheme is SignatureScheme.BODY:
        return bytes(body)
    if timestamp is None or isinstance(timestamp, bool) or not isinstance(timestamp, int) or timestamp < 0:
        raise ValueError("the timestamped scheme needs a timestamp: non-negative unix seconds")
    return f"{timestamp}.".encode("ascii") + bytes(body)


def sign(secret: bytes | str, body: bytes, *, scheme: SignatureScheme | str = SignatureScheme.TIMESTAMPED,
         timestamp: int | None = None) -> str:
    """The lowercase hex HMAC-SHA256 of :func:`signed_bytes` (without the ``sha256=`` prefix)."""
    return hmac.new(_key(secret), signed_bytes(body, scheme, timestamp), hashlib.sha256).hexdigest()


def signature_headers(secrets: bytes | str | Sequence[bytes | str], body: bytes, *,
                      scheme: SignatureScheme | str = SignatureScheme.TIMESTAMPED,
                      timestamp: int | None = None) -> dict[str, str]:
    """The headers a sender adds: one ``sha256=`` value per secret (several while rotating), and for
    ``timestamped`` the timestamp header (``timestamp`` defaults to now)."""
    scheme = SignatureScheme(scheme)
    keys = [secrets] if isinstance(secrets, bytes | str) else list(secrets)
    if not keys:
        raise ValueError("at least one secret is needed")
    headers: dict[str, str] = {}
    if scheme is SignatureScheme.TIMESTAMPED:
        timestamp = int(time.time()) if timestamp is None else timestamp
        headers[TIMESTAMP_HEADER] = str(timestamp)
    values = [f"sha256={sign(k, body, scheme=scheme, timestamp=timestamp)}" for k in keys]
    headers[SIGNATURE_HEADER] = ",".join(values)
    return headers


def parse_signature_header(value: str) -> list[str]:
    """The hex digests (lowercased) of a signature header's well-formed ``sha256=<64 hex>`` values, in order.
    Values of another form (another algorithm, a short digest) are ignored; :class:`ValueError` when there are
    more than :data:`MAX_SIGNATURE_VALUES` values."""
    parts = [p.strip() for p in value.split(",")]
    parts = [p for p in parts if p]
    if len(parts) > MAX_SIGNATURE_VALUES:
        raise ValueError(f"{SIGNATURE_HEADER} carries {len(parts)} values, at most {MAX_SIGNATURE_VALUES} are "
                         "accepted")
    digests = []
    for part in parts:
        name, sep, digest = part.partition("=")
        if sep and name.strip().lower() == "sha256" and _HEX_DIGEST.fullmatch(digest.strip()):
            digests.append(digest.strip().lower())
    return digests


def header_value(headers: Mapping[str, str], name: str) -> str | None:
    """A header's value by case-insensitive name (works for plain dicts as well as HTTP header mappings)."""
    value = headers.get(name)
    if value is not None:
        return value
    lowered = name.lower()
    for key, candidate in headers.items():
        if key.lower() == lowered:
            return candidate
    return None


def verify_signature(secrets: bytes | str | Sequence[bytes | str], body: bytes, headers: Mapping[str, str], *,
                     scheme: SignatureScheme | str = SignatureScheme.TIMESTAMPED,
                     tolerance_s: int = DEFAULT_TOLERANCE_S,
                     now: Callable[[], float] = time.time) -> SignatureCheck:
    """Check a received webhook's signature (see the module docstring for the order and the outcomes).

    ``secrets`` is the resolved key, or several keys (any may match); an empty list or an empty key fails closed
    as ``invalid_signature``. ``now`` returns unix seconds (injectable for tests)."""
    scheme = SignatureScheme(scheme)
    keys = [secrets] if isinstance(secrets, bytes | str) else list(secrets)
    if not keys or any(not k for k in keys):
        return SignatureCheck(SignatureOutcome.INVALID, "no signing secret is available for this trigger")
    raw_signature = header_value(headers, SIGNATURE_HEADER)
    if raw_signature is None or not raw_signature.strip():
        return SignatureCheck(SignatureOutcome.INVALID, f"the {SIGNATURE_HEADER} header is missing")
    try:
        digests = parse_signature_header(raw_signature)
    except ValueError as exc:
        return SignatureCheck(SignatureOutcome.INVALID, str(exc))
    if not digests:
        return SignatureCheck(SignatureOutcome.INVALID, f"the {SIGNATURE_HEADER} header has no "
                              "'sha256=<64 hex digits>' value")
    timestamp: int | None = None
    if scheme is SignatureScheme.TIMESTAMPED:
        raw_ts = header_value(headers, TIMESTAMP_HEADER)
        if raw_ts is None or not raw_ts.strip():
            return SignatureCheck(SignatureOutcome.INVALID, f"the {TIMESTAMP_HEADER} header is missing")
        if not _UNIX_SECONDS.fullmatch(raw_ts.strip()):
            return SignatureCheck(SignatureOutcome.INVALID, f"the {TIMESTAMP_HEADER} header is not unix seconds")
        timestamp = int(raw_ts.strip())
    expected = [sign(k, body, scheme=scheme, timestamp=timestamp).encode("ascii") for k in keys]
    matched: int | None = None
    for index, digest in enumerate(digests):
        candidate = digest.encode("ascii")
        for exp in expected:  # every comparison runs: no early exit that would time the match
            if hmac.compare_digest(candidate, exp) and matched is None:
                matched = index
    if matched is None:
        return SignatureCheck(SignatureOutcome.INVALID, "no signature matches the body")
    if timestamp is not None:
        skew = abs(now() - timestamp)
        if skew > tolerance_s:
            return SignatureCheck(SignatureOutcome.STALE, f"the timestamp is {int(skew)} s away from the gateway's "
                                  f"clock; at most {tolerance_s} s are accepted")
    return SignatureCheck(SignatureOutcome.VALID, "signature valid", matched)


# --- body and message → run inputs -----------------------------------------------------------------------------


class WebhookBodyError(ValueError):
    """A body the webhook intake refuses before anything is published; ``code`` and ``status`` are its problem."""

    code = "invalid_body"
    status = 400


class WebhookBodyTooLarge(WebhookBodyError):
    code = "payload_too_large"
    status = 413


class WebhookBodyNotUtf8(WebhookBodyError):
    code = "unsupported_media_type"
    status = 415


def check_body_size(size: int, max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
    """:class:`WebhookBodyTooLarge` when ``size`` (bytes read so far, or a declared ``Content-Length``) exceeds
    ``max_bytes``; a gateway can call it while streaming the body in, before holding all of it."""
    if size > max_bytes:
        raise WebhookBodyTooLarge(f"the body of {size} bytes exceeds the limit of {max_bytes} bytes")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json_strict(text: str) -> tuple[bool, Any]:
    """``(True, value)`` when ``text`` is one JSON value (RFC 8259: no ``NaN``/``Infinity``), else ``(False,
    None)``; nesting too deep for the parser counts as not JSON."""
    try:
        return True, json.loads(text, parse_constant=_reject_constant)
    except (ValueError, RecursionError):
        return False, None


def webhook_body_inputs(body: bytes, content_type: str | None = None, *,
                        max_bytes: int = DEFAULT_MAX_BODY_BYTES) -> dict[str, Any]:
    """The run inputs a webhook body gives (§10.5), before they are merged over the registration's ``input_vars``:
    a JSON object as is; any other JSON value as ``{payload: value}``; other UTF-8 text as ``{payload_text,
    content_type}`` (``content_type`` is the request's header, or ``None``). Raises :class:`WebhookBodyTooLarge`
    (413) above ``max_bytes`` and :class:`WebhookBodyNotUtf8` (415) for bytes that are not UTF-8. JSON is
    recognised by its content, whatever the ``Content-Type`` says."""
    check_body_size(len(body), max_bytes)
    try:
        text = bytes(body).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise WebhookBodyNotUtf8(f"the body is not UTF-8 text (invalid byte at offset {exc.start})") from None
    is_json, value = parse_json_strict(text)
    if is_json:
        if isinstance(value, dict):
            return value
        return {"payload": value}
    return {"payload_text": text, "content_type": content_type}


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(bytes(data)).hexdigest()


def webhook_dedupe_key(body: bytes) -> str:
    """The dedupe key of a webhook delivery: ``body-<SHA-256 of the raw body>`` (a valid NATS KV key token)."""
    return f"body-{sha256_hex(body)}"


def event_dedupe_key(payload: bytes, headers: Mapping[str, str] | None = None) -> str:
    """The dedupe key of an external NATS message: its ``Nats-Msg-Id`` as ``msgid-<id>`` when the id is made of
    KV-key-safe characters (``A-Z a-z 0-9 _ = -``, at most 128), ``msgidx-<SHA-256 of the id>`` for any other id,
    else ``body-<SHA-256 of the payload>``. Always a valid NATS KV key token (no dots)."""
    msg_id = header_value(headers, NATS_MSG_ID_HEADER) if headers else None
    if msg_id:
        if _SAFE_MESSAGE_ID.fullmatch(msg_id):
            return f"msgid-{msg_id}"
        return f"msgidx-{sha256_hex(msg_id.encode('utf-8'))}"
    return f"body-{sha256_hex(payload)}"


def event_payload_value(payload: bytes) -> dict[str, Any]:
    """``event_payload`` of §10.4: a JSON object as is, any other JSON value as ``{value}``, anything else as
    ``{raw_body: <text>}``; bytes that are not UTF-8 as ``{raw_body: <base64>, raw_body_encoding: "base64"}``."""
    try:
        text = bytes(payload).decode("utf-8")
    except UnicodeDecodeError:
        return {"raw_body": base64.b64encode(bytes(payload)).decode("ascii"), "raw_body_encoding": "base64"}
    is_json, value = parse_json_strict(text)
    if not is_json:
        return {"raw_body": text}
    if isinstance(value, dict):
        return value
    return {"value": value}


def event_message_inputs(subject: str, payload: bytes, headers: Mapping[str, str] | None = None, *,
                         stream_sequence: int | None = None) -> dict[str, Any]:
    """The run inputs of an external message (§10.4): ``event_source`` (``nats://<the message's subject>``, the
    concrete subject even when the registration uses a wildcard), ``event_message_id`` (the ``Nats-Msg-Id``
    header, else ``LO_EXT:<stream sequence>`` when given, else ``None``), ``event_payload``
    (:func:`event_payload_value`) and ``event_attributes`` (every header, as strings)."""
    attributes = {str(k): str(v) for k, v in (headers or {}).items()}
    msg_id = header_value(attributes, NATS_MSG_ID_HEADER)
    if not msg_id and stream_sequence is not None:
        msg_id = f"LO_EXT:{stream_sequence}"
    return {
        "event_source": f"nats://{subject}",
        "event_message_id": msg_id or None,
        "event_payload": event_payload_value(payload),
        "event_attributes": attributes,
    }
