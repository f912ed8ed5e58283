-- 001_outbox: the outbox table (the public contract), its parked table and the NOTIFY wake-up.
-- Placeholders in double braces are replaced with quoted identifiers by `outbox-relay migrate`.

CREATE TABLE IF NOT EXISTS {{.Outbox}} (
    -- Columns a writer sets.
    aggregate_type  text        NOT NULL,
    aggregate_id    text,                   -- the Kafka record key; NULL or '' is parked with a reason
    event_type      text        NOT NULL,
    payload         bytea,                  -- NULL is parked unless tombstones are enabled
    topic           text,                   -- overrides the topic template when set
    headers         jsonb,                  -- an object of string values, copied to record headers
    event_id        uuid        NOT NULL DEFAULT gen_random_uuid(),
    occurred_at     timestamptz NOT NULL DEFAULT now(),
    -- Columns that belong to the relay.
    id              bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    created_at      timestamptz NOT NULL DEFAULT clock_timestamp(),
    attempts        integer     NOT NULL DEFAULT 0,
    next_attempt_at timestamptz,
    last_error      text,
    dispatched_at   timestamptz
);

-- The relay reads pending rows in id order through this partial index; dispatched rows kept for
-- retention never enter it.
CREATE INDEX IF NOT EXISTS {{.Name "pending_idx"}} ON {{.Outbox}} (id) WHERE dispatched_at IS NULL;
-- Rows that failed at least once: small, read to know which keys wait behind a failing row.
CREATE INDEX IF NOT EXISTS {{.Name "failing_idx"}} ON {{.Outbox}} (aggregate_type, aggregate_id, id)
    WHERE attempts > 0 AND dispatched_at IS NULL;
-- Retention mode purges dispatched rows oldest first.
CREATE INDEX IF NOT EXISTS {{.Name "dispatched_idx"}} ON {{.Outbox}} (dispatched_at)
    WHERE dispatched_at IS NOT NULL;

-- Rows that could not be published after the configured attempts, or that are invalid.
CREATE TABLE IF NOT EXISTS {{.Parked}} (
    id              bigint      PRIMARY KEY,
    event_id        uuid        NOT NULL,
    aggregate_type  text        NOT NULL,
    aggregate_id    text,
    event_type      text        NOT NULL,
    payload         bytea,
    topic           text,
    headers         jsonb,
    occurred_at     timestamptz NOT NULL,
    created_at      timestamptz NOT NULL,
    attempts        integer     NOT NULL,
    reason          text        NOT NULL,
    parked_at       timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX IF NOT EXISTS {{.Name "parked_key_idx"}} ON {{.Parked}} (aggregate_type, aggregate_id);

-- A statement-level trigger sends one empty notification per INSERT statement: a wake-up hint,
-- never the row, so events of any size never make a writer fail.
CREATE OR REPLACE FUNCTION {{.NotifyFunc}}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify({{.ChannelLiteral}}, '');
    RETURN NULL;
END
$$;

DROP TRIGGER IF EXISTS {{.Name "notify"}} ON {{.Outbox}};
CREATE TRIGGER {{.Name "notify"}} AFTER INSERT ON {{.Outbox}}
    FOR EACH STATEMENT EXECUTE FUNCTION {{.NotifyFunc}}();
