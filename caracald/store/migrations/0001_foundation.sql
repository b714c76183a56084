-- Agents, their credentials, budget policies with immutable versions, allowlists, the pricebook,
-- the ledger and the hash-chained audit log.

CREATE TABLE agents (
    agent_id     uuid PRIMARY KEY,
    name         text NOT NULL UNIQUE CHECK (length(name) BETWEEN 1 AND 200),
    description  text NOT NULL DEFAULT '',
    owner        text NOT NULL CHECK (length(owner) BETWEEN 1 AND 320),
    parent_id    uuid REFERENCES agents (agent_id),
    status       text NOT NULL CHECK (status IN ('active', 'suspended')),
    created_at   timestamptz NOT NULL,
    updated_at   timestamptz NOT NULL,
    CHECK (parent_id IS NULL OR parent_id <> agent_id)
);
CREATE INDEX agents_parent_idx ON agents (parent_id) WHERE parent_id IS NOT NULL;

-- Only a SHA-256 digest of the secret part of a key is kept; the public key id finds the row.
CREATE TABLE agent_credentials (
    credential_id uuid PRIMARY KEY,
    agent_id      uuid NOT NULL REFERENCES agents (agent_id),
    key_id        text NOT NULL UNIQUE,
    secret_hash   bytea NOT NULL CHECK (length(secret_hash) = 32),
    created_at    timestamptz NOT NULL,
    revoked_at    timestamptz
);
CREATE UNIQUE INDEX agent_credentials_one_live_key ON agent_credentials (agent_id) WHERE revoked_at IS NULL;

CREATE TABLE policies (
    policy_id       uuid PRIMARY KEY,
    agent_id        uuid NOT NULL REFERENCES agents (agent_id),
    current_version integer NOT NULL CHECK (current_version >= 1),
    created_at      timestamptz NOT NULL
);
CREATE INDEX policies_agent_idx ON policies (agent_id);

CREATE TABLE policy_versions (
    policy_id     uuid NOT NULL REFERENCES policies (policy_id),
    version       integer NOT NULL CHECK (version >= 1),
    limit_amount  numeric(38, 12) NOT NULL CHECK (limit_amount > 0),
    currency      char(3) NOT NULL,
    time_window   text NOT NULL CHECK (time_window IN ('hourly', 'daily', 'weekly', 'monthly')),
    window_type   text NOT NULL CHECK (window_type IN ('calendar', 'rolling')),
    timezone      text NOT NULL,
    status        text NOT NULL CHECK (status IN ('active', 'inactive')),
    change_reason text NOT NULL CHECK (length(btrim(change_reason)) > 0),
    changed_by    text NOT NULL,
    created_at    timestamptz NOT NULL,
    PRIMARY KEY (policy_id, version)
);

-- A version, once written, is history: refuse any change to it.
CREATE FUNCTION caracal_refuse_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows are immutable', TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
END;
$$;
CREATE TRIGGER policy_versions_immutable BEFORE UPDATE OR DELETE ON policy_versions
    FOR EACH ROW EXECUTE FUNCTION caracal_refuse_change();

CREATE TABLE allowlists (
    allowlist_id uuid PRIMARY KEY,
    agent_id     uuid NOT NULL REFERENCES agents (agent_id),
    pattern      text NOT NULL CHECK (length(pattern) BETWEEN 1 AND 2048),
    pattern_type text NOT NULL CHECK (pattern_type IN ('regex', 'glob')),
    status       text NOT NULL CHECK (status IN ('active', 'deleted')),
    created_by   text NOT NULL,
    created_at   timestamptz NOT NULL,
    deleted_at   timestamptz
);
CREATE INDEX allowlists_agent_idx ON allowlists (agent_id) WHERE status = 'active';

CREATE TABLE price_entries (
    price_id              uuid PRIMARY KEY,
    kind                  text NOT NULL CHECK (kind IN ('tokens', 'request')),
    model                 text,
    pattern               text,
    pattern_type          text CHECK (pattern_type IN ('regex', 'glob')),
    currency              char(3) NOT NULL,
    input_per_mtok        numeric(38, 12) CHECK (input_per_mtok >= 0),
    output_per_mtok       numeric(38, 12) CHECK (output_per_mtok >= 0),
    cached_input_per_mtok numeric(38, 12) CHECK (cached_input_per_mtok >= 0),
    per_request           numeric(38, 12) CHECK (per_request >= 0),
    per_unit              numeric(38, 12) CHECK (per_unit >= 0),
    unit                  text,
    effective_from        timestamptz NOT NULL,
    created_by            text NOT NULL,
    created_at            timestamptz NOT NULL,
    CHECK (
        (kind = 'tokens' AND model IS NOT NULL AND pattern IS NULL
            AND input_per_mtok IS NOT NULL AND output_per_mtok IS NOT NULL)
        OR (kind = 'request' AND pattern IS NOT NULL AND pattern_type IS NOT NULL AND model IS NULL
            AND per_request IS NOT NULL AND per_unit IS NOT NULL)
    )
);
CREATE UNIQUE INDEX price_entries_model_version ON price_entries (model, effective_from) WHERE kind = 'tokens';
CREATE UNIQUE INDEX price_entries_pattern_version ON price_entries (pattern, pattern_type, effective_from)
    WHERE kind = 'request';
CREATE TRIGGER price_entries_immutable BEFORE UPDATE OR DELETE ON price_entries
    FOR EACH ROW EXECUTE FUNCTION caracal_refuse_change();

-- One row per effect on spending. `cost` is the row's effect on spend (zero for a reservation or a
-- denial, which are kept for the record); `merkle_root_id` is filled when the row's batch is sealed.
CREATE TABLE ledger_events (
    event_id            bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    idempotency_key     uuid NOT NULL UNIQUE,
    event_type          text NOT NULL
        CHECK (event_type IN ('reservation', 'settlement', 'expiry', 'adjustment', 'denial')),
    agent_id            uuid NOT NULL REFERENCES agents (agent_id),
    request_id          uuid,
    occurred_at         timestamptz NOT NULL,
    recorded_at         timestamptz NOT NULL DEFAULT now(),
    resource            text NOT NULL DEFAULT '',
    model               text,
    input_tokens        bigint CHECK (input_tokens >= 0),
    output_tokens       bigint CHECK (output_tokens >= 0),
    cached_input_tokens bigint CHECK (cached_input_tokens >= 0),
    cost                numeric(38, 12) NOT NULL DEFAULT 0,
    currency            char(3) NOT NULL,
    metadata            jsonb NOT NULL DEFAULT '{}'::jsonb,
    merkle_root_id      uuid
);
CREATE INDEX ledger_events_agent_time_idx ON ledger_events (agent_id, occurred_at);
CREATE INDEX ledger_events_time_idx ON ledger_events (occurred_at);
CREATE INDEX ledger_events_merkle_idx ON ledger_events (merkle_root_id) WHERE merkle_root_id IS NOT NULL;

-- Append-only, each record carries the hash of the one before it.
CREATE TABLE audit_log (
    audit_id    bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    occurred_at timestamptz NOT NULL,
    actor       text NOT NULL,
    event_type  text NOT NULL,
    action      text NOT NULL,
    subject_id  text,
    agent_id    uuid,
    reason      text,
    details     jsonb NOT NULL,
    prev_hash   bytea NOT NULL CHECK (length(prev_hash) = 32),
    record_hash bytea NOT NULL UNIQUE CHECK (length(record_hash) = 32)
);
CREATE INDEX audit_log_time_idx ON audit_log (occurred_at);
CREATE INDEX audit_log_type_time_idx ON audit_log (event_type, occurred_at);
CREATE TRIGGER audit_log_append_only BEFORE UPDATE OR DELETE ON audit_log
    FOR EACH ROW EXECUTE FUNCTION caracal_refuse_change();
