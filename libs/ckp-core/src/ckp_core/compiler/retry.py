"""Retry policy objects (§4.8): the keys they set, aliases resolved.

Used by global_config, a step's retry_config, error handlers and llm_action nodes.
"""

from __future__ import annotations

from typing import Any

from ckp_core.compiler.fields import Compilation
from ckp_core.expressions import json_type_name

RETRY_KEYS = {
    "max_retries": "max_retries", "max_attempts": "max_retries", "strategy": "strategy",
    "retry_delay_ms": "retry_delay_ms", "delay_ms": "retry_delay_ms", "base_delay_ms": "retry_delay_ms",
    "backoff_ms": "retry_delay_ms", "backoff_multiplier": "backoff_multiplier", "multiplier": "backoff_multiplier",
    "max_delay_ms": "max_delay_ms", "jitter": "jitter", "retry_on": "retry_on",
}
RETRY_STRATEGIES = ("fixed", "linear", "exponential_backoff", "fibonacci")


def retry_keys(c: Compilation, raw: Any, p: str) -> dict[str, Any]:
    """The keys a RetryPolicy object sets explicitly (§4.8), aliases resolved."""
    rp = c.obj(raw, p, RETRY_KEYS)
    if rp is None:
        return {}
    out: dict[str, Any] = {}
    for key, value in rp.items():
        canonical = RETRY_KEYS.get(key)
        if canonical is None:
            continue
        if canonical != key:
            c.add("info", "alias_normalised", f"{p}/{key}: '{key}' read as '{canonical}'", f"{p}/{key}")
        if canonical in out:
            continue
        if key == "max_attempts":
            n = c.integer(rp, key, p, minimum=1)
            if n is not None:
                out["max_retries"] = n - 1
        elif canonical in ("max_retries", "retry_delay_ms", "max_delay_ms"):
            n = c.integer(rp, key, p)
            if n is not None:
                out[canonical] = n
        elif canonical == "backoff_multiplier":
            m = c.number(rp, key, p, minimum=1)
            if m is not None:
                out[canonical] = m
        elif canonical == "strategy":
            s = c.enum(rp, key, p, RETRY_STRATEGIES)
            if s is not None:
                out[canonical] = s
        elif canonical == "jitter":
            if isinstance(value, bool):
                out["jitter"] = 1.0 if value else 0.0
            elif isinstance(value, int | float) and 0 <= value <= 1:
                out["jitter"] = float(value)
            else:
                c.add("error", "invalid_value", f"{p}/{key}: '{value}' is not valid; expected true, false or "
                      "a fraction in [0, 1]", f"{p}/{key}")
        elif canonical == "retry_on":
            codes = [value] if isinstance(value, str) else value
            if isinstance(codes, list) and all(isinstance(code, str) for code in codes):
                out["retry_on"] = list(codes)
            else:
                c.add("error", "invalid_type", f"{p}/{key}: expected array of strings, got "
                      f"{json_type_name(value)}", f"{p}/{key}")
    return out
