"""Identifiers: UUIDv7 for runs, events and commands; token-safe encoding for subject tokens."""

from __future__ import annotations

import re

import uuid_utils

_SAFE = re.compile(r"[A-Za-z0-9_-]")
_ALL_SAFE = re.compile(r"[A-Za-z0-9_-]*")


def new_id() -> str:
    """Return a new time-ordered UUIDv7 as a string."""
    return str(uuid_utils.uuid7())


def encode_token(value: str) -> str:
    """Encode an id so it is a single NATS subject token (api.md §16.1).

    Every byte outside ``[A-Za-z0-9_-]`` becomes ``~XX`` (upper-case hex), so ``invoice.v2`` becomes
    ``invoice~2Ev2``. UUIDs pass unchanged.
    """
    if _ALL_SAFE.fullmatch(value):  # nearly every id (a UUID): one match instead of one per character
        return value
    out: list[str] = []
    for ch in value:
        if _SAFE.fullmatch(ch):
            out.append(ch)
        else:
            out.extend(f"~{b:02X}" for b in ch.encode("utf-8"))
    return "".join(out)


def decode_token(token: str) -> str:
    """Invert :func:`encode_token`."""
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "~":
            raw.append(int(token[i + 1 : i + 3], 16))
            i += 3
        else:
            raw.extend(token[i].encode())
            i += 1
    return raw.decode("utf-8")
