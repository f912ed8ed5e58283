package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
)

// PartitionPins keeps, in the <table>_topics table, the partition count each topic's keys are
// hashed with (kafka.PartitionPins). A pin outlives the process that wrote it, so a restarted
// relay or a standby taking over hashes keys as the relay before it did, whatever partitions
// were added to the topic since. Its methods are safe for concurrent use.
type PartitionPins struct {
	pool *pgxpool.Pool
	t    Table
}

// NewPartitionPins returns the pins of the outbox t, read and written through pool.
func NewPartitionPins(pool *pgxpool.Pool, t Table) *PartitionPins {
	return &PartitionPins{pool: pool, t: t.WithDefaults()}
}

// Pin returns the partition count pinned for topic. A topic without a pin is pinned to live
// first; when two relays pin a topic at once, both get the count stored first.
func (p *PartitionPins) Pin(ctx context.Context, topic string, live int) (int, error) {
	read := func() (int, bool, error) {
		var n int
		err := p.pool.QueryRow(ctx, `SELECT partitions FROM `+p.t.topics()+` WHERE topic = $1`, topic).Scan(&n)
		if errors.Is(err, pgx.ErrNoRows) {
			return 0, false, nil
		}
		return n, err == nil, err
	}
	// Read first: a topic is pinned once, and a read needs neither INSERT nor a writable node.
	n, ok, err := read()
	if err == nil && !ok {
		if _, err = p.pool.Exec(ctx, `INSERT INTO `+p.t.topics()+` (topic, partitions) VALUES ($1, $2)
			ON CONFLICT (topic) DO NOTHING`, topic, live); err == nil {
			n, ok, err = read()
		}
	}
	if err == nil && !ok {
		err = errors.New("pin vanished after insert")
	}
	if err != nil {
		return 0, fmt.Errorf("pin the partition count of topic %q in %s_topics: %w", topic, p.t, err)
	}
	return n, nil
}

// Check verifies that the pins table exists and that the current role may read it and add pins
// to it, so that a missing migration or grant stops the relay at start rather than failing each
// topic's first publish.
func (p *PartitionPins) Check(ctx context.Context) error {
	var exists, canRead, canInsert bool
	err := p.pool.QueryRow(ctx, `SELECT to_regclass($1) IS NOT NULL,
		coalesce(has_table_privilege(to_regclass($1), 'SELECT'), false),
		coalesce(has_table_privilege(to_regclass($1), 'INSERT'), false)`, p.t.topics()).Scan(&exists, &canRead, &canInsert)
	switch {
	case err != nil:
		return fmt.Errorf("check %s_topics: %w", p.t, err)
	case !exists:
		return fmt.Errorf("table %s_topics (the partition count pinned per topic) missing: run 'outbox-relay migrate'", p.t)
	case !canRead || !canInsert:
		return fmt.Errorf("table %s_topics: the relay's role needs SELECT and INSERT on it: run sql/roles/relay_role.sql again", p.t)
	}
	return nil
}

// TopicPin is one topic's pinned partition count.
type TopicPin struct {
	Topic      string    // the Kafka topic
	Partitions int       // the partition count its keys are hashed with
	PinnedAt   time.Time // when the count was pinned or last repinned
}

// ListPins returns every pin of the outbox t, by topic.
func ListPins(ctx context.Context, pool *pgxpool.Pool, t Table) ([]TopicPin, error) {
	t = t.WithDefaults()
	rows, err := pool.Query(ctx, `SELECT topic, partitions, pinned_at FROM `+t.topics()+` ORDER BY topic`)
	if err != nil {
		return nil, fmt.Errorf("list the pinned partition counts of %s: %w", t, err)
	}
	pins, err := pgx.CollectRows(rows, pgx.RowToStructByPos[TopicPin])
	if err != nil {
		return nil, fmt.Errorf("list the pinned partition counts of %s: %w", t, err)
	}
	return pins, nil
}

// Repin pins topic to partitions, whether or not it had a pin, and returns the count it had (0
// for none). Relays that already publish to the topic keep the count they read until they
// restart.
func Repin(ctx context.Context, pool *pgxpool.Pool, t Table, topic string, partitions int) (int, error) {
	t = t.WithDefaults()
	if partitions < 1 {
		return 0, fmt.Errorf("repin topic %q: partition count %d is not positive", topic, partitions)
	}
	var old *int
	err := pool.QueryRow(ctx, `WITH old AS (SELECT partitions FROM `+t.topics()+` WHERE topic = $1)
		INSERT INTO `+t.topics()+` (topic, partitions) VALUES ($1, $2)
		ON CONFLICT (topic) DO UPDATE SET partitions = EXCLUDED.partitions, pinned_at = now()
		RETURNING (SELECT partitions FROM old)`, topic, partitions).Scan(&old)
	if err != nil {
		return 0, fmt.Errorf("repin topic %q in %s_topics: %w", topic, t, err)
	}
	if old == nil {
		return 0, nil
	}
	return *old, nil
}
