"""Projection of the procedure lifecycle, deployment records, projects, agents (api.md §4, §7, §9) and the audit
log (§12).

Called by the projector inside its batch transaction; every row derives from events only, so a rebuild by
replay gives the same rows.
"""

from __future__ import annotations

import json
from typing import Any

from ckp_core.approvals import parse_time
from ckp_core.audit import AuditEntry
from ckp_core.eventstore import StoredEvent

SEARCH_KEYS = ("domain", "business_domain", "intents", "primary_intents", "keywords", "tags")


def _j(value: Any) -> str:
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False)


def search_text(d: dict[str, Any]) -> str:
    """Lower-cased text that ``search`` matches: id, name, description, retrieval domain/intents/keywords/tags."""
    ckp = d.get("ckp_json") or {}
    parts: list[str] = [str(d.get("procedure_id") or ""), str(d.get("name") or ""), str(d.get("description") or "")]
    meta = ckp.get("retrieval_metadata")
    if isinstance(meta, dict):
        for key in SEARCH_KEYS:
            value = meta.get(key)
            if isinstance(value, list):
                parts.extend(str(x) for x in value)
            elif value is not None:
                parts.append(str(value))
    return "\n".join(parts).lower()


def _retrieval(d: dict[str, Any]) -> str | None:
    meta = (d.get("ckp_json") or {}).get("retrieval_metadata")
    return _j(meta) if meta is not None else None


async def apply_procedure_event(conn: Any, stored: StoredEvent) -> None:
    ev = stored.envelope
    d = ev.data
    at, pos, actor = ev.occurred_at, stored.position, ev.actor.render()
    pid = ev.aggregate_id
    if ev.type == "procedure_imported":
        await conn.execute(
            """INSERT INTO procedures (procedure_id, version, name, description, status, release_channel,
                 project_id, tags, content_hash, compiler_version, ir_key, ckp_json, variables_schema, trigger,
                 effective_date, diagnostics, revision, created_at, created_by, updated_at, position,
                 retrieval_metadata, search_text)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8::jsonb,$9,$10,$11,$12::jsonb,$13::jsonb,$14::jsonb,$15,$16::jsonb,
                 1,$17,$18,$17,$19,$20::jsonb,$21)
               ON CONFLICT (procedure_id, version) DO NOTHING""",
            d["procedure_id"], d["version"], d.get("name"), d.get("description"), d.get("status", "draft"),
            d.get("release_channel", "dev"), d.get("project_id"), _j(d.get("tags", [])), d["content_hash"],
            d["compiler_version"], d["ir_key"], _j(d["ckp_json"]), _j(d.get("variables_schema", {})),
            _j(d.get("trigger")) if d.get("trigger") is not None else None, d.get("effective_date"),
            _j(d.get("diagnostics", [])), at, actor, pos, _retrieval(d), search_text(d),
        )
    elif ev.type == "procedure_replaced":
        await conn.execute(
            """UPDATE procedures SET name = $3, description = $4, tags = $5::jsonb, content_hash = $6,
                 compiler_version = $7, ckp_json = $8::jsonb, variables_schema = $9::jsonb, trigger = $10::jsonb,
                 effective_date = $11, diagnostics = $12::jsonb, retrieval_metadata = $13::jsonb,
                 search_text = $14, revision = revision + 1, updated_at = $15
               WHERE procedure_id = $1 AND version = $2""",
            pid, d["version"], d.get("name"), d.get("description"), _j(d.get("tags", [])), d["content_hash"],
            d["compiler_version"], _j(d["ckp_json"]), _j(d.get("variables_schema", {})),
            _j(d.get("trigger")) if d.get("trigger") is not None else None, d.get("effective_date"),
            _j(d.get("diagnostics", [])), _retrieval(d), search_text(d), at,
        )
    elif ev.type == "procedure_version_deleted":
        await conn.execute("DELETE FROM procedures WHERE procedure_id = $1 AND version = $2", pid, d["version"])
    elif ev.type == "procedure_status_changed":
        await _deprecate(conn, pid, d.get("displaced_version"), at)
        await conn.execute(
            """UPDATE procedures SET status = $3, revision = revision + 1, updated_at = $4,
                 compiler_version = COALESCE($5, compiler_version), diagnostics = COALESCE($6::jsonb, diagnostics)
               WHERE procedure_id = $1 AND version = $2""",
            pid, d["version"], d["status"], at, d.get("compiler_version"),
            _j(d["diagnostics"]) if d.get("diagnostics") is not None else None,
        )
    elif ev.type == "procedure_promoted":
        await _deprecate(conn, pid, d.get("displaced_version"), at)
        await conn.execute(
            """UPDATE procedures SET status = 'active', release_channel = $3, promoted_from_version = $4,
                 promoted_at = $5, promoted_by = $6, revision = revision + 1, updated_at = $5,
                 compiler_version = COALESCE($7, compiler_version), diagnostics = $8::jsonb
               WHERE procedure_id = $1 AND version = $2""",
            pid, d["version"], d["target_channel"], d.get("displaced_version"), at, actor,
            d.get("compiler_version"), _j(d.get("diagnostics", [])),
        )
        await _deployment(conn, stored, "promote", d["version"], d.get("displaced_version"))
    elif ev.type == "procedure_rolled_back":
        await _deprecate(conn, pid, d["version"], at)
        await conn.execute(
            """UPDATE procedures SET status = 'active', promoted_from_version = $3, promoted_at = $4,
                 promoted_by = $5, revision = revision + 1, updated_at = $4
               WHERE procedure_id = $1 AND version = $2""",
            pid, d["restored_version"], d["version"], at, actor,
        )
        await _deployment(conn, stored, "rollback", d["restored_version"], d["version"])


async def _deprecate(conn: Any, pid: str, version: str | None, at: Any) -> None:
    if version:
        await conn.execute(
            """UPDATE procedures SET status = 'deprecated', revision = revision + 1, updated_at = $3
               WHERE procedure_id = $1 AND version = $2""", pid, version, at)


async def _deployment(conn: Any, stored: StoredEvent, action: str, deployed: str, replaced: str | None) -> None:
    ev = stored.envelope
    d = ev.data
    await conn.execute(
        """INSERT INTO procedure_deployments (deployment_id, procedure_id, action, target_channel, deployed_version,
             replaced_version, deployed_by, deployed_at, reason, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10) ON CONFLICT (deployment_id) DO NOTHING""",
        d["deployment_id"], ev.aggregate_id, action, d["target_channel"], deployed, replaced, ev.actor.render(),
        ev.occurred_at, d.get("reason"), stored.position,
    )


async def apply_project_event(conn: Any, stored: StoredEvent) -> None:
    ev = stored.envelope
    d = ev.data
    if ev.type == "project_created":
        await conn.execute(
            """INSERT INTO projects (project_id, name, description, created_at, created_by, updated_at, seq, position)
               VALUES ($1,$2,$3,$4,$5,$4,$6,$7) ON CONFLICT (project_id) DO NOTHING""",
            ev.aggregate_id, d["name"], d.get("description"), ev.occurred_at, ev.actor.render(), ev.seq,
            stored.position)
    elif ev.type == "project_updated":
        await conn.execute(
            """UPDATE projects SET name = $2, description = $3, updated_at = $4, seq = $5, position = $6
               WHERE project_id = $1""",
            ev.aggregate_id, d["name"], d.get("description"), ev.occurred_at, ev.seq, stored.position)
    elif ev.type == "project_deleted":
        await conn.execute("DELETE FROM projects WHERE project_id = $1", ev.aggregate_id)


AGENT_COLUMNS = {"name", "channel", "protocol", "base_url", "concurrency_limit", "resource_key", "pool_id",
                 "capabilities", "labels", "auth", "status"}
JSON_COLUMNS = {"capabilities", "labels", "auth"}


async def apply_agent_event(conn: Any, stored: StoredEvent) -> None:
    ev = stored.envelope
    d = ev.data
    aid, at = ev.aggregate_id, ev.occurred_at
    if ev.type == "agent_registered":
        await conn.execute(
            """INSERT INTO agents (agent_id, name, channel, protocol, base_url, status, concurrency_limit,
                 resource_key, pool_id, capabilities, labels, auth, token_sha256, registered_by, created_at,
                 updated_at, seq, position)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::jsonb,$11::jsonb,$12::jsonb,$13,$14,$15,$15,$16,$17)
               ON CONFLICT (agent_id) DO NOTHING""",
            aid, d["name"], d["channel"], d.get("protocol", "http"), d["base_url"], d.get("status", "online"),
            d.get("concurrency_limit", 1), d["resource_key"], d["pool_id"], _j(d.get("capabilities", [])),
            _j(d.get("labels", {})), _j(d.get("auth", {})), d["token_sha256"], ev.actor.render(), at, ev.seq,
            stored.position)
        return
    if ev.type == "agent_removed":
        await conn.execute("DELETE FROM agents WHERE agent_id = $1", aid)
        return
    sets = ["updated_at = $2", "seq = $3", "position = $4"]
    args: list[Any] = [aid, at, ev.seq, stored.position]

    def put(column: str, value: Any) -> None:
        args.append(_j(value) if column in JSON_COLUMNS else value)
        sets.append(f"{column} = ${len(args)}{'::jsonb' if column in JSON_COLUMNS else ''}")

    if ev.type == "agent_updated":
        for column, value in d.get("changes", {}).items():
            if column in AGENT_COLUMNS:
                put(column, value)
    elif ev.type == "agent_capabilities_synced":
        put("capabilities", d.get("capabilities", []))
    elif ev.type == "agent_token_rotated":
        put("token_sha256", d["token_sha256"])
    elif ev.type == "agent_status_changed":
        put("status", d["status"])
    elif ev.type == "agent_circuit_opened":
        put("circuit_state", "open")
        put("consecutive_failures", d.get("consecutive_failures", 0))
        sets.append("circuit_open_at = $2")
    elif ev.type == "agent_circuit_closed":
        put("circuit_state", "closed")
        put("consecutive_failures", 0)
        sets.append("circuit_open_at = NULL")
    else:
        return
    await conn.execute(f"UPDATE agents SET {', '.join(sets)} WHERE agent_id = $1 AND seq < $3", *args)  # noqa: S608


def _jn(value: Any) -> str | None:
    return _j(value) if value is not None else None


def _ts(value: Any) -> Any:
    return parse_time(value)


async def apply_approval_event(conn: Any, stored: StoredEvent) -> None:
    """The ``approvals`` projection (api.md §6): one row per approval, from the approval aggregate's events."""
    ev = stored.envelope
    d = ev.data
    aid, at = ev.aggregate_id, ev.occurred_at
    if ev.type == "approval_requested":
        await conn.execute(
            """INSERT INTO approvals (approval_id, run_id, procedure_id, procedure_version, node_id, node_name,
                 project_id, prompt, context_data, decision_type, options, input_schema, status, created_at,
                 expires_at, timeout_action, escalation_contact, approval_level, updated_at, seq, position)
               VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9::jsonb,$10,$11::jsonb,$12::jsonb,'pending',$13,$14,$15,$16,$17,
                 $13,$18,$19)
               ON CONFLICT (approval_id) DO NOTHING""",
            aid, d.get("run_id") or ev.correlation_id, d.get("procedure_id"), d.get("procedure_version"),
            d.get("node_id"), d.get("node_name"), d.get("project_id"), str(d.get("prompt") or ""),
            _jn(d.get("context_data")), d.get("decision_type") or "approve_reject", _j(d.get("options") or []),
            _j(d.get("input_schema") or {}), at, _ts(d.get("expires_at")), d.get("timeout_action"),
            d.get("escalation_contact"), d.get("approval_level"), ev.seq, stored.position)
    elif ev.type in ("approval_decided", "approval_timed_out"):
        await conn.execute(
            """UPDATE approvals SET status = $2, decision = $3, decided_by = $4, decided_at = $5, comment = $6,
                 decision_payload = $7::jsonb, updated_at = $8, seq = $9, position = $10
               WHERE approval_id = $1 AND seq < $9""",
            aid, d["status"], d.get("decision"), d.get("decided_by"), _ts(d.get("decided_at")), d.get("comment"),
            _jn(d.get("payload")), at, ev.seq, stored.position)
    elif ev.type == "approval_canceled":
        await conn.execute(
            """UPDATE approvals SET status = 'canceled', updated_at = $2, seq = $3, position = $4
               WHERE approval_id = $1 AND seq < $3""", aid, at, ev.seq, stored.position)


async def apply_audit_entry(conn: Any, entry: AuditEntry, position: int) -> None:
    """One ``LO_AUDIT`` record into ``audit_log``; a record already there (same event id) is kept as it is."""
    await conn.execute(
        """INSERT INTO audit_log (event_id, ts, category, action, outcome, actor, actor_kind, description,
             resource_type, resource_id, request_id, command_id, correlation_id, auth_disabled, meta, position)
           VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10,$11,$12,$13,$14,$15::jsonb,$16)
           ON CONFLICT (event_id) DO NOTHING""",
        entry.event_id, entry.ts, entry.category, entry.action, entry.outcome, entry.actor, entry.actor_kind,
        entry.description, entry.resource_type, entry.resource_id, entry.request_id, entry.command_id,
        entry.correlation_id, entry.auth_disabled, _j(entry.meta), position,
    )
