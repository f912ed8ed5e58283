package faults_test

import (
	"fmt"
	"net/url"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/pgbouncer"
)

// Entry 21: two replicas reach PostgreSQL through PgBouncer in session mode. A pooler answers
// the protocol with a backend key of its own, so the mark fence must use the server's pid: every
// row is marked once (no republishing loop), one replica leads, and when the leader's server
// backend is ended under the pooler the other replica takes over and loses nothing.
func TestFault21PgBouncerSessionPooling(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	pb := pgbouncer.Start(t, e.url, pgbouncer.Session)
	a := e.startRelay(relayOpts{name: "fault21-a", url: pb.URL()})
	e.waitLeader(a)
	b := e.startRelay(relayOpts{name: "fault21-b", url: pb.URL()})
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "a publishes and marks", func() (bool, string) {
		return a.probe.marked.Load() >= 300, fmt.Sprintf("%d acknowledged, %d marked", a.probe.acked.Load(), a.probe.marked.Load())
	})
	if b.Leader() {
		t.Fatal("both replicas lead through the session pool")
	}
	// The leader's server backend ends: PgBouncer closes the client, and the standby takes over.
	if n := e.terminate("fault21-a"); n != 1 {
		t.Fatalf("terminated %d server sessions of the leader, want 1", n)
	}
	e.eventually(60*time.Second, "b leads and publishes", func() (bool, string) {
		return b.probe.marked.Load() >= 300, fmt.Sprintf("%d acknowledged, %d marked", b.probe.acked.Load(), b.probe.marked.Load())
	})
	stop()
	e.waitDrained(60 * time.Second)
	b.stop(t)
	a.stop(t)
	if a.Leader() && b.Leader() {
		t.Error("both replicas lead")
	}
	for _, r := range []*inRelay{a, b} {
		if n := r.probe.parked.Load(); n != 0 {
			t.Errorf("%s parked %d rows", r.name, n)
		}
	}
	// One takeover republishes at most what was in flight; a fence on the pooler's fake pid
	// republished the same rows in a loop (over a million records in two minutes).
	rep := e.check(relayConfig().MaxInFlight)
	result(t, 21, rep, "PgBouncer session pooling, two replicas, leader's server backend ended")
}

// Entry 22: PgBouncer in transaction or statement mode cannot keep the relay's session (its
// advisory lock would stay on a server backend other clients use). Two replicas started on it,
// with pgx's defaults or with the simple protocol a PgBouncer user sets, both refuse at start
// with one line naming the pool mode and the fix, exit 1, publish nothing and leave no lock.
func TestFault22PgBouncerTransactionAndStatementPooling(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		mode  pgbouncer.Mode
		query string // added to the relay's DSN
	}{
		{pgbouncer.Transaction, ""},
		{pgbouncer.Transaction, "default_query_exec_mode=simple_protocol"},
		{pgbouncer.Statement, "default_query_exec_mode=simple_protocol"},
	} {
		name := string(tc.mode)
		if tc.query != "" {
			name += "-simple"
		}
		t.Run(name, func(t *testing.T) {
			t.Parallel()
			e := setup(t, options{})
			pb := pgbouncer.Start(t, e.url, tc.mode)
			if err := e.loader.Bulk(e.ctx, 50, 10); err != nil {
				t.Fatal(err)
			}
			dsn := pb.URL()
			if tc.query != "" {
				dsn += "&" + tc.query
			}
			var procs []*proc
			for i := range 2 {
				n := fmt.Sprintf("fault22-%s-%d", name, i)
				procs = append(procs, e.startProcess(n, "OUTBOX_DATABASE_URL="+withAppName(dsn, url.QueryEscape(n))))
			}
			for i, p := range procs {
				if code := p.wait(t, 90*time.Second); code != 1 {
					t.Errorf("replica %d exited %d, want 1; output:\n%s", i, code, p.logs.tail(20))
				}
				out := p.logs.tail(200)
				want := fmt.Sprintf("connection pooler in %s mode", tc.mode)
				if strings.Count(out, want) != 1 || !strings.Contains(out, "pool_mode=session") {
					t.Errorf("replica %d: want one line naming %q and the fix (pool_mode=session); output:\n%s", i, want, out)
				}
				if strings.Contains(out, "leadership gained") {
					t.Errorf("replica %d gained the leadership through a %s pool:\n%s", i, tc.mode, out)
				}
			}
			if n := e.records(); n != 0 {
				t.Errorf("%d records published through a %s pool, want none", n, tc.mode)
			}
			if n, err := e.pending(); err != nil || n != 50 {
				t.Errorf("pending rows: %d (%v), want all 50 kept for a relay that can keep its session", n, err)
			}
			h, err := postgres.LeaderOf(e.ctx, e.pool, e.table)
			if err != nil {
				t.Fatal(err)
			}
			if h != nil {
				t.Errorf("the leadership lock was left on pooled server backend %d", h.PID)
			}
		})
	}
}

// Entry 23: the relay's role has an idle_session_timeout (a common hardening) shorter than the
// gaps between events. The server ends the idle mark connection after every sparse event; the
// next mark runs on a new connection within the same term: one leadership term for the whole
// run and not one event published twice.
func TestFault23IdleSessionTimeout(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	// 1 s: above twice the relay's 100 ms poll interval (an idle, sleeping relay's session waits
	// up to two intervals, README "Connection poolers and idle timeouts") with room for a loaded
	// machine; the mark connection, idle between events, is still ended after each one.
	dsn := e.url + "&options=-c%20idle_session_timeout%3D1s"
	a := e.startRelay(relayOpts{name: "fault23", url: dsn})
	e.waitLeader(a)
	const events = 8
	for i := range events {
		if err := e.loader.Bulk(e.ctx, 1, 1); err != nil {
			t.Fatal(err)
		}
		e.waitDrained(60 * time.Second)
		// The gap: wait until the server ended the idle mark connection.
		e.eventually(60*time.Second, "the idle mark connection ended by the server", func() (bool, string) {
			n := len(e.backendPIDs("fault23 marks"))
			return n == 0, fmt.Sprintf("event %d: %d mark connections open", i, n)
		})
	}
	if err := e.loader.Bulk(e.ctx, 1, 1); err != nil {
		t.Fatal(err)
	}
	e.waitDrained(60 * time.Second)
	a.stop(t)
	if n := a.probe.leads.Load(); n != 1 {
		t.Errorf("%d leadership terms, want 1: a mark on an expired connection ended the term", n)
	}
	rep := e.check(0)
	if rep.Committed != events+1 {
		t.Errorf("committed %d events, want %d", rep.Committed, events+1)
	}
	result(t, 23, rep, "idle_session_timeout 1s ends the idle mark connection between sparse events")
}
