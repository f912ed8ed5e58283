package postgres_test

import (
	"context"
	"math"
	"slices"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

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
	exact, err := postgres.BacklogOf(ctx, pool, table, template, 5000)
	if err != nil {
		t.Fatal(err)
	}
	if exact.Estimated || exact.Pending != 2000 || len(exact.Topics) != 2 ||
		exact.Topics[0].Topic != "t.invoice" || exact.Topics[0].Pending != 500 || exact.Topics[1].Pending != 1500 {
		t.Fatalf("exact backlog: %+v", exact)
	}
	est, err := postgres.BacklogOf(ctx, pool, table, template, 200)
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
	pending, parked := postgres.BacklogSQL(table)
	for name, sql := range map[string]string{"pending": pending, "parked": parked} {
		var plan []map[string]any
		if err := pool.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+sql, "t.{aggregate_type}", 100).Scan(&plan); err != nil {
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
