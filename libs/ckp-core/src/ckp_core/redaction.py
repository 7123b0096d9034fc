"""Redaction of event payloads, views and logs (ckp.md §7.15, api.md §1.7)."""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Iterable
from typing import Any

REDACTED = "***REDACTED***"

_SENSITIVE_KEY = re.compile(
    r"^(password|passwd|secret|client_secret|api_key|apikey|api-key|authorization|cookie|private_key|"
    r"access_key|credentials?|.*token)$",  # a key equal to or ending in token (refreshToken, csrf_token)
    re.IGNORECASE,
)
_COUNTERS = frozenset({"prompt_tokens", "completion_tokens", "total_tokens"})


def is_sensitive_key(key: str, extra: frozenset[str] = frozenset()) -> bool:
    """True when a key's value must be redacted wherever it appears."""
    return key in extra or _sensitive_by_rule(key)


@functools.lru_cache(maxsize=8192)
def _sensitive_by_rule(key: str) -> bool:
    """The built-in rule (remembered per key: every event payload repeats the same few keys)."""
    if key.lower() in _COUNTERS:
        return False
    return bool(_SENSITIVE_KEY.match(key))


class Redactor:
    """Redacts by key (built-in rules plus extra names) and masks known sensitive values."""

    def __init__(self, extra_keys: Iterable[str] = (), values: Iterable[str] = ()) -> None:
        self.extra_keys = frozenset(extra_keys)
        self.values = sorted({v for v in values if isinstance(v, str) and len(v) >= 4}, key=len, reverse=True)

    def add(self, keys: Iterable[str] = (), values: Iterable[str] = ()) -> None:
        """Redact more keys and mask more values from now on (secrets handed out, decrypted outputs)."""
        self.extra_keys = self.extra_keys | frozenset(keys)
        fresh = {v for v in values if isinstance(v, str) and len(v) >= 4} - set(self.values)
        if fresh:
            self.values = sorted({*self.values, *fresh}, key=len, reverse=True)

    def _mask(self, s: str) -> str:
        for v in self.values:
            if v in s:
                s = s.replace(v, REDACTED)
        return s

    def redact(self, value: Any) -> Any:
        """Return a redacted deep copy of a JSON value."""
        if isinstance(value, dict):
            return {
                k: REDACTED if is_sensitive_key(str(k), self.extra_keys) else self.redact(v)
                for k, v in value.items()
            }
        if isinstance(value, list):
            return [self.redact(v) for v in value]
        if isinstance(value, str) and self.values:
            return self._mask(value)
        return value


def scalar_strings(value: Any) -> list[str]:
    """The strings, and numbers as text, of a JSON value's leaves: the values to mask once the value is known
    to be sensitive."""
    if isinstance(value, dict):
        return [s for v in value.values() for s in scalar_strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in scalar_strings(v)]
    if isinstance(value, str):
        return [value]
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return [json.dumps(value)]
    return []


def mask_leaves(value: Any) -> Any:
    """A copy of a JSON value with every leaf but null replaced by :data:`REDACTED` (its shape kept)."""
    if isinstance(value, dict):
        return {k: mask_leaves(v) for k, v in value.items()}
    if isinstance(value, list):
        return [mask_leaves(v) for v in value]
    return value if value is None else REDACTED


FIELD_LIMIT = 64 * 1024
PAYLOAD_LIMIT = 256 * 1024


def _size(value: Any) -> int:
    return len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8"))


def _stub(value: Any) -> dict[str, Any]:
    raw = json.dumps(value, separators=(",", ":"), ensure_ascii=False, default=str).encode("utf-8")
    return {"_truncated": True, "bytes": len(raw), "sha256": hashlib.sha256(raw).hexdigest()}


def bound_payload(payload: dict[str, Any]) -> dict[str, Any]:
    """Bound an event payload (ckp.md §7.15): a field over 64 KiB becomes ``{"_truncated": true, "bytes",
    "sha256"}``; a payload still over 256 KiB has its largest fields truncated first until it fits. A ``variables``
    map (the values a step or node wrote) is bounded variable by variable the same way, to fit one field: one large
    variable does not hide the others.

    A payload of at most 64 KiB as a whole (nearly every one) is returned as is after one measure: none of its
    fields can be larger than the payload."""
    if _size(payload) <= FIELD_LIMIT:
        return dict(payload)
    variables = payload.get("variables")
    if isinstance(variables, dict) and variables:
        payload = {**payload, "variables": _fit(variables, FIELD_LIMIT)}
    return _fit(payload, PAYLOAD_LIMIT)


def _fit(mapping: dict[str, Any], limit: int) -> dict[str, Any]:
    """Each entry over 64 KiB truncated, then the largest entries first until the whole is at most ``limit``."""
    out = {k: (_stub(v) if _size(v) > FIELD_LIMIT else v) for k, v in mapping.items()}
    largest_first = [k for k, _ in sorted(((k, _size(v)) for k, v in out.items()), key=lambda kv: kv[1],
                                          reverse=True)]
    total = _size(out)
    for key in largest_first:
        if total <= limit:
            break
        if isinstance(out[key], dict) and out[key].get("_truncated"):
            continue
        out[key] = _stub(out[key])
        total = _size(out)
    return out
