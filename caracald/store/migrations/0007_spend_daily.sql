-- Per-agent daily spend totals: the hourly `spend_totals` (0005) rolled up per UTC day, kept by the same
-- trigger in the same transaction. A month-long budget window then reads about 30 day rows and the few
-- dozen hour rows at its ends instead of some 700 hour rows per agent: with a thousand agents, the
-- difference between a dashboard refresh in tens of milliseconds and one in hundreds.
-- No hour may change between the back-fill below and the new trigger taking over: writers wait for this
-- transaction, which sums the hour rows once.
LOCK TABLE spend_totals IN SHARE ROW EXCLUSIVE MODE;

CREATE TABLE spend_daily (
    agent_id        uuid NOT NULL,
    currency        char(3) NOT NULL,
    day             timestamptz NOT NULL CHECK (day = date_trunc('day', day, 'UTC')),
    total           numeric(38, 12) NOT NULL DEFAULT 0,
    spending_events bigint NOT NULL DEFAULT 0 CHECK (spending_events >= 0),
    ledger_events   bigint NOT NULL DEFAULT 0 CHECK (ledger_events >= 0),
    PRIMARY KEY (agent_id, day, currency)
);

-- As before for the hours, then the days. Every writer locks hour rows in key order and then day rows in
-- key order, so two writers sharing rows still cannot deadlock.
CREATE OR REPLACE FUNCTION caracal_spend_totals_add() RETURNS trigger LANGUAGE plpgsql AS $$
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
    INSERT INTO spend_daily AS d (agent_id, currency, day, total, spending_events, ledger_events)
    SELECT agent_id, currency, date_trunc('day', occurred_at, 'UTC'),
           COALESCE(sum(cost) FILTER (WHERE event_type IN ('settlement', 'expiry', 'adjustment')), 0),
           count(*) FILTER (WHERE event_type IN ('settlement', 'expiry')),
           count(*)
      FROM new_rows
     GROUP BY 1, 2, 3
     ORDER BY 1, 3, 2
    ON CONFLICT (agent_id, day, currency) DO UPDATE
       SET total = d.total + EXCLUDED.total,
           spending_events = d.spending_events + EXCLUDED.spending_events,
           ledger_events = d.ledger_events + EXCLUDED.ledger_events;
    RETURN NULL;
END;
$$;

-- The days recorded so far, from their hours (the same sums: every hour lies in one UTC day).
INSERT INTO spend_daily (agent_id, currency, day, total, spending_events, ledger_events)
SELECT agent_id, currency, date_trunc('day', bucket, 'UTC'), sum(total), sum(spending_events), sum(ledger_events)
  FROM spend_totals
 GROUP BY 1, 2, 3;
