package faults_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/oracle"
)

// Entry 5: the relay's LISTEN connection is killed (pg_terminate_backend) three times while
// inserts go on. The relay reconnects and catches up.
func TestFault05ListenConnectionKilled(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	r := e.startRelay(relayOpts{name: "fault05"})
	e.waitLeader(r)
	stop := e.loader.Go(e.ctx)
	defer stop()
	var killedAt int64 // the relay's connects when it was last killed
	for i := range 3 {
		want := int64(100 * (i + 1))
		e.eventually(60*time.Second, "progress", func() (bool, string) {
			return r.probe.acked.Load() >= want, itoa(r.probe.acked.Load()) + " acknowledged"
		})
		// The relay may be between a kill and its reconnect (the loader can run ahead of the
		// last kill's backoff): wait until it has connected again (a session killed while the
		// relay was still opening it fails the open, and counts no connect), then kill exactly
		// that session.
		var n int
		e.eventually(30*time.Second, "a relay session to kill", func() (bool, string) {
			c := r.probe.connects.Load()
			if c <= killedAt {
				return false, itoa(c) + " connects so far, none since the last kill"
			}
			if n = e.terminate("fault05"); n > 0 {
				killedAt = c
			}
			return n > 0, itoa(c) + " connects so far"
		})
		if n != 1 {
			t.Fatalf("terminated %d sessions, want 1", n)
		}
	}
	e.eventually(60*time.Second, "progress after the last kill", func() (bool, string) {
		return r.probe.acked.Load() >= 400, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	stop()
	e.waitDrained(60 * time.Second)
	r.stop(t)
	if c := r.probe.connects.Load(); c < 4 {
		t.Errorf("the relay connected %d times, want at least 4 (one per kill)", c)
	}
	rep := e.check(3 * relayConfig().MaxInFlight)
	result(t, 5, rep, "reconnects and catches up after each of 3 kills")
}

// Entry 6: no NOTIFY at all (the trigger is disabled): polling alone delivers everything. A
// connection LISTENing on the outbox's channel beside the relay counts the notifications: after
// the drain, a marker sent on the channel must be the first it receives. (The relay's own
// Notified is no count of them: its session sets it too, to claim before it sleeps.)
func TestFault06NoNotify(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	e.exec(`ALTER TABLE {outbox} DISABLE TRIGGER outbox_notify`)
	conn, err := pgx.Connect(e.ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	channel := e.table.WithDefaults().Channel()
	if _, err := conn.Exec(e.ctx, `LISTEN `+pgx.Identifier{channel}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	r := e.startRelay(relayOpts{})
	e.loader.Run(e.ctx, 400)
	e.waitDrained(60 * time.Second)
	r.stop(t)
	if _, err := conn.Exec(e.ctx, `SELECT pg_notify($1, 'marker')`, channel); err != nil {
		t.Fatal(err)
	}
	notified := 0
	for {
		ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			t.Fatalf("the marker notification never arrived: %v", err)
		}
		if n.Payload == "marker" {
			break
		}
		notified++
	}
	if notified != 0 {
		t.Errorf("%d notifications were sent with the trigger disabled", notified)
	}
	rep := e.check(0)
	result(t, 6, rep, "polling alone, 0 notifications seen")
}

// Entry 7: events larger than NOTIFY's 8000-byte payload limit: writers never fail because of
// NOTIFY, and a notification never carries the row.
func TestFault07BigEvents(t *testing.T) {
	t.Parallel()
	e := setup(t, options{load: oracle.Config{PayloadBytes: 20000}})
	conn, err := pgx.Connect(e.ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if _, err := conn.Exec(e.ctx, `LISTEN `+pgx.Identifier{e.table.WithDefaults().Channel()}.Sanitize()); err != nil {
		t.Fatal(err)
	}
	r := e.startRelay(relayOpts{})
	e.loader.Run(e.ctx, 200)
	_, _, _, failures := e.loader.Counts()
	if failures != 0 {
		t.Errorf("%d writing transactions failed", failures)
	}
	e.waitDrained(60 * time.Second)
	r.stop(t)
	notes := 0
	for {
		// The notifications were sent long ago and wait in the connection: a loaded machine may
		// take a while to hand over the first; once they flow, a pause means there are no more.
		wait := 500 * time.Millisecond
		if notes == 0 {
			wait = 30 * time.Second
		}
		ctx, cancel := context.WithTimeout(e.ctx, wait)
		n, err := conn.WaitForNotification(ctx)
		cancel()
		if err != nil {
			break
		}
		notes++
		if n.Payload != "" {
			t.Fatalf("a notification carries %d bytes: %.80q", len(n.Payload), n.Payload)
		}
	}
	if notes == 0 {
		t.Error("no notification arrived: the trigger did not fire")
	}
	rep := e.check(0)
	result(t, 7, rep, "20 kB events, empty notifications, no writer failed")
}
