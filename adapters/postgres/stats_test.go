package postgres_test

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestBacklogExtrapolates reads fewer rows than are pending: with dense ids the extrapolated
// total is exact, the topics keep their shares, and the result says it is an estimate; reading
// enough rows gives exact counts.
func TestBacklogExtrapolates(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	_, err := pool.Exec(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+`
		(aggregate_type, aggregate_id, event_type, payload)
		SELECT CASE WHEN g % 4 = 0 THEN 'invoice' ELSE 'order' END, g::text, 'Happened', '{}'
		FROM generate_series(1, 2000) g`)
	if err != nil {
		t.Fatal(err)
	}
	const template = "t.{aggregate_type}"
	exact, err := postgres.BacklogOf(ctx, pool, table, template, 5000, true)
	if err != nil {
		t.Fatal(err)
	}
	if exact.Estimated || exact.Pending != 2000 || len(exact.Topics) != 2 ||
		exact.Topics[0].Topic != "t.invoice" || exact.Topics[0].Pending != 500 || exact.Topics[1].Pending != 1500 {
		t.Fatalf("exact backlog: %+v", exact)
	}
	est, err := postgres.BacklogOf(ctx, pool, table, template, 200, true)
	if err != nil {
		t.Fatal(err)
	}
	if !est.Estimated || est.Pending != 2000 {
		t.Fatalf("estimated backlog: pending %v estimated %v, want 2000 extrapolated", est.Pending, est.Estimated)
	}
	for i, tp := range est.Topics {
		if math.Abs(tp.Pending-exact.Topics[i].Pending) > 20 {
			t.Errorf("topic %s: estimated %v, exact %v", tp.Topic, tp.Pending, exact.Topics[i].Pending)
		}
		if tp.OldestAge != 0 && tp.OldestAge < exact.Topics[i].OldestAge {
			t.Errorf("topic %s: oldest age %v, less than the earlier exact reading %v", tp.Topic, tp.OldestAge, exact.Topics[i].OldestAge)
		}
	}
	if h, err := postgres.LeaderOf(ctx, pool, table); err != nil || h != nil {
		t.Fatalf("leader of an outbox no relay leads: %+v %v", h, err)
	}
}

// TestBacklogQueriesAreBounded checks the plans of the backlog queries on a large outbox: they
// read the oldest rows through an index under a LIMIT and never scan a whole table, so their cost
// does not grow with the backlog.
func TestBacklogQueriesAreBounded(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	for _, sql := range []string{
		`INSERT INTO ` + pgx.Identifier{table.Schema, table.Name}.Sanitize() + ` (aggregate_type, aggregate_id, event_type, payload)
			SELECT 'order', g::text, 'Happened', '{}' FROM generate_series(1, 50000) g`,
		`INSERT INTO ` + pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize() + `
			(id, event_id, aggregate_type, aggregate_id, event_type, occurred_at, created_at, attempts, reason)
			SELECT -g, gen_random_uuid(), 'order', g::text, 'Happened', now(), now(), 1, 'test' FROM generate_series(1, 50000) g`,
		`ANALYZE ` + pgx.Identifier{table.Schema, table.Name}.Sanitize(),
		`ANALYZE ` + pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize(),
	} {
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	pending, parked := postgres.BacklogSQL(table, false)
	pendingHeld, _ := postgres.BacklogSQL(table, true)
	for name, q := range map[string]struct {
		sql  string
		args []any
	}{
		"pending":                {pending, []any{"t.{aggregate_type}", 100}},
		"pending and held":       {pendingHeld, []any{"t.{aggregate_type}", 100}},
		"parked":                 {parked, []any{"t.{aggregate_type}", 100}},
		"stalled":                {postgres.StalledSQL(table, false), []any{time.Minute, 100}},
		"stalled, held left out": {postgres.StalledSQL(table, true), []any{time.Minute, 100}},
	} {
		sql := q.sql
		var plan []map[string]any
		if err := pool.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+sql, q.args...).Scan(&plan); err != nil {
			t.Fatalf("explain %s: %v", name, err)
		}
		var nodes []string
		var walk func(n map[string]any, underLimit bool)
		walk = func(n map[string]any, underLimit bool) {
			typ, _ := n["Node Type"].(string)
			if typ == "Limit" {
				underLimit = true
			}
			if typ == "Seq Scan" {
				t.Errorf("%s backlog query scans %v sequentially", name, n["Relation Name"])
			}
			if strings.HasPrefix(typ, "Index") && !underLimit {
				t.Errorf("%s backlog query: %s on %v is not bounded by a LIMIT", name, typ, n["Relation Name"])
			}
			nodes = append(nodes, typ)
			children, _ := n["Plans"].([]any)
			for _, c := range children {
				walk(c.(map[string]any), underLimit)
			}
		}
		walk(plan[0]["Plan"].(map[string]any), false)
		if !slices.Contains(nodes, "Limit") {
			t.Errorf("%s backlog query has no Limit: %v", name, nodes)
		}
	}
}

// heldFixture fills an outbox with rows held behind parked rows (key acc-42, and the empty key
// whose parked row has a NULL aggregate_id), two minutes old, and rows that may go: a free key's
// row 30 s old, and a row of another aggregate type with the same id, 10 s old.
func heldFixture(t *testing.T) (*pgxpool.Pool, postgres.Table) {
	t.Helper()
	pool, table := dbtest.Schema(t)
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	parked := pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()
	for _, sql := range []string{
		`INSERT INTO ` + parked + ` (id, event_id, aggregate_type, aggregate_id, event_type, topic, occurred_at, created_at, attempts, reason)
			VALUES (-10, gen_random_uuid(), 'order', 'acc-42', 'E', 'orders', now(), now(), 10, 'test'),
				(-9, gen_random_uuid(), 'order', 'acc-42', 'E', 'orders', now(), now(), 10, 'test'),
				(-8, gen_random_uuid(), 'order', NULL, 'E', 'orders', now(), now(), 1, 'test')`,
		`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload, topic, created_at) VALUES
			('order', 'acc-42', 'E', 'x', 'orders', now() - interval '2 minutes'),
			('order', '', 'E', 'x', 'orders', now() - interval '2 minutes'),
			('order', NULL, 'E', 'x', 'orders', now() - interval '2 minutes'),
			('order', 'acc-42', 'E', 'x', 'orders', now() - interval '2 minutes'),
			('order', 'free', 'E', 'x', 'orders', now() - interval '30 seconds'),
			('invoice', 'acc-42', 'E', 'x', 'invoices', now() - interval '10 seconds')`,
	} {
		if _, err := pool.Exec(context.Background(), sql); err != nil {
			t.Fatal(err)
		}
	}
	return pool, table
}

// TestBacklogCountsHeldRows: with order_policy wait, the rows of keys with a parked row are
// counted apart as held, per topic, and left out of the oldest age (the lag); HeldKeys says
// which parked row each key waits for. With skip, nothing is held.
func TestBacklogCountsHeldRows(t *testing.T) {
	t.Parallel()
	pool, table := heldFixture(t)
	ctx := context.Background()
	b, err := postgres.BacklogOf(ctx, pool, table, "t.{aggregate_type}", 1000, true)
	if err != nil {
		t.Fatal(err)
	}
	if b.Pending != 6 || b.Held != 4 || len(b.Topics) != 2 {
		t.Fatalf("backlog: pending %v held %v topics %+v, want 6 pending, 4 held, 2 topics", b.Pending, b.Held, b.Topics)
	}
	inv, ord := b.Topics[0], b.Topics[1]
	if inv.Topic != "invoices" || inv.Held != 0 || ord.Topic != "orders" || ord.Pending != 5 || ord.Held != 4 {
		t.Errorf("topics %+v, want invoices with nothing held and orders with 4 of 5 held", b.Topics)
	}
	if ord.OldestAge < 29*time.Second || ord.OldestAge > 90*time.Second || b.OldestAge != ord.OldestAge {
		t.Errorf("oldest age of orders %v (overall %v), want that of the free row, about 30s: held rows are no lag", ord.OldestAge, b.OldestAge)
	}
	keys, err := postgres.HeldKeys(ctx, pool, table, 1000, 100)
	if err != nil {
		t.Fatal(err)
	}
	want := []postgres.HeldKey{
		{AggregateType: "order", Key: "", ParkedID: -8, Parked: 1, Held: 2},
		{AggregateType: "order", Key: "acc-42", ParkedID: -10, Parked: 2, Held: 2},
	}
	if !slices.Equal(keys, want) {
		t.Errorf("held keys %+v, want %+v", keys, want)
	}

	skip, err := postgres.BacklogOf(ctx, pool, table, "t.{aggregate_type}", 1000, false)
	if err != nil {
		t.Fatal(err)
	}
	if skip.Held != 0 || skip.OldestAge < 119*time.Second {
		t.Errorf("order_policy skip: held %v, oldest %v; want nothing held and the oldest row's age", skip.Held, skip.OldestAge)
	}
}

// TestStalled: only a row the relay could publish now makes a stall; rows held behind a parked
// row (with order_policy wait), rows waiting for their retry and the rows behind them do not.
func TestStalled(t *testing.T) {
	t.Parallel()
	pool, table := heldFixture(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	exec := func(sql string) {
		t.Helper()
		if _, err := pool.Exec(ctx, sql); err != nil {
			t.Fatal(err)
		}
	}
	stalled := func(held bool) bool {
		t.Helper()
		s, err := postgres.Stalled(ctx, pool, table, time.Minute, held, 1000)
		if err != nil {
			t.Fatal(err)
		}
		return s
	}
	// Held rows two minutes old, free rows younger than a minute.
	if stalled(true) {
		t.Error("stalled with only held rows older than the stall timeout")
	}
	if !stalled(false) {
		t.Error("not stalled with order_policy skip: the relay does not hold rows behind parked ones then")
	}
	// A key's row failed and waits for its retry; its next row waits behind it. (Rows are read
	// in id order, which is the order of their age: the younger free rows go.)
	exec(`DELETE FROM ` + outbox + ` WHERE aggregate_id = 'free' OR aggregate_type = 'invoice'`)
	exec(`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload, created_at, attempts, next_attempt_at)
		VALUES ('order', 'retried', 'E', 'x', now() - interval '2 minutes', 3, now() + interval '1 minute'),
			('order', 'retried', 'E', 'x', now() - interval '2 minutes', 0, NULL)`)
	if stalled(true) {
		t.Error("stalled with a row waiting for its retry and the row behind it")
	}
	// Its retry is due: it may go now.
	exec(`UPDATE ` + outbox + ` SET next_attempt_at = now() - interval '1 second' WHERE attempts = 3`)
	if !stalled(true) {
		t.Error("not stalled with a due row two minutes old")
	}
	exec(`DELETE FROM ` + outbox + ` WHERE aggregate_id = 'retried'`)
	exec(`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload, created_at)
		VALUES ('order', 'free', 'E', 'x', now() - interval '61 seconds')`)
	if !stalled(true) {
		t.Error("not stalled with a free row past the stall timeout")
	}
}
