-- Ledger snapshots (`caracal snapshot create`): a point-in-time record of the ledger -- per agent, currency
-- and UTC day, the charged spend and the number of events up to `last_event_id`, and the latest signed
-- Merkle checkpoint then. `document` is the canonical JSON text exactly as hashed (`sha256`, hex), so a
-- restore can tell a damaged snapshot from a damaged ledger.
CREATE TABLE ledger_snapshots (
    snapshot_id   uuid PRIMARY KEY,
    created_at    timestamptz NOT NULL,
    created_by    text NOT NULL,
    last_event_id bigint NOT NULL CHECK (last_event_id >= 0),
    total_events  bigint NOT NULL CHECK (total_events >= 0),
    merkle_root   text,
    tree_size     bigint,
    document      text NOT NULL,
    sha256        text NOT NULL CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    size_bytes    bigint NOT NULL CHECK (size_bytes >= 0)
);
CREATE INDEX ledger_snapshots_created_idx ON ledger_snapshots (created_at);
