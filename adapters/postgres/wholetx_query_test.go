package postgres_test

import (
	"context"
	"fmt"
	"math/rand/v2"
	"slices"
	"testing"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestWholeTxsReadsWhatTheirFirstFormRead checks the claim of StoreConfig.Transactions, which
// reads the rest of the claim's transactions by ranges of (tx, id) and by the gaps between the
// claim's ids, against the plain form it replaced (every row of each transaction, less the
// claim's): on outboxes of random transactions (interleaved, some rows without one), with rows
// backing off, rows gone (marked) and rows dispatched, and random claims (start, limit, rows in
// flight as a run and one by one, held keys with and without a head), both return the same rows
// with the same flags, in the same order.
func TestWholeTxsReadsWhatTheirFirstFormRead(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table, Transactions: true})
	if err != nil {
		t.Fatal(err)
	}
	claim, claimHold, refClaim, refClaimHold := postgres.ClaimQueries(store)
	rng := rand.New(rand.NewPCG(17, 1))
	type row struct{ id, tx int64 }
	read := func(q string, args ...any) []row {
		t.Helper()
		rows, err := pool.Query(ctx, q, args...)
		if err != nil {
			t.Fatal(err)
		}
		var out []row
		for rows.Next() {
			vals, err := rows.Values()
			if err != nil {
				t.Fatal(err)
			}
			out = append(out, row{vals[0].(int64), vals[len(vals)-1].(int64)})
		}
		if err := rows.Err(); err != nil {
			t.Fatal(err)
		}
		return out
	}
	compared, extended := 0, 0
	for outbox := range 12 {
		if _, err := pool.Exec(ctx, `TRUNCATE `+ident); err != nil {
			t.Fatal(err)
		}
		// 200 rows; each of them of one of ntx transactions (tx values of our own), or none.
		ntx := 1 + rng.IntN(60)
		if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload, tx)
			SELECT 't', (i % 7)::text, 'E', 'x', CASE WHEN random() < 0.1 THEN NULL ELSE (1000 + floor(random() * $1))::text::xid8 END
			FROM generate_series(1, 200) i ORDER BY i`, ntx); err != nil {
			t.Fatal(err)
		}
		var first int64
		if err := pool.QueryRow(ctx, `SELECT min(id) FROM `+ident).Scan(&first); err != nil {
			t.Fatal(err)
		}
		// Some rows back off, some are gone (marked in delete mode), some dispatched (retain).
		if _, err := pool.Exec(ctx, `UPDATE `+ident+` SET attempts = 1, next_attempt_at = now() + interval '1 hour' WHERE random() < $1`, rng.Float64()*0.1); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.Exec(ctx, `DELETE FROM `+ident+` WHERE random() < $1`, rng.Float64()*0.2); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.Exec(ctx, `UPDATE `+ident+` SET dispatched_at = now() WHERE random() < $1`, rng.Float64()*0.1); err != nil {
			t.Fatal(err)
		}
		for range 40 {
			from := first + int64(rng.IntN(120))
			limit := 1 + rng.IntN(80)
			// In flight: a run, and ids one by one.
			lo, hi := int64(1), int64(0)
			if rng.IntN(2) == 0 {
				lo = first + int64(rng.IntN(200))
				hi = lo + int64(rng.IntN(30))
			}
			rest := []int64{}
			for range rng.IntN(15) {
				if id := first + int64(rng.IntN(200)); id < lo || id > hi {
					rest = append(rest, id)
				}
			}
			args := []any{lo, hi, rest, limit, from}
			q, ref := claim, refClaim
			if rng.IntN(3) == 0 {
				// Held keys: one with its head, one without (parked).
				k1, k2 := fmt.Sprint(rng.IntN(7)), fmt.Sprint(rng.IntN(7))
				var head int64
				_ = pool.QueryRow(ctx, `SELECT coalesce(min(id), 0) FROM `+ident+` WHERE aggregate_id = $1 AND dispatched_at IS NULL AND id >= $2`, k1, from).Scan(&head)
				args = append(args, []string{"t", "t"}, []string{k1, k2}, []int64{head})
				q, ref = claimHold, refClaimHold
			}
			got, want := read(q, args...), read(ref, args...)
			if !slices.Equal(got, want) {
				t.Fatalf("outbox %d, claim %v:\n got %v\nwant %v", outbox, args, got, want)
			}
			compared++
			if n := limit; len(want) > n {
				extended++
			}
		}
	}
	if extended < compared/4 {
		t.Fatalf("only %d of %d claims read rows beyond their limit: the test does not exercise the extension", extended, compared)
	}
}
