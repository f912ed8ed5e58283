package postgres_test

import (
	"context"
	"reflect"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// roundTrips counts what a connection sends: statements on their own, batches, and the claim
// statements among both.
type roundTrips struct{ queries, batches, claims atomic.Int64 }

func (r *roundTrips) count(sql string) {
	// The claim of two ranges around the ids in flight (the others left out hashed or one by
	// one), or the claim of one range past them.
	if strings.Contains(sql, "NOT IN (SELECT unnest($3::bigint[]))") || strings.Contains(sql, "<> ALL($3::bigint[])") ||
		strings.Contains(sql, "<> ALL($2::bigint[])") {
		r.claims.Add(1)
	}
}

func (r *roundTrips) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	r.queries.Add(1)
	r.count(d.SQL)
	return ctx
}

func (r *roundTrips) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (r *roundTrips) TraceBatchStart(ctx context.Context, _ *pgx.Conn, _ pgx.TraceBatchStartData) context.Context {
	r.batches.Add(1)
	return ctx
}

func (r *roundTrips) TraceBatchQuery(_ context.Context, _ *pgx.Conn, d pgx.TraceBatchQueryData) {
	r.count(d.SQL)
}

func (r *roundTrips) TraceBatchEnd(context.Context, *pgx.Conn, pgx.TraceBatchEndData) {}

// snapshot returns the counts and sets them to zero.
func (r *roundTrips) snapshot() (queries, batches, claims int64) {
	return r.queries.Swap(0), r.batches.Swap(0), r.claims.Swap(0)
}

// TestIdlePollIsOneRoundTrip: a sleeping session whose last claim was an idle poll that found
// nothing (from the oldest row, nothing in flight, no key held) sends the next poll's claim with
// the blocked keys' statement, and the Claim that follows asks for nothing more. What it returns
// is what a claim after the blocked keys returns: the rows committed before, decoded as any
// claim decodes them. A claim with other arguments, or after another use of the session, asks
// the database; and a row committed after the prefetched claim wakes the session, so the next
// claim finds it.
func TestIdlePollIsOneRoundTrip(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	rt := &roundTrips{}
	sess := tracedLeader(ctx, t, table, rt)
	const limit, budget = 1000, 1 << 20
	poll := func() []relay.Message {
		t.Helper()
		rows, err := sess.Claim(ctx, 0, nil, limit, budget, nil)
		if err != nil {
			t.Fatal(err)
		}
		return rows
	}
	reload := func() {
		t.Helper()
		if _, err := sess.Blocked(ctx, true); err != nil {
			t.Fatal(err)
		}
	}
	// Asleep as the relay gets there: empty claims a linger apart, then the sleep lock and a
	// claim after it.
	deadline := time.Now().Add(time.Minute)
	for !sess.(relay.Sleeper).Asleep() {
		if time.Now().After(deadline) {
			t.Fatal("the session did not fall asleep within a minute of empty claims")
		}
		if rows := poll(); len(rows) != 0 {
			t.Fatalf("claimed %d rows of an empty outbox", len(rows))
		}
		if err := sess.Wait(ctx, 50*time.Millisecond); err != nil {
			t.Fatal(err)
		}
		_ = sess.Notified()
	}
	poll()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	insert := func(key string) int64 {
		t.Helper()
		var id int64
		if err := pool.QueryRow(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload, headers)
			VALUES ('order', $1, 'placed', '\x00ff'::bytea, '{"trace":"t-1"}') RETURNING id`, key).Scan(&id); err != nil {
			t.Fatal(err)
		}
		return id
	}
	drop := func(id int64) {
		t.Helper()
		if _, err := pool.Exec(ctx, `DELETE FROM `+ident+` WHERE id = $1`, id); err != nil {
			t.Fatal(err)
		}
	}

	// An idle poll: one round trip for the keys and the claim.
	rt.snapshot()
	reload()
	if rows := poll(); len(rows) != 0 {
		t.Fatalf("idle poll claimed %v", rows)
	}
	if q, b, c := rt.snapshot(); q != 0 || b != 1 || c != 1 {
		t.Fatalf("idle poll: %d statements and %d batches sent, %d claims; want one batch with the claim", q, b, c)
	}

	// A row committed before the poll comes with it, as any claim decodes it.
	a := insert("a")
	reload()
	got := poll()
	if q, b, c := rt.snapshot(); q != 0 || b != 1 || c != 1 || len(got) != 1 || got[0].ID != a {
		t.Fatalf("poll after row %d: %d statements, %d batches, %d claims, rows %v", a, q, b, c, got)
	}
	again := poll() // not after Blocked: asks the database
	if len(again) != 1 || !reflect.DeepEqual(got[0], again[0]) {
		t.Fatalf("the prefetched row differs from the claimed one:\n%+v\n%+v", got[0], again[0])
	}
	if string(got[0].Payload) != "\x00\xff" || got[0].AggregateID != "a" || !strings.Contains(string(got[0].Headers), "t-1") {
		t.Fatalf("prefetched row %+v", got[0])
	}
	drop(a)

	// A poll that found rows is no idle poll: the next reload sends its statement alone.
	rt.snapshot()
	reload()
	if q, b, _ := rt.snapshot(); q != 1 || b != 0 {
		t.Fatalf("reload after a poll that found rows: %d statements, %d batches; want the statement alone", q, b)
	}
	poll() // empty: idle again
	rt.snapshot()

	// A claim with other arguments than the idle poll's asks the database, and sees the rows
	// committed since.
	reload()
	b := insert("b")
	if rows, err := sess.Claim(ctx, 0, []int64{b - 1000}, limit, budget, nil); err != nil || len(rows) != 1 || rows[0].ID != b {
		t.Fatalf("claim with ids in flight after the reload: %v, %v; want row %d", rows, err, b)
	}
	if q, _, c := rt.snapshot(); q != 1 || c != 2 {
		t.Fatalf("claim with other arguments: %d statements, %d claims; want one more claim", q, c)
	}
	drop(b)
	poll()

	// Another use of the session between the reload and the claim drops the prefetched claim.
	reload()
	c := insert("c")
	if _, err := sess.Horizon(ctx); err != nil {
		t.Fatal(err)
	}
	if rows := poll(); len(rows) != 1 || rows[0].ID != c {
		t.Fatalf("claim after the horizon: %v; want row %d committed after the reload", rows, c)
	}
	drop(c)
	poll()

	// Two reloads in a row: the claim follows the second.
	reload()
	e := insert("e")
	reload()
	if rows := poll(); len(rows) != 1 || rows[0].ID != e {
		t.Fatalf("claim after a second reload: %v; want row %d committed between the two", rows, e)
	}
	drop(e)
	poll()

	// A row committed after the prefetched claim: that claim does not see it, and the writer's
	// notification wakes the session for the claim that does.
	_ = sess.Notified()
	reload()
	d := insert("d")
	if rows := poll(); len(rows) != 0 {
		t.Fatalf("the prefetched claim saw row %d, committed after it: %v", d, rows)
	}
	woke := time.Now()
	for !sess.Notified() {
		if time.Since(woke) > 30*time.Second {
			t.Fatalf("no wake-up within 30s for row %d, committed while the session slept", d)
		}
		if err := sess.Wait(ctx, time.Second); err != nil {
			t.Fatal(err)
		}
	}
	if rows := poll(); len(rows) != 1 || rows[0].ID != d {
		t.Fatalf("claim after the wake-up: %v; want row %d", rows, d)
	}
}

// tracedLeader opens a session on table whose connection reports its statements to tracer,
// makes it the leader, and closes it when the test ends.
func tracedLeader(ctx context.Context, t *testing.T, table postgres.Table, tracer pgx.QueryTracer) relay.Session {
	t.Helper()
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	conn.Tracer = tracer
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: table})
	if err != nil {
		t.Fatal(err)
	}
	sess, err := store.Open(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = sess.Close(context.Background()) })
	if led, err := sess.TryLead(ctx); err != nil || !led {
		t.Fatalf("lead: %v, %v", led, err)
	}
	return sess
}
