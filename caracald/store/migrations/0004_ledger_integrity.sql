-- Ledger integrity (DESIGN invariant 5): every ledger event sealed into exactly one Merkle batch
-- (RFC 9162 hashing), each batch's root signed with a key id and chained to the one before it.
-- See docs/ledger-encoding.md for the bytes that are hashed and caracald/integrity for the code.

-- Filled when an event is sealed: its position in the tree (seq = leaf index + 1, gap-free, assigned in
-- event_id order within a batch) and the canonical bytes its leaf hash covers, stored exactly as hashed.
ALTER TABLE ledger_events
    ADD COLUMN seq bigint UNIQUE CHECK (seq >= 1),
    ADD COLUMN canonical bytea;
ALTER TABLE ledger_events ADD CONSTRAINT ledger_events_sealed_together
    CHECK ((seq IS NULL) = (canonical IS NULL) AND (seq IS NULL) = (merkle_root_id IS NULL));
-- The sealer's queue: events waiting for a batch, oldest first.
CREATE INDEX ledger_events_unsealed_idx ON ledger_events (event_id) WHERE seq IS NULL;
-- The time index, now carrying seq: verifying a time range finds which seqs its events have with an
-- index-only scan. It serves every query the plain time index did, which it replaces.
CREATE INDEX ledger_events_time_seq_idx ON ledger_events (occurred_at) INCLUDE (seq);
DROP INDEX ledger_events_time_idx;

-- Public halves of the signing keys, current and retired, so that any checkpoint can be checked.
-- Private keys never come here: they are files with mode 0600 (integrity.key_dir). A verifier does
-- not take its trust from this table (whoever can write it could add a key): it trusts the public key
-- files it is given; this table is the history and what a third party is told.
CREATE TABLE merkle_keys (
    key_name   text NOT NULL CHECK (key_name ~ '^[A-Za-z0-9._-]{1,200}$'),
    key_id     text NOT NULL CHECK (key_id ~ '^[0-9a-f]{8}$'),
    algorithm  text NOT NULL CHECK (algorithm IN ('ed25519', 'ecdsa-p256')),
    public_key text NOT NULL UNIQUE,  -- the signed-note verifier key: <name>+<key id>+<base64 key>
    created_at timestamptz NOT NULL,
    retired_at timestamptz,
    PRIMARY KEY (key_name, key_id)
);
-- One key signs at a time.
CREATE UNIQUE INDEX merkle_keys_one_active ON merkle_keys ((retired_at IS NULL)) WHERE retired_at IS NULL;

-- One row per sealed batch: the events with seq first_seq..last_seq, and the signed checkpoint of the
-- whole tree after them. A batch verifies from its own rows plus what is stored here: the frontier of the
-- tree before it (whose root must be the previous checkpoint's root) extended by its leaves must give
-- root_hash, and `checkpoint` (a C2SP signed note, caracald.core.signing) must sign exactly that.
CREATE TABLE merkle_batches (
    batch_id             uuid PRIMARY KEY,
    first_seq            bigint NOT NULL UNIQUE CHECK (first_seq >= 1),
    last_seq             bigint NOT NULL UNIQUE,
    event_count          integer NOT NULL CHECK (event_count >= 1),
    tree_size            bigint NOT NULL UNIQUE,
    previous_tree_size   bigint NOT NULL UNIQUE CHECK (previous_tree_size >= 0),
    root_hash            bytea NOT NULL CHECK (length(root_hash) = 32),
    -- the perfect subtree roots of the tree before this batch, largest first (32 bytes each)
    start_frontier       bytea NOT NULL CHECK (length(start_frontier) % 32 = 0),
    -- RFC 9162 consistency proof from the previous checkpoint to this one (empty for the first batch)
    consistency_proof    bytea NOT NULL CHECK (length(consistency_proof) % 32 = 0),
    -- this batch's leaf hashes in seq order (32 bytes each): proves one event without reading the batch
    leaf_hashes          bytea NOT NULL CHECK (length(leaf_hashes) % 32 = 0),
    -- the roots of the aligned 32-leaf blocks (leaves 32k..32k+31, k counted from the first leaf of the
    -- tree) lying wholly in this batch, in order: an event's audit path then needs ~60 hashes, not ~1000
    block_hashes         bytea NOT NULL CHECK (length(block_hashes) % 32 = 0),
    checkpoint           text NOT NULL,
    key_name             text NOT NULL,
    key_id               text NOT NULL CHECK (key_id ~ '^[0-9a-f]{8}$'),
    min_occurred_at      timestamptz NOT NULL,
    max_occurred_at      timestamptz NOT NULL,
    created_at           timestamptz NOT NULL,
    -- the last verification's outcome (informational: a verifier never trusts these columns)
    verified_at          timestamptz,
    verification_status  text CHECK (verification_status IN ('passed', 'failed')),
    verification_problem text,
    CHECK (last_seq = first_seq + event_count - 1),
    CHECK (tree_size = last_seq AND previous_tree_size = first_seq - 1),
    CHECK (length(leaf_hashes) = 32 * event_count)
);
CREATE INDEX merkle_batches_occurred_idx ON merkle_batches (min_occurred_at, max_occurred_at);

-- The tree as the sealer left it, to extend it with the next batch without re-reading old leaves.
CREATE TABLE merkle_state (
    singleton     boolean PRIMARY KEY DEFAULT true CHECK (singleton),
    origin        text NOT NULL,  -- the checkpoints' first line: names this ledger
    tree_size     bigint NOT NULL CHECK (tree_size >= 0),
    frontier      bytea NOT NULL CHECK (length(frontier) % 32 = 0),
    last_batch_id uuid,
    updated_at    timestamptz NOT NULL
);
INSERT INTO merkle_state (origin, tree_size, frontier, updated_at)
VALUES ('caracal.ledger/' || gen_random_uuid(), 0, '\x'::bytea, now());

-- Sealed rows are history: refuse changing or deleting them (sealing itself fills seq, canonical and
-- merkle_root_id of rows not sealed yet). The WHEN conditions keep the check in the executor: the function
-- runs only to refuse. Tampering needs a superuser who disables these triggers; the verifier finds it.
CREATE FUNCTION caracal_refuse_sealed_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION 'ledger event % is sealed: sealed ledger events cannot be changed or deleted', OLD.event_id
        USING ERRCODE = 'integrity_constraint_violation';
END;
$$;
CREATE TRIGGER ledger_events_sealed_update BEFORE UPDATE ON ledger_events
    FOR EACH ROW WHEN (OLD.seq IS NOT NULL)
    EXECUTE FUNCTION caracal_refuse_sealed_change();
CREATE TRIGGER ledger_events_sealed_delete BEFORE DELETE ON ledger_events
    FOR EACH ROW WHEN (OLD.seq IS NOT NULL)
    EXECUTE FUNCTION caracal_refuse_sealed_change();

-- A batch, once written, only gets its verification outcome recorded.
CREATE FUNCTION caracal_merkle_batches_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE'
       OR (OLD.batch_id, OLD.first_seq, OLD.last_seq, OLD.event_count, OLD.tree_size, OLD.previous_tree_size,
           OLD.root_hash, OLD.start_frontier, OLD.consistency_proof, OLD.leaf_hashes, OLD.block_hashes,
           OLD.checkpoint,
           OLD.key_name, OLD.key_id, OLD.min_occurred_at, OLD.max_occurred_at, OLD.created_at)
          IS DISTINCT FROM
          (NEW.batch_id, NEW.first_seq, NEW.last_seq, NEW.event_count, NEW.tree_size, NEW.previous_tree_size,
           NEW.root_hash, NEW.start_frontier, NEW.consistency_proof, NEW.leaf_hashes, NEW.block_hashes,
           NEW.checkpoint,
           NEW.key_name, NEW.key_id, NEW.min_occurred_at, NEW.max_occurred_at, NEW.created_at) THEN
        RAISE EXCEPTION 'merkle batches are immutable' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER merkle_batches_immutable BEFORE UPDATE OR DELETE ON merkle_batches
    FOR EACH ROW EXECUTE FUNCTION caracal_merkle_batches_guard();

-- Keys are never forgotten (old checkpoints need them); a key can only be retired, once.
CREATE FUNCTION caracal_merkle_keys_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' OR OLD.retired_at IS NOT NULL
       OR (OLD.key_name, OLD.key_id, OLD.algorithm, OLD.public_key, OLD.created_at)
          IS DISTINCT FROM (NEW.key_name, NEW.key_id, NEW.algorithm, NEW.public_key, NEW.created_at) THEN
        RAISE EXCEPTION 'merkle keys can only be retired' USING ERRCODE = 'integrity_constraint_violation';
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER merkle_keys_retire_only BEFORE UPDATE OR DELETE ON merkle_keys
    FOR EACH ROW EXECUTE FUNCTION caracal_merkle_keys_guard();
