"""The gateway's :class:`~langorch_gateway.auth.Authenticator`: the credentials of api.md §2.1.

So far: agent tokens (``Authorization: Bearer lo_agt_…``). Any other credential present is refused with 401
until its kind is checked here (a present but invalid credential is always 401).
"""

from __future__ import annotations

import hashlib

from fastapi import Request

from ckp_core.events import Actor
from langorch_gateway.auth import Principal
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem

AGENT_TOKEN_PREFIX = "lo_agt_"  # noqa: S105 (a prefix, not a secret)


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


class GatewayAuthenticator:
    """Checks a request's credential against the projections."""

    async def authenticate(self, request: Request) -> Principal | None:
        header = request.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        if header and scheme.lower() == "bearer" and token.startswith(AGENT_TOKEN_PREFIX):
            agent_id = await clients(request).pool.fetchval(
                "SELECT agent_id FROM agents WHERE token_sha256 = $1", sha256_hex(token))
            if agent_id is None:
                raise ApiProblem("invalid_token", "the agent token is not valid (rotated or unknown)")
            return Principal(actor=Actor(kind="agent", id=str(agent_id)))
        if header or request.headers.get("x-api-key"):
            raise ApiProblem("invalid_token", "the credential is not valid")
        return None
