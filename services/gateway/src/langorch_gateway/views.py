"""Rows of the projections rendered as the API's resources (api.md §4.1, §5.1, §5.7)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import asyncpg

from ckp_core.events import format_time
from ckp_core.redaction import Redactor

_REDACT = Redactor()


def _time(v: datetime | None) -> str | None:
    return format_time(v) if v is not None else None


def _json(v: Any) -> Any:
    return json.loads(v) if isinstance(v, str) else v


def execution_mode_of(row: asyncpg.Record) -> str:
    """A new run's ``execution_mode`` (``run_created``, ckp.md §8): its version's ``global_config.execution_mode``."""
    config = (_json(row["ckp_json"]) or {}).get("global_config")
    mode = config.get("execution_mode") if isinstance(config, dict) else None
    return mode if mode in ("production", "dry_run", "validation_only") else "production"


def procedure_out(row: asyncpg.Record) -> dict[str, Any]:
    diagnostics = _json(row["diagnostics"]) or []
    trigger = _json(row["trigger"])
    return {
        "procedure_id": row["procedure_id"], "version": row["version"], "name": row["name"],
        "description": row["description"], "status": row["status"], "effective_date": row["effective_date"],
        "release_channel": row["release_channel"], "promoted_from_version": row["promoted_from_version"],
        "promoted_at": _time(row["promoted_at"]), "promoted_by": row["promoted_by"],
        "project_id": row["project_id"], "tags": _json(row["tags"]) or [],
        "content_hash": row["content_hash"], "compiler_version": row["compiler_version"],
        "diagnostics_summary": {
            "errors": 0,
            "warnings": sum(1 for d in diagnostics if d.get("severity") == "warning"),
            "infos": sum(1 for d in diagnostics if d.get("severity") == "info"),
        },
        "has_trigger": bool(trigger) and trigger.get("type", "manual") != "manual",
        "revision": row["revision"], "created_at": _time(row["created_at"]), "created_by": row["created_by"],
        "updated_at": _time(row["updated_at"]),
    }


def procedure_detail(row: asyncpg.Record) -> dict[str, Any]:
    ckp = _json(row["ckp_json"])
    return procedure_out(row) | {
        "ckp_json": ckp, "variables_schema": _json(row["variables_schema"]), "trigger": _json(row["trigger"]),
        "provenance": ckp.get("provenance"), "retrieval_metadata": _json(row["retrieval_metadata"]),
        "diagnostics": _json(row["diagnostics"]) or [],
    }


def run_out(row: asyncpg.Record) -> dict[str, Any]:
    error = _json(row["error"])
    started, ended = row["started_at"], row["ended_at"]
    duration = None
    if started is not None:
        duration = ((ended or datetime.now(UTC)) - started).total_seconds()
    return {
        "run_id": row["run_id"], "thread_id": row["run_id"], "procedure_id": row["procedure_id"],
        "procedure_version": row["procedure_version"], "release_channel": row["release_channel"],
        "status": row["status"], "input_vars": _REDACT.redact(_json(row["input_vars"])),
        "output_vars": _REDACT.redact(_json(row["output_vars"])),
        "error": None if error is None else {k: error.get(k) for k in ("code", "message", "node_id", "step_id")},
        "error_message": None if error is None else error.get("message"),
        "waiting_on": _json(row.get("waiting_on")), "last_node_id": row["last_node_id"],
        "last_step_id": row["last_step_id"],
        "total_prompt_tokens": row["total_prompt_tokens"], "total_completion_tokens": row["total_completion_tokens"],
        "estimated_cost_usd": row["estimated_cost_usd"],
        "retry_count": row["retry_count"], "rerun_of": row["rerun_of"], "parent_run_id": row["parent_run_id"],
        "parent_node_id": row["parent_node_id"], "root_run_id": row["root_run_id"],
        "trigger_type": row["trigger_type"], "triggered_by": row["triggered_by"],
        "created_by": row["created_by"], "project_id": row["project_id"],
        "created_at": _time(row["created_at"]), "started_at": _time(started), "ended_at": _time(ended),
        "updated_at": _time(row["updated_at"]), "cancel_requested_at": _time(row["cancel_requested_at"]),
        "duration_seconds": duration,
        "seq": row["seq"],
    }


def event_out_from_row(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "event_id": row["event_id"], "seq": row["seq"], "stream_seq": row["stream_seq"], "run_id": row["run_id"],
        "created_at": _time(row["created_at"]), "event_type": row["event_type"], "node_id": row["node_id"],
        "step_id": row["step_id"], "attempt": row["attempt"], "actor": row["actor"],
        "payload": _REDACT.redact(_json(row["payload"])),
    }


def event_out(envelope: Any, position: int) -> dict[str, Any]:
    d = envelope.data
    return {
        "event_id": envelope.event_id, "seq": envelope.seq, "stream_seq": position,
        "run_id": envelope.aggregate_id, "created_at": format_time(envelope.occurred_at),
        "event_type": envelope.type, "node_id": d.get("node_id"), "step_id": d.get("step_id"),
        "attempt": d.get("attempt"), "actor": envelope.actor.render(),
        "payload": _REDACT.redact({k: v for k, v in d.items() if k not in ("node_id", "step_id", "attempt")}),
    }


def page(items: list[dict[str, Any]], total: int, limit: int, offset: int) -> dict[str, Any]:
    return {"items": items, "total": total, "limit": limit, "offset": offset}


def deployment_out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "deployment_id": row["deployment_id"], "action": row["action"], "target_channel": row["target_channel"],
        "deployed_version": row["deployed_version"], "replaced_version": row["replaced_version"],
        "deployed_by": row["deployed_by"], "deployed_at": _time(row["deployed_at"]), "reason": row["reason"],
    }


def project_out(row: asyncpg.Record) -> dict[str, Any]:
    return {
        "project_id": row["project_id"], "name": row["name"], "description": row["description"],
        "created_at": _time(row["created_at"]), "created_by": row["created_by"],
        "updated_at": _time(row["updated_at"]), "procedure_count": int(row["procedure_count"]),
        "active_run_count": int(row["active_run_count"]),
    }
