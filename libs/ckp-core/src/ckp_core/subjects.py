"""NATS subject, stream and bucket names (DESIGN §3, api.md §16): the only place they are spelled."""

from __future__ import annotations

from ckp_core.ids import encode_token

EVENT_STREAM = "LO_EVT"
COMMAND_STREAM = "LO_CMD"
EXTERNAL_STREAM = "LO_EXT"
AUDIT_STREAM = "LO_AUDIT"
PROCEDURES_BUCKET = "lo_procedures"
STEPS_BUCKET = "lo_steps"
LEASES_BUCKET = "lo_leases"
LOCKS_BUCKET = "lo_locks"
PRESENCE_BUCKET = "lo_presence"
RATELIMITS_BUCKET = "lo_ratelimits"
ARTIFACTS_BUCKET = "lo_artifacts"  # object store of stored artifact content (api.md §5.8)

# Request/reply queries the runtime answers over the NATS services API (core NATS, not a stream): the gateway asks
# the owner of checkpoints, step records, leases and live agent state instead of reading its storage. Every
# replica serves them in one queue group, so exactly one answers each request.
RUNTIME_QUERY_SERVICE = "langorch-runtime"
RUNTIME_QUERY_GROUP = "langorch-runtime-queries"
QUERY_RUN_CHECKPOINTS = "lo.qry.run.checkpoints"
QUERY_RUN_CHECKPOINT = "lo.qry.run.checkpoint"
QUERY_RUN_DIAGNOSTICS = "lo.qry.run.diagnostics"
QUERY_LEASES = "lo.qry.lease.list"
QUERY_AGENTS_LIVE = "lo.qry.agent.live"


def event_subject(aggregate: str, aggregate_id: str, event_type: str) -> str:
    """``lo.evt.<aggregate>.<encoded id>.<type>``."""
    return f"lo.evt.{aggregate}.{encode_token(aggregate_id)}.{event_type}"


def aggregate_filter(aggregate: str, aggregate_id: str) -> str:
    """Subject filter covering every event of one aggregate."""
    return f"lo.evt.{aggregate}.{encode_token(aggregate_id)}.>"


def subject_matches(pattern: str, subject: str) -> bool:
    """NATS subject matching: ``*`` matches one token, a final ``>`` one or more (``lo.ext.>`` does not match
    ``lo.ext``)."""
    want, have = pattern.split("."), subject.split(".")
    for i, part in enumerate(want):
        if part == ">":
            return len(have) > i
        if i >= len(have) or part not in ("*", have[i]):
            return False
    return len(want) == len(have)


def command_subject(aggregate: str, verb: str) -> str:
    """``lo.cmd.<aggregate>.<verb>``."""
    return f"lo.cmd.{aggregate}.{verb}"


def audit_subject(category: str, action: str) -> str:
    """``lo.audit.<category>.<action>`` (api.md §16.1)."""
    return f"lo.audit.{encode_token(category)}.{encode_token(action)}"


def procedure_key(procedure_id: str, version: str) -> str:
    """KV key of a compiled procedure version in ``lo_procedures``.

    KV keys may not contain ``~``, so the token encoding's escape character is written ``=`` here
    (``invoice.v2`` / ``1.0.0`` → ``invoice=2Ev2.1=2E0=2E0``); ``=`` never occurs in an encoded token.
    """
    return f"{encode_token(procedure_id)}.{encode_token(version)}".replace("~", "=")


def kv_token(value: str) -> str:
    """One KV key token for an id (the subject token encoding, with ``=`` as the escape; see ``procedure_key``)."""
    return encode_token(value).replace("~", "=")


def agent_presence_key(agent_id: str) -> str:
    """``lo_presence`` key of an agent's heartbeat (api.md §7.3)."""
    return f"agent.{kv_token(agent_id)}"


def service_presence_key(service: str, instance_id: str) -> str:
    """``lo_presence`` key of one service replica: ``service.<service>.<instance>`` (api.md §14)."""
    return f"service.{kv_token(service)}.{kv_token(instance_id)}"


def agent_probe_key(agent_id: str) -> str:
    """``lo_presence`` key of the last health probe of an agent (written by the elected poller)."""
    return f"probe.{kv_token(agent_id)}"


def lease_key(resource_key: str, slot: int) -> str:
    """``lo_leases`` key of one concurrency slot: ``<resource_key>.<slot>`` (api.md §8)."""
    return f"{kv_token(resource_key)}.{slot}"
