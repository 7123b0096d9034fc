"""The ``users`` and ``api_keys`` projections (api.md §2.3): one row per user (keyed by ``user_id``; the user
aggregate's id is the username) and one per API key.

Every change after the creation is one ``UPDATE`` guarded by the row's ``seq``, so a redelivered event changes
nothing. ``password_hash`` is kept only to check logins; no view returns it.
"""

from __future__ import annotations

from ckp_core.events import (
    ApiKeyCreated,
    ApiKeyRevoked,
    LoginFailed,
    UserCreated,
    UserDeactivated,
    UserDeleted,
    UserLoggedIn,
    UserLoggedOut,
    UserPasswordChanged,
    UserUpdated,
)
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json

USERS = Projection("users", "user", ("users",))
API_KEYS = Projection("api_keys", "api_key", ("api_keys",))


@USERS.handles
async def user_created(conn: Conn, event: UserCreated, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO users (user_id, username, email, full_name, roles, is_active, password_hash, created_at,
             created_by, updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5::jsonb,true,$6,$7,$8,$7,$9,$10) ON CONFLICT (user_id) DO NOTHING""",
        event.user_id, rec.aggregate_id, event.email, event.full_name, to_json(event.roles), event.password_hash,
        rec.at, rec.actor, rec.seq, rec.position)


@USERS.handles
async def user_updated(conn: Conn, event: UserUpdated, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE users SET email = $2, full_name = $3, roles = $4::jsonb, is_active = $5, updated_at = $6,
             seq = $7, position = $8 WHERE username = $1 AND seq < $7""",
        rec.aggregate_id, event.email, event.full_name, to_json(event.roles), event.is_active, rec.at, rec.seq,
        rec.position)


@USERS.handles
async def user_deactivated(conn: Conn, event: UserDeactivated, rec: Recorded) -> None:
    await conn.execute(
        "UPDATE users SET is_active = false, updated_at = $2, seq = $3, position = $4 WHERE username = $1 AND seq < $3",
        rec.aggregate_id, rec.at, rec.seq, rec.position)


@USERS.handles
async def user_deleted(conn: Conn, event: UserDeleted, rec: Recorded) -> None:
    await conn.execute("DELETE FROM users WHERE username = $1 AND seq < $2", rec.aggregate_id, rec.seq)


@USERS.handles
async def password_changed(conn: Conn, event: UserPasswordChanged, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE users SET password_hash = $2, updated_at = $3, seq = $4, position = $5
           WHERE username = $1 AND seq < $4""",
        rec.aggregate_id, event.password_hash, rec.at, rec.seq, rec.position)


@USERS.handles
async def logged_in(conn: Conn, event: UserLoggedIn, rec: Recorded) -> None:
    await conn.execute(
        "UPDATE users SET last_login_at = $2, seq = $3, position = $4 WHERE username = $1 AND seq < $3",
        rec.aggregate_id, rec.at, rec.seq, rec.position)


@USERS.handles
async def recorded_only(conn: Conn, event: LoginFailed | UserLoggedOut, rec: Recorded) -> None:
    """Failed logins and logouts are in the stream (and the audit log); the row keeps only its position."""
    await conn.execute("UPDATE users SET seq = $2, position = $3 WHERE username = $1 AND seq < $2",
                       rec.aggregate_id, rec.seq, rec.position)


@API_KEYS.handles
async def key_created(conn: Conn, event: ApiKeyCreated, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO api_keys (key_id, name, description, roles, key_sha256, created_by, created_at, expires_at,
             seq, position)
           VALUES ($1,$2,$3,$4::jsonb,$5,$6,$7,$8,$9,$10) ON CONFLICT (key_id) DO NOTHING""",
        rec.aggregate_id, event.name, event.description, to_json(event.roles), event.key_sha256, rec.actor, rec.at,
        event.expires_at, rec.seq, rec.position)


@API_KEYS.handles
async def key_revoked(conn: Conn, event: ApiKeyRevoked, rec: Recorded) -> None:
    await conn.execute(
        """UPDATE api_keys SET revoked_at = COALESCE(revoked_at, $2), seq = $3, position = $4
           WHERE key_id = $1 AND seq < $3""",
        rec.aggregate_id, rec.at, rec.seq, rec.position)
