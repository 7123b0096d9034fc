"""Secret metadata (api.md §11): a gateway-owned aggregate. The gateway appends ``secret_created`` /
``secret_updated`` / ``secret_deleted`` / ``secret_checked`` itself at the aggregate's head, audits each
(``secret_mgmt``), and waits for the ``secrets`` projection. No endpoint accepts or returns a value: ``value`` in
a body is refused with 422 ``secret_value_not_accepted``, and ``check`` resolves the value in the gateway and
reports only whether it could.

``referenced_by`` lists the procedure versions whose document names the secret: a ``secret_references`` entry
whose key is the name, or a ``secrets.<name>`` use of an undeclared alias (in any placeholder). The grant
redemption (``routes_callbacks``) uses the same rule to refuse a secret the run's procedure does not name.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Annotated, Any, Literal, NamedTuple

import asyncpg
from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator
from pydantic.json_schema import SkipJsonSchema

from ckp_core.errors import ConcurrencyError
from ckp_core.events import (
    EventEnvelope,
    SecretChecked,
    SecretCreated,
    SecretDeleted,
    SecretUpdated,
    format_time,
    make_event,
)
from langorch_gateway import auditing, auth, deps, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import min_position, ryw
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Where, fetch_page
from langorch_infra.secret_providers import SecretError, SecretRecord, fold_record, refs

router = APIRouter()

STALE = {"X-LangOrch-Consistency": "stale"}
CATEGORY = "secret_mgmt"
ACTIONS = {"secret_created": "create", "secret_updated": "update", "secret_deleted": "delete",
           "secret_checked": "check"}
NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,199}$"
VALUE_REFUSED = "Secret values are not accepted: store the value in the provider and record where it lives"
ProviderField = Literal["env", "vault", "aws", "azure"]
Tag = Annotated[str, Field(min_length=1, max_length=100)]

# which procedure versions name which secret (ckp_json is the procedure's document; see the module docstring)
REFERENCES = r"""
WITH declared AS (
    SELECT p.procedure_id, p.version,
           CASE jsonb_typeof(p.ckp_json #> '{global_config,secrets_config,secret_references}')
                WHEN 'object' THEN p.ckp_json #> '{global_config,secrets_config,secret_references}'
                ELSE '{}'::jsonb END AS refs,
           p.ckp_json::text AS document
    FROM procedures p),
refs AS (
    SELECT d.procedure_id, d.version, r.key AS alias,
           CASE jsonb_typeof(r.value) WHEN 'string' THEN r.value #>> '{}' ELSE r.value ->> 'key' END AS name
    FROM declared d, jsonb_each(d.refs) r
    UNION
    SELECT d.procedure_id, d.version, m[1] AS alias, m[1] AS name
    FROM declared d, regexp_matches(d.document, 'secrets\.([A-Za-z0-9_-]+)', 'g') m
    WHERE NOT d.refs ? m[1])
SELECT name, procedure_id, version, alias FROM refs WHERE name = ANY($1::text[])
ORDER BY name, procedure_id, version, alias"""


class SecretIn(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    name: str = Field(pattern=NAME, description="Name procedures use (``{{secrets.<name>}}`` or a reference key).")
    provider: ProviderField = Field(validation_alias=AliasChoices("provider", "provider_hint"),
                                    description="Where the value lives (alias: provider_hint).")
    provider_ref: str | None = Field(None, min_length=1, max_length=2000, description="The provider's reference: "
                                     "env variable; vault <mount>/<path>#<field>; aws name or ARN [#<json key>]; "
                                     "azure <vault url>/<secret name>. Default: the name.")
    description: str | None = Field(None, max_length=2000)
    tags: list[Tag] = Field(default_factory=list, max_length=50)
    value: SkipJsonSchema[Any] = Field(None, exclude=True)  # refused (422 secret_value_not_accepted)


class SecretPatch(BaseModel):
    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    provider: ProviderField | None = Field(None, validation_alias=AliasChoices("provider", "provider_hint"))
    provider_ref: str | None = Field(None, min_length=1, max_length=2000)
    description: str | None = Field(None, max_length=2000)
    tags: list[Tag] | None = Field(None, max_length=50)
    value: SkipJsonSchema[Any] = Field(None, exclude=True)  # refused (422 secret_value_not_accepted)

    @field_validator("provider", "tags")
    @classmethod
    def _not_null(cls, value: Any) -> Any:
        if value is None:
            raise ValueError("Must not be null")
        return value


async def refuse_values(request: Request) -> None:
    """422 ``secret_value_not_accepted`` for a body with ``value`` (checked before the body's other fields, so a
    value is always refused with this code; the value itself is never echoed, logged or audited)."""
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        return  # the body's own validation answers malformed_json
    if isinstance(body, dict) and "value" in body:
        problem = ApiProblem("secret_value_not_accepted", VALUE_REFUSED, errors={"value": [VALUE_REFUSED]})
        name = request.path_params.get("name", body.get("name"))
        await auditing.decided(request, CATEGORY, "create" if request.method == "POST" else "update",
                               resource_type="secret", resource_id=name if isinstance(name, str) else None,
                               outcome="rejected", code=problem.code, detail=problem.detail)
        raise problem


NoValue = Annotated[None, Depends(refuse_values)]


def reference_errors(provider: str, ref: str | None, name: str) -> dict[str, list[str]]:
    """A provider reference that cannot resolve, as ``errors`` (422)."""
    try:
        if provider == "vault":
            refs.vault_ref(ref or name)
        elif provider == "aws":
            refs.aws_ref(ref or name)
        elif provider == "azure":
            refs.azure_ref(ref or "")
    except ValueError as exc:
        return {"provider_ref": [str(exc)]}
    return {}


def secret_out(row: asyncpg.Record | dict[str, Any], referenced_by: list[dict[str, Any]]) -> dict[str, Any]:
    last_check = row["last_check"]
    if isinstance(last_check, str):
        last_check = json.loads(last_check)
    tags = row["tags"]
    return {"name": row["name"], "provider": row["provider"], "provider_ref": row["provider_ref"],
            "description": row["description"], "tags": json.loads(tags) if isinstance(tags, str) else list(tags),
            "referenced_by": referenced_by, "last_check": last_check, "created_by": row["created_by"],
            "created_at": _time(row["created_at"]), "updated_at": _time(row["updated_at"])}


def _time(value: datetime | None) -> str | None:
    return format_time(value) if value is not None else None


async def references(db: asyncpg.Pool, names: list[str]) -> dict[str, list[dict[str, Any]]]:
    out: dict[str, list[dict[str, Any]]] = {n: [] for n in names}
    if names:
        for r in await db.fetch(REFERENCES, names):
            out[r["name"]].append({"procedure_id": r["procedure_id"], "version": r["version"], "alias": r["alias"]})
    return out


async def _row(db: asyncpg.Pool, name: str) -> asyncpg.Record:
    row = await db.fetchrow("SELECT * FROM secrets WHERE name = $1", name)
    if row is None:
        raise ApiProblem("not_found", f"secret {name} not found", resource="secret")
    return row


class Current(NamedTuple):
    record: SecretRecord | None
    head: int  # the aggregate's position (0: never written)
    seq: int
    created: EventEnvelope | None  # the event that created the current record


async def _current(request: Request, name: str) -> Current:
    """The record from the aggregate's events (not the projection: a create or delete decides on its head)."""
    stored = await clients(request).store.read("secret", name)
    record = fold_record(s.envelope for s in stored)
    created = next((s.envelope for s in reversed(stored) if s.envelope.type == "secret_created"), None)
    last = stored[-1] if stored else None
    return Current(record, last.position if last else 0, last.envelope.seq if last else 0,
                   created if record is not None else None)


class Appended(NamedTuple):
    position: int
    event: EventEnvelope
    projected: bool


SecretEvent = SecretCreated | SecretUpdated | SecretDeleted | SecretChecked


async def _append(request: Request, principal: auth.Principal, current: Current, data: SecretEvent) -> Appended:
    """Append at the head ``current`` was read at (a concurrent change → 503 to retry), audit, and wait."""
    name = data.name
    event = make_event(data, aggregate_id=name, seq=current.seq + 1, actor=principal.actor,
                       causation_id=request.state.request_id)
    try:
        [position] = await clients(request).store.append([event], expected_position=current.head)
    except ConcurrencyError:
        raise ApiProblem("unavailable", f"secret {name} is being changed concurrently; retry", status=503) from None
    await auditing.decided(request, CATEGORY, ACTIONS[data.TYPE], resource_type="secret", resource_id=name,
                           meta=data.model_dump(mode="json"), event_id=event.event_id, actor=principal.actor)
    resolver = clients(request).secret_resolver
    resolver.forget(name)
    return Appended(position, event, await ryw(request, position))


async def _out(request: Request, db: asyncpg.Pool, name: str, done: Appended, record: SecretRecord,
               created: EventEnvelope | None) -> JSONResponse:
    """The record after a write: from the projection, or from the events when the projection lags."""
    headers = {"X-LangOrch-Position": str(done.position)}
    refs = (await references(db, [name]))[name]
    if done.projected:
        return JSONResponse(secret_out(await _row(db, name), refs), headers=headers)
    first = created or done.event
    row = {"name": name, "provider": record.provider, "provider_ref": record.provider_ref,
           "description": record.description, "tags": record.tags, "last_check": None,
           "created_by": first.actor.render(), "created_at": first.occurred_at, "updated_at": done.event.occurred_at}
    return JSONResponse(secret_out(row, refs), headers=headers | STALE)


@router.get("/api/secrets")
async def list_secrets(
    request: Request, db: deps.Pool, principal: auth.Viewer,
    provider: ProviderField | None = None,
    tag: Annotated[str | None, Query(max_length=100)] = None,
    search: Annotated[str | None, Query(max_length=500)] = None,
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of secret metadata records, by name (never a value)."""
    headers = await min_position(request)
    where = Where()
    where.eq("provider", provider)
    if tag:
        where.add(f"tags ? {where.arg(tag)}")
    if search:
        term = where.arg(search.lower())
        where.add(f"(strpos(lower(name), {term}) > 0 OR strpos(lower(COALESCE(description, '')), {term}) > 0)")
    rows, total = await fetch_page(db, "secrets", where, "name", limit, offset)
    refs = await references(db, [r["name"] for r in rows])
    return JSONResponse(views.page([secret_out(r, refs[r["name"]]) for r in rows], total, limit, offset),
                        headers=headers)


@router.post("/api/secrets", status_code=201)
async def create_secret(request: Request, db: deps.Pool, principal: auth.Admin, _: NoValue,
                        body: SecretIn) -> JSONResponse:
    """Record where a secret's value lives (its provider and reference)."""
    meta = body.model_dump(mode="json")
    async with auditing.refusals_audited(request, CATEGORY, "create", resource_type="secret", resource_id=body.name,
                                         meta=meta, statuses=(409, 422)):
        errors = reference_errors(body.provider, body.provider_ref, body.name)
        if errors:
            raise ApiProblem("validation_failed", "the provider reference cannot resolve", errors=errors)
        current = await _current(request, body.name)
        if current.record is not None:
            raise ApiProblem("secret_exists", f"a secret named {body.name!r} exists")
        data = SecretCreated(name=body.name, provider=body.provider, provider_ref=body.provider_ref,
                             description=body.description, tags=body.tags)
        done = await _append(request, principal, current, data)
    record = SecretRecord(body.name, body.provider, body.provider_ref, body.description, body.tags)
    response = await _out(request, db, body.name, done, record, done.event)
    response.status_code = 201
    response.headers["Location"] = f"/api/secrets/{body.name}"
    return response


@router.get("/api/secrets/{name}")
async def get_secret(request: Request, db: deps.Pool, principal: auth.Viewer, name: str) -> JSONResponse:
    """One secret's metadata record, the procedures that name it and its last check."""
    headers = await min_position(request)
    row = await _row(db, name)
    return JSONResponse(secret_out(row, (await references(db, [name]))[name]), headers=headers)


async def _update(request: Request, db: deps.Pool, principal: auth.Principal, name: str,
                  body: SecretPatch) -> JSONResponse:
    fields = body.model_fields_set - {"value"}
    async with auditing.refusals_audited(request, CATEGORY, "update", resource_type="secret", resource_id=name,
                                         meta=body.model_dump(mode="json", exclude_unset=True), statuses=(409, 422)):
        current = await _current(request, name)
        old = current.record
        if old is None:
            raise ApiProblem("not_found", f"secret {name} not found", resource="secret")
        provider = body.provider if "provider" in fields and body.provider is not None else old.provider
        new = SecretRecord(
            name, provider,
            body.provider_ref if "provider_ref" in fields else old.provider_ref,
            body.description if "description" in fields else old.description,
            list(body.tags) if "tags" in fields and body.tags is not None else old.tags)
        errors = reference_errors(new.provider, new.provider_ref, name)
        if errors:
            raise ApiProblem("validation_failed", "the provider reference cannot resolve", errors=errors)
        if new == old:
            return JSONResponse(secret_out(await _row(db, name), (await references(db, [name]))[name]))
        done = await _append(request, principal, current, SecretUpdated(
            name=name, provider=new.provider, provider_ref=new.provider_ref,
            description=new.description, tags=new.tags))
    return await _out(request, db, name, done, new, current.created)


@router.patch("/api/secrets/{name}")
async def patch_secret(request: Request, db: deps.Pool, principal: auth.Admin, _: NoValue, name: str,
                       body: SecretPatch) -> JSONResponse:
    """Change a secret's provider, reference, description or tags."""
    return await _update(request, db, principal, name, body)


@router.put("/api/secrets/{name}", deprecated=True)
async def put_secret(request: Request, db: deps.Pool, principal: auth.Admin, _: NoValue, name: str,
                     body: SecretPatch) -> JSONResponse:
    """Accepted alias of PATCH (api.md §1.8)."""
    return await _update(request, db, principal, name, body)


@router.delete("/api/secrets/{name}", status_code=204)
async def delete_secret(request: Request, db: deps.Pool, principal: auth.Admin, name: str,
                        force: bool = False) -> Response:
    """Delete a metadata record; 409 ``secret_in_use`` while a procedure names it, unless ``force=true``."""
    async with auditing.refusals_audited(request, CATEGORY, "delete", resource_type="secret", resource_id=name,
                                         meta={"force": force}):
        current = await _current(request, name)
        if current.record is None:
            raise ApiProblem("not_found", f"secret {name} not found", resource="secret")
        refs = (await references(db, [name]))[name]
        if refs and not force:
            raise ApiProblem("secret_in_use", f"{len(refs)} procedure version(s) name secret {name}; delete with "
                             "force=true to remove the record anyway", referenced_by=refs)
        done = await _append(request, principal, current, SecretDeleted(name=name, forced=bool(refs)))
    return Response(status_code=204, headers={"X-LangOrch-Position": str(done.position)}
                    | ({} if done.projected else STALE))


class CheckOut(BaseModel):
    name: str
    ok: bool
    provider: str
    checked_at: str
    error: str | None


@router.post("/api/secrets/{name}/check")
async def check_secret(request: Request, principal: auth.Admin, name: str) -> CheckOut:
    """Resolve the value from its provider now (past the cache) and report only whether that worked; the
    outcome is recorded (``secret_checked``) as the record's ``last_check``."""
    current = await _current(request, name)
    if current.record is None:
        raise ApiProblem("not_found", f"secret {name} not found", resource="secret")
    record = current.record
    error: str | None = None
    try:
        await clients(request).secret_resolver.check(record)
    except SecretError as exc:
        error = f"{exc.code}: {exc.reason}"
    data = SecretChecked(name=name, provider=record.provider, ok=error is None,
                         error=error)
    for _ in range(3):  # another write moved the head meanwhile: append the outcome at the new head
        try:
            done = await _append(request, principal, current, data)
            break
        except ApiProblem:
            current = await _current(request, name)
            if current.record is None:
                raise ApiProblem("not_found", f"secret {name} not found", resource="secret") from None
    else:
        raise ApiProblem("unavailable", f"secret {name} is being changed concurrently; retry", status=503)
    return CheckOut(name=name, ok=error is None, provider=record.provider,
                    checked_at=format_time(done.event.occurred_at), error=error)

