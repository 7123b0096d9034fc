"""Typed settings (pydantic-settings, env prefix ``LANGORCH_``), one class per service on a common base."""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, SecretStr, TypeAdapter, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class LlmModelConfig(BaseModel):
    """One entry of ``LANGORCH_LLM_MODELS`` (api.md §15.5): where a model lives, its prices and fallback chain."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    base_url: str | None = Field(None, description="Provider base URL of this model (default LANGORCH_LLM_BASE_URL).")
    api_key_secret: str | None = Field(None, description="Name of the secret holding this model's API key.")
    prompt_usd_per_1k: float | None = Field(None, ge=0, description="USD per 1000 prompt tokens.")
    completion_usd_per_1k: float | None = Field(None, ge=0, description="USD per 1000 completion tokens.")
    quality: float | None = Field(None, description="Quality score compared with a node's min_llm_quality.")
    fallbacks: list[str] = Field(default_factory=list, description="Models tried, in order, after a retryable "
                                 "failure of this one.")

    @property
    def priced(self) -> bool:
        return self.prompt_usd_per_1k is not None or self.completion_usd_per_1k is not None


SecretProviderName = Literal["env", "vault", "aws", "azure"]
DEFAULT_SECRET_PROVIDERS: tuple[SecretProviderName, ...] = ("env",)


def split_list(value: Any) -> Any:
    """A list setting from the environment: comma-separated (``a,b``) or a JSON list; other values as given."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            return json.loads(text)
        return [part.strip() for part in text.split(",") if part.strip()]
    return value


class CommonSettings(BaseSettings):
    """Connection settings every service shares."""

    # a model-level error would otherwise quote every input, secrets included
    model_config = SettingsConfigDict(env_prefix="LANGORCH_", extra="ignore", hide_input_in_errors=True)

    nats_url: str = Field("nats://127.0.0.1:4222", description="NATS server with JetStream enabled; several "
                          "seed servers of a cluster comma-separated (nats://a:4222,nats://b:4222).")
    nats_replicas: int = Field(1, ge=1, le=5, description="Replicas of every LangOrch stream, KV bucket and object "
                               "store (3 on a 3-node JetStream cluster); applied on creation and reconciled at "
                               "start when it differs.")
    # NATS credentials (at most one kind) and TLS: passed to every NATS connection of the services and the CLI
    nats_user: str | None = Field(None, description="NATS user name (with nats_password).")
    nats_password: SecretStr | None = Field(None, description="Password of nats_user.")
    nats_token: SecretStr | None = Field(None, description="NATS authentication token (instead of a user).")
    nats_nkey_seed_file: str | None = Field(None, description="File holding the nkey seed (SU…) NATS "
                                            "authenticates this client with.")
    nats_creds_file: str | None = Field(None, description="NATS .creds file (user JWT and nkey seed) of an "
                                        "operator-mode server.")
    nats_tls_ca_file: str | None = Field(None, description="CA bundle (PEM) the NATS server's certificate is "
                                         "checked against when the server requires TLS (default: the system's).")
    nats_tls_cert_file: str | None = Field(None, description="Client certificate (PEM) for NATS TLS, with "
                                           "nats_tls_key_file.")
    nats_tls_key_file: str | None = Field(None, description="Private key (PEM) of nats_tls_cert_file.")

    @model_validator(mode="after")
    def _one_nats_credential(self) -> CommonSettings:
        """A user goes with a password, one kind of NATS credential at most, a client certificate with its key."""
        if (self.nats_user is None) != (self.nats_password is None):
            raise ValueError("nats_user and nats_password go together: set both or neither")
        kinds = [name for name, value in (("nats_user", self.nats_user), ("nats_token", self.nats_token),
                                          ("nats_nkey_seed_file", self.nats_nkey_seed_file),
                                          ("nats_creds_file", self.nats_creds_file)) if value is not None]
        if len(kinds) > 1:
            raise ValueError(f"set one kind of NATS credential, not {' and '.join(kinds)}")
        if (self.nats_tls_cert_file is None) != (self.nats_tls_key_file is None):
            raise ValueError("nats_tls_cert_file and nats_tls_key_file go together: set both or neither")
        return self

    database_url: str = Field(
        "postgresql://postgres@127.0.0.1:5432/langorch",
        description="PostgreSQL for projections and LangGraph checkpoints.",
    )
    instance_id: str | None = Field(None, description="Name of this replica in logs and events.")
    log_format: Literal["json", "console"] | None = Field(None, description="Log lines as JSON objects or as "
                                                          "console text (default: console for `langorch up` in "
                                                          "a terminal, json otherwise).")
    log_level: Literal["debug", "info", "warning", "error", "critical"] = Field("info", description="Lowest level "
                                                                                "logged (any case).")
    auth_secret_key: SecretStr = Field(SecretStr("langorch-development-secret-key"), description="Secret the "
                                       "keys of user tokens, credential grants and callback tokens are derived "
                                       "from (HKDF); runtime and gateway must share it. The default is a "
                                       "development placeholder: with auth enabled the gateway refuses to start "
                                       "unless it is set to at least 32 bytes.")
    metrics_port: int = Field(9464, ge=0, description="Port of this replica's GET /metrics, /health and /ready "
                              "(compiler, runtime, approvals; 0: none). The gateway serves them on its API port, "
                              "and `langorch up` serves one combined /metrics there.")
    presence_ttl_s: float = Field(30.0, ge=1, description="TTL of this replica's key in KV lo_presence (renewed "
                                  "every third of it); a replica that dies leaves GET /api/config after it.")
    audit_retention_days: int = Field(365, ge=1, description="Days audit records are kept in stream LO_AUDIT "
                                      "(api.md §12).")
    # secret providers (api.md §11): the runtime resolves secrets at the moment of use, the gateway when an agent
    # redeems a credential grant and on POST /api/secrets/{name}/check
    secret_providers: Annotated[list[SecretProviderName], NoDecode] = Field(
        default_factory=lambda: list(DEFAULT_SECRET_PROVIDERS), description="Providers tried in order for a "
        "secret name without a metadata record (comma-separated or a JSON list).")
    secret_cache_ttl_s: float = Field(30.0, ge=0, description="Seconds a value read from vault, aws or azure is "
                                      "kept in this process's memory (never persisted; 0: no cache). env is read "
                                      "at every use.")
    secret_provider_timeout_s: float = Field(10.0, gt=0, description="Timeout of one call to a secret provider.")
    vault_addr: str | None = Field(None, description="Vault address, e.g. https://vault.internal:8200 (a "
                                   "procedure's secrets_config.vault_url overrides it for that procedure).")
    vault_auth_method: Literal["token", "approle", "kubernetes"] = Field("token", description="How LangOrch "
                                                                         "logs in to Vault.")
    vault_token: SecretStr | None = Field(None, description="Vault token (auth method token).")
    vault_token_path: str | None = Field(None, description="File holding the Vault token (auth method token), "
                                         "read at each login.")
    vault_role: str | None = Field(None, description="AppRole role_id (approle) or role name (kubernetes).")
    vault_secret_id_path: str | None = Field(None, description="File holding the AppRole secret_id (approle).")
    vault_jwt_path: str = Field("/var/run/secrets/kubernetes.io/serviceaccount/token", description="Service "
                                "account token sent to Vault's Kubernetes auth (kubernetes).")
    vault_auth_mount: str | None = Field(None, description="Mount of the auth method (default: approle, "
                                         "kubernetes).")
    vault_namespace: str | None = Field(None, description="Vault Enterprise namespace.")
    vault_ca_bundle: str | None = Field(None, description="CA bundle (PEM file) Vault's certificate is checked "
                                        "against (default: the system's).")
    aws_region: str | None = Field(None, description="AWS region of Secrets Manager (default: the SDK's own "
                                   "configuration, AWS_REGION / profile).")
    aws_endpoint_url: str | None = Field(None, description="Secrets Manager endpoint URL (a VPC endpoint, a "
                                         "local emulator); default: the SDK's.")
    azure_credential: Literal["default", "managed_identity"] = Field("default", description="azure-identity "
                                                                     "credential: DefaultAzureCredential or "
                                                                     "ManagedIdentityCredential.")
    azure_client_id: str | None = Field(None, description="Client id of a user-assigned managed identity.")
    azure_ca_bundle: str | None = Field(None, description="CA bundle (PEM file) Key Vault's certificate is "
                                        "checked against (default: the system's).")
    azure_verify_challenge_resource: bool = Field(True, description="Check that the resource of Key Vault's "
                                                  "authentication challenge belongs to the vault's domain (turn "
                                                  "off only for a vault reached by IP address or a private name).")

    @field_validator("log_format", "log_level", mode="before")
    @classmethod
    def _any_case(cls, value: Any) -> Any:
        """``LANGORCH_LOG_LEVEL=DEBUG`` and ``LANGORCH_LOG_FORMAT=JSON`` are accepted."""
        return value.lower() if isinstance(value, str) else value

    @field_validator("secret_providers", mode="before")
    @classmethod
    def _split_providers(cls, value: Any) -> Any:
        """``LANGORCH_SECRET_PROVIDERS=env,vault`` or a JSON list."""
        return split_list(value)


class CompilerSettings(CommonSettings):
    """Settings of the compiler service."""


class RuntimeSettings(CommonSettings):
    """Settings of the runtime service."""

    ack_wait_s: float = Field(4.0, gt=0, description="JetStream ack wait of run commands; a runtime that stops "
                              "signalling progress (every third of it) for this long loses its runs to another "
                              "replica, which takes them over at once when the replica is gone from NATS.")
    max_concurrent_runs: int = Field(16, ge=1, description="Runs one replica executes at once: it fetches a run "
                                     "command only while it has a free slot, so the commands beyond every "
                                     "replica's slots wait in LO_CMD, for whichever replica frees one first.")
    public_url: str = Field("http://127.0.0.1:8080", description="Base URL of the gateway as agents reach it "
                            "(async callbacks go to <public_url>/api/runs/<run_id>/callback).")
    callback_timeout_s: float = Field(3600.0, gt=0, description="How long an async workflow delegation may wait "
                                      "for its callback (ckp.md §4.6).")
    recovery_grace_s: float = Field(60.0, ge=0, description="Executing time the recovery path gets of its own "
                                    "after the run deadline passed (global_config.timeout_ms, ckp.md §7.11).")
    agent_health_interval_s: float = Field(30.0, gt=0, description="Seconds between health probes of every "
                                           "agent by the elected replica (api.md §7.3).")
    agent_heartbeat_interval_s: float = Field(15.0, gt=0, description="Agents' heartbeat interval; a heartbeat "
                                              "is fresh for 3 intervals.")
    agent_circuit_failures: int = Field(3, ge=1, description="Consecutive failed probes that open an agent's "
                                        "circuit.")
    agent_probe_timeout_s: float = Field(5.0, gt=0, description="Timeout of one agent health probe.")
    leader_lock_ttl_s: float = Field(15.0, ge=1, description="TTL of leader keys in lo_locks; a dead leader is "
                                     "replaced within this time.")
    lease_ttl_s: float = Field(60.0, ge=1, description="TTL of a lease key in lo_leases (renewed every TTL/3 "
                               "while the step runs; a crashed runtime's leases expire after it).")
    lease_wait_timeout_s: float = Field(600.0, ge=0, description="Longest wait for a free lease slot before the "
                                        "attempt fails with lease_wait_timeout (ckp.md §7.5).")
    agent_timeout_s: float = Field(120.0, gt=0, description="Attempt timeout of agent calls and sync workflows "
                                   "when neither the step nor global_config sets one (ckp.md §4.9).")
    mcp_timeout_s: float = Field(60.0, gt=0, description="Attempt timeout of MCP tool calls when neither the step "
                                 "nor global_config sets one (ckp.md §4.9).")
    agent_async_accept_timeout_s: float = Field(10.0, gt=0, description="How long an async workflow agent may "
                                                "take to accept a step, answer body included, per try (3 tries; "
                                                "api.md §15.2).")
    agent_strict_response: bool = Field(True, description="A 2xx agent body that is not the response envelope is "
                                        "agent_protocol_error; false takes a bare object as the result.")
    agent_circuit_half_open_s: float = Field(60.0, gt=0, description="An open agent circuit becomes half-open "
                                             "(tried again by dispatch) after this many seconds.")
    llm_base_url: str = Field("https://api.openai.com/v1", description="Base URL of the OpenAI-compatible "
                              "provider (POST <base_url>/chat/completions, api.md §15.5).")
    llm_api_key: SecretStr | None = Field(None, description="API key sent as Bearer token to llm_base_url.")
    llm_default_model: str = Field("gpt-4o", description="Model of llm_action nodes that name none.")
    llm_timeout_s: float = Field(60.0, gt=0, description="Timeout of one LLM call when the node sets no "
                                 "timeout_ms.")
    llm_extra_headers: dict[str, str] = Field(default_factory=dict, description="Headers added to every LLM "
                                              "request; values may be '{{secrets.<name>}}' references.")
    llm_models: dict[str, LlmModelConfig] = Field(default_factory=dict, description="Model table (JSON): "
                                                  "{<model>: {base_url?, api_key_secret?, prompt_usd_per_1k, "
                                                  "completion_usd_per_1k, quality?, fallbacks: []}}.")
    notify_webhook_url: SecretStr | None = Field(None, description="Notification webhook: every notify operation "
                                                 "POSTs its notification_requested payload here (best effort; "
                                                 "skipped in dry_run and under mocks; ckp.md §4.3). A secret: "
                                                 "webhook URLs often carry their token.")
    alert_webhook_url: SecretStr | None = Field(None, description="Alert webhook: an error handler with "
                                                "notify_on_error POSTs its step_error_notification here (best "
                                                "effort; ckp.md §4.10). A secret, like notify_webhook_url.")
    notify_webhook_headers: dict[str, str] = Field(default_factory=dict, description="Headers added to both "
                                                   "webhooks' POSTs (JSON object); values may be "
                                                   "'{{secrets.<name>}}' references.")
    webhook_timeout_s: float = Field(5.0, gt=0, le=60, description="Timeout of one webhook POST; a failed POST "
                                     "is tried once more, then dropped (logged).")
    metrics_node_labels: bool = Field(True, description="The step and SLA metrics carry a node_id label (with "
                                      "procedure_id), for per-node dashboards: a series per node of every "
                                      "procedure. false: node_id is empty, the series are per procedure only.")
    time_scale: float = Field(1.0, gt=0, le=1, description="For tests only: factor on the pauses a document "
                              "asks for (wait steps, wait_after_ms, retry and backoff delays), which are slept "
                              "for this fraction of their length; events still carry the document's values. "
                              "Timeouts, SLAs, deadlines and rate limits keep real time. 1 (the default) is "
                              "real time; refused outside (0, 1].")


class ApprovalsSettings(CommonSettings):
    """Settings of the approvals service (api.md §6)."""

    leader_lock_ttl_s: float = Field(15.0, ge=1, description="TTL of the approval timer's leader key in lo_locks; "
                                     "a dead leader is replaced within this time.")
    timer_tick_s: float = Field(0.1, gt=0, le=5, description="How often the elected replica looks for expired "
                                "approvals (the lateness of a timeout is at most this).")
    ack_wait_s: float = Field(30.0, gt=0, description="JetStream ack wait of approval commands.")


class TriggersSettings(CommonSettings):
    """Settings of the triggers service (api.md §10)."""

    ack_wait_s: float = Field(30.0, gt=0, description="JetStream ack wait of trigger commands.")
    fire_timeout_s: float = Field(20.0, gt=0, description="How long a fire waits for the run owner's answer to "
                                  "its run creation before the command is redelivered.")
    concurrency_retry_after_s: int = Field(5, ge=1, description="The Retry-After a fire refused at its trigger's "
                                           "max_concurrent_runs carries (seconds); an event fire is redelivered "
                                           "after the same delay.")
    scheduler_lock_ttl_s: float = Field(10.0, ge=1, description="TTL of the scheduler's leader key in lo_locks "
                                        "(renewed every third of it): a dead scheduler replica is replaced, and "
                                        "its schedules and file watches resume, within this time.")
    file_watch_interval_s: float = Field(60.0, gt=0, description="Seconds between two looks of the scheduler "
                                         "replica at each file_watch registration's path.")


class GatewaySettings(CommonSettings):
    """Settings of the gateway (REST/SSE API and projector)."""

    host: str = Field("127.0.0.1", description="Bind address of the HTTP API.")
    auth_enabled: bool = Field(True, description="Require a credential on every endpoint outside the open list "
                               "(api.md §2.2); false is the loud development mode where requests without one act "
                               "as 'anonymous' holding every role.")
    auth_disabled_allow_remote: bool = Field(False, description="Allow auth_enabled=false while the gateway binds "
                                             "a non-loopback host (otherwise it refuses to start).")
    auth_token_expire_minutes: int = Field(60, ge=1, le=60 * 24 * 30, description="Lifetime of the user tokens "
                                           "and console sessions POST /api/auth/login issues.")
    auth_role_cache_s: float = Field(30.0, ge=0, le=30, description="Seconds a user's roles and active flag, and "
                                     "an API key's row, are cached per gateway replica (forgotten when its "
                                     "projector sees them change; a removed role, a deactivated user or a revoked "
                                     "key takes effect within this time in any case; 0: read at every request).")
    bootstrap_admin_username: str = Field("admin", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,127}$",
                                          description="User the gateway creates with the admin role when auth is "
                                          "enabled and no user exists.")
    bootstrap_admin_password: SecretStr | None = Field(None, description="Password of the bootstrap admin (at "
                                                       "least 12 characters); unset: no user is created and a "
                                                       "warning is logged every minute while none exists.")
    port: int = Field(8080, description="Port of the HTTP API.")
    ryw_timeout_ms: int = Field(5000, description="Longest wait for a projection to reach a command's event.")
    command_timeout_s: float = Field(10.0, description="Longest wait for a command's outcome before 202.")
    sse_keepalive_s: float = Field(15.0, description="Seconds between SSE keep-alive comments.")
    max_page_size: int = Field(500, ge=1, le=10_000, description="Largest `limit` a list accepts; more → 422.")
    default_run_channel: Literal["dev", "qa", "prod"] | None = Field(
        None, description="Channel whose active version a run created with neither procedure_version nor "
        "release_channel executes; unset: the first active version in prod, then qa, then dev.")
    sse_max_per_principal: int = Field(20, ge=1, description="Open SSE streams (runs and approvals together) one "
                                       "principal may hold; more → 429 too_many_streams.")
    public_url: str | None = Field(None, description="Base of callback, webhook and agent URLs (default: "
                                   "http://<host>:<port>).")
    agent_heartbeat_interval_s: float = Field(15.0, gt=0, description="Heartbeat interval told to agents; "
                                              "presence keys live 3 intervals.")
    agent_circuit_half_open_s: float = Field(60.0, gt=0, description="An open agent circuit reads half_open "
                                             "after this many seconds.")
    agent_url_allowlist: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Hosts or CIDRs agents may live at, comma-separated (a JSON list also "
        "works); empty = any address except link-local and metadata ones.")
    agent_require_explicit_capabilities: bool = Field(True, description="Refuse the wildcard capability '*'.")
    agent_probe_timeout_s: float = Field(5.0, gt=0, description="Timeout of capability probes.")
    ready_max_lag: int = Field(10_000, ge=0, description="GET /api/ready answers 503 while a projection is more "
                               "than this many events behind the stream head.")
    ready_stall_s: float = Field(10.0, gt=0, description="GET /api/ready answers 503 while a projection has been "
                                 "applying events for this many seconds without moving (its database writes blocked "
                                 "or failing).")
    metrics_token: SecretStr | None = Field(None, description="Bearer token GET /metrics requires when set.")
    agent_recommended_concurrency: int = Field(1, ge=1, description="Concurrency suggested by the bootstrap "
                                               "endpoint.")
    webhook_tolerance_s: int = Field(300, ge=1, le=24 * 3600, description="Largest difference between a "
                                     "webhook's X-LangOrch-Timestamp and the gateway's clock (else 401 "
                                     "stale_signature).")
    webhook_max_body_bytes: int = Field(1024 * 1024, ge=1, le=64 * 1024 * 1024, description="Largest webhook "
                                        "body the gateway reads (more → 413); it stops reading past this.")
    admission_max_backlog: int = Field(1000, ge=0, description="Admission control: run creations (POST "
                                       "/api/runs, rerun, a manual fire, a webhook) are refused with 429 "
                                       "rate_limited while this many run commands wait for the runtime "
                                       "(creations not yet decided, starts not yet taken by a replica): at most "
                                       "this many wait; 0: off.")
    admission_retry_after_s: int = Field(2, ge=1, le=3600, description="Retry-After (seconds) of a creation "
                                         "refused by admission control.")
    admission_cache_ms: int = Field(500, ge=0, le=60_000, description="How long a gateway replica reuses its "
                                    "reading of the runtime's backlog (two JetStream consumer look-ups) before "
                                    "reading it again; 0: at every creation.")

    @field_validator("agent_url_allowlist", mode="before")
    @classmethod
    def _split_allowlist(cls, value: Any) -> Any:
        """``LANGORCH_AGENT_URL_ALLOWLIST=10.0.0.0/8,agents.internal`` or a JSON list."""
        return split_list(value)


REDACTED_VALUE = "***REDACTED***"
TOKEN_URL_SCHEMES = frozenset({"nats", "tls", "ws", "wss"})
_QUERY_SECRET = re.compile(r"(?<=[?&])(password|passwd|pwd|token|secret|api_key|sslpassword)=[^&#]*", re.IGNORECASE)


def effective_settings(settings: BaseSettings) -> dict[str, Any]:
    """The effective settings as JSON, safe to publish (KV ``lo_presence``, ``GET /api/config``, api.md §14).

    Secrets appear as ``{"set": bool}``, header maps keep their keys with redacted values, and the password of
    every URL (``postgresql://user:pw@…``, ``nats://user:pw@…``) is redacted, wherever it is nested.
    """
    out: dict[str, Any] = {}
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if _is_secret(field.annotation) or isinstance(value, SecretStr):
            out[name] = {"set": value is not None and bool(value.get_secret_value())}
        elif name.endswith("headers") and isinstance(value, dict):
            out[name] = dict.fromkeys(value, REDACTED_VALUE)
        else:
            dumped = value.model_dump(mode="json") if isinstance(value, BaseModel) else value
            out[name] = _redact_urls(TypeAdapter(Any).dump_python(dumped, mode="json"))
    return out


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in get_args(annotation)


def _redact_urls(value: Any) -> Any:
    if isinstance(value, str):
        return redact_url_password(value)
    if isinstance(value, dict):
        return {k: _redact_urls(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact_urls(v) for v in value]
    return value


def redact_url_password(text: str) -> str:
    """``scheme://user:pw@host/…`` → ``scheme://user:***REDACTED***@host/…`` (each URL of a comma list too)."""
    return ",".join(_redact_one(part) for part in text.split(","))


def _redact_one(url: str) -> str:
    url = _QUERY_SECRET.sub(lambda m: f"{m.group(1)}={REDACTED_VALUE}", url)
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url
    authority, slash, tail = rest.partition("/")
    userinfo, at, host = authority.rpartition("@")
    if not at:
        return url
    if ":" not in userinfo:  # a bare user name, except NATS's token form nats://<token>@host
        return f"{scheme}://{REDACTED_VALUE}@{host}{slash}{tail}" if scheme in TOKEN_URL_SCHEMES else url
    user = userinfo.split(":", 1)[0]
    return f"{scheme}://{user}:{REDACTED_VALUE}@{host}{slash}{tail}"
