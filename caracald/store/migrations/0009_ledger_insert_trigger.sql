-- One pass over an insert's events instead of four. The ledger writer inserts thousands of events per
-- statement, and each statement-level trigger on the insert (agents exist: 0008; hourly and daily spend
-- totals: 0005, 0007) read the whole transition table twice, truncating every event's time to the hour and
-- to the day through a time-zone lookup: a fifth of PostgreSQL's work per event. Now one trigger sums the
-- inserted events once per agent, currency and UTC hour (date_bin: plain arithmetic, and in UTC the same
-- hours and days as date_trunc), and the agents check, the hours and the days all work from those few sums.
-- Same results, same errors, same locks in the same order: agents, then hours, then days, each in key order.
DROP TRIGGER ledger_events_agents_exist_insert ON ledger_events;
DROP TRIGGER ledger_events_spend_totals ON ledger_events;
DROP FUNCTION caracal_spend_totals_add();

-- The agents check of 0008, as a function of the agents named: the insert trigger below and 0008's update
-- trigger share it. Lock first: a concurrent delete of one of these agents finishes before the check,
-- which then (READ COMMITTED: a new snapshot per statement) sees the agent gone; a later delete waits for
-- this transaction and then sees its events. Locked in key order, so two writers cannot deadlock here.
CREATE FUNCTION caracal_agents_exist(named uuid[]) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    PERFORM 1
       FROM agents a
      WHERE a.agent_id = ANY (named)
      ORDER BY a.agent_id
        FOR KEY SHARE OF a;
    SELECT n.agent_id INTO missing
      FROM unnest(named) AS n(agent_id)
     WHERE NOT EXISTS (SELECT 1 FROM agents a WHERE a.agent_id = n.agent_id)
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'insert or update on table "ledger_events" violates foreign key constraint "%"',
                        'ledger_events_agent_id_fkey'
              USING ERRCODE = 'foreign_key_violation',
                    DETAIL = format('Key (agent_id)=(%s) is not present in table "agents".', missing),
                    TABLE = 'ledger_events',
                    COLUMN = 'agent_id',
                    CONSTRAINT = 'ledger_events_agent_id_fkey';
    END IF;
END;
$$;

CREATE OR REPLACE FUNCTION caracal_ledger_agents_exist() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM caracal_agents_exist(ARRAY(SELECT DISTINCT n.agent_id FROM new_rows n));
    RETURN NULL;
END;
$$;

CREATE FUNCTION caracal_ledger_events_inserted() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    hours spend_totals[];
BEGIN
    SELECT array_agg(ROW(h.agent_id, h.currency, h.bucket, h.total, h.spending_events, h.ledger_events)::spend_totals
                     ORDER BY h.agent_id, h.bucket, h.currency)
      INTO hours
      FROM (SELECT n.agent_id, n.currency,
                   date_bin('1 hour', n.occurred_at, TIMESTAMPTZ '2000-01-01 00:00:00+00') AS bucket,
                   COALESCE(sum(n.cost) FILTER (WHERE n.event_type IN ('settlement', 'expiry', 'adjustment')), 0)
                       AS total,
                   count(*) FILTER (WHERE n.event_type IN ('settlement', 'expiry')) AS spending_events,
                   count(*) AS ledger_events
              FROM new_rows n
             GROUP BY 1, 2, 3) h;
    IF hours IS NULL THEN
        RETURN NULL;  -- nothing inserted (every row skipped by ON CONFLICT DO NOTHING)
    END IF;

    PERFORM caracal_agents_exist(ARRAY(SELECT DISTINCT h.agent_id FROM unnest(hours) h));

    INSERT INTO spend_totals AS t (agent_id, currency, bucket, total, spending_events, ledger_events)
    SELECT h.agent_id, h.currency, h.bucket, h.total, h.spending_events, h.ledger_events
      FROM unnest(hours) WITH ORDINALITY h
     ORDER BY h.ordinality
    ON CONFLICT (agent_id, bucket, currency) DO UPDATE
       SET total = t.total + EXCLUDED.total,
           spending_events = t.spending_events + EXCLUDED.spending_events,
           ledger_events = t.ledger_events + EXCLUDED.ledger_events;

    -- Every hour lies in one UTC day: a day's sums are its hours' sums.
    INSERT INTO spend_daily AS d (agent_id, currency, day, total, spending_events, ledger_events)
    SELECT h.agent_id, h.currency, date_bin('1 day', h.bucket, TIMESTAMPTZ '2000-01-01 00:00:00+00'),
           sum(h.total), sum(h.spending_events), sum(h.ledger_events)
      FROM unnest(hours) h
     GROUP BY 1, 2, 3
     ORDER BY 1, 3, 2
    ON CONFLICT (agent_id, day, currency) DO UPDATE
       SET total = d.total + EXCLUDED.total,
           spending_events = d.spending_events + EXCLUDED.spending_events,
           ledger_events = d.ledger_events + EXCLUDED.ledger_events;
    RETURN NULL;
END;
$$;
CREATE TRIGGER ledger_events_inserted AFTER INSERT ON ledger_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_ledger_events_inserted();
