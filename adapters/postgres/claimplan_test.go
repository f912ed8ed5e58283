package postgres_test

import (
	"context"
	"strings"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestClaimReadsTheBacklogInIDOrder: on an outbox without statistics (never analyzed, or
// analyzed empty, as an outbox in delete mode usually is), a backlog written by one transaction
// is claimed through an ordered scan of pending_idx that stops at the claim's limit: no bitmap
// scan of every pending row sorted to keep the first ones, which read the whole backlog for each
// claim and made a 200k-row drain several times slower (BENCHMARKS.md, "Backlog under live
// writers").
func TestClaimReadsTheBacklogInIDOrder(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	const n = 50000
	if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'bulk', (i % 100)::text, 'Bulk', convert_to(repeat(md5(i::text), 8), 'UTF8') FROM generate_series(1, $1::int) AS i`, n); err != nil {
		t.Fatal(err)
	}
	var analyzed bool
	if err := pool.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_stats WHERE schemaname = $1 AND tablename = $2)`,
		table.Schema, table.Name).Scan(&analyzed); err != nil {
		t.Fatal(err)
	}
	if analyzed {
		t.Skip("the outbox was analyzed meanwhile (autovacuum): its plans no longer show the case")
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	for _, from := range []int64{0, n / 2} {
		for name, explain := range map[string]func(context.Context, relay.Session, int64, int) (string, error){
			"claim of two ranges": postgres.ExplainClaim, "claim of two ranges, <> ALL": postgres.ExplainClaimFew,
			"claim of one range": postgres.ExplainClaimAbove,
		} {
			plan, err := explain(ctx, sess, from, 1000)
			if err != nil {
				t.Fatal(err)
			}
			if strings.Contains(plan, `"Bitmap`) || strings.Contains(plan, `"Node Type": "Sort"`) ||
				!strings.Contains(plan, `"Index Name": "outbox_pending_idx"`) {
				t.Errorf("%s from %d: want an ordered index scan of outbox_pending_idx, no bitmap scan and no sort; plan:\n%s", name, from, plan)
			}
		}
	}
	rows, err := sess.Claim(ctx, 0, nil, 1000, 1<<30, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1000 || rows[0].ID != 1 || rows[999].ID != 1000 {
		t.Fatalf("claim returned %d rows, want ids 1..1000", len(rows))
	}
}

// TestMarkFindsItsRowsByTheKey: on an outbox of a few rows, the mark's plan is a scan of the
// primary key, not of the table. The mark is prepared, and its generic plan, made on a small
// outbox, is kept when a backlog arrives: a sequential scan planned on one page then read all
// 200k rows at every mark (BENCHMARKS.md, "Backlog under live writers").
func TestMarkFindsItsRowsByTheKey(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'live', i::text, 'Live', 'x' FROM generate_series(1, 3) AS i`); err != nil {
		t.Fatal(err)
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	plan, err := postgres.ExplainMark(ctx, sess, []int64{1, 2})
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(plan, `"Seq Scan"`) || !strings.Contains(plan, `"Index Name": "outbox_pkey"`) {
		t.Errorf("want the mark to find its rows through outbox_pkey, not a sequential scan; plan:\n%s", plan)
	}
}
