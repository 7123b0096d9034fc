"""``GET /api/config`` (api.md §14): the effective, redacted settings of every live replica.

Each replica (this gateway included) publishes ``service.<service>.<instance>`` to KV ``lo_presence`` with its
redacted settings and the leader locks it holds; this route reads those keys directly, so a replica that
stopped is gone as soon as its key is deleted or expires. Role admin — authentication is not built yet, and
with auth disabled the anonymous principal holds every role (api.md §2.4).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from langorch_gateway import auth, deps
from langorch_infra.presence import read_presence

router = APIRouter()


class ServiceReplica(BaseModel):
    service: str = Field(description="compiler, runtime, approvals, triggers or gateway; creation: the run "
                                     "creation process of `langorch up`.")
    instance_id: str = Field(description="The replica's name (LANGORCH_INSTANCE_ID or hostname-pid-suffix).")
    version: str
    started_at: str
    last_seen_at: str = Field(description="Last renewal of the presence key (every third of its TTL).")
    leader_of: list[str] = Field(description="Leader locks in lo_locks this replica holds.")
    settings: dict[str, Any] = Field(description="Effective settings; secrets as {set: bool}, header values and "
                                     "URL passwords redacted.")


class ConfigOut(BaseModel):
    version: str
    auth_enabled: bool
    public_url: str
    services: list[ServiceReplica]


@router.get("/api/config", response_model=ConfigOut)
async def config(principal: auth.Admin,
                 request: Request, js: deps.JetStream, settings: deps.Settings) -> dict[str, Any]:
    """Effective configuration of every live service replica (read-only; admin)."""
    replicas = []
    for value in await read_presence(js):
        try:
            replicas.append(ServiceReplica.model_validate(value).model_dump())
        except ValueError:
            continue  # a key some other writer left in the bucket's service.* space
    return {"version": request.app.version, "auth_enabled": settings.auth_enabled,
            "public_url": (settings.public_url or f"http://{settings.host}:{settings.port}").rstrip("/"),
            "services": replicas}
