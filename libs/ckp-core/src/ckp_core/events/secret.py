"""Events of the secret aggregate (owned by the gateway, api.md §11): metadata records only — which provider
holds a secret and under which reference. No event ever carries a secret value."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from ckp_core.events.envelope import EventData

SecretProviderName = Literal["env", "vault", "aws", "azure"]


class SecretCreated(EventData):
    TYPE = "secret_created"
    AGGREGATE = "secret"

    name: str
    provider: SecretProviderName
    provider_ref: str | None = Field(None, description="Where the provider holds the value (default: the name).")
    description: str | None = None
    tags: list[str] = Field(default_factory=list)


class SecretUpdated(EventData):
    """The record's state after the change (every field, so readers need no history)."""

    TYPE = "secret_updated"
    AGGREGATE = "secret"

    name: str
    provider: SecretProviderName
    provider_ref: str | None = None
    description: str | None = None
    tags: list[str] = Field(default_factory=list)


class SecretDeleted(EventData):
    TYPE = "secret_deleted"
    AGGREGATE = "secret"

    name: str
    forced: bool = Field(False, description="Deleted with force=true while procedures referenced it.")


class SecretChecked(EventData):
    """A resolution check: whether the provider produced a value (never the value)."""

    TYPE = "secret_checked"
    AGGREGATE = "secret"

    name: str
    provider: SecretProviderName
    ok: bool
    error: str | None = Field(None, description="The provider's reason when the check failed.")


EVENTS: tuple[type[EventData], ...] = (SecretCreated, SecretUpdated, SecretDeleted, SecretChecked)
