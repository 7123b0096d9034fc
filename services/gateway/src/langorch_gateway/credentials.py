"""The gateway's :class:`~langorch_gateway.auth.Authenticator`: the credentials of api.md §2.1.

Checked in this order: an API key (``X-API-Key: lo_<key_id>_<secret>`` or ``Authorization: Bearer lo_<key_id>_…``),
a bearer token (an agent token ``lo_agt_…`` or a user JWT), the console session cookie ``langorch_session``. Every
credential present is checked, and one that is present but invalid is always 401, even when another valid one is
present too; the principal is the first valid one in that order. Credentials in the query string
(``?access_token=``, ``?token=``, ``?api_key=``) are refused: they leak into logs (the run callback's ``?token=`` is
its own route's, which takes no principal).

A user's effective roles come from the ``users`` projection (cached at most ``LANGORCH_AUTH_ROLE_CACHE_S``), not
from the token. A session's unsafe request also needs ``X-CSRF-Token`` equal to the ``langorch_csrf`` cookie (and to
the token the session was issued with), else 403 ``csrf_failed``.
"""

from __future__ import annotations

import asyncio
import logging
import time
from datetime import UTC, datetime
from typing import cast

from fastapi import Request

from ckp_core.events import Actor
from langorch_gateway import users
from langorch_gateway.auth import Principal
from langorch_gateway.deps import clients
from langorch_gateway.problems import ApiProblem
from langorch_infra.settings import GatewaySettings

log = logging.getLogger(__name__)

AGENT_TOKEN_PREFIX = "lo_agt_"  # noqa: S105 (a prefix, not a secret)
QUERY_CREDENTIALS = ("access_token", "token", "api_key")
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class GatewayAuthenticator:
    """Checks a request's credentials against the projections; also holds what the auth routes share per replica
    (the user-token key, the user cache, the lock of user changes)."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.token_key = users.user_token_key(settings.auth_secret_key.get_secret_value())
        self.cache = users.UserCache(settings.auth_role_cache_s)
        self.keys = users.ApiKeyCache(settings.auth_role_cache_s)
        self.users_lock = asyncio.Lock()
        self._key_used: dict[str, float] = {}

    async def authenticate(self, request: Request) -> Principal | None:
        for name in QUERY_CREDENTIALS:
            if name in request.query_params:
                raise ApiProblem("invalid_token", f"credentials are not accepted in the query string (?{name}=): "
                                 "send them in the Authorization or X-API-Key header")
        found: list[Principal] = []
        x_api_key = request.headers.get("x-api-key")
        header = request.headers.get("authorization")
        bearer: str | None = None
        if header is not None:
            scheme, _, value = header.strip().partition(" ")
            bearer = value.strip()
            if scheme.lower() != "bearer" or not bearer:
                raise ApiProblem("invalid_token", "the Authorization header must be 'Bearer <token>'")
        if x_api_key is not None:
            found.append(await self._api_key(request, x_api_key.strip()))
        if bearer is not None and bearer.startswith(users.API_KEY_PREFIX) and not bearer.startswith(
                AGENT_TOKEN_PREFIX):
            found.append(await self._api_key(request, bearer))
        elif bearer is not None:
            found.append(await (self._agent(request, bearer) if bearer.startswith(AGENT_TOKEN_PREFIX)
                                else self._user_token(request, bearer)))
        session = request.cookies.get(users.SESSION_COOKIE)
        if session is not None:
            found.append(await self._session(request, session))
        return found[0] if found else None

    async def _agent(self, request: Request, token: str) -> Principal:
        agent_id = await clients(request).pool.fetchval(
            "SELECT agent_id FROM agents WHERE token_sha256 = $1", users.sha256_hex(token))
        if agent_id is None:
            raise ApiProblem("invalid_token", "the agent token is not valid (rotated or unknown)")
        return Principal(actor=Actor(kind="agent", id=str(agent_id)))

    async def _api_key(self, request: Request, key: str) -> Principal:
        key_id = users.parse_api_key(key)
        if key_id is None:
            raise ApiProblem("invalid_token", "the API key is malformed")
        pool = clients(request).pool
        row = await self.keys.get(pool, key_id)
        if row is None or not users.same_digest(row.key_sha256, users.sha256_hex(key)):
            raise ApiProblem("invalid_token", "the API key is not valid")
        if row.revoked_at is not None:
            raise ApiProblem("invalid_token", "the API key has been revoked")
        now = datetime.now(UTC)
        if row.expires_at is not None and row.expires_at <= now:
            raise ApiProblem("token_expired", "the API key has expired")
        last = self._key_used.get(key_id)
        if last is None or time.monotonic() - last >= users.USAGE_INTERVAL_S:
            self._key_used[key_id] = time.monotonic()
            await pool.execute(
                """INSERT INTO api_key_usage (key_id, last_used_at) VALUES ($1, $2)
                   ON CONFLICT (key_id) DO UPDATE SET last_used_at = GREATEST(api_key_usage.last_used_at,
                                                                               EXCLUDED.last_used_at)""",
                key_id, now)
        return Principal(actor=Actor(kind="api_key", id=key_id), roles=row.roles, expires_at=row.expires_at)

    async def _user_token(self, request: Request, token: str, *, session: bool = False) -> Principal:
        claims = users.decode_token(self.token_key, token)
        app = clients(request)
        if await users.denylisted(app.js, str(claims["jti"])):
            raise ApiProblem("invalid_token", "the token was logged out")
        username = str(claims["sub"])
        user = await self.cache.get(app.pool, username)
        if user is None or user.user_id != claims.get("uid"):  # a user created again since: read it once more
            user = await self.cache.get(app.pool, username, fresh=True)
        if user is None or user.user_id != claims.get("uid"):
            raise ApiProblem("invalid_token", "the token's user does not exist")
        if not user.is_active:
            raise ApiProblem("invalid_token", "the token's user is deactivated")
        if session and request.method not in SAFE_METHODS:
            self._check_csrf(request, claims.get("csrf"))
        extra = {"credential": "session" if session else "bearer"}
        return Principal(actor=Actor(kind="user", id=username), roles=frozenset(user.roles), user_id=user.user_id,
                         expires_at=datetime.fromtimestamp(int(claims["exp"]), UTC), token_id=str(claims["jti"]),
                         extra=extra)

    async def _session(self, request: Request, token: str) -> Principal:
        return await self._user_token(request, token, session=True)

    @staticmethod
    def _check_csrf(request: Request, bound: object) -> None:
        header = request.headers.get("x-csrf-token")
        cookie = request.cookies.get(users.CSRF_COOKIE)
        if (not header or not cookie or not users.same_digest(header, cookie) or not isinstance(bound, str)
                or not users.same_digest(users.sha256_hex(header), bound)):
            raise ApiProblem("csrf_failed", "a console session's unsafe request needs the X-CSRF-Token header equal "
                             "to the langorch_csrf cookie")


def authority(request: Request) -> GatewayAuthenticator:
    """The application's authenticator (the auth routes use its key, cache and lock)."""
    return cast(GatewayAuthenticator, clients(request).authenticator)
