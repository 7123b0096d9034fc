"""Secrets at the moment of use (ckp.md §7.14, api.md §11, §15.3): the ``env`` provider and credential grants.

A grant is a short-lived JWT (HS256, key derived from ``LANGORCH_AUTH_SECRET_KEY`` with HKDF info
``langorch-grant``) that an agent redeems at ``GET /api/agent-credentials/{secret_name}``; the runtime never
hands an HTTP agent the value itself.
"""

from __future__ import annotations

import os
import re
import time
import uuid
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

GRANT_TTL_S = 300
ISSUER = "langorch"
AUDIENCE = "agent_credential"


def env_secret(name: str) -> str | None:
    """The ``env`` provider: ``LANGORCH_SECRET_<NAME>``, then the variable named ``name`` itself."""
    normalised = re.sub(r"[^A-Za-z0-9]", "_", name).upper()
    value = os.environ.get(f"LANGORCH_SECRET_{normalised}")
    return value if value is not None else os.environ.get(name)


def grant_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"langorch-grant").derive(secret.encode())


def make_grant(key: bytes, *, run_id: str, secret_name: str, node_id: str, step_id: str,
               agent_id: str | None = None, field: str | None = None, ttl_s: int = GRANT_TTL_S) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": run_id, "secret_name": secret_name,
                              "agent_id": agent_id, "node_id": node_id, "step_id": step_id, "field": field,
                              "jti": str(uuid.uuid4()), "iat": now, "exp": now + min(ttl_s, GRANT_TTL_S)}
    return jwt.encode(claims, key, algorithm="HS256")


def verify_grant(key: bytes, token: str) -> dict[str, Any]:
    """The grant's claims; raises ``jwt.InvalidTokenError`` (expired, bad signature, wrong audience)."""
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    return claims


_JWT = re.compile(r"[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")


def redeem_grants(value: Any, key: bytes, resolve: Any = env_secret) -> Any:
    """Replace every credential grant inside ``value`` (any JSON value) by the secret it names, in memory: MCP
    tools get values, not grants (ckp.md §7.14). A grant that does not verify is left as it is."""
    if isinstance(value, dict):
        return {k: redeem_grants(v, key, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [redeem_grants(v, key, resolve) for v in value]
    if not isinstance(value, str) or "." not in value:
        return value

    def swap(match: re.Match[str]) -> str:
        try:
            claims = verify_grant(key, match.group(0))
        except jwt.InvalidTokenError:
            return match.group(0)
        secret = resolve(str(claims.get("secret_name")))
        if secret is None:
            return match.group(0)
        field = claims.get("field")
        if field:
            import json

            try:
                return str(json.loads(secret)[field])
            except (ValueError, KeyError, TypeError):
                return match.group(0)
        return str(secret)

    return _JWT.sub(swap, value)
