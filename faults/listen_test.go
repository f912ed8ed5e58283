package faults_test

import (
	"context"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
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
	for i := range 3 {
		want := int64(100 * (i + 1))
		e.eventually(60*time.Second, "progress", func() (bool, string) {
			return r.probe.acked.Load() >= want, itoa(r.probe.acked.Load()) + " acknowledged"
		})
		// The relay may be between a kill and its reconnect (the loader can run ahead of the
		// last kill's backoff): wait until it has a session again, then kill exactly that one.
		var n int
		e.eventually(30*time.Second, "a relay session to kill", func() (bool, string) {
			n = e.terminate("fault05")
			return n > 0, itoa(r.probe.connects.Load()) + " connects so far"
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

// countNotified decorates a store: it counts the wake-up notifications its sessions saw.
type countNotified struct {
	relay.Store
	n *int64
}

func (s countNotified) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &notifiedSession{Session: sess, n: s.n}, nil
}

type notifiedSession struct {
	relay.Session
	n *int64
}

func (s *notifiedSession) Notified() bool {
	ok := s.Session.Notified()
	if ok {
		*s.n++ // Notified is called by the relay's goroutine only
	}
	return ok
}

// Entry 6: no NOTIFY at all (the trigger is disabled): polling alone delivers everything.
func TestFault06NoNotify(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	e.exec(`ALTER TABLE {outbox} DISABLE TRIGGER outbox_notify`)
	var notified int64
	r := e.startRelay(relayOpts{store: func(s relay.Store) relay.Store { return countNotified{Store: s, n: &notified} }})
	e.loader.Run(e.ctx, 400)
	e.waitDrained(60 * time.Second)
	r.stop(t)
	if notified != 0 {
		t.Errorf("the relay saw %d notifications with the trigger disabled", notified)
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
