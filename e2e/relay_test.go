package e2e_test

import (
	"context"
	"encoding/json"
	"math/rand/v2"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// inProcessConfig is the relay configuration of the in-process tests: small batches so that
// many claims, rescans and marks happen.
var inProcessConfig = relay.Config{BatchSize: 100, MaxInFlight: 400, PollInterval: 200 * time.Millisecond}

// TestRelayEndToEnd runs the relay (relay.Relay on the Postgres store and the Kafka publisher)
// while 8 writers commit concurrently: each transaction locks its key's row, bumps the key's
// sequence and inserts an event; 10% roll back; some hold their transaction open 20 to 200 ms
// after inserting, so ids commit out of order. Every committed event must be on the topic once,
// no rolled-back one, in sequence order per key, with the row's event id and key.
func TestRelayEndToEnd(t *testing.T) {
	f := newFixture(t, 50, 3)
	stop := f.startRelay(inProcessConfig)
	wait := f.run(load{writers: 8, perWrite: 250, rollback: 0.10, hold: 0.15}, nil)
	wait()
	if t.Failed() {
		t.FailNow()
	}
	f.waitDrained(2 * time.Minute)
	stop()

	v := f.oracle.check(t, readTopic(t, f.broker.Addrs, f.topic))
	if v.committed < 1500 || v.rolledBack == 0 {
		t.Fatalf("load too small to prove anything: %s", v)
	}
	if v.duplicates != 0 {
		t.Errorf("D: %d duplicates without any failure, want 0", v.duplicates)
	}
}

// TestRelayVisibilityGap commits ids out of order on purpose: transaction A inserts first (the
// lower id) and stays open while B inserts and commits. B must be published while A is still
// open, and A once it commits. A transaction that holds a snapshot for the whole test, and one
// that inserted an event and never commits, hold back nothing.
func TestRelayVisibilityGap(t *testing.T) {
	f := newFixture(t, 4, 1)
	ctx := context.Background()

	// Open for the whole test: a snapshot pinned by an unrelated reader...
	reader, err := f.pool.BeginTx(ctx, pgx.TxOptions{IsoLevel: pgx.RepeatableRead})
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = reader.Rollback(ctx) }()
	var n int
	if err := reader.QueryRow(ctx, `SELECT count(*) FROM `+f.seqTable()).Scan(&n); err != nil {
		t.Fatal(err)
	}
	// ...and a writer that inserted the lowest id of all and never commits.
	stuck, err := f.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = stuck.Rollback(ctx) }()
	ws := &written{token: "tok-stuck", key: "stuck-key", seq: 1}
	payload, _ := json.Marshal(eventPayload{Key: ws.key, Seq: ws.seq, Token: ws.token})
	if err := stuck.QueryRow(ctx, `INSERT INTO `+f.outbox()+` (aggregate_type, aggregate_id, event_type, payload)
		VALUES ($1, $2, 'SequenceBumped', $3) RETURNING id, event_id::text`, aggType, ws.key, payload).Scan(&ws.rowID, &ws.eventID); err != nil {
		t.Fatal(err)
	}
	f.oracle.add(ws)

	f.startRelay(inProcessConfig)
	tl := startTail(t, f.broker.Addrs, f.topic)

	// A takes id n and waits; B takes n+1 and commits first.
	inserted := make(chan *written, 1)
	release := make(chan struct{})
	doneA := make(chan error, 1)
	go func() {
		_, err := f.write(ctx, nil, writeOpts{key: f.keys[0], inserted: inserted, release: release})
		doneA <- err
	}()
	var wa *written
	select {
	case wa = <-inserted:
	case err := <-doneA:
		t.Fatalf("transaction A: %v", err)
	}
	wb, err := f.write(ctx, nil, writeOpts{key: f.keys[1]})
	if err != nil {
		close(release)
		t.Fatalf("transaction B: %v", err)
	}
	if !(ws.rowID < wa.rowID && wa.rowID < wb.rowID) {
		close(release)
		t.Fatalf("ids: stuck %d, A %d, B %d: the test needs them increasing", ws.rowID, wa.rowID, wb.rowID)
	}
	tl.waitFor(t, wb.eventID, time.Minute) // B is out while A (lower id) is still open
	if tl.has(wa.eventID) {
		t.Fatalf("A published before it committed")
	}
	close(release)
	if err := <-doneA; err != nil {
		t.Fatalf("transaction A: %v", err)
	}
	tl.waitFor(t, wa.eventID, time.Minute)

	// More traffic while the reader and the stuck writer stay open, including the keys of A and B.
	f.run(load{writers: 3, perWrite: 60, rollback: 0.1, hold: 0.2}, nil)()
	// The stuck writer's row is the only one left.
	deadline := time.Now().Add(2 * time.Minute)
	for {
		pending, _, err := f.pending(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if pending == 0 {
			break // the database sees only committed rows: the stuck one is invisible
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d rows pending after 2m while a snapshot and an uncommitted insert stay open", pending)
		}
		time.Sleep(100 * time.Millisecond)
	}
	if err := stuck.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	f.oracle.resolve(ws, txRolledBack)
	if err := reader.Rollback(ctx); err != nil {
		t.Fatal(err)
	}
	v := f.oracle.check(t, readTopic(t, f.broker.Addrs, f.topic))
	if v.duplicates != 0 {
		t.Errorf("D: %d duplicates without any failure, want 0", v.duplicates)
	}
}

// TestRelayLosesNoWakeUp runs the relay with the longest poll interval (a minute) beside writers
// that commit in rounds: in each, a burst of 20 transactions and four writers that commit a few
// transactions, some held open a moment after inserting, then all stop until the relay
// published and marked every row. The
// relay goes to sleep and wakes up hundreds of times, and writers insert while it is awake (their
// trigger then sends no notification) and commit while it goes to sleep. A lost wake-up leaves
// a round's last rows to the next poll, a minute later: every round must end long before.
func TestRelayLosesNoWakeUp(t *testing.T) {
	f := newFixture(t, 20, 3)
	f.startRelay(relay.Config{PollInterval: time.Minute})
	ctx := context.Background()
	// The bound is generous for a loaded machine, and half the poll interval.
	const rounds, bound = 150, 30 * time.Second
	for r := range rounds {
		var wg sync.WaitGroup
		// A burst of one event per key, each its own transaction, and as many notifications at
		// once as a commit rate past the relay's busy threshold would send it (50 in one
		// commit): the relay, busy, lets its sleep lock go and the writers beside it stop
		// notifying. (Twenty transactions alone commit too slowly on a loaded machine to cross
		// the threshold, 24 notifications within 20 ms.)
		wg.Go(func() {
			if _, err := f.pool.Exec(ctx, `SELECT pg_notify($1, g::text) FROM generate_series(1, 50) g`, f.table.Channel()); err != nil {
				t.Errorf("notifications: %v", err)
			}
			f.backlog(1)
		})
		for i := range 4 {
			rng := rand.New(rand.NewPCG(uint64(r*4+i)+1, uint64(time.Now().UnixNano())))
			wg.Go(func() {
				for range 1 + rng.IntN(3) {
					o := writeOpts{}
					if rng.IntN(2) == 0 {
						o.hold = time.Duration(rng.Int64N(int64(3 * time.Millisecond)))
					}
					if _, err := f.write(ctx, rng, o); err != nil {
						t.Errorf("writer %d: %v", i, err)
						return
					}
				}
			})
		}
		wg.Wait()
		if t.Failed() {
			t.FailNow()
		}
		start := time.Now()
		for {
			n, _, err := f.pending(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if n == 0 {
				break
			}
			if time.Since(start) > bound {
				t.Fatalf("round %d: %d rows still pending %s after the last commit (poll interval 1 min): a wake-up was lost", r, n, bound)
			}
			time.Sleep(time.Millisecond)
		}
	}
	v := f.oracle.check(t, readTopic(t, f.broker.Addrs, f.topic))
	if v.committed < rounds*4 {
		t.Fatalf("load too small to prove anything: %s", v)
	}
}
