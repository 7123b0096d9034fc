"""Credential grants (ckp.md §7.14, api.md §15.3); the providers live in :mod:`langorch_infra.secret_providers`.

A grant is a short-lived JWT (HS256, key derived from ``LANGORCH_AUTH_SECRET_KEY`` with HKDF info
``langorch-grant``) that an agent redeems at ``GET /api/agent-credentials/{secret_name}``; the runtime never
hands an HTTP agent the value itself. A grant names the secret and, when the procedure's reference named a
provider, that provider and its reference (``provider``, ``ref``, ``url`` claims), so the redeemer resolves it
exactly as the runtime would have.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import jwt
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from langorch_infra.secret_providers import SecretResolver, env_secret

GRANT_TTL_S = 300
ISSUER = "langorch"
AUDIENCE = "agent_credential"


__all__ = ["AUDIENCE", "GRANT_TTL_S", "ISSUER", "env_secret", "grant_key", "make_grant", "redeem_grants",
           "resolve_grant", "verify_grant"]


def grant_key(secret: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=b"langorch-grant").derive(secret.encode())


def make_grant(key: bytes, *, run_id: str, secret_name: str, node_id: str, step_id: str,
               agent_id: str | None = None, field: str | None = None, ttl_s: int = GRANT_TTL_S,
               provider: str | None = None, ref: str | None = None, url: str | None = None) -> str:
    now = int(time.time())
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": run_id, "secret_name": secret_name,
                              "agent_id": agent_id, "node_id": node_id, "step_id": step_id, "field": field,
                              "jti": str(uuid.uuid4()), "iat": now, "exp": now + min(ttl_s, GRANT_TTL_S)}
    claims |= {k: v for k, v in (("provider", provider), ("ref", ref), ("url", url)) if v is not None}
    return jwt.encode(claims, key, algorithm="HS256")


def verify_grant(key: bytes, token: str) -> dict[str, Any]:
    """The grant's claims; raises ``jwt.InvalidTokenError`` (expired, bad signature, wrong audience)."""
    claims: dict[str, Any] = jwt.decode(token, key, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER)
    return claims


_JWT = re.compile(r"[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}\.[A-Za-z0-9_-]{10,}")


async def resolve_grant(resolver: SecretResolver, claims: dict[str, Any]) -> str:
    """The value a verified grant names, read from its provider now; raises
    :class:`~langorch_infra.secret_providers.SecretError`."""
    return await resolver.resolve(str(claims.get("secret_name")), provider=claims.get("provider"),
                                  ref=claims.get("ref"), url=claims.get("url"), field=claims.get("field"))


async def redeem_grants(value: Any, key: bytes, resolve: Callable[[dict[str, Any]], Awaitable[str]]) -> Any:
    """Replace every credential grant inside ``value`` (any JSON value) by the secret it names, in memory: MCP
    tools get values, not grants (ckp.md §7.14). A grant that does not verify is left as it is; a secret that
    does not resolve raises the resolver's error."""
    if isinstance(value, dict):
        return {k: await redeem_grants(v, key, resolve) for k, v in value.items()}
    if isinstance(value, list):
        return [await redeem_grants(v, key, resolve) for v in value]
    if not isinstance(value, str) or "." not in value:
        return value
    out: list[str] = []
    pos = 0
    for match in _JWT.finditer(value):
        try:
            claims = verify_grant(key, match.group(0))
        except jwt.InvalidTokenError:
            continue
        out += [value[pos:match.start()], await resolve(claims)]
        pos = match.end()
    if not out:
        return value
    out.append(value[pos:])
    return "".join(out)
