"""Async-callback tokens (api.md §15.2): ``v1.<expires_unix>.<delegation_id>.<b64url HMAC-SHA256>``.

The HMAC key is derived from ``LANGORCH_AUTH_SECRET_KEY`` with HKDF-SHA256 (info ``langorch-callback``); the
signed text is ``v1|run_id|node_id|step_id|delegation_id|expires_unix``. A token authorises one delegation.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
from dataclasses import dataclass

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GRACE_S = 300  # a token stays valid this long after the callback deadline


def callback_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"langorch-callback").derive(secret.encode())


def _sign(key: bytes, run_id: str, node_id: str, step_id: str, delegation_id: str, expires_unix: int) -> str:
    text = f"v1|{run_id}|{node_id}|{step_id}|{delegation_id}|{expires_unix}".encode()
    return base64.urlsafe_b64encode(hmac.new(key, text, hashlib.sha256).digest()).rstrip(b"=").decode()


def make_token(key: bytes, run_id: str, node_id: str, step_id: str, delegation_id: str, expires_unix: int) -> str:
    return f"v1.{expires_unix}.{delegation_id}.{_sign(key, run_id, node_id, step_id, delegation_id, expires_unix)}"


@dataclass(frozen=True)
class ParsedToken:
    expires_unix: int
    delegation_id: str
    signature: str


def parse_token(token: str) -> ParsedToken | None:
    parts = token.split(".")
    if len(parts) != 4 or parts[0] != "v1" or not (parts[1].isascii() and parts[1].isdigit()) or not parts[2]:
        return None
    return ParsedToken(int(parts[1]), parts[2], parts[3])


def verify_token(key: bytes, token: ParsedToken, run_id: str, node_id: str, step_id: str) -> bool:
    expected = _sign(key, run_id, node_id, step_id, token.delegation_id, token.expires_unix)
    return hmac.compare_digest(expected, token.signature)
