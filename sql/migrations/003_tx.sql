-- 003_tx: the database transaction that wrote each row, for kafka.delivery=exactly_once (all rows
-- of one transaction go out in one Kafka transaction). Writers change nothing: the default fills
-- it. Rows already there keep NULL (adding a column without a default rewrites nothing): the
-- relay takes each of them as a transaction of its own.

ALTER TABLE {{.Outbox}} ADD COLUMN IF NOT EXISTS tx xid8;
ALTER TABLE {{.Outbox}} ALTER COLUMN tx SET DEFAULT pg_current_xact_id();
-- A claim in exactly-once mode reads the rest of the transactions it started: through this index.
CREATE INDEX IF NOT EXISTS {{.Name "tx_idx"}} ON {{.Outbox}} (tx) WHERE dispatched_at IS NULL;
