package postgres_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestClaimNeverEndsInsideATransaction checks the claims of StoreConfig.Transactions: each row
// carries its writing transaction, two transactions whose rows interleave are each returned
// whole by the claim that returns their first row (beyond the claim's row bound), the rows of a
// transaction left in flight are not returned again, and rows written before the column existed
// (NULL) are each a transaction of their own. Without the option, TxID is 0.
func TestClaimNeverEndsInsideATransaction(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	insert := func(conn *pgx.Conn, key string) {
		t.Helper()
		if _, err := conn.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload) VALUES ('t', $1, 'E', 'x')`, key); err != nil {
			t.Fatal(err)
		}
	}
	// Two rows written before the column had a default: NULL, each its own transaction.
	if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload, tx)
		VALUES ('t', 'old', 'E', 'x', NULL), ('t', 'old', 'E', 'x', NULL)`); err != nil {
		t.Fatal(err)
	}
	// Transactions a and b interleave their rows: a1 b1 a2 b2 a3 b3 ... a5 b5.
	ca, err := pgx.Connect(ctx, dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer ca.Close(ctx)
	cb, err := pgx.Connect(ctx, dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer cb.Close(ctx)
	for _, c := range []*pgx.Conn{ca, cb} {
		if _, err := c.Exec(ctx, `BEGIN`); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 5 {
		insert(ca, fmt.Sprintf("a%d", i))
		insert(cb, fmt.Sprintf("b%d", i))
	}
	for _, c := range []*pgx.Conn{ca, cb} {
		if _, err := c.Exec(ctx, `COMMIT`); err != nil {
			t.Fatal(err)
		}
	}

	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table, Transactions: true})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := store.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)

	// A claim of 1 row: the first NULL row alone.
	rows, err := sess.Claim(ctx, 0, nil, 1, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].AggregateID != "old" || rows[0].TxID != 0 {
		t.Fatalf("first claim of 1 row: got %v, want the first old row with TxID 0", summary(rows))
	}
	skip := []int64{rows[0].ID}
	// A claim of 2 rows: the second NULL row, then a's first row, and the rest of a.
	rows, err = sess.Claim(ctx, 0, skip, 2, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := summary(rows); got != "old a0 a1 a2 a3 a4" {
		t.Fatalf("claim of 2 rows: got %q, want the second old row and all of transaction a", got)
	}
	txA := rows[1].TxID
	for _, r := range rows[1:] {
		if r.TxID == 0 || r.TxID != txA {
			t.Fatalf("row %s: TxID %d, want a's %d (non-zero)", r.AggregateID, r.TxID, txA)
		}
		skip = append(skip, r.ID)
	}
	skip = append(skip, rows[0].ID)
	// The rest: b whole, even with a byte budget of 1.
	rows, err = sess.Claim(ctx, 0, skip, 1, 1, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := summary(rows); got != "b0 b1 b2 b3 b4" {
		t.Fatalf("claim of 1 row and 1 byte: got %q, want all of transaction b", got)
	}
	if rows[0].TxID == txA || rows[0].TxID == 0 {
		t.Fatalf("b's TxID %d: want non-zero and not a's", rows[0].TxID)
	}

	// Without the option the column is not read.
	plain := dbtest.Session(t, table, dbtest.URL())
	rows, err = plain.Claim(ctx, 0, nil, 3, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 3 {
		t.Fatalf("plain claim of 3: got %d rows", len(rows))
	}
	for _, r := range rows {
		if r.TxID != 0 {
			t.Fatalf("plain claim: row %d has TxID %d, want 0", r.ID, r.TxID)
		}
	}
}

// summary lists the aggregate ids of rows, in order.
func summary(rows []relay.Message) string {
	s := ""
	for i, r := range rows {
		if i > 0 {
			s += " "
		}
		s += r.AggregateID
	}
	return s
}

// TestClaimFlagsTheRowsAWholeTransactionWaitsFor checks that a claim of StoreConfig.Transactions
// returns, with a transaction it returned a row of, every other pending row of it that may not go
// now (held key, in flight, backing off) flagged TxHeld, and the rows that may go unflagged: the
// relay then hands over the transaction only whole.
func TestClaimFlagsTheRowsAWholeTransactionWaitsFor(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	// One transaction: keys x, y, z, w, y in id order.
	if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('t', 'x', 'E', 'x'), ('t', 'y', 'E', 'x'), ('t', 'z', 'E', 'x'), ('t', 'w', 'E', 'x'), ('t', 'y', 'E', 'x')`); err != nil {
		t.Fatal(err)
	}
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table, Transactions: true})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := store.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer sess.Close(ctx)
	flags := func(rows []relay.Message) string {
		s := ""
		for i, r := range rows {
			if i > 0 {
				s += " "
			}
			s += r.AggregateID
			if r.TxHeld {
				s += "!"
			}
			if r.TxID <= 0 || r.TxID != rows[0].TxID {
				t.Fatalf("row %s: TxID %d, want the transaction's (positive, the same for all)", r.AggregateID, r.TxID)
			}
		}
		return s
	}
	all, err := sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := flags(all); got != "x y z w y" {
		t.Fatalf("plain claim: %q, want every row unflagged", got)
	}
	// y's key held (parked: no head): both y rows come flagged.
	rows, err := sess.Claim(ctx, 0, nil, 10, 1<<20, relay.Blocked{relay.BlockKey("t", "y"): 0})
	if err != nil {
		t.Fatal(err)
	}
	if got := flags(rows); got != "x y! z w y!" {
		t.Fatalf("claim with y's key held: %q, want the y rows flagged", got)
	}
	// y's key held behind its first row: the second, of the head's transaction, goes with it.
	rows, err = sess.Claim(ctx, 0, nil, 10, 1<<20, relay.Blocked{relay.BlockKey("t", "y"): all[1].ID})
	if err != nil {
		t.Fatal(err)
	}
	if got := flags(rows); got != "x y z w y" {
		t.Fatalf("claim with y's key held behind its first row: %q, want nothing flagged", got)
	}
	// z in flight (skipped) and a claim of one row: x, then the rest of its transaction, z
	// flagged, y and w unflagged (above the claim's last row, free).
	rows, err = sess.Claim(ctx, 0, []int64{all[2].ID}, 1, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := flags(rows); got != "x y z! w y" {
		t.Fatalf("claim of one row with z in flight: %q, want z flagged", got)
	}
	// w backing off (a failed attempt): w flagged.
	if err := sess.Retry(ctx, all[3].ID, "test", time.Hour); err != nil {
		t.Fatal(err)
	}
	rows, err = sess.Claim(ctx, 0, nil, 10, 1<<20, nil)
	if err != nil {
		t.Fatal(err)
	}
	if got := flags(rows); got != "x y z w! y" {
		t.Fatalf("claim with w backing off: %q, want w flagged", got)
	}
}
