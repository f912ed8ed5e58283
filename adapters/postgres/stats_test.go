package postgres_test

import (
	"context"
	"math"
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
