"""Events of the API-key aggregate (owned by the gateway, api.md §2.3): the key itself is shown once, in the
creation response; events carry only its SHA-256."""

from __future__ import annotations

from datetime import datetime

from ckp_core.events.envelope import EventData


class ApiKeyCreated(EventData):
    TYPE = "api_key_created"
    AGGREGATE = "api_key"

    key_id: str
    name: str
    description: str | None = None
    roles: list[str]
    key_sha256: str
    expires_at: datetime | None = None


class ApiKeyRevoked(EventData):
    TYPE = "api_key_revoked"
    AGGREGATE = "api_key"

    key_id: str


EVENTS: tuple[type[EventData], ...] = (ApiKeyCreated, ApiKeyRevoked)
