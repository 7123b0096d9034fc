"""Pure ``ckp-core`` analysis over HTTP (api.md §4.2, §4.6): validate, graph, explain and diff.

Nothing here publishes a command: the gateway compiles with ``ckp-core`` itself. Subflow checks see the stored
procedures through a lookup prefetched from the ``procedures`` projection (the compiler does no I/O).
"""

from __future__ import annotations

from typing import Any, Literal

import asyncpg
from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict

from ckp_core import analysis
from ckp_core.compiler import CompileResult, compile_document
from ckp_core.ir import SubflowRefIR
from langorch_gateway import auth, views
from langorch_gateway.deps import clients
from langorch_gateway.dispatch import min_position
from langorch_gateway.problems import ApiProblem

router = APIRouter()

MAX_LOOKUP_PROCEDURES = 200


class ValidateIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    ckp_json: dict[str, Any]


class ExplainIn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    input_vars: dict[str, Any] | None = None
    ckp_json: dict[str, Any] | None = None


def subflow_targets(doc: Any) -> list[tuple[str, str | None]]:
    """``(procedure_id, version)`` of every subflow node of a raw document (``latest`` → None)."""
    wg = doc.get("workflow_graph") if isinstance(doc, dict) else None
    nodes = wg.get("nodes") if isinstance(wg, dict) else None
    out: list[tuple[str, str | None]] = []
    if not isinstance(nodes, dict):
        return out
    for node in nodes.values():
        if isinstance(node, dict) and node.get("type") == "subflow" and isinstance(node.get("procedure_id"), str):
            version = node.get("version")
            out.append((node["procedure_id"], version if isinstance(version, str) and version != "latest" else None))
    return out


class StoredLookup:
    """A :class:`ckp_core.compiler.ProcedureLookup` over versions prefetched from the projection."""

    def __init__(self, rows: dict[str, list[asyncpg.Record]]) -> None:
        self.rows = rows

    def __call__(self, procedure_id: str, version: str | None) -> list[SubflowRefIR] | None:
        versions = self.rows.get(procedure_id, [])
        if version is None:
            active = [r for r in versions if r["status"] == "active"]
            row = max(active, key=lambda r: r["position"]) if active else None
        else:
            row = next((r for r in versions if r["version"] == version), None)
        if row is None:
            return None
        return [SubflowRefIR(node_id="", procedure_id=pid, version=v)
                for pid, v in subflow_targets(views._json(row["ckp_json"]))]


async def stored_lookup(db: asyncpg.Pool, doc: Any) -> StoredLookup:
    """Prefetch every stored version reachable through subflow references (bounded)."""
    rows: dict[str, list[asyncpg.Record]] = {}
    pending = [pid for pid, _ in subflow_targets(doc)]
    while pending and len(rows) < MAX_LOOKUP_PROCEDURES:
        pid = pending.pop()
        if pid in rows:
            continue
        found = await db.fetch(
            "SELECT procedure_id, version, status, position, ckp_json FROM procedures WHERE procedure_id = $1", pid)
        rows[pid] = list(found)
        for row in found:
            pending.extend(child for child, _ in subflow_targets(views._json(row["ckp_json"])) if child not in rows)
    return StoredLookup(rows)


async def compile_with_store(request: Request, doc: dict[str, Any]) -> CompileResult:
    return compile_document(doc, await stored_lookup(clients(request).pool, doc))


async def _version_doc(request: Request, procedure_id: str, version: str) -> tuple[asyncpg.Record, dict[str, Any]]:
    db = clients(request).pool
    if version == "latest":
        row = await db.fetchrow(
            "SELECT * FROM procedures WHERE procedure_id = $1 ORDER BY position DESC LIMIT 1", procedure_id)
    else:
        row = await db.fetchrow("SELECT * FROM procedures WHERE procedure_id = $1 AND version = $2", procedure_id,
                                version)
    if row is None:
        raise ApiProblem("not_found", f"procedure {procedure_id} version {version} not found", resource="procedure")
    return row, views._json(row["ckp_json"])


def _compile_failed(result: CompileResult) -> ApiProblem:
    n = len(result.errors)
    return ApiProblem("compile_failed", f"{n} compile error{'s' if n != 1 else ''}", errors={},
                      diagnostics=[d.model_dump(mode="json") for d in result.diagnostics])


@router.post("/api/procedures/validate")
async def validate_procedure(principal: auth.Viewer, request: Request, body: ValidateIn) -> JSONResponse:
    """Compile a document without storing it; 200 also when it is invalid."""
    headers = await min_position(request)
    result = await compile_with_store(request, body.ckp_json)
    summary = {"nodes": 0, "edges": 0, "external_calls": 0}
    if result.ir is not None:
        summary = {"nodes": len(result.ir.nodes), "edges": len(result.ir.edges),
                   "external_calls": len(analysis.explain(result.ir)["external_calls"])}
    return JSONResponse({
        "valid": result.ok, "procedure_id": result.procedure_id, "version": result.version,
        "diagnostics": [d.model_dump(mode="json") for d in result.diagnostics], "summary": summary,
    }, headers=headers)


@router.get("/api/procedures/{procedure_id}/diff")
async def diff_versions(
    principal: auth.Viewer,
    request: Request, procedure_id: str,
    from_version: str = Query(alias="from", min_length=1, max_length=64),
    to_version: str = Query(alias="to", min_length=1, max_length=64),
    format: Literal["json", "unified"] = "json",
) -> JSONResponse:
    """Structural diff of two versions (``latest`` allowed)."""
    headers = await min_position(request)
    from_row, from_doc = await _version_doc(request, procedure_id, from_version)
    to_row, to_doc = await _version_doc(request, procedure_id, to_version)
    out = analysis.diff(from_doc, to_doc, from_row["version"], to_row["version"], procedure_id,
                        unified=format == "unified")
    return JSONResponse(out, headers=headers)


@router.get("/api/procedures/{procedure_id}/{version}/graph")
async def procedure_graph(principal: auth.Viewer, request: Request, procedure_id: str, version: str) -> JSONResponse:
    """The laid-out graph of a stored version (GraphOut)."""
    headers = await min_position(request)
    _, doc = await _version_doc(request, procedure_id, version)
    result = compile_document(doc)
    if result.ir is None:  # stored documents compiled once; a newer compiler may refuse them
        raise _compile_failed(result)
    return JSONResponse(analysis.graph_view(result.ir), headers=headers)


@router.post("/api/procedures/{procedure_id}/{version}/explain")
async def explain_procedure(principal: auth.Viewer, request: Request, procedure_id: str, version: str,
                            body: ExplainIn | None = None) -> JSONResponse:
    """Static analysis of a stored version, or of an unsaved edit of it (``ckp_json``)."""
    headers = await min_position(request)
    body = body or ExplainIn()
    _, doc = await _version_doc(request, procedure_id, version)
    if body.ckp_json is not None:
        doc = body.ckp_json
    result = await compile_with_store(request, doc)
    if result.ir is None:
        raise _compile_failed(result)
    return JSONResponse(analysis.explain(result.ir, body.input_vars), headers=headers)
