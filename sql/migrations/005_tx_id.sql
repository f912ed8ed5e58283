-- 005_tx_id: the index of migration 003 gets the id after tx. A claim in exactly-once mode reads
-- the rest of each transaction it returned a row of: with (tx, id) it reads only the rows below
-- and above the claim's ids, by range, instead of every row of the transaction again (the rows
-- the claim already has were read twice, which doubled the database's work per row).
CREATE INDEX IF NOT EXISTS {{.Name "tx_id_idx"}} ON {{.Outbox}} (tx, id) WHERE dispatched_at IS NULL;
DROP INDEX IF EXISTS {{.Index "tx_idx"}};
