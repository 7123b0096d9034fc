"""Agent-facing endpoints: async callbacks (api.md §5.10, §15.2) and credential-grant redemption (§15.3).

The token names one delegation; the gateway checks it against the ``workflow_delegated`` event the runtime
appended (node, step), then publishes ``lo.cmd.run.resume`` (Nats-Msg-Id per delegation, so a repeated
callback is dropped by JetStream) and answers 202. The runtime appends ``workflow_callback_received``.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Literal

import asyncpg
import jwt
from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from ckp_core import runs
from ckp_core.commands import ResumeRun
from ckp_core.events import ANONYMOUS, Actor
from langorch_gateway import auditing, deps, routes_secrets
from langorch_gateway.dispatch import accepted_headers, raise_if_rejected, ryw, send
from langorch_gateway.problems import ApiProblem
from langorch_infra.callbacks import callback_key, parse_token, verify_token
from langorch_infra.hosting import Drain
from langorch_infra.secret_providers import SecretError, SecretResolver
from langorch_infra.secrets import grant_key, resolve_grant, verify_grant
from langorch_infra.settings import GatewaySettings

router = APIRouter()



class CallbackIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    status: Literal["success", "failure"] = "success"
    output: dict[str, Any] | None = Field(None, validation_alias="output_vars")
    node_id: str | None = None
    step_id: str | None = None
    error: str | None = None
    error_code: str | None = None
    artifacts: list[Any] | None = None


@router.post("/api/runs/{run_id}/callback", status_code=202)
async def run_callback(
    request: Request, db: deps.Pool, settings: deps.Settings, run_id: str, body: CallbackIn,
    token_header: str | None = Header(None, alias="X-LangOrch-Callback-Token"),
    token_query: str | None = Query(None, alias="token"),
) -> JSONResponse:
    """Resume a run paused on an async delegation."""
    raw = token_header or token_query
    token = parse_token(raw) if raw else None
    if token is None:
        raise ApiProblem("invalid_callback_token", "callback token missing or malformed", status=403)
    run = await db.fetchrow("SELECT status FROM runs WHERE run_id = $1", run_id)
    if run is None:
        raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
    drain = deps.clients(request).drain  # a stopping gateway answers before the server cuts the request off
    delegated = await _delegation(db, settings, drain, run_id, token.delegation_id,
                                  wait=run["status"] not in runs.TERMINAL_STATUSES)
    key = callback_key(settings.auth_secret_key.get_secret_value())
    if delegated is None or not verify_token(key, token, run_id, delegated["node_id"], delegated["step_id"]):
        raise ApiProblem("invalid_callback_token", "the callback token does not match a delegation of this run",
                         status=403)
    if token.expires_unix < time.time():
        raise ApiProblem("callback_token_expired", "the callback token has expired", status=403)
    if (body.node_id and body.node_id != delegated["node_id"]) or (body.step_id and body.step_id !=
                                                                    delegated["step_id"]):
        raise ApiProblem("callback_mismatch", f"the token names node {delegated['node_id']} step "
                         f"{delegated['step_id']}", status=400)
    status = await _settled(db, settings, drain, run_id)
    if status == runs.DELETED:
        raise ApiProblem("not_found", f"run {run_id} not found", resource="run")
    if status in runs.TERMINAL_STATUSES:
        return JSONResponse({"resumed": False, "status": status}, status_code=200)
    answered = await db.fetchval(  # callback_timed_out carries no status member: its type says it
        """SELECT event_type FROM run_events WHERE run_id = $1 AND event_type IN
             ('workflow_callback_received', 'callback_timed_out') AND payload->>'delegation_id' = $2
           ORDER BY seq LIMIT 1""",
        run_id, token.delegation_id)
    if answered is not None:
        said = "timed_out" if answered == "callback_timed_out" else "duplicate"
        return JSONResponse({"resumed": False, "status": said}, status_code=200)
    # suspended (the callback's frame waits in either status) or a resume now would reach a run still executing,
    # and be lost (api.md §5.10)
    if status not in runs.WAITING_STATUSES:
        raise ApiProblem("run_not_paused", f"run {run_id} is {status}, not waiting for this callback yet; retry",
                         current_status=status)
    resolution = {"wait_id": token.delegation_id, "status": body.status, "output": body.output,
                  "error": body.error, "error_code": body.error_code, "artifacts": body.artifacts,
                  "node_id": delegated["node_id"], "step_id": delegated["step_id"]}
    if len(json.dumps(resolution, default=str)) > 10 * 1024 * 1024:
        raise ApiProblem("payload_too_large", "callback output larger than 10 MiB")
    command = ResumeRun(actor=Actor(kind="agent", id=None), run_id=run_id, resume_reason="workflow_callback",
                        resolution=resolution, causation_id=request.state.request_id)
    # wait (bounded) until the run has taken the callback, so a repeat finds it answered (api.md §5.11)
    outcome = await send(request, "run", run_id, command, "resume_run", f"/api/runs/{run_id}",
                         msg_id=f"callback-{token.delegation_id}")
    headers = {"X-LangOrch-Command-ID": command.command_id}
    if outcome is not None:
        raise_if_rejected(outcome)
        headers = accepted_headers(command.command_id, outcome.position, await ryw(request, outcome.position))
    return JSONResponse({"resumed": True, "status": "queued", "run_id": run_id}, status_code=202, headers=headers)


async def _settled(db: asyncpg.Pool, settings: GatewaySettings, drain: Drain, run_id: str) -> str:
    """The run's status once it waits or has ended: a run that has just delegated may still be executing (the
    runtime appends the pausing event after the step, or another parallel branch still runs), so a live status is
    re-read for up to ``LANGORCH_RYW_TIMEOUT_MS``."""
    deadline = time.monotonic() + settings.ryw_timeout_ms / 1000
    while True:
        status = str(await db.fetchval("SELECT status FROM runs WHERE run_id = $1", run_id) or runs.DELETED)
        if (status in runs.WAITING_STATUSES or status in runs.TERMINAL_STATUSES or status == runs.DELETED
                or time.monotonic() >= deadline or drain.released):
            return status
        await asyncio.sleep(0.05)


async def _delegation(db: asyncpg.Pool, settings: GatewaySettings, drain: Drain, run_id: str, delegation_id: str,
                      *, wait: bool) -> asyncpg.Record | None:
    """The ``workflow_delegated`` event of ``delegation_id``. An agent may call back before the runtime has appended
    it (the agent answers the dispatch, then calls back at once), so while the run is live the lookup is repeated
    for up to ``LANGORCH_RYW_TIMEOUT_MS`` before the token is refused."""
    deadline = time.monotonic() + (settings.ryw_timeout_ms / 1000 if wait else 0)
    while True:
        row: asyncpg.Record | None = await db.fetchrow(
            """SELECT node_id, step_id FROM run_events WHERE run_id = $1 AND event_type = 'workflow_delegated'
                 AND payload->>'delegation_id' = $2 ORDER BY seq DESC LIMIT 1""", run_id, delegation_id)
        if row is not None or time.monotonic() >= deadline or drain.released:
            return row
        await asyncio.sleep(0.05)


@router.get("/api/agent-credentials/{secret_name}")
async def redeem_credential(request: Request, db: deps.Pool, settings: deps.Settings, secret_name: str,
                            authorization: str | None = Header(None)) -> JSONResponse:
    """Exchange a credential grant for the secret's value, resolved from the provider now; every redemption,
    refused or not, is audited (``secret_mgmt/redeem``, actor ``agent:<agent_id>``, never the value)."""
    claims: dict[str, Any] = {}
    try:
        value = await _redeem(db, settings, deps.clients(request).secret_resolver, secret_name, authorization,
                              claims)
    except ApiProblem as problem:
        await _audit_redeem(request, secret_name, claims, problem)
        raise
    await _audit_redeem(request, secret_name, claims, None)
    return JSONResponse({"value": value}, headers={"Cache-Control": "no-store"})


async def _redeem(db: asyncpg.Pool, settings: GatewaySettings, resolver: SecretResolver, secret_name: str,
                  authorization: str | None, claims: dict[str, Any]) -> Any:
    """The secret's value for a valid grant (``claims`` is filled with the grant's claims once verified)."""
    token = authorization[7:].strip() if authorization and authorization.lower().startswith("bearer ") else None
    if not token:
        raise ApiProblem("invalid_grant", "a credential grant is required (Authorization: Bearer <grant>)",
                         status=401)
    try:
        claims.update(verify_grant(grant_key(settings.auth_secret_key.get_secret_value()), token))
    except jwt.InvalidTokenError as exc:
        raise ApiProblem("invalid_grant", f"invalid or expired grant: {type(exc).__name__}", status=401) from exc
    if claims.get("secret_name") != secret_name:
        raise ApiProblem("forbidden", "the grant is for another secret", status=403)
    run = await db.fetchrow("SELECT status, procedure_id, procedure_version FROM runs WHERE run_id = $1",
                            claims.get("sub"))
    if run is None or run["status"] in runs.TERMINAL_STATUSES:
        raise ApiProblem("forbidden", "the grant's run is no longer active", status=403)
    named = (await routes_secrets.references(db, [secret_name]))[secret_name]
    if not any((r["procedure_id"], r["version"]) == (run["procedure_id"], run["procedure_version"]) for r in named):
        raise ApiProblem("forbidden", "the run's procedure does not name this secret", status=403)
    try:  # the provider the runtime would have used: the grant's, else the name's record, else the defaults
        return await resolve_grant(resolver, claims)
    except SecretError as exc:
        if exc.code == "secret_not_found":
            raise ApiProblem("not_found", f"secret {secret_name} has no value: {exc.reason}", resource="secret",
                             provider=exc.provider) from None
        raise ApiProblem("upstream_error", f"secret {secret_name}: provider {exc.provider} failed: {exc.reason}",
                         provider=exc.provider, secret_code=exc.code) from None


async def _audit_redeem(request: Request, secret_name: str, claims: dict[str, Any],
                        problem: ApiProblem | None) -> None:
    agent_id = claims.get("agent_id")
    run_id = claims.get("sub")
    meta = {"secret_name": secret_name, "run_id": run_id, "node_id": claims.get("node_id"),
            "step_id": claims.get("step_id"), "field": claims.get("field"), "grant_id": claims.get("jti")}
    await auditing.decided(
        request, "secret_mgmt", "redeem", resource_type="secret", resource_id=secret_name,
        outcome="rejected" if problem else "accepted", meta=meta, code=problem.code if problem else None,
        detail=problem.detail if problem else None,
        actor=Actor(kind="agent", id=str(agent_id)) if agent_id else ANONYMOUS,
        correlation_id=str(run_id) if run_id else None)
