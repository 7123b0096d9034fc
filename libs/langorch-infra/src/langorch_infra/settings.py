"""Typed settings (pydantic-settings, env prefix ``LANGORCH_``), one class per service on a common base."""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class CommonSettings(BaseSettings):
    """Connection settings every service shares."""

    model_config = SettingsConfigDict(env_prefix="LANGORCH_", extra="ignore")

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server with JetStream enabled.")
    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/langorch",
        description="PostgreSQL for projections and LangGraph checkpoints.",
    )
    instance_id: str | None = Field(None, description="Name of this replica in logs and events.")


class CompilerSettings(CommonSettings):
    """Settings of the compiler service."""


class RuntimeSettings(CommonSettings):
    """Settings of the runtime service."""

    ack_wait_s: float = Field(30.0, description="JetStream ack wait of run commands; a runtime that stops "
                              "signalling progress for this long loses its runs to another replica.")
    max_concurrent_runs: int = Field(16, ge=1, description="Runs one replica executes at once.")


class GatewaySettings(CommonSettings):
    """Settings of the gateway (REST/SSE API and projector)."""

    host: str = Field("127.0.0.1", description="Bind address of the HTTP API.")
    port: int = Field(8080, description="Port of the HTTP API.")
    ryw_timeout_ms: int = Field(5000, description="Longest wait for a projection to reach a command's event.")
    command_timeout_s: float = Field(10.0, description="Longest wait for a command's outcome before 202.")
    sse_keepalive_s: float = Field(15.0, description="Seconds between SSE keep-alive comments.")
