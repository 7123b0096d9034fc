"""Users, API keys and user tokens (api.md §2.1, §2.3): the gateway-owned ``user`` and ``api_key`` aggregates.

* **User tokens** are JWTs (HS256) with ``iss=langorch``, ``aud=langorch-api``, ``sub`` (the username), ``uid``
  (the user id, so a token never outlives its user's deletion and re-creation), ``roles`` (at issue time, for
  clients; the gateway reads the effective roles from the ``users`` projection), ``iat``, ``exp`` and ``jti``.
  Their key is derived from ``LANGORCH_AUTH_SECRET_KEY`` with HKDF info ``langorch-user-token``, distinct from
  the credential grants' (``langorch-grant``) and the callback tokens' (``langorch-callback``), so a token of one
  kind never verifies as another. Logout denylists the ``jti`` in KV ``lo_locks`` until the token would expire.
* **Passwords** are hashed with argon2id (argon2-cffi); the hash travels only in the user events and the ``users``
  row that checks logins.
* **API keys** are ``lo_<key_id>_<secret>``, kept as SHA-256 only.
* **Login throttling**: failures per username and client address are kept in KV ``lo_ratelimits`` (shared by the
  replicas); 10 within 15 minutes → 429 until the oldest one leaves the window.
* **Writes**: the gateway appends the aggregates' events itself with the expected position of the aggregate's head,
  so two writers of one aggregate serialise (and two replicas bootstrapping the same admin: one wins). Changes of
  users run under one PostgreSQL advisory lock, after the projection has applied every user event, so the
  uniqueness of usernames and the "one active admin remains" rule hold across replicas.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import ipaddress
import json
import logging
import re
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import jwt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from nats.js import JetStreamContext
from nats.js.errors import KeyDeletedError, KeyNotFoundError, KeyWrongLastSequenceError, NotFoundError

from ckp_core.errors import ConcurrencyError
from ckp_core.events import Actor, EventData, UserCreated, format_time, make_event
from ckp_core.eventstore import AggregateHead
from ckp_core.ids import new_id
from ckp_core.subjects import EVENT_STREAM, LOCKS_BUCKET, RATELIMITS_BUCKET
from langorch_gateway.deps import Clients
from langorch_gateway.pool import advisory_lock
from langorch_gateway.problems import ApiProblem
from langorch_infra.cancel import stop_if_cancelled
from langorch_infra.jetstream import JetStreamEventStore
from langorch_infra.kv import put_with_ttl
from langorch_infra.settings import GatewaySettings

log = logging.getLogger(__name__)

ISSUER = "langorch"
AUDIENCE = "langorch-api"
USER_TOKEN_INFO = b"langorch-user-token"
PLACEHOLDER_SECRET = "langorch-development-secret-key"  # noqa: S105 (the default that auth-on refuses)
MIN_SECRET_BYTES = 32
PASSWORD_MIN = 12
PASSWORD_MAX = 1024
SESSION_COOKIE = "langorch_session"
CSRF_COOKIE = "langorch_csrf"
API_KEY_PREFIX = "lo_"
API_KEY = re.compile(r"^lo_(k_[0-9a-f]{32})_([A-Za-z0-9]{43})$")
_ALPHABET = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
LOGIN_WINDOW_S = 15 * 60
LOGIN_MAX_FAILURES = 10
USAGE_INTERVAL_S = 60.0  # last_used_at of an API key is written at most this often per key and replica
USERS_LOCK = 72_015  # PostgreSQL advisory lock of user changes (any constant no other lock uses)
USER_EVENTS = "lo.evt.user.>"
APPEND_TRIES = 5
SYSTEM = Actor.system("gateway")


class StartupRefused(RuntimeError):
    """A configuration the gateway refuses to start with (api.md §2.1, §2.4)."""


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a bind address or a request's host name) is a loopback address."""
    name = host.strip().strip("[]").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


def check_startup(settings: GatewaySettings) -> None:
    """Refuse to start with auth on and a weak secret key, or with auth off on a non-loopback bind."""
    if settings.auth_enabled:
        key = settings.auth_secret_key.get_secret_value()
        if key == PLACEHOLDER_SECRET or len(key.encode()) < MIN_SECRET_BYTES:
            raise StartupRefused(
                f"authentication is enabled but LANGORCH_AUTH_SECRET_KEY is "
                f"{'the development placeholder' if key == PLACEHOLDER_SECRET else 'shorter than 32 bytes'}: set it "
                "to at least 32 random bytes shared by the gateway and the runtime (for example the output of "
                "`python3 -c 'import secrets; print(secrets.token_urlsafe(48))'`), or set LANGORCH_AUTH_ENABLED=false "
                "for local development")
        password = settings.bootstrap_admin_password
        if password is not None and len(password.get_secret_value()) < PASSWORD_MIN:
            raise StartupRefused(f"LANGORCH_BOOTSTRAP_ADMIN_PASSWORD must have at least {PASSWORD_MIN} characters")
    elif not is_loopback(settings.host) and not settings.auth_disabled_allow_remote:
        raise StartupRefused(
            f"authentication is disabled (LANGORCH_AUTH_ENABLED=false) and the gateway would listen on "
            f"{settings.host}, which is not a loopback address: anyone who reaches it would act with every role. "
            "Enable authentication, bind 127.0.0.1, or set LANGORCH_AUTH_DISABLED_ALLOW_REMOTE=true")


def user_token_key(secret: str) -> bytes:
    """The HS256 key of user tokens (HKDF-SHA256 of the auth secret, info ``langorch-user-token``)."""
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=USER_TOKEN_INFO).derive(secret.encode())


def sha256_hex(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


# -- tokens ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class IssuedToken:
    token: str
    jti: str
    expires_at: datetime
    expires_in: int


def issue_token(key: bytes, *, username: str, user_id: str, roles: Sequence[str], minutes: int,
                csrf: str | None = None) -> IssuedToken:
    """A user token; ``csrf`` binds a console session's CSRF token (its SHA-256 is a claim)."""
    now = int(time.time())
    exp = now + minutes * 60
    jti = uuid.uuid4().hex
    claims: dict[str, Any] = {"iss": ISSUER, "aud": AUDIENCE, "sub": username, "uid": user_id,
                              "roles": sorted(roles), "iat": now, "exp": exp, "jti": jti}
    if csrf is not None:
        claims["csrf"] = sha256_hex(csrf)
    return IssuedToken(jwt.encode(claims, key, algorithm="HS256"), jti, datetime.fromtimestamp(exp, UTC), exp - now)


def decode_token(key: bytes, token: str) -> dict[str, Any]:
    """The claims of a valid user token; raises ``ApiProblem`` 401 (``token_expired`` or ``invalid_token``)."""
    try:
        claims: dict[str, Any] = jwt.decode(
            token, key, algorithms=["HS256"], audience=AUDIENCE, issuer=ISSUER,
            options={"require": ["iss", "aud", "sub", "iat", "exp", "jti"]})
    except jwt.ExpiredSignatureError as exc:
        raise ApiProblem("token_expired", "the token has expired; log in again") from exc
    except jwt.InvalidTokenError as exc:
        raise ApiProblem("invalid_token", "the bearer token is not a valid LangOrch user token") from exc
    if not isinstance(claims.get("sub"), str) or not isinstance(claims.get("jti"), str):
        raise ApiProblem("invalid_token", "the bearer token is not a valid LangOrch user token")
    return claims


# -- passwords -------------------------------------------------------------------------------------------------

_HASHER = PasswordHasher()  # argon2id, the library's RFC 9106 low-memory profile
_DUMMY: list[str] = []


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_HASHER.hash, password)


async def verify_password(stored: str | None, password: str) -> bool:
    """Check ``password`` against an argon2 hash; without one (unknown user) a dummy hash is checked, so the
    answer takes as long either way."""
    if stored is None:
        if not _DUMMY:
            _DUMMY.append(await hash_password(secrets.token_urlsafe(16)))
        stored = _DUMMY[0]
        password = password + "\x00"  # never matches
    try:
        return await asyncio.to_thread(_HASHER.verify, stored, password)
    except (VerificationError, InvalidHashError):
        return False


# -- API keys --------------------------------------------------------------------------------------------------


def new_api_key() -> tuple[str, str]:
    """``(key_id, key)``: ``lo_<key_id>_<secret>`` with a 43-character base62 secret (~256 bits)."""
    key_id = "k_" + uuid.UUID(new_id()).hex
    secret = "".join(secrets.choice(_ALPHABET) for _ in range(43))
    return key_id, f"{API_KEY_PREFIX}{key_id}_{secret}"


def parse_api_key(text: str) -> str | None:
    """The key id of a well-formed API key, else None."""
    match = API_KEY.match(text)
    return match.group(1) if match else None


def same_digest(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


# -- the users projection, cached ------------------------------------------------------------------------------


@dataclass(frozen=True)
class UserRecord:
    """What a request needs of a user: identity, effective roles, whether active."""

    user_id: str
    username: str
    email: str
    full_name: str | None
    roles: tuple[str, ...]
    is_active: bool


def roles_of(value: Any) -> tuple[str, ...]:
    roles = json.loads(value) if isinstance(value, str) else value
    return tuple(str(r) for r in roles or ())


def record_of(row: asyncpg.Record) -> UserRecord:
    return UserRecord(row["user_id"], row["username"], row["email"], row["full_name"], roles_of(row["roles"]),
                      bool(row["is_active"]))


CACHE_MAX = 10_000  # rows a cache keeps at most (then it starts again empty)


class ProjectedCache:
    """Rows of a projection by key, each kept at most ``ttl_s``, and forgotten as soon as this replica's projector
    sees their aggregate change (:meth:`changed`, registered with ``Projector.watch``) or the replica that made
    the change forgets them (:meth:`forget`). A row read while something was forgotten is not kept: the read may
    have started before the change reached the table."""

    def __init__(self, ttl_s: float) -> None:
        self.ttl_s = ttl_s
        self._rows: dict[str, tuple[float, Any]] = {}
        self._forgotten = 0  # how many times something was forgotten (a read overlapping one keeps nothing)

    def cached(self, key: str) -> tuple[bool, Any]:
        """``(True, row)`` when ``key`` is cached and younger than ``ttl_s``, else ``(False, None)``."""
        known = self._rows.get(key)
        if known is not None and time.monotonic() - known[0] < self.ttl_s:
            return True, known[1]
        return False, None

    def keep(self, key: str, row: Any, since: int) -> None:
        """Cache ``row``, read after :attr:`generation` was ``since`` (not kept when something was forgotten
        meanwhile)."""
        if since != self._forgotten:
            return
        if len(self._rows) >= CACHE_MAX:
            self._rows.clear()
        self._rows[key] = (time.monotonic(), row)

    @property
    def generation(self) -> int:
        return self._forgotten

    def forget(self, key: str) -> None:
        self._forgotten += 1
        self._rows.pop(key, None)

    def changed(self, key: str | None) -> None:
        """The projector saw ``key``'s aggregate change (None: anything may have changed)."""
        self._forgotten += 1
        if key is None:
            self._rows.clear()
        else:
            self._rows.pop(key, None)


class UserCache(ProjectedCache):
    """Users by username (api.md §2.1: removing a role or deactivating a user takes effect within ``ttl_s`` on
    every replica, as soon as its projector sees the change; the replica that made the change forgets it at
    once)."""

    async def get(self, pool: asyncpg.Pool, username: str, *, fresh: bool = False) -> UserRecord | None:
        """The user (None: no such user); ``fresh`` reads the projection whatever the cache holds."""
        hit, known = self.cached(username)
        if hit and not fresh:
            return known  # type: ignore[no-any-return]
        since = self.generation
        row = await pool.fetchrow(
            "SELECT user_id, username, email, full_name, roles, is_active FROM users WHERE username = $1", username)
        found = record_of(row) if row is not None else None
        self.keep(username, found, since)
        return found


@dataclass(frozen=True)
class ApiKeyRecord:
    """What a request needs of an API key (its row in ``api_keys``)."""

    key_sha256: str
    roles: frozenset[str]
    expires_at: datetime | None
    revoked_at: datetime | None


class ApiKeyCache(ProjectedCache):
    """API keys by key id, as :class:`UserCache` (a revoked key is refused by a replica as soon as its projector
    sees the revocation, and within ``ttl_s`` in any case; expiry is checked at every request). Unknown key ids are
    not cached: a key created on another replica works as soon as its row is written."""

    async def get(self, pool: asyncpg.Pool, key_id: str) -> ApiKeyRecord | None:
        hit, known = self.cached(key_id)
        if hit:
            return known  # type: ignore[no-any-return]
        since = self.generation
        row = await pool.fetchrow("SELECT key_sha256, roles, expires_at, revoked_at FROM api_keys WHERE key_id = $1",
                                  key_id)
        if row is None:
            return None
        found = ApiKeyRecord(row["key_sha256"], frozenset(roles_of(row["roles"])), row["expires_at"],
                             row["revoked_at"])
        self.keep(key_id, found, since)
        return found


# -- KV: the logout denylist and the login throttle ------------------------------------------------------------


def _denylist_key(jti: str) -> str:
    return f"auth.denied.{sha256_hex(jti)[:48]}"


async def denylist(js: JetStreamContext, jti: str, expires_at: datetime) -> None:
    """Refuse the token ``jti`` until it would have expired (its key then expires too)."""
    ttl = max(1.0, (expires_at - datetime.now(UTC)).total_seconds() + 1)
    await put_with_ttl(js, LOCKS_BUCKET, _denylist_key(jti), b"1", ttl)


async def denylisted(js: JetStreamContext, jti: str) -> bool:
    """Whether ``jti`` was logged out: one get of the key's last message, the request ``KeyValue.get`` makes on
    the buckets ``ensure_topology`` creates (``js.key_value`` asks for the bucket's stream info first: a second round
    trip at every user-token request). A delete, purge or TTL-expiry marker has no data: not denylisted."""
    try:
        msg = await js.get_last_msg(f"KV_{LOCKS_BUCKET}", f"$KV.{LOCKS_BUCKET}.{_denylist_key(jti)}")
    except NotFoundError:
        return False
    return bool(msg.data)


class LoginThrottle:
    """Failed logins per username and client address in KV ``lo_ratelimits`` (one key per pair, the failure times
    of the window, written with a compare-and-set on the key's last revision)."""

    def __init__(self, js: JetStreamContext) -> None:
        self.js = js

    @staticmethod
    def key(username: str, client: str) -> str:
        return f"login.{sha256_hex(username + chr(10) + client)[:48]}"

    async def _read(self, key: str) -> tuple[list[float], int]:
        try:
            msg = await self.js.get_last_msg(f"KV_{RATELIMITS_BUCKET}", f"$KV.{RATELIMITS_BUCKET}.{key}")
        except NotFoundError:
            return [], 0
        try:
            times = [float(t) for t in json.loads(msg.data or b"[]")]
        except (ValueError, TypeError):
            times = []
        horizon = time.time() - LOGIN_WINDOW_S
        return [t for t in times if t > horizon], int(msg.seq or 0)

    async def retry_after(self, username: str, client: str) -> int | None:
        """Seconds until another try is allowed, or None when it is allowed now."""
        times, _ = await self._read(self.key(username, client))
        if len(times) < LOGIN_MAX_FAILURES:
            return None
        oldest = sorted(times)[-LOGIN_MAX_FAILURES]
        return max(1, int(oldest + LOGIN_WINDOW_S - time.time()) + 1)

    async def failed(self, username: str, client: str) -> None:
        key = self.key(username, client)
        for _ in range(APPEND_TRIES):
            times, last = await self._read(key)
            times = sorted([*times, time.time()])[-LOGIN_MAX_FAILURES * 2:]
            try:
                await put_with_ttl(self.js, RATELIMITS_BUCKET, key, json.dumps(times).encode(), LOGIN_WINDOW_S + 1,
                                   last=last)
                return
            except KeyWrongLastSequenceError:
                continue
        log.warning("failed login of %s not counted: the throttle key kept changing", username)

    async def succeeded(self, username: str, client: str) -> None:
        kv = await self.js.key_value(RATELIMITS_BUCKET)
        with contextlib.suppress(KeyNotFoundError, KeyDeletedError, NotFoundError):
            await kv.delete(self.key(username, client))


# -- appending the aggregates' events --------------------------------------------------------------------------


async def append(store: JetStreamEventStore, aggregate: str, aggregate_id: str, head: AggregateHead | None,
                 payloads: Sequence[EventData], *, actor: Actor, causation_id: str | None) -> list[int]:
    """Append ``payloads`` after ``head`` (None: a new aggregate); raises ``ConcurrencyError`` when it moved."""
    seq = head.seq if head else 0
    events = [make_event(p, aggregate_id=aggregate_id, seq=seq + i, actor=actor, causation_id=causation_id,
                         aggregate=aggregate) for i, p in enumerate(payloads, start=1)]
    return await store.append(events, expected_position=head.position if head else 0)


async def append_at_head(store: JetStreamEventStore, aggregate: str, aggregate_id: str,
                         payloads: Sequence[EventData], *, actor: Actor, causation_id: str | None) -> list[int]:
    """Append at whatever the aggregate's head is (events that change no state rule: logins, logouts)."""
    for _ in range(APPEND_TRIES):
        head = await store.head(aggregate, aggregate_id)
        try:
            return await append(store, aggregate, aggregate_id, head, payloads, actor=actor,
                                causation_id=causation_id)
        except ConcurrencyError:
            continue
    raise ApiProblem("unavailable", f"{aggregate} {aggregate_id} is being changed concurrently; retry", status=503)


async def last_user_position(js: JetStreamContext) -> int:
    """The stream position of the newest user event (0: none yet)."""
    try:
        msg = await js.get_last_msg(EVENT_STREAM, USER_EVENTS)
    except NotFoundError:
        return 0
    return int(msg.seq or 0)


@contextlib.asynccontextmanager
async def users_locked(pool: asyncpg.Pool, local: asyncio.Lock) -> AsyncIterator[None]:
    """Serialise the user changes of every replica (an in-process lock first, so waiting requests do not each hold
    a pooled connection)."""
    async with local, pool.acquire() as conn, advisory_lock(conn, USERS_LOCK):
        yield


# -- views -----------------------------------------------------------------------------------------------------


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


def user_out(row: asyncpg.Record) -> dict[str, Any]:
    """``UserOut`` (never the password hash)."""
    return {"user_id": row["user_id"], "username": row["username"], "email": row["email"],
            "full_name": row["full_name"], "roles": list(roles_of(row["roles"])), "is_active": bool(row["is_active"]),
            "created_at": _time(row["created_at"]), "updated_at": _time(row["updated_at"]),
            "last_login_at": _time(row["last_login_at"])}


def api_key_out(row: asyncpg.Record) -> dict[str, Any]:
    """``ApiKeyOut`` (never the key nor its hash); ``row`` joins ``api_key_usage`` for ``last_used_at``."""
    return {"key_id": row["key_id"], "name": row["name"], "description": row["description"],
            "roles": list(roles_of(row["roles"])), "created_by": row["created_by"],
            "created_at": _time(row["created_at"]), "expires_at": _time(row["expires_at"]),
            "last_used_at": _time(row["last_used_at"]), "revoked_at": _time(row["revoked_at"])}


USER_COLUMNS = ("user_id, username, email, full_name, roles, is_active, created_at, updated_at, last_login_at")
API_KEYS_VIEW = ("(SELECT k.*, u.last_used_at FROM api_keys k LEFT JOIN api_key_usage u ON u.key_id = k.key_id) "
                 "AS api_keys_view")


# -- creating users, the bootstrap admin, the loud auth-disabled mode ------------------------------------------


async def caught_up(app: Clients) -> None:
    """Wait until the projection has applied every user event (under the users lock: then it is the state)."""
    if not await app.projector.wait(await last_user_position(app.js), app.settings.ryw_timeout_ms / 1000):
        raise ApiProblem("unavailable", "the users projection is behind the event stream; retry", status=503)


async def create_user(app: Clients, *, username: str, email: str, full_name: str | None, roles: Sequence[str],
                      password_hash: str, actor: Actor, causation_id: str | None) -> tuple[str, int]:
    """Append ``user_created`` for a username no user has (call under :func:`users_locked`); ``(user_id,
    position)``. 409 ``user_exists`` when one has it."""
    await caught_up(app)
    if await app.pool.fetchval("SELECT 1 FROM users WHERE username = $1", username) is not None:
        raise ApiProblem("user_exists", f"a user named {username!r} exists")
    head = await app.store.head("user", username)
    user_id = new_id()
    try:
        [position] = await append(app.store, "user", username, head, [UserCreated(
            user_id=user_id, username=username, email=email, full_name=full_name, roles=sorted(set(roles)),
            password_hash=password_hash)], actor=actor, causation_id=causation_id)
    except ConcurrencyError as exc:
        raise ApiProblem("user_exists", f"a user named {username!r} was just created") from exc
    return user_id, position


async def bootstrap_admin(app: Clients, lock: asyncio.Lock) -> bool:
    """Create the bootstrap admin when auth is on and no user exists (api.md §2.3); True when a user exists."""
    settings = app.settings
    async with users_locked(app.pool, lock):
        await caught_up(app)
        if await app.pool.fetchval("SELECT 1 FROM users LIMIT 1") is not None:
            return True
        if settings.bootstrap_admin_password is None:
            return False
        digest = await hash_password(settings.bootstrap_admin_password.get_secret_value())
        username = settings.bootstrap_admin_username
        try:
            _, position = await create_user(app, username=username, email=f"{username}@localhost", full_name=None,
                                            roles=["admin"], password_hash=digest, actor=SYSTEM, causation_id=None)
        except ApiProblem as problem:
            if problem.code == "user_exists":  # another replica bootstrapped it first
                return True
            raise
    await app.projector.wait(position, settings.ryw_timeout_ms / 1000)
    log.warning("created the bootstrap admin %r (LANGORCH_BOOTSTRAP_ADMIN_USERNAME) with the password of "
                "LANGORCH_BOOTSTRAP_ADMIN_PASSWORD", username)
    return True


BOOTSTRAP_FIRST_TRY_S = 15.0
NO_USER_WARNING_S = 60.0
DISABLED_WARNING_S = 600.0


def _warn_disabled(settings: GatewaySettings) -> None:
    log.warning("AUTHENTICATION IS DISABLED (LANGORCH_AUTH_ENABLED=false): every request without credentials acts "
                "as 'anonymous' holding every role. For local development only.")
    if settings.auth_disabled_allow_remote and not is_loopback(settings.host):
        log.warning("AUTHENTICATION IS DISABLED on %s, a non-loopback address "
                    "(LANGORCH_AUTH_DISABLED_ALLOW_REMOTE=true): anyone who reaches it is an admin", settings.host)


async def _housekeeping(app: Clients, lock: asyncio.Lock) -> None:
    settings = app.settings
    if not settings.auth_enabled:
        while True:
            await asyncio.sleep(DISABLED_WARNING_S)
            stop_if_cancelled()
            _warn_disabled(settings)
    while True:
        try:
            if await bootstrap_admin(app, lock):
                return
        except Exception:  # NATS or PostgreSQL away for a moment: try again at the next round
            log.warning("bootstrap admin check failed; trying again in %s s", NO_USER_WARNING_S, exc_info=True)
        else:
            log.warning("authentication is enabled and no user exists: set LANGORCH_BOOTSTRAP_ADMIN_PASSWORD "
                        "(the gateway then creates %r with the admin role), or create the first admin with "
                        "`langorch users create <name> --email <email> --role admin --direct` (it writes to NATS "
                        "directly, with this gateway's NATS settings)", settings.bootstrap_admin_username)
        await asyncio.sleep(NO_USER_WARNING_S)


async def start(app: Clients, lock: asyncio.Lock) -> asyncio.Task[None]:
    """At start-up: the auth-disabled warning, or a first bounded try at the bootstrap admin (so the first login
    works as soon as the gateway serves); then the periodic warnings and tries in a task (cancel it to stop)."""
    if not app.settings.auth_enabled:
        _warn_disabled(app.settings)
    else:
        try:
            await asyncio.wait_for(bootstrap_admin(app, lock), BOOTSTRAP_FIRST_TRY_S)
        except Exception:  # the task tries again
            log.warning("bootstrap admin check did not finish at start-up; trying again", exc_info=True)
    return asyncio.create_task(_housekeeping(app, lock), name="auth-housekeeping")
