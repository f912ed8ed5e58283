-- 004_wake: writers notify only when the relay sleeps.
--
-- A NOTIFY makes PostgreSQL commit the notifying transactions one at a time, each behind the
-- previous one's WAL flush: flat out, writers that notify on every commit lost a third of their
-- commits per second. The relay needs a wake-up only when it sleeps; while it reads the outbox it
-- finds the new rows by itself. Two advisory locks, keyed by the outbox's name, tell the writers
-- which it is; the relay takes both with pg_advisory_lock, session-level:
--
--   * the awake lock: the relay holds it exclusively while it follows this protocol. A writer
--     that can take it in share mode has no such relay (none runs, or an older one): it
--     notifies, as every writer did before.
--   * the sleep lock: the relay takes it exclusively before it sleeps and lets it go when it
--     reads again. A writer that cannot take it in share mode (the relay holds it, or waits for
--     it) notifies. One that takes it, and so does not notify, keeps it until its transaction
--     ends: the relay's lock waits for that, and the relay reads the outbox once more after it
--     got the lock and before it sleeps, so it sees that writer's rows.
--
-- The try functions never wait: a writer is never held up by the relay.
CREATE OR REPLACE FUNCTION {{.NotifyFunc}}() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF pg_try_advisory_xact_lock_shared(hashtextextended({{.AwakeKey}}, 0)) THEN
        PERFORM pg_notify({{.ChannelLiteral}}, '');
    ELSIF NOT pg_try_advisory_xact_lock_shared(hashtextextended({{.SleepKey}}, 0)) THEN
        PERFORM pg_notify({{.ChannelLiteral}}, '');
    END IF;
    RETURN NULL;
END
$$;
