"""Projects (api.md §9): a gateway-owned aggregate. The gateway appends ``project_created`` /
``project_updated`` / ``project_deleted`` itself with the aggregate's expected position and waits for the
``projects`` projection; counts and costs come from the ``procedures``, ``runs`` and ``run_events`` projections.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal, NamedTuple

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field

from ckp_core import runs
from ckp_core.errors import ConcurrencyError
from ckp_core.events import (
    EventData,
    EventEnvelope,
    ProjectCreated,
    ProjectDeleted,
    ProjectUpdated,
    format_time,
    make_event,
)
from ckp_core.ids import new_id
from langorch_gateway import auditing, auth, deps, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import min_position, ryw
from langorch_gateway.problems import ApiProblem
from langorch_gateway.queries import Limit, Offset, Order, Where, fetch_page

router = APIRouter()

STALE = {"X-LangOrch-Consistency": "stale"}
ACTIONS = {"project_created": "create", "project_updated": "update", "project_deleted": "delete"}

_ACTIVE = ", ".join(f"'{s}'" for s in runs.ACTIVE_STATUSES)  # the run aggregate's constants, not input
PROJECTS_VIEW = f"""(SELECT p.*,
    (SELECT count(DISTINCT procedure_id) FROM procedures pr WHERE pr.project_id = p.project_id) AS procedure_count,
    (SELECT count(*) FROM runs r WHERE r.project_id = p.project_id
       AND r.status IN ({_ACTIVE}))
       AS active_run_count
  FROM projects p) AS projects_view"""  # noqa: S608
Name = Annotated[str, Field(min_length=1, max_length=200, pattern=r"\S")]


class ProjectIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name
    description: str | None = Field(None, max_length=2000)


class ProjectPatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: Name | None = None
    description: str | None = Field(None, max_length=2000)


async def _row(request: Request, project_id: str) -> asyncpg.Record:
    row = await clients(request).pool.fetchrow(f"SELECT * FROM {PROJECTS_VIEW} WHERE project_id = $1",  # noqa: S608
                                      project_id)
    if row is None:
        raise ApiProblem("not_found", f"project {project_id} not found", resource="project")
    return row


async def _name_taken(request: Request, name: str, other_than: str | None = None) -> None:
    existing = await clients(request).pool.fetchval(
        "SELECT project_id FROM projects WHERE lower(name) = lower($1) AND project_id IS DISTINCT FROM $2",
        name.strip(), other_than)
    if existing is not None:
        raise ApiProblem("project_exists", f"a project named {name!r} exists", existing_project_id=existing)


class Appended(NamedTuple):
    position: int
    event: EventEnvelope
    projected: bool  # the projection applied it within the read-your-writes wait


async def _append(request: Request, project_id: str, data: EventData) -> Appended:
    """Append one event at the aggregate's head (the check makes concurrent writers serialise), and audit it."""
    store = clients(request).store
    for _ in range(5):
        head = await store.head("project", project_id)
        event = make_event(data, aggregate_id=project_id, seq=(head.seq if head else 0) + 1, actor=auth.actor(request),
                           causation_id=request.state.request_id)
        try:
            [position] = await store.append([event], expected_position=head.position if head else 0)
        except ConcurrencyError:
            continue
        await auditing.decided(request, "project", ACTIONS[data.TYPE], resource_type="project",
                               resource_id=project_id, meta=data.model_dump(mode="json"), event_id=event.event_id)
        return Appended(position, event, await ryw(request, position))
    raise ApiProblem("unavailable", "project is being changed concurrently; retry", status=503)


@router.get("/api/projects")
async def list_projects(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    search: Annotated[str | None, Query(max_length=500)] = None,
    sort: Literal["name", "created_at"] = "created_at",
    order: Order = "desc",
    limit: Limit = 100,
    offset: Offset = 0,
) -> JSONResponse:
    """Page of projects with procedure and active-run counts."""
    headers = await min_position(request)
    where = Where()
    if search:
        term = where.arg(search.lower())
        where.add(f"(strpos(lower(name), {term}) > 0 OR strpos(lower(COALESCE(description, '')), {term}) > 0)")
    order_sql = ("lower(name) {o}, " if sort == "name" else "created_at {o}, ").format(o=order) + f"project_id {order}"
    rows, total = await fetch_page(db, PROJECTS_VIEW, where, order_sql, limit, offset)
    return JSONResponse(views.page([views.project_out(r) for r in rows], total, limit, offset), headers=headers)


@router.post("/api/projects", status_code=201)
async def create_project(principal: auth.Operator,
                         request: Request, names_lock: deps.NamesLock, body: ProjectIn) -> JSONResponse:
    """Create a project (name unique, case-insensitively)."""
    project_id = new_id()
    async with names_lock, auditing.refusals_audited(request, "project", "create", resource_type="project",
                                                     resource_id=None, meta=body.model_dump()):
        await _name_taken(request, body.name)
        done = await _append(request, project_id, ProjectCreated(
            project_id=project_id, name=body.name.strip(), description=body.description))
    headers = {"Location": f"/api/projects/{project_id}", "X-LangOrch-Position": str(done.position)}
    if not done.projected:  # the event is durable; answer from it rather than from a projection that lags
        ts = format_time(done.event.occurred_at)
        out = {"project_id": project_id, "name": body.name.strip(), "description": body.description,
               "created_at": ts, "created_by": done.event.actor.render(), "updated_at": ts, "procedure_count": 0,
               "active_run_count": 0}
        return JSONResponse(out, status_code=201, headers=headers | STALE)
    return JSONResponse(views.project_out(await _row(request, project_id)), status_code=201, headers=headers)


@router.get("/api/projects/{project_id}")
async def get_project(principal: auth.Viewer, request: Request, project_id: str) -> JSONResponse:
    headers = await min_position(request)
    return JSONResponse(views.project_out(await _row(request, project_id)), headers=headers)


async def _update(request: Request, project_id: str, body: ProjectPatch) -> JSONResponse:
    async with clients(request).names_lock, auditing.refusals_audited(
            request, "project", "update", resource_type="project", resource_id=project_id,
            meta=body.model_dump(exclude_unset=True)):
        row = await _row(request, project_id)
        fields = body.model_fields_set
        name = body.name.strip() if "name" in fields and body.name is not None else row["name"]
        description = body.description if "description" in fields else row["description"]
        if "name" in fields and body.name is None:
            raise ApiProblem("validation_failed", "name cannot be null", errors={"name": ["Must not be null"]})
        if (name, description) == (row["name"], row["description"]):
            return JSONResponse(views.project_out(row))
        if name.lower() != row["name"].lower():
            await _name_taken(request, name, other_than=project_id)
        done = await _append(request, project_id, ProjectUpdated(project_id=project_id, name=name,
                                                                 description=description))
    headers = {"X-LangOrch-Position": str(done.position)}
    if not done.projected:  # the projection lags: its row with this update applied
        out = views.project_out(row) | {"name": name, "description": description,
                                        "updated_at": format_time(done.event.occurred_at)}
        return JSONResponse(out, headers=headers | STALE)
    return JSONResponse(views.project_out(await _row(request, project_id)), headers=headers)


@router.patch("/api/projects/{project_id}")
async def patch_project(principal: auth.Operator,
                        request: Request, project_id: str, body: ProjectPatch) -> JSONResponse:
    """Rename or re-describe a project."""
    return await _update(request, project_id, body)


@router.put("/api/projects/{project_id}", deprecated=True)
async def put_project(principal: auth.Operator, request: Request, project_id: str, body: ProjectPatch) -> JSONResponse:
    """Accepted alias of PATCH (api.md §1.8)."""
    return await _update(request, project_id, body)


@router.delete("/api/projects/{project_id}", status_code=204)
async def delete_project(principal: auth.Admin, request: Request, project_id: str) -> Response:
    """Delete a project that no procedure is assigned to."""
    row = await _row(request, project_id)
    if row["procedure_count"]:
        problem = ApiProblem("project_not_empty", f"{row['procedure_count']} procedure(s) are assigned to project "
                             f"{project_id}", procedure_count=int(row["procedure_count"]))
        raise await auditing.refused_decision(request, "project", "delete", "project", project_id, problem)
    done = await _append(request, project_id, ProjectDeleted(project_id=project_id))
    return Response(status_code=204, headers={"X-LangOrch-Position": str(done.position)}
                    | ({} if done.projected else STALE))


@router.get("/api/projects/{project_id}/cost-summary")
async def cost_summary(
    principal: auth.Viewer,
    request: Request, db: deps.Pool,
    project_id: str,
    period_days: Annotated[int, Query(ge=1, le=365)] = 30,
) -> JSONResponse:
    """Run count and LLM usage (``llm_usage`` events) of the project's runs created in the window."""
    headers = await min_position(request)
    await _row(request, project_id)
    window = "r.project_id = $1 AND r.created_at >= now() - make_interval(days => $2)"
    async with db.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        run_count = await conn.fetchval(f"SELECT count(*) FROM runs r WHERE {window}",  # noqa: S608
                                        project_id, period_days)
        models = await conn.fetch(
            f"""SELECT COALESCE(e.payload->>'model', 'other') AS model,
                  COALESCE(sum((e.payload->>'prompt_tokens')::bigint), 0) AS prompt_tokens,
                  COALESCE(sum((e.payload->>'completion_tokens')::bigint), 0) AS completion_tokens,
                  sum((e.payload->>'estimated_cost_usd')::numeric) AS cost
                FROM run_events e JOIN runs r ON r.run_id = e.run_id
                WHERE e.event_type = 'llm_usage' AND {window}
                GROUP BY 1 ORDER BY 1""", project_id, period_days)  # noqa: S608
    by_model: list[dict[str, Any]] = [
        {"model": m["model"], "prompt_tokens": int(m["prompt_tokens"]),
         "completion_tokens": int(m["completion_tokens"]),
         "estimated_cost_usd": float(m["cost"]) if m["cost"] is not None else None}
        for m in models]
    return JSONResponse({
        "project_id": project_id, "period_days": period_days, "run_count": int(run_count),
        "total_prompt_tokens": sum(m["prompt_tokens"] for m in by_model),
        "total_completion_tokens": sum(m["completion_tokens"] for m in by_model),
        "estimated_cost_usd": round(sum(m["estimated_cost_usd"] or 0.0 for m in by_model), 6),
        "by_model": by_model,
    }, headers=headers)
