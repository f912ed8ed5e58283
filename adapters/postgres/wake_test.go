package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// wakeLoop drives a session as the relay's claim loop does: claim, then claim again at once if
// rows came or a wake-up came, else wait for one, claiming again only when it came or the poll
// interval (a minute, the longest allowed) passed. Every id it claims is
// sent on ids; it stops when ctx ends.
func wakeLoop(ctx context.Context, sess relay.Session, ids chan<- int64) <-chan error {
	done := make(chan error, 1)
	go func() {
		var skip []int64
		for ctx.Err() == nil {
			poll := time.Now()
			rows, err := sess.Claim(ctx, 0, skip, 1000, 1<<30, nil)
			if err != nil && ctx.Err() == nil {
				done <- err
				return
			}
			for _, m := range rows {
				skip = append(skip, m.ID)
				ids <- m.ID
			}
			// Like the relay, it claims again only on a wake-up or once the poll interval passed.
			for len(rows) == 0 && !sess.Notified() && time.Since(poll) < time.Minute && ctx.Err() == nil {
				if err := sess.Wait(ctx, time.Minute-time.Since(poll)); err != nil && ctx.Err() == nil {
					done <- err
					return
				}
			}
		}
		done <- nil
	}()
	return done
}

// insert appends one row in tx and returns its id.
func insert(ctx context.Context, t *testing.T, tx pgx.Tx, table postgres.Table) int64 {
	t.Helper()
	var id int64
	if err := tx.QueryRow(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+
		` (aggregate_type, aggregate_id, event_type, payload) VALUES ('order', 'k', 'placed', 'x') RETURNING id`).Scan(&id); err != nil {
		t.Fatal(err)
	}
	return id
}

// busy makes tx, at its commit, send the relay as many notifications at once as a commit rate
// past its busy threshold would (24 within 20 ms): a sleeping relay then lets its sleep lock go
// at its next claim that finds rows.
func busy(ctx context.Context, t *testing.T, tx pgx.Tx, table postgres.Table) {
	t.Helper()
	if _, err := tx.Exec(ctx, `SELECT pg_notify($1, g::text) FROM generate_series(1, 50) g`, table.Channel()); err != nil {
		t.Fatal(err)
	}
}

// awaitID waits, at most within, for id on ids.
func awaitID(t *testing.T, ids <-chan int64, id int64, within time.Duration, what string) {
	t.Helper()
	deadline := time.After(within)
	for {
		select {
		case got := <-ids:
			if got == id {
				return
			}
		case <-deadline:
			t.Fatalf("%s: row %d not claimed within %s (the session waits up to a minute for a wake-up)", what, id, within)
		}
	}
}

// advisory counts the sessions waiting for table's sleep lock in exclusive mode (the relay going
// to sleep), and those holding it in share mode (writers in a transaction that did not notify).
func advisory(ctx context.Context, t *testing.T, pool *pgxpool.Pool, table postgres.Table) (waiters, holders int) {
	t.Helper()
	if err := pool.QueryRow(ctx, `SELECT count(*) FILTER (WHERE NOT granted AND mode = 'ExclusiveLock'),
			count(*) FILTER (WHERE granted AND mode = 'ShareLock')
		FROM pg_locks WHERE locktype = 'advisory' AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
			AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0)`, "outbox-relay:sleep:"+table.String()).
		Scan(&waiters, &holders); err != nil {
		t.Fatal(err)
	}
	return waiters, holders
}

// TestWakeUpOfAWriterThatDidNotNotify is the race the wake-up protocol exists for: a writer
// inserts while the relay is awake, so its trigger sends no notification, and commits only
// after the relay's last claim, while the relay is going to sleep. The relay must claim the row
// on its own, long before its poll interval (a minute here). Run twice: the writer commits while
// the relay waits for the sleep lock, and before the relay ever tries to take it.
func TestWakeUpOfAWriterThatDidNotNotify(t *testing.T) {
	t.Parallel()
	for _, phase := range []string{"while the relay waits for the sleep lock", "before the relay's next wait"} {
		t.Run(strings.ReplaceAll(phase, " ", "_"), func(t *testing.T) {
			t.Parallel()
			pool, table := dbtest.Schema(t)
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			defer cancel()
			sess := dbtest.Session(t, table, dbtest.URL())
			if ok, err := sess.TryLead(ctx); err != nil || !ok {
				t.Fatalf("TryLead: %v, %v", ok, err)
			}
			ids := make(chan int64, 10000)
			lctx, stop := context.WithCancel(ctx)
			done := wakeLoop(lctx, sess, ids)
			defer func() {
				stop()
				if err := <-done; err != nil {
					t.Errorf("claim loop: %v", err)
				}
			}()

			// A burst of committed rows: the relay reads them awake, and lets the sleep lock go.
			tx, err := pool.Begin(ctx)
			if err != nil {
				t.Fatal(err)
			}
			var last int64
			for range 20 {
				last = insert(ctx, t, tx, table)
			}
			busy(ctx, t, tx, table)
			if err := tx.Commit(ctx); err != nil {
				t.Fatal(err)
			}
			awaitID(t, ids, last, 30*time.Second, "the burst")

			// The writer inserts; it may find the relay awake (no notification, the sleep lock
			// kept in share mode) or already asleep (a notification): the first case is the one
			// this test is about, and it is retried until it happens.
			for attempt := 0; ; attempt++ {
				if attempt == 200 {
					t.Fatal("the writer never found the relay awake in 200 tries")
				}
				time.Sleep(time.Duration(attempt%4) * 500 * time.Microsecond) // land at different points of the relay's busy spell
				w, err := pool.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				id := insert(ctx, t, w, table)
				var skipped bool
				if err := w.QueryRow(ctx, `SELECT EXISTS (SELECT 1 FROM pg_locks WHERE locktype = 'advisory' AND pid = pg_backend_pid()
					AND mode = 'ShareLock' AND granted AND ((classid::bigint << 32) | objid::bigint) = hashtextextended($1, 0))`,
					"outbox-relay:sleep:"+table.String()).Scan(&skipped); err != nil {
					t.Fatal(err)
				}
				// Hold it until the relay's claims can no longer see it before the commit: the
				// relay waits for the sleep lock, or (second phase) a moment.
				if phase == "while the relay waits for the sleep lock" && skipped {
					for {
						waiters, _ := advisory(ctx, t, pool, table)
						if waiters > 0 {
							break
						}
						if ctx.Err() != nil {
							t.Fatal("the relay never waited for the sleep lock")
						}
						time.Sleep(time.Millisecond)
					}
				}
				if err := w.Commit(ctx); err != nil {
					t.Fatal(err)
				}
				awaitID(t, ids, id, 30*time.Second, "a writer's row committed "+phase)
				if skipped {
					t.Logf("the writer found the relay awake at try %d", attempt+1)
					return
				}
				// It notified: the relay was asleep. Wake it into a busy spell and try again.
				tx, err := pool.Begin(ctx)
				if err != nil {
					t.Fatal(err)
				}
				for range 20 {
					last = insert(ctx, t, tx, table)
				}
				busy(ctx, t, tx, table)
				if err := tx.Commit(ctx); err != nil {
					t.Fatal(err)
				}
				awaitID(t, ids, last, 30*time.Second, "a burst")
			}
		})
	}
}

// TestTriggerNotifiesOnlyASleepingRelay checks the trigger's three cases from a writer's side:
// no relay holds the awake lock (an older relay, or none): it notifies, as before; a relay is
// awake: it does not, and keeps the sleep lock in share mode until it commits; a relay sleeps
// (holds the sleep lock, or waits for it): it notifies.
func TestTriggerNotifiesOnlyASleepingRelay(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	conn := func() *pgx.Conn {
		c, err := pgx.Connect(ctx, dbtest.URL())
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { _ = c.Close(context.Background()) })
		return c
	}
	listener, relayConn := conn(), conn()
	if _, err := listener.Exec(ctx, `LISTEN `+pgx.Identifier{table.Channel()}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	lock := func(c *pgx.Conn, fn, what string) {
		t.Helper()
		if _, err := c.Exec(ctx, `SELECT `+fn+`(hashtextextended($1, 0))`, "outbox-relay:"+what+":"+table.String()); err != nil {
			t.Fatal(err)
		}
	}
	// notified commits one row and reports whether it notified: a marker notification sent
	// after its commit arrives after the row's, if any.
	notified := func(what string) bool {
		t.Helper()
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		insert(ctx, t, tx, table)
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := pool.Exec(ctx, `SELECT pg_notify($1, 'marker')`, table.Channel()); err != nil {
			t.Fatal(err)
		}
		got := false
		for {
			n, err := listener.WaitForNotification(ctx)
			if err != nil {
				t.Fatalf("%s: %v", what, err)
			}
			if n.Payload == "marker" {
				return got
			}
			got = true
		}
	}
	if !notified("no relay") {
		t.Error("no relay holds the awake lock: the writer did not notify")
	}
	lock(relayConn, "pg_advisory_lock", "awake")
	if notified("relay awake") {
		t.Error("the relay is awake: the writer notified")
	}
	lock(relayConn, "pg_advisory_lock", "sleep")
	if !notified("relay asleep") {
		t.Error("the relay holds the sleep lock: the writer did not notify")
	}
	lock(relayConn, "pg_advisory_unlock", "sleep")

	// A writer in the middle of its transaction keeps the sleep lock: a relay going to sleep
	// waits for it, and meanwhile the writers notify.
	w, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = w.Rollback(ctx) }()
	insert(ctx, t, w, table)
	if _, holders := advisory(ctx, t, pool, table); holders != 1 {
		t.Fatalf("%d sessions hold an advisory lock in share mode, want 1: the writer that did not notify", holders)
	}
	sleeping := make(chan error, 1)
	go func() {
		_, err := relayConn.Exec(ctx, `SELECT pg_advisory_lock(hashtextextended($1, 0))`, "outbox-relay:sleep:"+table.String())
		sleeping <- err
	}()
	for {
		if waiters, _ := advisory(ctx, t, pool, table); waiters == 1 {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("the relay's sleep lock never waited for the writer")
		}
		time.Sleep(time.Millisecond)
	}
	if !notified("relay waiting for the sleep lock") {
		t.Error("the relay waits for the sleep lock: the writer did not notify")
	}
	select {
	case err := <-sleeping:
		t.Fatalf("the relay took the sleep lock while a writer that did not notify was still open (%v)", err)
	default:
	}
	if err := w.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := <-sleeping; err != nil {
		t.Fatal(err)
	}
}
