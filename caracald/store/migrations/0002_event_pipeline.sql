-- The event pipeline: the embedded deployment's bus (an event log with per-group committed offsets)
-- and the dead letter queue every consumer writes what it cannot apply to.

-- One row per record; each topic has one logical partition (0). `log_offset` comes from a sequence, like a
-- bigserial, but it is assigned by the trigger below *after* taking a per-topic transaction lock, so offsets
-- of a topic become visible in order and a consumer reading "after offset N" never skips a row that commits
-- late with a lower offset. (A column default would be evaluated before the trigger, outside the lock.)
-- CACHE 1 matters: with a per-session cache, values would not be handed out in the order the lock grants.
CREATE SEQUENCE event_log_offset_seq AS bigint CACHE 1;

CREATE TABLE event_log (
    topic       text NOT NULL CHECK (length(topic) BETWEEN 1 AND 249),
    log_offset  bigint NOT NULL,
    key         bytea,
    payload     bytea NOT NULL,
    -- [[name, base64(value)], ...], in order; names may repeat, as Kafka headers may
    headers     jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(headers) = 'array'),
    produced_at timestamptz NOT NULL DEFAULT clock_timestamp(),
    PRIMARY KEY (topic, log_offset)
);
ALTER SEQUENCE event_log_offset_seq OWNED BY event_log.log_offset;
CREATE INDEX event_log_produced_idx ON event_log (produced_at);

CREATE FUNCTION caracal_event_log_assign_offset() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    -- Producers of one topic take turns from their first row until they commit (0x0CA7E100 is the
    -- event log's lock class, see caracald.bus.pg_log); re-taking a lock this transaction holds is free.
    PERFORM pg_advisory_xact_lock(212328704, hashtext(NEW.topic));
    NEW.log_offset := nextval('event_log_offset_seq');
    RETURN NEW;
END;
$$;
CREATE TRIGGER event_log_assign_offset BEFORE INSERT ON event_log
    FOR EACH ROW EXECUTE FUNCTION caracal_event_log_assign_offset();

-- Records are immutable; old ones may be deleted (retention) once every group has read them.
CREATE FUNCTION caracal_refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '% rows cannot be changed', TG_TABLE_NAME USING ERRCODE = 'integrity_constraint_violation';
END;
$$;
CREATE TRIGGER event_log_immutable BEFORE UPDATE ON event_log
    FOR EACH ROW EXECUTE FUNCTION caracal_refuse_update();

-- Wake the consumers of each topic a statement wrote to (one notification per topic and transaction).
CREATE FUNCTION caracal_event_log_notify() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    written text;
BEGIN
    FOR written IN SELECT DISTINCT topic FROM new_rows LOOP
        PERFORM pg_notify('caracal_event_log', written);
    END LOOP;
    RETURN NULL;
END;
$$;
CREATE TRIGGER event_log_notify AFTER INSERT ON event_log
    REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION caracal_event_log_notify();

-- Per consumer group and topic partition: the next offset the group will read (Kafka's convention).
CREATE TABLE consumer_offsets (
    consumer_group   text NOT NULL CHECK (length(consumer_group) BETWEEN 1 AND 255),
    topic            text NOT NULL,
    partition        integer NOT NULL DEFAULT 0 CHECK (partition >= 0),
    committed_offset bigint NOT NULL CHECK (committed_offset >= 0),
    committed_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (consumer_group, topic, partition)
);

-- Records a consumer could not apply, with where they came from and why. The same records also go to the
-- caracal.dlq topic; this table is what operators triage (`caracal dlq ...`): redrive or purge.
-- A record is dead-lettered once per consumer group: a replay that fails on it again finds its row.
CREATE TABLE dlq_events (
    dlq_id           bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    source_topic     text NOT NULL,
    source_partition integer NOT NULL CHECK (source_partition >= 0),
    source_offset    bigint NOT NULL CHECK (source_offset >= 0),
    consumer_group   text NOT NULL,
    message_key      bytea,
    payload          bytea NOT NULL,
    headers          jsonb NOT NULL DEFAULT '[]'::jsonb CHECK (jsonb_typeof(headers) = 'array'),
    error_type       text NOT NULL,
    error_message    text NOT NULL,
    retry_count      integer NOT NULL DEFAULT 0 CHECK (retry_count >= 0),
    failed_at        timestamptz NOT NULL,
    event_id         uuid,  -- the metering event's id, when the payload could be decoded
    status           text NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'redriven', 'purged')),
    resolved_at      timestamptz,
    resolved_by      text,
    UNIQUE (consumer_group, source_topic, source_partition, source_offset),
    CHECK ((status = 'pending') = (resolved_at IS NULL))
);
CREATE INDEX dlq_events_pending_idx ON dlq_events (failed_at) WHERE status = 'pending';
CREATE INDEX dlq_events_error_type_idx ON dlq_events (error_type, failed_at);
CREATE INDEX dlq_events_event_idx ON dlq_events (event_id) WHERE event_id IS NOT NULL;
