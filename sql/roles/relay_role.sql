-- Least-privilege role for outbox-relay: no DDL, only what the relay does on its own tables
-- (read, mark and delete outbox rows; move poison rows to the parked table; pin topics' partition
-- counts; read migrations).
-- Run as the tables' owner after `outbox-relay migrate`, for example:
--   psql -v role=outbox_relay -v password="$RELAY_PASSWORD" -v schema=public -v table=outbox -f relay_role.sql
-- Every variable is optional: role outbox_relay, schema public, table outbox; without password
-- the role gets none (for certificate or peer authentication). Running it again is harmless.
-- `outbox-relay parked retry` inserts into the outbox and `outbox-relay partitions repin` updates
-- pins: run them as the owner, not as this role.
\set ON_ERROR_STOP on
\if :{?role}
\else
\set role outbox_relay
\endif
\if :{?schema}
\else
\set schema public
\endif
\if :{?table}
\else
\set table outbox
\endif
SELECT format('CREATE ROLE %I LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE NOREPLICATION', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
\if :{?password}
SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'password') \gexec
\endif
-- USAGE only: the role can reach the tables, not create objects in the schema.
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'schema', :'role') \gexec
-- Claim (SELECT), mark (DELETE, or UPDATE dispatched_at with relay.mark=retain), record a failed
-- attempt (UPDATE attempts, last_error, next_attempt_at) and park (DELETE). No INSERT: only
-- the application writes events.
SELECT format('GRANT SELECT, DELETE ON %I.%I TO %I', :'schema', :'table', :'role') \gexec
SELECT format('GRANT UPDATE (attempts, last_error, next_attempt_at, dispatched_at) ON %I.%I TO %I',
              :'schema', :'table', :'role') \gexec
-- Read the last value of the outbox's id sequence (never draw from it): with pg_locks it tells
-- the relay below which id no transaction can still add a row, so claims skip the rows deleted
-- since the last vacuum. Without it the relay works, reading from the oldest row every time.
SELECT format('GRANT SELECT ON SEQUENCE %s TO %I',
              pg_get_serial_sequence(format('%I.%I', :'schema', :'table'), 'id'), :'role') \gexec
-- Park (INSERT) and know which keys wait behind a parked row (SELECT).
SELECT format('GRANT SELECT, INSERT ON %I.%I TO %I', :'schema', :'table' || '_parked', :'role') \gexec
-- Read a topic's pinned partition count and pin a topic the first time it is published to
-- (SELECT, INSERT). No UPDATE: repinning ('outbox-relay partitions repin') is the owner's call.
SELECT format('GRANT SELECT, INSERT ON %I.%I TO %I', :'schema', :'table' || '_topics', :'role') \gexec
SELECT format('GRANT SELECT ON %I.outbox_relay_migrations TO %I', :'schema', :'role') \gexec
