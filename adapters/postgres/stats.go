package postgres

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/bounds"
)

// BacklogScanRowsDefault is the default number of pending rows Backlog reads.
const BacklogScanRowsDefault = 10000

// BacklogScanRowsRange is the range cmd allows for http.backlog_scan_rows, the rows Backlog reads.
var BacklogScanRowsRange = bounds.Int{Min: 100, Max: 10000000}

// Querier is what the read-only operations need: a pool, a connection or a transaction.
type Querier interface {
	Query(ctx context.Context, sql string, args ...any) (pgx.Rows, error)
	QueryRow(ctx context.Context, sql string, args ...any) pgx.Row
}

// TopicBacklog is what waits for one topic.
type TopicBacklog struct {
	// Topic is the row's topic, or the topic template applied to the row.
	Topic string `json:"topic"`
	// Pending is the number of rows not yet published (an estimate when Backlog.Estimated),
	// Held included.
	Pending float64 `json:"pending"`
	// Held is the number of the pending rows held behind a parked row of their key (see
	// BacklogOf), likewise.
	Held float64 `json:"held"`
	// OldestAge is the age of the topic's oldest pending row that is not held; zero when none
	// is pending.
	OldestAge time.Duration `json:"-"`
	// Parked is the number of parked rows of the topic.
	Parked float64 `json:"parked"`
}

// Backlog is what waits in one outbox, per topic.
type Backlog struct {
	// Topics are sorted by name.
	Topics []TopicBacklog
	// Pending is the number of pending rows (an estimate when Estimated), Held included.
	Pending float64
	// Held is the number of pending rows held behind a parked row of their key, likewise.
	Held float64
	// OldestAge is the age of the oldest pending row that is not held: the relay's lag; zero
	// when none is pending.
	OldestAge time.Duration
	// Parked is the number of parked rows (an estimate when Estimated).
	Parked float64
	// Estimated is true when more pending rows exist than were read: the pending counts are
	// then extrapolated from the rows read (see BacklogOf).
	Estimated bool
	// ParkedEstimated is true when more parked rows exist than were read.
	ParkedEstimated bool
}

// BacklogOf returns the pending and parked rows of t per topic. template is the topic template
// ({aggregate_type} and {event_type} are replaced) for rows without a topic of their own. When
// held (the relay's order_policy is wait), the pending rows of a key with a parked row are
// counted apart as held: they wait, by design, for the parked row to be retried or dropped, so
// they are neither lag nor a stall, and the oldest ages leave them out.
//
// It stays cheap on any backlog: it reads at most scanRows pending rows, the oldest first,
// through the pending index (an index scan bounded by LIMIT), plus one index probe for the newest
// pending id. Below scanRows pending rows the counts are exact. Above, the total is extrapolated
// from the density of pending ids in the rows read (ids are dense unless rows were published out
// of order or rolled back), and each topic's share is taken from the rows read; the oldest ages
// are exact for every topic present among the oldest scanRows rows, which includes the overall
// oldest. Parked rows are counted the same way, up to scanRows of them. Whether a row is held is
// one probe of the parked table's key index per row read.
func BacklogOf(ctx context.Context, q Querier, t Table, template string, scanRows int, held bool) (Backlog, error) {
	t = t.WithDefaults()
	if scanRows < 1 {
		scanRows = BacklogScanRowsDefault
	}
	pendingSQL, parkedSQL := BacklogSQL(t, held)
	rows, err := q.Query(ctx, pendingSQL, template, scanRows)
	if err != nil {
		return Backlog{}, fmt.Errorf("read pending rows of %s: %w", t, err)
	}
	type agg struct {
		n, held  int64
		age      float64
		lo, hi   int64
		newestID int64
	}
	byTopic := map[string]*TopicBacklog{}
	var total, heldTotal, lo, hi, newest int64
	lo = -1
	var a agg
	var name string
	_, err = pgx.ForEachRow(rows, []any{&name, &a.n, &a.held, &a.age, &a.lo, &a.hi, &a.newestID}, func() error {
		age := time.Duration(a.age * float64(time.Second))
		byTopic[name] = &TopicBacklog{Topic: name, Pending: float64(a.n), Held: float64(a.held), OldestAge: age}
		total += a.n
		heldTotal += a.held
		if lo < 0 || a.lo < lo {
			lo = a.lo
		}
		hi = max(hi, a.hi)
		newest = a.newestID
		return nil
	})
	if err != nil {
		return Backlog{}, fmt.Errorf("read pending rows of %s: %w", t, err)
	}
	var b Backlog
	b.Pending, b.Held = float64(total), float64(heldTotal)
	if total >= int64(scanRows) && newest > hi {
		// Extrapolate: the rows past the ones read are assumed as dense in ids as those read,
		// and spread over topics, and held, as those read.
		density := float64(total) / float64(hi-lo+1)
		b.Pending = float64(total) + float64(newest-hi)*density
		b.Estimated = true
		scale := b.Pending / float64(total)
		b.Held *= scale
		for _, tb := range byTopic {
			tb.Pending *= scale
			tb.Held *= scale
		}
	}

	rows, err = q.Query(ctx, parkedSQL, template, scanRows)
	if err != nil {
		return Backlog{}, fmt.Errorf("read parked rows of %s: %w", t, err)
	}
	var parked int64
	var n int64
	_, err = pgx.ForEachRow(rows, []any{&name, &n}, func() error {
		tb := byTopic[name]
		if tb == nil {
			tb = &TopicBacklog{Topic: name}
			byTopic[name] = tb
		}
		tb.Parked = float64(n)
		parked += n
		return nil
	})
	if err != nil {
		return Backlog{}, fmt.Errorf("read parked rows of %s: %w", t, err)
	}
	b.Parked = float64(parked)
	if parked >= int64(scanRows) {
		// More parked rows than read: estimate the total from the table's statistics.
		var est float64
		if err := q.QueryRow(ctx, `SELECT greatest(reltuples, $2)::float8 FROM pg_class WHERE oid = $1::regclass`,
			t.parked(), float64(parked)).Scan(&est); err == nil && est > float64(parked) {
			for _, tb := range byTopic {
				tb.Parked *= est / float64(parked)
			}
			b.Parked = est
			b.ParkedEstimated = true
		}
	}

	for _, tb := range byTopic {
		b.OldestAge = max(b.OldestAge, tb.OldestAge)
		b.Topics = append(b.Topics, *tb)
	}
	sort.Slice(b.Topics, func(i, j int) bool { return b.Topics[i].Topic < b.Topics[j].Topic })
	return b, nil
}

// BacklogSQL returns the two queries BacklogOf runs on t, for EXPLAIN: the pending rows per
// topic and the parked rows per topic. Both take the topic template as $1 and the most rows to
// read as $2. held is BacklogOf's.
func BacklogSQL(t Table, held bool) (pending, parked string) {
	t = t.WithDefaults()
	topicOf := func(topic, aggType, evType string) string {
		return `coalesce(nullif(` + topic + `, ''), replace(replace($1::text, '{aggregate_type}', ` + aggType + `), '{event_type}', ` + evType + `))`
	}
	topic := topicOf("topic", "aggregate_type", "event_type")
	isHeld := `false`
	if held {
		isHeld = heldCond(t)
	}
	pending = `
		WITH head AS (
			SELECT ` + t.id("o") + ` AS id, created_at, ` + topicOf(t.topicCol("o"), t.aggType("o"), t.evType("o")) + ` AS topic,
				` + isHeld + ` AS held
			FROM ` + t.outbox() + ` o WHERE dispatched_at IS NULL ORDER BY ` + t.id("o") + ` LIMIT $2)
		SELECT topic, count(*), count(*) FILTER (WHERE held),
			coalesce(greatest(extract(epoch FROM now() - min(created_at) FILTER (WHERE NOT held)), 0), 0)::float8,
			min(id), max(id),
			(SELECT max(` + t.id("") + `) FROM ` + t.outbox() + ` WHERE dispatched_at IS NULL)
		FROM head GROUP BY topic`
	parked = `
		SELECT ` + topic + ` AS topic, count(*)
		FROM (SELECT topic, aggregate_type, event_type FROM ` + t.parked() + ` ORDER BY id LIMIT $2) p
		GROUP BY 1`
	return pending, parked
}

// heldCond is true for an outbox row, aliased o, whose key has a row in the parked table: with
// order_policy wait the relay holds it until that row is retried or dropped. A NULL key is the
// empty key, as in the relay's blocked keys. Each lookup is a probe of the parked table's key
// index; the second runs only for a row with an empty key. OFFSET 0 keeps them probes: without
// it the planner may hash the whole parked table instead, a cost that grows with the parked
// rows rather than with the rows read.
func heldCond(t Table) string { return heldCondOf(t, t.aggType("o"), t.key("o")) }

// heldCondOf is heldCond on a row whose aggregate type and key are aggType and key.
func heldCondOf(t Table, aggType, key string) string {
	return `(EXISTS (SELECT 1 FROM ` + t.parked() + ` p WHERE p.aggregate_type = ` + aggType + `
				AND p.aggregate_id = coalesce(` + key + `, '') OFFSET 0)
			OR (coalesce(` + key + `, '') = '' AND EXISTS (SELECT 1 FROM ` + t.parked() + ` p
				WHERE p.aggregate_type = ` + aggType + ` AND p.aggregate_id IS NULL OFFSET 0)))`
}

// HeldKey is a key whose pending rows wait behind a parked row (order_policy wait).
type HeldKey struct {
	// AggregateType and Key are the key; Key is "" for a NULL or empty aggregate_id.
	AggregateType string `json:"aggregate_type"`
	Key           string `json:"key"`
	// ParkedID is the id of the key's first parked row: the one to retry or drop.
	ParkedID int64 `json:"parked_id"`
	// Parked is the number of parked rows of the key.
	Parked int64 `json:"parked"`
	// Held is the number of the key's pending rows among the rows read.
	Held int64 `json:"held"`
}

// HeldKeys returns the keys with held rows (see BacklogOf) among the oldest scanRows pending
// rows of t, those with the most held rows first, at most limit of them.
func HeldKeys(ctx context.Context, q Querier, t Table, scanRows, limit int) ([]HeldKey, error) {
	t = t.WithDefaults()
	if scanRows < 1 {
		scanRows = BacklogScanRowsDefault
	}
	// The parked rows of a key are read through the key index: an empty key's are those with
	// '' and those with NULL.
	parkedOf := func(what string) string {
		return `(SELECT ` + what + ` FROM ` + t.parked() + ` p WHERE p.aggregate_type = h.aggregate_type AND p.aggregate_id = h.key)`
	}
	parkedNull := func(what string) string {
		return `(SELECT ` + what + ` FROM ` + t.parked() + ` p WHERE h.key = '' AND p.aggregate_type = h.aggregate_type AND p.aggregate_id IS NULL)`
	}
	rows, err := q.Query(ctx, `
		WITH head AS (
			SELECT `+t.aggType("o")+` AS aggregate_type, coalesce(`+t.key("o")+`, '') AS key, `+heldCond(t)+` AS held
			FROM `+t.outbox()+` o WHERE dispatched_at IS NULL ORDER BY `+t.id("o")+` LIMIT $1),
		keys AS (
			SELECT aggregate_type, key, count(*) AS n FROM head WHERE held
			GROUP BY 1, 2 ORDER BY 3 DESC, 1, 2 LIMIT $2)
		SELECT h.aggregate_type, h.key, coalesce(least(`+parkedOf("min(p.id)")+`, `+parkedNull("min(p.id)")+`), 0),
			`+parkedOf("count(*)")+` + `+parkedNull("count(*)")+`, h.n
		FROM keys h ORDER BY h.n DESC, 1, 2`, scanRows, limit)
	if err != nil {
		return nil, fmt.Errorf("read held rows of %s: %w", t, err)
	}
	var out []HeldKey
	var k HeldKey
	_, err = pgx.ForEachRow(rows, []any{&k.AggregateType, &k.Key, &k.ParkedID, &k.Parked, &k.Held}, func() error {
		out = append(out, k)
		return nil
	})
	if err != nil {
		return nil, fmt.Errorf("read held rows of %s: %w", t, err)
	}
	return out, nil
}

// Holder is the database session holding an outbox's leadership lock.
type Holder struct {
	PID             int        `json:"pid"`
	ClientAddr      string     `json:"client_addr,omitempty"` // empty for a Unix socket or when hidden
	BackendStart    *time.Time `json:"backend_start,omitempty"`
	ApplicationName string     `json:"application_name,omitempty"`
	State           string     `json:"state,omitempty"`
	// LastActive is the latest query start or state change of the session or of its mark
	// connection (the heartbeat runs there): the leader's last sign of life the database saw.
	LastActive *time.Time `json:"last_active,omitempty"`
}

// holderSQL selects the leadership lock's holder of the lock key $1: its pid, client address,
// backend start, application name, state and last sign of life (see Holder.LastActive).
const holderSQL = `
		WITH k AS (SELECT hashtextextended($1, 0) AS key),
		h AS (SELECT l.pid, host(a.client_addr) AS addr, a.backend_start, a.application_name, a.state,
				greatest(a.query_start, a.state_change) AS active
			FROM pg_locks l CROSS JOIN k
			LEFT JOIN pg_stat_activity a ON a.pid = l.pid
			WHERE l.locktype = 'advisory' AND l.granted AND l.objsubid = 1
				AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
				AND l.classid = ((k.key >> 32) & 4294967295)::oid
				AND l.objid = (k.key & 4294967295)::oid
			LIMIT 1)
		SELECT h.pid, h.addr, h.backend_start, h.application_name, h.state,
			greatest(h.active, (SELECT max(greatest(m.query_start, m.state_change)) FROM pg_stat_activity m
				WHERE m.application_name = left(h.application_name || ' marks', 63) AND m.pid <> h.pid)) AS last_active
		FROM h`

// LeaderOf returns the session holding the leadership of t, or nil when no relay leads. The
// advisory lock of pg_try_advisory_lock(bigint) shows in pg_locks with the key's high 32 bits in
// classid, its low 32 bits in objid and objsubid 1. The connection details come from
// pg_stat_activity: another role's sessions show them only to superusers and members of
// pg_read_all_stats.
func LeaderOf(ctx context.Context, q Querier, t Table) (*Holder, error) {
	t = t.WithDefaults()
	var h Holder
	var addr, app, state *string
	err := q.QueryRow(ctx, holderSQL, t.lockKey()).Scan(&h.PID, &addr, &h.BackendStart, &app, &state, &h.LastActive)
	if errors.Is(err, pgx.ErrNoRows) {
		return nil, nil
	}
	if err != nil {
		return nil, fmt.Errorf("read leadership lock of %s: %w", t, err)
	}
	if addr != nil {
		h.ClientAddr = *addr
	}
	if app != nil {
		h.ApplicationName = *app
	}
	if state != nil {
		h.State = *state
	}
	return &h, nil
}
