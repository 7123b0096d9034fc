-- Projections of LO_EVT (api.md §1.5). Every row derives from events only, so a rebuild is row-for-row equal.
CREATE TABLE IF NOT EXISTS projection_positions (
    name        text PRIMARY KEY,
    position    bigint NOT NULL
);

-- messages a projector skipped because they could not be decoded or applied (poison), kept for operators
CREATE TABLE IF NOT EXISTS projection_dead_letters (
    name        text NOT NULL,
    position    bigint NOT NULL,
    subject     text NOT NULL,
    error       text NOT NULL,
    recorded_at timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (name, position)
);

CREATE TABLE IF NOT EXISTS procedures (
    procedure_id      text NOT NULL,
    version           text NOT NULL,
    name              text,
    description       text,
    status            text NOT NULL,
    release_channel   text NOT NULL,
    project_id        text,
    tags              jsonb NOT NULL,
    content_hash      text NOT NULL,
    compiler_version  text NOT NULL,
    ir_key            text NOT NULL,
    ckp_json          jsonb NOT NULL,
    variables_schema  jsonb NOT NULL,
    trigger           jsonb,
    effective_date    text,
    diagnostics       jsonb NOT NULL,
    revision          integer NOT NULL,
    created_at        timestamptz NOT NULL,
    created_by        text NOT NULL,
    updated_at        timestamptz NOT NULL,
    position          bigint NOT NULL,
    PRIMARY KEY (procedure_id, version)
);
CREATE INDEX IF NOT EXISTS procedures_created_at ON procedures (created_at DESC, procedure_id, version);

CREATE TABLE IF NOT EXISTS runs (
    run_id            text PRIMARY KEY,
    procedure_id      text NOT NULL,
    procedure_version text NOT NULL,
    release_channel   text,
    status            text NOT NULL,
    input_vars        jsonb NOT NULL,
    output_vars       jsonb,
    error             jsonb,
    last_node_id      text,
    last_step_id      text,
    trigger_type      text NOT NULL,
    triggered_by      text,
    created_by        text NOT NULL,
    project_id        text,
    parent_run_id     text,
    parent_node_id    text,
    root_run_id       text,
    rerun_of          text,
    retry_count       integer NOT NULL DEFAULT 0,
    cancel_requested_at timestamptz,
    created_at        timestamptz NOT NULL,
    started_at        timestamptz,
    ended_at          timestamptz,
    updated_at        timestamptz NOT NULL,
    seq               integer NOT NULL,
    position          bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS runs_created_at ON runs (created_at DESC, run_id);
CREATE INDEX IF NOT EXISTS runs_procedure ON runs (procedure_id, procedure_version);

CREATE TABLE IF NOT EXISTS run_events (
    run_id      text NOT NULL,
    seq         integer NOT NULL,
    event_id    text NOT NULL UNIQUE,
    stream_seq  bigint NOT NULL UNIQUE,
    event_type  text NOT NULL,
    node_id     text,
    step_id     text,
    attempt     integer,
    actor       text NOT NULL,
    payload     jsonb NOT NULL,
    created_at  timestamptz NOT NULL,
    PRIMARY KEY (run_id, seq)
);

-- issue 5: lifecycle, search and deployment records of procedures
ALTER TABLE procedures ADD COLUMN IF NOT EXISTS promoted_from_version text;
ALTER TABLE procedures ADD COLUMN IF NOT EXISTS promoted_at timestamptz;
ALTER TABLE procedures ADD COLUMN IF NOT EXISTS promoted_by text;
ALTER TABLE procedures ADD COLUMN IF NOT EXISTS retrieval_metadata jsonb;
ALTER TABLE procedures ADD COLUMN IF NOT EXISTS search_text text NOT NULL DEFAULT '';
CREATE INDEX IF NOT EXISTS procedures_project ON procedures (project_id);

CREATE TABLE IF NOT EXISTS procedure_deployments (
    deployment_id     text PRIMARY KEY,
    procedure_id      text NOT NULL,
    action            text NOT NULL,
    target_channel    text NOT NULL,
    deployed_version  text NOT NULL,
    replaced_version  text,
    deployed_by       text NOT NULL,
    deployed_at       timestamptz NOT NULL,
    reason            text,
    position          bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS procedure_deployments_procedure ON procedure_deployments (procedure_id, position DESC);

CREATE TABLE IF NOT EXISTS projects (
    project_id   text PRIMARY KEY,
    name         text NOT NULL,
    description  text,
    created_at   timestamptz NOT NULL,
    created_by   text NOT NULL,
    updated_at   timestamptz NOT NULL,
    seq          integer NOT NULL,
    position     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS projects_name ON projects (lower(name));

CREATE TABLE IF NOT EXISTS agents (
    agent_id               text PRIMARY KEY,
    name                   text NOT NULL,
    channel                text NOT NULL,
    protocol               text NOT NULL,
    base_url               text NOT NULL,
    status                 text NOT NULL,
    concurrency_limit      integer NOT NULL,
    resource_key           text NOT NULL,
    pool_id                text NOT NULL,
    capabilities           jsonb NOT NULL,
    labels                 jsonb NOT NULL,
    auth                   jsonb NOT NULL,
    token_sha256           text NOT NULL,
    circuit_state          text NOT NULL DEFAULT 'closed',
    consecutive_failures   integer NOT NULL DEFAULT 0,
    circuit_open_at        timestamptz,
    registered_by          text NOT NULL,
    created_at             timestamptz NOT NULL,
    updated_at             timestamptz NOT NULL,
    seq                    integer NOT NULL,
    position               bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS agents_channel ON agents (channel, pool_id);
CREATE INDEX IF NOT EXISTS agents_token ON agents (token_sha256);

ALTER TABLE runs ADD COLUMN IF NOT EXISTS cancel_requested_at timestamptz;

-- Not a projection (api.md §1.5): submitted requests with an Idempotency-Key and their response snapshots.
-- A cache: losing it loses only the idempotent replay of old requests. Survives `projections rebuild`.
CREATE TABLE IF NOT EXISTS api_commands (
    principal         text NOT NULL,
    idempotency_key   text NOT NULL,
    request_hash      text NOT NULL,
    method            text NOT NULL,
    path              text NOT NULL,
    command_id        text NOT NULL,
    state             text NOT NULL,
    response_status   integer,
    response_body     bytea,
    response_headers  jsonb,
    submitted_at      timestamptz NOT NULL,
    PRIMARY KEY (principal, idempotency_key)
);
ALTER TABLE runs ADD COLUMN IF NOT EXISTS total_prompt_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS total_completion_tokens bigint NOT NULL DEFAULT 0;
ALTER TABLE runs ADD COLUMN IF NOT EXISTS estimated_cost_usd double precision NOT NULL DEFAULT 0;

-- Not a projection: every command the gateway published (api.md §3 GET /api/commands/{id}); its outcome is
-- looked up on the aggregate's events by causation id.
CREATE TABLE IF NOT EXISTS api_command_log (
    command_id    text PRIMARY KEY,
    command_type  text NOT NULL,
    actor         text NOT NULL,
    aggregate     text NOT NULL,
    aggregate_id  text NOT NULL,
    resource      text,
    submitted_at  timestamptz NOT NULL
);

-- issue 5: approvals (api.md §6) and what a paused run waits on (api.md §5.1)
CREATE TABLE IF NOT EXISTS approvals (
    approval_id        text PRIMARY KEY,
    run_id             text NOT NULL,
    procedure_id       text,
    procedure_version  text,
    node_id            text,
    node_name          text,
    project_id         text,
    prompt             text NOT NULL,
    context_data       jsonb,
    decision_type      text NOT NULL,
    options            jsonb NOT NULL,
    input_schema       jsonb NOT NULL,
    status             text NOT NULL,
    decision           text,
    decided_by         text,
    decided_at         timestamptz,
    comment            text,
    decision_payload   jsonb,
    created_at         timestamptz NOT NULL,
    expires_at         timestamptz,
    timeout_action     text,
    escalation_contact text,
    approval_level     text,
    updated_at         timestamptz NOT NULL,
    seq                integer NOT NULL,
    position           bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS approvals_created_at ON approvals (created_at DESC, approval_id);
CREATE INDEX IF NOT EXISTS approvals_run ON approvals (run_id);
CREATE INDEX IF NOT EXISTS approvals_status ON approvals (status, expires_at);
ALTER TABLE runs ADD COLUMN IF NOT EXISTS waiting_on jsonb;

-- issue: artifacts of runs (api.md §5.8), from artifact_created run events
CREATE TABLE IF NOT EXISTS run_artifacts (
    artifact_id  text PRIMARY KEY,
    run_id       text NOT NULL,
    node_id      text,
    step_id      text,
    kind         text NOT NULL,
    name         text,
    uri          text,
    mime_type    text,
    size_bytes   bigint,
    stored       boolean NOT NULL,
    created_at   timestamptz NOT NULL,
    position     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS run_artifacts_run ON run_artifacts (run_id, created_at, artifact_id);
CREATE INDEX IF NOT EXISTS runs_parent ON runs (parent_run_id, created_at);

-- The audit log (api.md §12): a projection of stream LO_AUDIT with its own position ("audit"); one row per
-- record, keyed by event_id (a command's id for command outcomes), so a record published twice lands once.
CREATE TABLE IF NOT EXISTS audit_log (
    event_id        text PRIMARY KEY,
    ts              timestamptz NOT NULL,
    category        text NOT NULL,
    action          text NOT NULL,
    outcome         text NOT NULL,
    actor           text NOT NULL,
    actor_kind      text NOT NULL,
    description     text NOT NULL,
    resource_type   text,
    resource_id     text,
    request_id      text,
    command_id      text,
    correlation_id  text,
    auth_disabled   boolean NOT NULL,
    meta            jsonb NOT NULL,
    position        bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_log_ts ON audit_log (ts DESC, event_id DESC);
CREATE INDEX IF NOT EXISTS audit_log_resource ON audit_log (resource_type, resource_id);
CREATE INDEX IF NOT EXISTS audit_log_request ON audit_log (request_id);

-- issue 15: users and API keys (api.md §2.3), gateway-owned aggregates. password_hash (argon2id) is read only to
-- check a login; no view returns it.
CREATE TABLE IF NOT EXISTS users (
    user_id        text PRIMARY KEY,
    username       text NOT NULL UNIQUE,
    email          text NOT NULL,
    full_name      text,
    roles          jsonb NOT NULL,
    is_active      boolean NOT NULL,
    password_hash  text NOT NULL,
    created_at     timestamptz NOT NULL,
    created_by     text NOT NULL,
    updated_at     timestamptz NOT NULL,
    last_login_at  timestamptz,
    seq            integer NOT NULL,
    position       bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS users_created ON users (created_at, user_id);

CREATE TABLE IF NOT EXISTS api_keys (
    key_id       text PRIMARY KEY,
    name         text NOT NULL,
    description  text,
    roles        jsonb NOT NULL,
    key_sha256   text NOT NULL,
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL,
    expires_at   timestamptz,
    revoked_at   timestamptz,
    seq          integer NOT NULL,
    position     bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS api_keys_created ON api_keys (created_at, key_id);

-- Not a projection: when each API key was last used (written at most once a minute per key and replica, no event
-- per request). Survives `projections rebuild`; losing it loses only last_used_at.
CREATE TABLE IF NOT EXISTS api_key_usage (
    key_id        text PRIMARY KEY,
    last_used_at  timestamptz NOT NULL
);

-- issue 15: secret metadata records (api.md §11); never a value
CREATE TABLE IF NOT EXISTS secrets (
    name          text PRIMARY KEY,
    provider      text NOT NULL,
    provider_ref  text,
    description   text,
    tags          jsonb NOT NULL,
    last_check    jsonb,
    created_at    timestamptz NOT NULL,
    created_by    text NOT NULL,
    updated_at    timestamptz NOT NULL,
    seq           integer NOT NULL,
    position      bigint NOT NULL
);

-- issue 16: trigger registrations and their fires (api.md §10), from the trigger aggregate's events
CREATE TABLE IF NOT EXISTS triggers (
    trigger_id             text PRIMARY KEY,
    procedure_id           text NOT NULL,
    version                text NOT NULL,
    trigger_type           text NOT NULL,
    schedule               text,
    timezone               text NOT NULL,
    webhook_secret         text,
    signature_scheme       text NOT NULL,
    event_source           text,
    input_vars             jsonb NOT NULL,
    dedupe_window_seconds  integer NOT NULL,
    max_concurrent_runs    integer,
    enabled                boolean NOT NULL,
    source                 text NOT NULL,
    revision               integer NOT NULL,
    created_at             timestamptz NOT NULL,
    created_by             text NOT NULL,
    updated_at             timestamptz NOT NULL,
    last_fired_at          timestamptz,
    last_run_id            text,
    seq                    integer NOT NULL,
    position               bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS triggers_procedure ON triggers (procedure_id, version);
CREATE TABLE IF NOT EXISTS trigger_fires (
    fire_id        text PRIMARY KEY,
    trigger_id     text NOT NULL,
    fired_at       timestamptz NOT NULL,
    outcome        text NOT NULL,
    reason         text,
    run_id         text,
    trigger_type   text NOT NULL,
    triggered_by   text,
    source_detail  jsonb NOT NULL,
    position       bigint NOT NULL
);
CREATE INDEX IF NOT EXISTS trigger_fires_trigger ON trigger_fires (trigger_id, fired_at DESC, fire_id);
