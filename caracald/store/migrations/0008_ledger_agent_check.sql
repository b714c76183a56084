-- Every ledger event names an agent that exists: checked once per statement instead of once per row.
-- The foreign key of 0001 ran a lookup and took a row lock for each inserted event; in the ledger writer's
-- batches of thousands that was about a third of PostgreSQL's work per event. The triggers below keep the
-- same guarantees: an insert (or an update of agent_id) names only existing agents and holds the same
-- FOR KEY SHARE locks on them until it commits; an agent with events can be neither deleted nor renumbered.
-- The error is the foreign key's (SQLSTATE 23503, same constraint name), so the writer's dead letters and
-- every caller see no difference.
ALTER TABLE ledger_events DROP CONSTRAINT ledger_events_agent_id_fkey;

CREATE FUNCTION caracal_ledger_agents_exist() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    missing uuid;
BEGIN
    -- Lock first: a concurrent delete of one of these agents finishes before the check below, which then
    -- (READ COMMITTED: a new snapshot per statement) sees the agent gone; a later delete waits for this
    -- transaction and then sees its events. Locked in key order, so two writers cannot deadlock here.
    PERFORM 1
       FROM agents a
      WHERE a.agent_id IN (SELECT DISTINCT n.agent_id FROM new_rows n)
      ORDER BY a.agent_id
        FOR KEY SHARE OF a;
    SELECT n.agent_id INTO missing
      FROM (SELECT DISTINCT agent_id FROM new_rows) n
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
    RETURN NULL;
END;
$$;
CREATE TRIGGER ledger_events_agents_exist_insert AFTER INSERT ON ledger_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_ledger_agents_exist();
CREATE TRIGGER ledger_events_agents_exist_update AFTER UPDATE ON ledger_events
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_ledger_agents_exist();

-- The other side of the foreign key: the agent row an event names stays.
CREATE FUNCTION caracal_agents_keep_ledger() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'UPDATE' AND NEW.agent_id = OLD.agent_id THEN
        RETURN NEW;
    END IF;
    IF EXISTS (SELECT 1 FROM ledger_events e WHERE e.agent_id = OLD.agent_id) THEN
        RAISE EXCEPTION 'update or delete on table "agents" violates foreign key constraint "%" on table "%"',
                        'ledger_events_agent_id_fkey', 'ledger_events'
              USING ERRCODE = 'foreign_key_violation',
                    DETAIL = format('Key (agent_id)=(%s) is still referenced from table "ledger_events".',
                                    OLD.agent_id),
                    TABLE = 'agents',
                    CONSTRAINT = 'ledger_events_agent_id_fkey';
    END IF;
    IF TG_OP = 'DELETE' THEN
        RETURN OLD;
    END IF;
    RETURN NEW;
END;
$$;
CREATE TRIGGER agents_keep_ledger BEFORE DELETE OR UPDATE OF agent_id ON agents
    FOR EACH ROW EXECUTE FUNCTION caracal_agents_keep_ledger();
