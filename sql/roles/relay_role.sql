-- Least-privilege role for outbox-relay: no DDL, only what the relay does on its own tables
-- (read, mark and delete outbox rows; move poison rows to the parked table; pin topics' partition
-- counts; read migrations).
-- Run as the tables' owner after `outbox-relay migrate`, for example:
--   psql -v role=outbox_relay -v password="$RELAY_PASSWORD" -v schema=public -v table=outbox -f relay_role.sql
-- Every variable is optional: role outbox_relay, schema public, table outbox; without password
-- the role gets none (for certificate or peer authentication). Running it again is harmless.
-- `outbox-relay parked retry` inserts into the outbox, `parked drop` deletes parked rows and
-- `outbox-relay partitions repin` updates pins: run them as the owner. This role may only list
-- parked rows (`parked list`) and pin a topic the first time it is used.
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
-- Park (INSERT) and know which keys wait behind a parked row (SELECT). No DELETE: the relay never
-- removes a parked row, the only record of an event it gave up on; dropping one is the owner's call.
SELECT format('GRANT SELECT, INSERT ON %I.%I TO %I', :'schema', :'table' || '_parked', :'role') \gexec
-- Read a topic's pinned partition count and pin a topic the first time it is published to
-- (SELECT, INSERT). No UPDATE: repinning ('outbox-relay partitions repin') is the owner's call.
SELECT format('GRANT SELECT, INSERT ON %I.%I TO %I', :'schema', :'table' || '_topics', :'role') \gexec
SELECT format('GRANT SELECT ON %I.outbox_relay_migrations TO %I', :'schema', :'role') \gexec
-- With database.wait_for_replication sync or all, the relay reads the standbys' flush positions in
-- pg_stat_replication, which only pg_read_all_stats (part of pg_monitor) shows: pass
-- -v wait_for_replication=on. Granting it needs a superuser (or ADMIN OPTION on the role), and it
-- also lets the role read every session's statistics, other users' query text included.
\if :{?wait_for_replication}
SELECT format('GRANT pg_read_all_stats TO %I', :'role') \gexec
\endif
-- A standby ends the sessions of a leader that gave no sign of life for relay.leader_lease while
-- rows wait (a frozen process keeps its lock). Replicas running as this same role may end each
-- other's sessions already; replicas under different roles need pg_signal_backend, granted with
-- -v signal=on (it lets the role end any non-superuser session, so it is not granted by default).
\if :{?signal}
SELECT format('GRANT pg_signal_backend TO %I', :'role') \gexec
\endif
