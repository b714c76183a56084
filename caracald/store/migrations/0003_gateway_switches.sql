-- Operator switches every gateway replica polls (at least once per second). `deny_all` on means every
-- request is refused with 403 deny_all until it is turned off again.
CREATE TABLE gateway_switches (
    name     text PRIMARY KEY CHECK (name IN ('deny_all')),
    enabled  boolean NOT NULL,
    reason   text NOT NULL DEFAULT '',
    set_by   text NOT NULL,
    set_at   timestamptz NOT NULL
);
