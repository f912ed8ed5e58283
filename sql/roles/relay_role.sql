-- Least-privilege role for outbox-relay: no DDL, only what the relay does on its own tables
-- (read, mark and delete outbox rows; move poison rows to the parked table; read migrations).
-- Run as the tables' owner after `outbox-relay migrate`, for example:
--   psql -v role=outbox_relay -v password=secret -v schema=public -v table=outbox -f relay_role.sql
SELECT format('CREATE ROLE %I LOGIN', :'role')
 WHERE NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = :'role') \gexec
SELECT format('ALTER ROLE %I PASSWORD %L', :'role', :'password') \gexec
SELECT format('GRANT USAGE ON SCHEMA %I TO %I', :'schema', :'role') \gexec
SELECT format('GRANT SELECT, UPDATE, DELETE ON %I.%I TO %I', :'schema', :'table', :'role') \gexec
SELECT format('GRANT SELECT, INSERT, DELETE ON %I.%I TO %I', :'schema', :'table' || '_parked', :'role') \gexec
SELECT format('GRANT SELECT ON %I.outbox_relay_migrations TO %I', :'schema', :'role') \gexec
