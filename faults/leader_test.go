package faults_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// Entry 8: two replicas share the outbox; the leader is stopped and the other takes over, twice.
// Only one publishes at a time, and per-key order holds across the handovers.
func TestFault08TwoReplicas(t *testing.T) {
	t.Parallel()
	forLayouts(t, fault08)
}

func fault08(t *testing.T, layout string) {
	e := setup(t, options{layout: layout})
	a := e.startRelay(relayOpts{name: "fault08-a"})
	e.waitLeader(a)
	b := e.startRelay(relayOpts{name: "fault08-b"})
	stop := e.loader.Go(e.ctx)
	defer stop()
	progress := func(r *inRelay, n int64) {
		e.eventually(60*time.Second, r.name+" publishes", func() (bool, string) {
			return r.probe.acked.Load() >= n, itoa(r.probe.acked.Load()) + " acknowledged"
		})
	}
	progress(a, 200)
	if b.Leader() {
		t.Fatal("both replicas lead")
	}
	a.stop(t)
	e.waitLeader(b)
	a2 := e.startRelay(relayOpts{name: "fault08-a2"})
	progress(b, 200)
	if a2.Leader() {
		t.Fatal("both replicas lead")
	}
	b.stop(t)
	e.waitLeader(a2)
	progress(a2, 200)
	stop()
	e.waitDrained(60 * time.Second)
	a2.stop(t)
	// Each leader handed every message over before the next one handed over its first.
	for _, pair := range [][2]*inRelay{{a, b}, {b, a2}} {
		_, _, lastOld := pair[0].sink.span()
		n, firstNew, _ := pair[1].sink.span()
		if n == 0 || !lastOld.Before(firstNew) {
			t.Errorf("%s published until %s, %s from %s: overlapping publishers", pair[0].name,
				lastOld.Format(time.RFC3339Nano), pair[1].name, firstNew.Format(time.RFC3339Nano))
		}
	}
	rep := e.check(0)
	result(t, 8, rep, "graceful handovers between two replicas")
}

// Entry 9: the leader's lock session is killed (pg_terminate_backend) while its process keeps
// other connections to the database. The old leader publishes nothing after the new leader
// started, and nothing is lost.
func TestFault09LeaderLockSessionKilled(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	// The leader's process also holds a pool of its own, like 'outbox-relay run' does.
	pc, err := pgxpool.ParseConfig(withAppName(e.url, "fault09-a-pool"))
	if err != nil {
		t.Fatal(err)
	}
	pc.MaxConns = 2
	pool, err := pgxpool.NewWithConfig(e.ctx, pc)
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	for range 2 {
		c, err := pool.Acquire(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		defer c.Release()
	}
	// The old leader reconnects a moment after its session dies, and whichever replica asks
	// first gets the lock: on a loaded machine often the old one again, and no takeover happens.
	// Its new sessions wait until the standby leads, as if its host were slower.
	aStore := &heldOpen{}
	a := e.startRelay(relayOpts{name: "fault09-a", store: func(s relay.Store) relay.Store { aStore.Store = s; return aStore }})
	e.waitLeader(a)
	b := e.startRelay(relayOpts{name: "fault09-b"})
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "a publishes", func() (bool, string) {
		return a.probe.acked.Load() >= 300, itoa(a.probe.acked.Load()) + " acknowledged"
	})
	aStore.hold()
	if n := e.terminate("fault09-a"); n != 1 {
		t.Fatalf("terminated %d sessions of the leader, want 1", n)
	}
	e.waitLeader(b)
	aStore.release()
	e.eventually(60*time.Second, "b publishes", func() (bool, string) {
		return b.probe.acked.Load() >= 300, itoa(b.probe.acked.Load()) + " acknowledged"
	})
	if a.Leader() {
		t.Error("the old leader leads again while the new one leads")
	}
	if got := len(e.backendPIDs("fault09-a-pool")); got != 2 {
		t.Errorf("the old leader's other connections: %d, want 2 still open", got)
	}
	stop()
	e.waitDrained(60 * time.Second)
	b.stop(t)
	a.stop(t)
	_, _, lastA := a.sink.span()
	_, firstB, _ := b.sink.span()
	if !lastA.Before(firstB) {
		t.Errorf("old leader published until %s, new leader from %s: overlapping publishers",
			lastA.Format(time.RFC3339Nano), firstB.Format(time.RFC3339Nano))
	}
	rep := e.check(relayConfig().MaxInFlight)
	result(t, 9, rep, "old leader stops at its next database call; in-flight batch republished")
}

// heldOpen decorates a store: between hold and release, opening a session waits.
type heldOpen struct {
	relay.Store
	mu   sync.Mutex
	gate chan struct{} // open while nil or closed
}

func (s *heldOpen) hold() {
	s.mu.Lock()
	s.gate = make(chan struct{})
	s.mu.Unlock()
}

func (s *heldOpen) release() {
	s.mu.Lock()
	if s.gate != nil {
		close(s.gate)
		s.gate = nil
	}
	s.mu.Unlock()
}

func (s *heldOpen) Open(ctx context.Context) (relay.Session, error) {
	s.mu.Lock()
	gate := s.gate
	s.mu.Unlock()
	if gate != nil {
		select {
		case <-gate:
		case <-ctx.Done():
			return nil, ctx.Err()
		}
	}
	return s.Store.Open(ctx)
}
