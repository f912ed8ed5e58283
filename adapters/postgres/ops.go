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
	// Every column the relay reads or writes, so a wrong database.columns mapping, or a table not
	// adopted yet, fails here rather than at the first claim.
	if _, err := pool.Exec(ctx, `SELECT `+t.id("")+`, `+t.eventID("")+`, `+t.aggType("")+`, `+t.key("")+`, `+t.evType("")+`,
		`+t.payload("")+`, `+t.topicCol("")+`, `+t.headers("")+`, `+t.occurred("")+`, created_at, attempts,
		next_attempt_at, last_error, dispatched_at FROM `+t.outbox()+` LIMIT 0`); err != nil {
		if t.Mapped() {
			return fmt.Errorf("read %s with the columns of database.columns (run 'outbox-relay migrate --adopt' to add the relay's): %w", t, err)
		}
		return fmt.Errorf("read %s: %w", t, err)
	}
	return nil
}

// Stalled reports whether t has a pending row older than d that the relay could publish now,
// which means no progress for at least d (published rows leave the pending set). Rows the relay
// holds on purpose do not count: a row waiting for its retry (next_attempt_at; the broker
// refused it, and it is parked after relay.max_attempts), a row waiting behind such a row of its
// key, and, when held (order_policy wait), a row waiting behind a parked row of its key. Rows
// the broker does not take because it is down, or because their topic is missing, stay due: they
// count. It reads at most scanRows pending rows, the oldest first, through the pending index,
// up to the first that may go, with one probe of the failing index (and of the parked table's
// key index, when held) per row: a stall behind more held rows than that is not seen.
func Stalled(ctx context.Context, q Querier, t Table, d time.Duration, held bool, scanRows int) (bool, error) {
	t = t.WithDefaults()
	if scanRows < 1 {
		scanRows = BacklogScanRowsDefault
	}
	var stalled bool
	err := q.QueryRow(ctx, StalledSQL(t, held), d, scanRows).Scan(&stalled)
	if err != nil {
		return false, fmt.Errorf("read stalled rows of %s: %w", t, err)
	}
	return stalled, nil
}

// StalledSQL returns the query of Stalled, for EXPLAIN: it takes the duration as $1 and the most
// rows to read as $2.
func StalledSQL(t Table, held bool) string {
	t = t.WithDefaults()
	notHeld := ``
	if held {
		notHeld = ` AND NOT ` + heldCondOf(t, `o.aggregate_type`, `o.aggregate_id`)
	}
	return `SELECT coalesce((SELECT o.created_at < now() - $1::interval
		FROM (SELECT ` + t.id("") + ` AS id, created_at, ` + t.aggType("") + ` AS aggregate_type, ` + t.key("") + ` AS aggregate_id,
				next_attempt_at FROM ` + t.outbox() + `
			WHERE dispatched_at IS NULL ORDER BY ` + t.id("") + ` LIMIT $2) o
		WHERE (o.next_attempt_at IS NULL OR o.next_attempt_at <= now())
			AND NOT EXISTS (SELECT 1 FROM ` + t.outbox() + ` f WHERE f.attempts > 0 AND f.dispatched_at IS NULL
				AND ` + t.aggType("f") + ` = o.aggregate_type AND ` + t.key("f") + ` = o.aggregate_id AND ` + t.id("f") + ` < o.id
				AND f.next_attempt_at > now() OFFSET 0)` + notHeld + `
		ORDER BY o.id LIMIT 1), false)`
}

// Purge deletes rows published more than retention ago, batch rows per statement, until a short
// batch. It returns how many rows it deleted.
func Purge(ctx context.Context, pool *pgxpool.Pool, t Table, retention time.Duration, batch int) (int64, error) {
	t = t.WithDefaults()
	var total int64
	for {
		tag, err := pool.Exec(ctx, `DELETE FROM `+t.outbox()+` WHERE `+t.id("")+` IN (
			SELECT `+t.id("")+` FROM `+t.outbox()+` WHERE dispatched_at < now() - $1::interval
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
