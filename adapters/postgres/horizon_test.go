package postgres_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestHorizonStopsBelowOpenWriters: the horizon never passes the id of a row whose transaction
// is still open, though rows with higher ids commit meanwhile, and moves past it once it commits.
func TestHorizonStopsBelowOpenWriters(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	insert := `INSERT INTO ` + ident + ` (aggregate_type, aggregate_id, event_type, payload) VALUES ('o', 'k', 'e', 'p') RETURNING id`
	var first int64
	if err := pool.QueryRow(ctx, insert).Scan(&first); err != nil {
		t.Fatal(err)
	}
	open, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = open.Rollback(context.Background()) }()
	var held int64
	if err := open.QueryRow(ctx, insert).Scan(&held); err != nil {
		t.Fatal(err)
	}
	var last int64
	for range 5 {
		if err := pool.QueryRow(ctx, insert).Scan(&last); err != nil {
			t.Fatal(err)
		}
	}

	sess := dbtest.Session(t, table, dbtest.URL())
	horizon := func() int64 {
		t.Helper()
		time.Sleep(60 * time.Millisecond) // past the session's pause between looks
		h, err := sess.Horizon(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	for range 4 {
		if h := horizon(); h >= held {
			t.Fatalf("horizon %d while row %d is uncommitted", h, held)
		}
	}
	if err := open.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	var h int64
	for deadline := time.Now().Add(60 * time.Second); time.Now().Before(deadline); {
		if h = horizon(); h >= last {
			break
		}
	}
	if h < last {
		t.Fatalf("horizon %d after every writer committed, want at least %d", h, last)
	}
}

// TestHorizonLooksByRowsClaimed: a session looks at the writers again once it claimed 50 rows
// since its last look (and 50 ms passed), or a second passed: a slow relay reads the horizon
// about once a second instead of 20 times. Each look after the first moves the horizon to what
// the look before it found, with no writer open, so whether a call looked shows in its value.
func TestHorizonLooksByRowsClaimed(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	insert := func(n int) int64 {
		t.Helper()
		var last int64
		err := pool.QueryRow(ctx, `WITH ins AS (INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
			SELECT 'o', 'k' || i, 'e', 'p' FROM generate_series(1, $1) i RETURNING id) SELECT max(id) FROM ins`, n).Scan(&last)
		if err != nil {
			t.Fatal(err)
		}
		return last
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	horizon := func() int64 {
		t.Helper()
		h, err := sess.Horizon(ctx)
		if err != nil {
			t.Fatal(err)
		}
		return h
	}
	first := insert(1)
	h0 := horizon() // the first look: a candidate, no horizon yet
	time.Sleep(60 * time.Millisecond)
	if h := horizon(); h != h0 {
		t.Fatalf("horizon %d after %d: a look with no row claimed since the last, within a second", h, h0)
	}
	last := insert(60)
	rows, err := sess.Claim(ctx, 0, nil, 1000, 1<<20, nil)
	if err != nil || len(rows) < 50 {
		t.Fatalf("claim: %d rows, %v; want the 61 written", len(rows), err)
	}
	time.Sleep(60 * time.Millisecond)
	h1 := horizon()
	if h1 < first || h1 >= last {
		t.Fatalf("horizon %d after claiming %d rows: want the first look's %d (the second look's candidate is %d)", h1, len(rows), first, last)
	}
	time.Sleep(60 * time.Millisecond)
	if h := horizon(); h != h1 {
		t.Fatalf("horizon %d after %d: a look with no row claimed since the last, within a second", h, h1)
	}
	time.Sleep(horizonWait)
	if h := horizon(); h < last {
		t.Fatalf("horizon %d a second after the last look: want the look before's %d", h, last)
	}
}

// horizonWait is a little over the longest pause between two looks at the writers.
const horizonWait = 1100 * time.Millisecond

// TestHorizonRefusesCachedSequences: a sequence that hands ids out in blocks per session can
// insert a row below ids already committed at any later time: no horizon then, and claims read
// from the oldest row.
func TestHorizonRefusesCachedSequences(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	if _, err := pool.Exec(ctx, `ALTER TABLE `+ident+` ALTER COLUMN id SET CACHE 20`); err != nil {
		t.Fatal(err)
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	if _, err := sess.Horizon(ctx); !errors.Is(err, relay.ErrNoHorizon) {
		t.Fatalf("horizon error %v, want ErrNoHorizon", err)
	}
	if h, err := sess.Horizon(ctx); err != nil || h != 0 {
		t.Fatalf("second call: %d, %v; want 0 and no error", h, err)
	}
}
