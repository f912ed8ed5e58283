package postgres_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestBlockedReadsFailingAndParkedKeysAtOnce: the blocked keys, read in one query, map a key
// with a failing row to its lowest failing id and a parked key to 0, also when it has a failing
// row as well; without the parked keys, only the failing ones.
func TestBlockedReadsFailingAndParkedKeysAtOnce(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	sess := dbtest.Session(t, table, dbtest.URL())
	if ok, err := sess.TryLead(ctx); err != nil || !ok {
		t.Fatalf("TryLead: %v, %v", ok, err)
	}
	row := func(key string) int64 {
		t.Helper()
		var id int64
		if err := pool.QueryRow(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+
			` (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, 'placed', 'x') RETURNING id`, key).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	failing, failing2, parked, both, bothParked := row("failing"), row("failing"), row("parked"), row("both"), row("both")
	for _, id := range []int64{failing2, failing, both} {
		if err := sess.Retry(ctx, id, "broker said no", 0); err != nil {
			t.Fatal(err)
		}
	}
	for _, id := range []int64{parked, bothParked} {
		if err := sess.Park(ctx, id, "poison"); err != nil {
			t.Fatal(err)
		}
	}
	got, err := sess.Blocked(ctx, true)
	if err != nil {
		t.Fatal(err)
	}
	want := relay.Blocked{relay.BlockKey("order", "failing"): failing, relay.BlockKey("order", "parked"): 0, relay.BlockKey("order", "both"): 0}
	if len(got) != len(want) {
		t.Fatalf("blocked keys %v, want %v", got, want)
	}
	for k, id := range want {
		if g, ok := got[k]; !ok || g != id {
			t.Fatalf("blocked keys %v, want %v", got, want)
		}
	}
	got, err = sess.Blocked(ctx, false)
	if err != nil {
		t.Fatal(err)
	}
	want = relay.Blocked{relay.BlockKey("order", "failing"): failing, relay.BlockKey("order", "both"): both}
	if len(got) != len(want) || got[relay.BlockKey("order", "failing")] != failing || got[relay.BlockKey("order", "both")] != both {
		t.Fatalf("failing keys %v, want %v", got, want)
	}
}
