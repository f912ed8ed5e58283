package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// CheckOutbox verifies that the outbox tables of t exist and can be read.
func CheckOutbox(ctx context.Context, pool *pgxpool.Pool, t Table) error {
	t = t.WithDefaults()
	var outbox, parked *string
	err := pool.QueryRow(ctx, `SELECT to_regclass($1)::text, to_regclass($2)::text`, t.outbox(), t.parked()).Scan(&outbox, &parked)
	if err != nil {
		return fmt.Errorf("check outbox: %w", err)
	}
	if outbox == nil || parked == nil {
		return fmt.Errorf("outbox table %s or %s_parked missing: run 'outbox-relay migrate'", t, t)
	}
	if _, err := pool.Exec(ctx, `SELECT 1 FROM `+t.outbox()+` LIMIT 0`); err != nil {
		return fmt.Errorf("read %s: %w", t, err)
	}
	return nil
}

// Stalled reports whether t has a pending row older than d: published rows leave the pending set,
// so an old pending row means no progress for at least d.
func Stalled(ctx context.Context, pool *pgxpool.Pool, t Table, d time.Duration) (bool, error) {
	t = t.WithDefaults()
	var stalled bool
	err := pool.QueryRow(ctx, `SELECT coalesce((SELECT created_at < now() - $1::interval
		FROM `+t.outbox()+` WHERE dispatched_at IS NULL AND (next_attempt_at IS NULL OR next_attempt_at <= now())
		ORDER BY id LIMIT 1), false)`, d).Scan(&stalled)
	return stalled, err
}

// Purge deletes rows published more than retention ago, batch rows per statement, until a short
// batch. It returns how many rows it deleted.
func Purge(ctx context.Context, pool *pgxpool.Pool, t Table, retention time.Duration, batch int) (int64, error) {
	t = t.WithDefaults()
	var total int64
	for {
		tag, err := pool.Exec(ctx, `DELETE FROM `+t.outbox()+` WHERE id IN (
			SELECT id FROM `+t.outbox()+` WHERE dispatched_at < now() - $1::interval
			ORDER BY dispatched_at LIMIT $2)`, retention, batch)
		if err != nil {
			return total, fmt.Errorf("purge %s: %w", t, err)
		}
		total += tag.RowsAffected()
		if tag.RowsAffected() < int64(batch) {
			return total, nil
		}
	}
}
