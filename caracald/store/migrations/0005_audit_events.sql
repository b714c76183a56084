-- Audit events from the bus, and per-agent hourly spend totals.

-- The audit logger appends audit events consumed from caracal.audit.events; each carries an id, so that a
-- redelivered or replayed event is recognised and appended once. Records written directly by the CLI in
-- their own transaction have none (NULL, and NULLs do not collide). The id is a deduplication key, not part
-- of the hashed content: the chain covers what happened, as before.
ALTER TABLE audit_log ADD COLUMN event_id uuid UNIQUE;

-- Per agent, currency and UTC hour (the hour's first instant): what `ledger query` sums, so that a report
-- over months reads a few hundred rows instead of every event. `total` is the charged spend (settlements,
-- expiries and adjustments, as caracald.core.ledger.CHARGED_EVENT_TYPES), `spending_events` the events a
-- report counts (settlements and expiries, SPENDING_EVENT_TYPES), `ledger_events` every row, whatever its
-- type (a currency with only reservations still shows in a report, with a total of zero).
CREATE TABLE spend_totals (
    agent_id        uuid NOT NULL,
    currency        char(3) NOT NULL,
    bucket          timestamptz NOT NULL CHECK (bucket = date_trunc('hour', bucket, 'UTC')),
    total           numeric(38, 12) NOT NULL DEFAULT 0,
    spending_events bigint NOT NULL DEFAULT 0 CHECK (spending_events >= 0),
    ledger_events   bigint NOT NULL DEFAULT 0 CHECK (ledger_events >= 0),
    PRIMARY KEY (agent_id, bucket, currency)
);

-- Maintained in the transaction that inserts the events, from the statement's transition table, which
-- holds only the rows actually inserted: a row skipped by ON CONFLICT (idempotency_key) DO NOTHING -- a
-- replayed or duplicated event -- is not in it and counts nothing. Every insert path (the ledger writer's
-- COPY batches, the direct ledger sink, tools) goes through it. Rows are upserted in key order so that
-- concurrent writers lock shared rows in the same order. The ledger is append-only (sealed rows cannot
-- change, and nothing updates the amounts of unsealed ones), so inserts are all there is to follow;
-- caracald.store.spend_totals.rebuild recomputes the table from the events if ever needed.
CREATE FUNCTION caracal_spend_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO spend_totals AS t (agent_id, currency, bucket, total, spending_events, ledger_events)
    SELECT agent_id, currency, date_trunc('hour', occurred_at, 'UTC'),
           COALESCE(sum(cost) FILTER (WHERE event_type IN ('settlement', 'expiry', 'adjustment')), 0),
           count(*) FILTER (WHERE event_type IN ('settlement', 'expiry')),
           count(*)
      FROM new_rows
     GROUP BY 1, 2, 3
     ORDER BY 1, 3, 2
    ON CONFLICT (agent_id, bucket, currency) DO UPDATE
       SET total = t.total + EXCLUDED.total,
           spending_events = t.spending_events + EXCLUDED.spending_events,
           ledger_events = t.ledger_events + EXCLUDED.ledger_events;
    RETURN NULL;
END;
$$;
CREATE TRIGGER ledger_events_spend_totals AFTER INSERT ON ledger_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_spend_totals_add();

-- The events recorded before this migration.
INSERT INTO spend_totals (agent_id, currency, bucket, total, spending_events, ledger_events)
SELECT agent_id, currency, date_trunc('hour', occurred_at, 'UTC'),
       COALESCE(sum(cost) FILTER (WHERE event_type IN ('settlement', 'expiry', 'adjustment')), 0),
       count(*) FILTER (WHERE event_type IN ('settlement', 'expiry')),
       count(*)
  FROM ledger_events
 GROUP BY 1, 2, 3;
