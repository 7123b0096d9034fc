"""The ``agents`` projection (api.md §7): one row per registered agent, its status and circuit breaker state.

Every change after the registration is one ``UPDATE`` guarded by the row's ``seq``, so a redelivered event changes
nothing.
"""

from __future__ import annotations

from typing import Any

from ckp_core.events import (
    AgentCapabilitiesSynced,
    AgentCircuitClosed,
    AgentCircuitOpened,
    AgentRegistered,
    AgentRemoved,
    AgentStatusChanged,
    AgentTokenRotated,
    AgentUpdated,
)
from langorch_gateway.projections.base import Conn, Projection, Recorded, to_json

PROJECTION = Projection("agents", "agent", ("agents",))

AGENT_COLUMNS = {"name", "channel", "protocol", "base_url", "concurrency_limit", "resource_key", "pool_id",
                 "capabilities", "labels", "auth", "status"}
"""The columns an ``agent_updated`` change may set."""
JSON_COLUMNS = {"capabilities", "labels", "auth"}


class AgentUpdate:
    """The ``SET`` clauses of one event's update of its agent's row ($1 agent id, $2 time, $3 seq, $4 position)."""

    def __init__(self, rec: Recorded) -> None:
        self.sets = ["updated_at = $2", "seq = $3", "position = $4"]
        self.args: list[Any] = [rec.aggregate_id, rec.at, rec.seq, rec.position]

    def put(self, column: str, value: Any) -> AgentUpdate:
        json_column = column in JSON_COLUMNS
        self.args.append(to_json(value) if json_column else value)
        self.sets.append(f"{column} = ${len(self.args)}{'::jsonb' if json_column else ''}")
        return self

    def clause(self, sql: str) -> AgentUpdate:
        self.sets.append(sql)
        return self

    async def execute(self, conn: Conn) -> None:
        await conn.execute(f"UPDATE agents SET {', '.join(self.sets)} WHERE agent_id = $1 AND seq < $3",  # noqa: S608
                           *self.args)


@PROJECTION.handles
async def registered(conn: Conn, event: AgentRegistered, rec: Recorded) -> None:
    await conn.execute(
        """INSERT INTO agents (agent_id, name, channel, protocol, base_url, status, concurrency_limit,
             resource_key, pool_id, capabilities, labels, auth, token_sha256, registered_by, created_at,
             updated_at, seq, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb,$11::jsonb,$12::jsonb,$13,$14,$15,$15,$16,$17)
           ON CONFLICT (agent_id) DO NOTHING""",
        rec.aggregate_id, event.name, event.channel, event.protocol, event.base_url, event.status,
        event.concurrency_limit, event.resource_key, event.pool_id, to_json(event.capabilities),
        to_json(event.labels), to_json(event.auth), event.token_sha256, rec.actor, rec.at, rec.seq, rec.position)


@PROJECTION.handles
async def removed(conn: Conn, event: AgentRemoved, rec: Recorded) -> None:
    await conn.execute("DELETE FROM agents WHERE agent_id = $1", rec.aggregate_id)


@PROJECTION.handles
async def updated(conn: Conn, event: AgentUpdated, rec: Recorded) -> None:
    update = AgentUpdate(rec)
    for column, value in event.changes.items():
        if column in AGENT_COLUMNS:
            update.put(column, value)
    await update.execute(conn)


@PROJECTION.handles
async def capabilities_synced(conn: Conn, event: AgentCapabilitiesSynced, rec: Recorded) -> None:
    await AgentUpdate(rec).put("capabilities", event.capabilities).execute(conn)


@PROJECTION.handles
async def token_rotated(conn: Conn, event: AgentTokenRotated, rec: Recorded) -> None:
    await AgentUpdate(rec).put("token_sha256", event.token_sha256).execute(conn)


@PROJECTION.handles
async def status_changed(conn: Conn, event: AgentStatusChanged, rec: Recorded) -> None:
    await AgentUpdate(rec).put("status", event.status).execute(conn)


@PROJECTION.handles
async def circuit_opened(conn: Conn, event: AgentCircuitOpened, rec: Recorded) -> None:
    update = AgentUpdate(rec).put("circuit_state", "open").put("consecutive_failures", event.consecutive_failures)
    await update.clause("circuit_open_at = $2").execute(conn)


@PROJECTION.handles
async def circuit_closed(conn: Conn, event: AgentCircuitClosed, rec: Recorded) -> None:
    update = AgentUpdate(rec).put("circuit_state", "closed").put("consecutive_failures", 0)
    await update.clause("circuit_open_at = NULL").execute(conn)
