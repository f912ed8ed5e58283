package postgres

import (
	"context"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// RetainedFilter selects retained rows: rows published with relay.mark=retain, whose
// dispatched_at is set, not yet purged. Each set field narrows the selection; the zero filter
// selects every retained row.
type RetainedFilter struct {
	Since         time.Time // dispatched_at at or after Since, when not zero
	Until         time.Time // dispatched_at before Until, when not zero
	Key           string    // aggregate_id, when not ""
	AggregateType string    // aggregate_type, when not ""
	EventType     string    // event_type, when not ""
}

// where returns the condition of f on t's columns, with its arguments as $1 to $5.
func (f RetainedFilter) where(t Table) (string, []any) {
	opt := func(s string) *string {
		if s == "" {
			return nil
		}
		return &s
	}
	optTime := func(t time.Time) *time.Time {
		if t.IsZero() {
			return nil
		}
		return &t
	}
	return `dispatched_at IS NOT NULL
		AND ($1::timestamptz IS NULL OR dispatched_at >= $1) AND ($2::timestamptz IS NULL OR dispatched_at < $2)
		AND ($3::text IS NULL OR ` + t.key("") + ` = $3) AND ($4::text IS NULL OR ` + t.aggType("") + ` = $4)
		AND ($5::text IS NULL OR ` + t.evType("") + ` = $5)`,
		[]any{optTime(f.Since), optTime(f.Until), opt(f.Key), opt(f.AggregateType), opt(f.EventType)}
}

// CountRetained returns how many retained rows of t f selects.
func CountRetained(ctx context.Context, pool *pgxpool.Pool, t Table, f RetainedFilter) (int64, error) {
	t = t.WithDefaults()
	where, args := f.where(t)
	var n int64
	if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+t.outbox()+` WHERE `+where, args...).Scan(&n); err != nil {
		return 0, fmt.Errorf("count retained rows of %s: %w", t, err)
	}
	return n, nil
}

// ReadRetained returns up to limit retained rows of t that f selects, with an id above after, in
// id order (so in order per key), as the relay read them to publish them. Rows the purge deletes
// meanwhile are simply not returned.
func ReadRetained(ctx context.Context, pool *pgxpool.Pool, t Table, f RetainedFilter, after int64, limit int) ([]relay.Message, error) {
	t = t.WithDefaults()
	where, args := f.where(t)
	// The columns as the claim reads them (table.go), so a mapped table replays as it published.
	rows, err := pool.Query(ctx, `SELECT `+t.id("")+`, `+t.eventID("")+`::text, `+t.aggType("")+`, `+t.key("")+`,
			`+t.evType("")+`, `+t.payload("")+`, `+t.topicCol("")+`, `+t.headers("")+`::text, `+t.occurred("")+`, created_at
		FROM `+t.outbox()+` WHERE `+where+` AND `+t.id("")+` > $6 ORDER BY `+t.id("")+` LIMIT $7`, append(args, after, limit)...)
	if err != nil {
		return nil, fmt.Errorf("read retained rows of %s: %w", t, err)
	}
	var out []relay.Message
	var (
		m       relay.Message
		key     *string
		topic   *string
		headers *string
	)
	_, err = pgx.ForEachRow(rows, []any{&m.ID, &m.EventID, &m.AggregateType, &key, &m.EventType, &m.Payload,
		&topic, &headers, &m.OccurredAt, &m.CreatedAt}, func() error {
		c := m
		c.AggregateID, c.AggregateIDNull = "", key == nil
		if key != nil {
			c.AggregateID = *key
		}
		if topic != nil {
			c.Topic = *topic
		}
		if headers != nil {
			c.Headers = []byte(*headers)
		}
		out = append(out, c)
		m.Payload = nil
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read retained rows of %s: %w", t, err)
	}
	return out, nil
}
