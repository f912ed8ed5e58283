package postgres

import (
	"cmp"
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// ParkedRow is one row of the parked table: an outbox row the relay gave up on, with the reason.
type ParkedRow struct {
	ID            int64     // the row's original outbox id, kept so a retried row keeps its place
	EventID       string    // the event's UUID
	AggregateType string    // the aggregate's kind
	AggregateID   *string   // the record key; nil when NULL
	EventType     string    // the event's type
	Topic         *string   // the row's topic override; nil when NULL
	Attempts      int       // failed publish attempts before it was parked
	Reason        string    // why it was parked: the validator's or the broker's error
	ParkedAt      time.Time // when it was parked
}

// ParkedFilter selects parked rows. Rows match when their id is one of IDs (if any) and their
// aggregate_id is Key (if set) and their aggregate_type is AggregateType (if set). All must be
// set to select every row with no other condition, so that an empty filter selects nothing.
type ParkedFilter struct {
	IDs           []int64
	Key           string
	AggregateType string
	All           bool
}

func (f ParkedFilter) empty() bool {
	return len(f.IDs) == 0 && f.Key == "" && f.AggregateType == "" && !f.All
}

// where returns the condition of f, with its arguments as $1 to $3.
func (f ParkedFilter) where() (string, []any) {
	var ids []int64
	if len(f.IDs) > 0 {
		ids = f.IDs
	}
	var key, aggType *string
	if f.Key != "" {
		key = &f.Key
	}
	if f.AggregateType != "" {
		aggType = &f.AggregateType
	}
	return `($1::bigint[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR aggregate_id = $2)
		AND ($3::text IS NULL OR aggregate_type = $3)`, []any{ids, key, aggType}
}

const parkedColumns = `id, event_id::text, aggregate_type, aggregate_id, event_type, topic, attempts, reason, parked_at`

func scanParked(rows pgx.Rows) ([]ParkedRow, error) {
	var out []ParkedRow
	var r ParkedRow
	_, err := pgx.ForEachRow(rows, []any{&r.ID, &r.EventID, &r.AggregateType, &r.AggregateID, &r.EventType,
		&r.Topic, &r.Attempts, &r.Reason, &r.ParkedAt}, func() error {
		out = append(out, r)
		return nil
	})
	return out, err
}

// ListParked returns the parked rows of t that f selects (every row when f is empty), in id order.
func ListParked(ctx context.Context, pool *pgxpool.Pool, t Table, f ParkedFilter) ([]ParkedRow, error) {
	t = t.WithDefaults()
	where, args := f.where()
	rows, err := pool.Query(ctx, `SELECT `+parkedColumns+` FROM `+t.parked()+` WHERE `+where+` ORDER BY id`, args...)
	if err != nil {
		return nil, fmt.Errorf("list parked rows of %s: %w", t, err)
	}
	out, err := scanParked(rows)
	if err != nil {
		return nil, fmt.Errorf("list parked rows of %s: %w", t, err)
	}
	return out, nil
}

// ErrNoSelection is returned by RetryParked and DropParked for an empty filter.
var ErrNoSelection = errors.New("no parked rows selected: give ids, a key or all")

// RetryParked moves the parked rows f selects back into the outbox, in one statement, with their
// original ids (so a key's order holds: a retried row goes before the key's later rows) and their
// attempts reset. The relay publishes them again at its next scan. It returns the rows moved.
func RetryParked(ctx context.Context, pool *pgxpool.Pool, t Table, f ParkedFilter) ([]ParkedRow, error) {
	t = t.WithDefaults()
	if f.empty() {
		return nil, ErrNoSelection
	}
	where, args := f.where()
	// created_at is set anew: it measures how long a row has been pending, for lag and stall checks.
	rows, err := pool.Query(ctx, `WITH p AS (DELETE FROM `+t.parked()+` WHERE `+where+` RETURNING *),
		o AS (INSERT INTO `+t.outbox()+` (`+replayColumns(t)+`, attempts)
			OVERRIDING SYSTEM VALUE
			SELECT `+replayValues(t)+`, 0
			FROM p ORDER BY id)
		SELECT `+parkedColumns+` FROM p ORDER BY id`, args...)
	if err != nil {
		return nil, fmt.Errorf("retry parked rows of %s: %w", t, err)
	}
	out, err := scanParked(rows)
	if err != nil {
		return nil, fmt.Errorf("retry parked rows of %s: %w", t, err)
	}
	return out, nil
}

// DropParked deletes the parked rows f selects for good, and returns them.
func DropParked(ctx context.Context, pool *pgxpool.Pool, t Table, f ParkedFilter) ([]ParkedRow, error) {
	t = t.WithDefaults()
	if f.empty() {
		return nil, ErrNoSelection
	}
	where, args := f.where()
	rows, err := pool.Query(ctx, `DELETE FROM `+t.parked()+` WHERE `+where+` RETURNING `+parkedColumns, args...)
	if err != nil {
		return nil, fmt.Errorf("drop parked rows of %s: %w", t, err)
	}
	out, err := scanParked(rows)
	if err != nil {
		return nil, fmt.Errorf("drop parked rows of %s: %w", t, err)
	}
	slices.SortFunc(out, func(a, b ParkedRow) int { return cmp.Compare(a.ID, b.ID) })
	return out, nil
}

// replayColumns returns the outbox columns RetryParked fills, in the order of replayValues: the
// mapped ones that t has.
func replayColumns(t Table) string {
	c := t.Columns
	cols := []string{c.ID, c.EventID, c.AggregateType, c.Key, c.EventType, c.Payload, c.Topic, c.Headers, c.OccurredAt}
	var out []string
	for _, name := range cols {
		if name != Absent {
			out = append(out, pgx.Identifier{name}.Sanitize())
		}
	}
	return strings.Join(out, ", ")
}

// replayValues returns the parked table's columns that fill replayColumns.
func replayValues(t Table) string {
	c := t.Columns
	out := []string{"id", "event_id", "aggregate_type", "aggregate_id", "event_type", "payload"}
	for _, opt := range []struct{ v, col string }{{c.Topic, "topic"}, {c.Headers, "headers"}, {c.OccurredAt, "occurred_at"}} {
		if opt.v != Absent {
			out = append(out, opt.col)
		}
	}
	return strings.Join(out, ", ")
}
