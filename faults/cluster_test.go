package faults_test

import (
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
	"github.com/outbox-relay/outbox-relay/internal/tcpproxy"
)

// Entry 14: PostgreSQL is stopped hard (pg_ctl stop -m immediate) under load and restarted. The
// relay reconnects with backoff and resumes; commits whose answer was lost are resolved by the
// oracle's ledger.
func TestFault14PostgresStoppedHard(t *testing.T) {
	t.Parallel()
	c := pgcluster.Start(t)
	e := setup(t, options{cluster: c})
	r := e.startRelay(relayOpts{})
	e.waitLeader(r)
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "progress", func() (bool, string) {
		return r.probe.acked.Load() >= 200, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	c.StopImmediate()
	time.Sleep(2 * time.Second) // the outage
	if r.Connected() {
		// The relay notices at its next query; it polls every 100ms.
		e.eventually(30*time.Second, "the relay notices the outage", func() (bool, string) { return !r.Connected(), "connected" })
	}
	c.Start()
	acked := r.probe.acked.Load()
	e.eventually(90*time.Second, "progress after the restart", func() (bool, string) {
		return r.probe.acked.Load() > acked+200, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	stop()
	e.waitDrained(90 * time.Second)
	r.stop(t)
	_, _, unknown, _ := e.loader.Counts()
	t.Logf("%d events with an unknown commit outcome, resolved from the ledger", unknown)
	rep := e.check(relayConfig().MaxInFlight)
	result(t, 14, rep, "reconnected after the restart and resumed")
}

// Entry 15: the database becomes read-only (as after a failover onto a standby): sessions are
// terminated and new ones cannot write. The relay publishes and marks nothing against the
// read-only node, and resumes when it is writable again.
func TestFault15DatabaseReadOnly(t *testing.T) {
	t.Parallel()
	c := pgcluster.Start(t)
	e := setup(t, options{cluster: c})
	r := e.startRelay(relayOpts{})
	e.waitLeader(r)
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "progress", func() (bool, string) {
		return r.probe.acked.Load() >= 200, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	if err := c.SetReadOnly(e.ctx, true); err != nil {
		t.Fatal(err)
	}
	// Every session opened from now on meets the read-only node: it connects, is refused the
	// leadership, ends, and the relay reconnects.
	connects := r.probe.connects.Load()
	sessions := func(n int64) func() (bool, string) {
		return func() (bool, string) {
			got := r.probe.connects.Load() - connects
			return got >= n, itoa(got) + " sessions on the read-only node"
		}
	}
	e.eventually(60*time.Second, "the relay meets the read-only node", sessions(1))
	records, marked := e.records(), r.probe.marked.Load()
	e.eventually(60*time.Second, "the relay retries the read-only node", sessions(4))
	if n := r.logs.count("read-only"); n == 0 {
		t.Error("the relay never said the database is read-only")
	}
	if got := e.records(); got != records {
		t.Errorf("%d records published while the database was read-only", got-records)
	}
	if got := r.probe.marked.Load(); got != marked {
		t.Errorf("%d rows marked against the read-only node", got-marked)
	}
	if r.Leader() {
		t.Error("the relay leads on a read-only node")
	}
	if err := c.SetReadOnly(e.ctx, false); err != nil {
		t.Fatal(err)
	}
	acked := r.probe.acked.Load()
	e.eventually(90*time.Second, "progress once writable", func() (bool, string) {
		return r.probe.acked.Load() > acked+200, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	stop()
	e.waitDrained(90 * time.Second)
	r.stop(t)
	rep := e.check(relayConfig().MaxInFlight)
	result(t, 15, rep, "no publish or mark while read-only, resumed when writable")
}

// Entry 16: the database connection is cut after the broker acknowledged a batch and before the
// batch was marked (the marking statement waits on a lock, then the connection drops). The relay
// reconnects and publishes the batch again: duplicates bounded by what was in flight. Then the
// connection stalls silently for longer than the query timeout: the relay drops the session and
// reconnects when the network is back.
func TestFault16MarkFailsAfterPublish(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	host := strings.TrimPrefix(strings.SplitN(strings.TrimPrefix(dbtest.URL(), "postgres://"), "/", 2)[0], "postgres@")
	proxy, err := tcpproxy.New(host)
	if err != nil {
		t.Fatal(err)
	}
	defer proxy.Close()
	url := strings.Replace(dbtest.URL(), host, proxy.Addr(), 1)
	e.loader.Run(e.ctx, 300)
	held, release := e.holdRows()
	r := e.startRelay(relayOpts{name: "fault16", url: url, timeout: time.Second})
	e.eventually(60*time.Second, "the held batch acknowledged", func() (bool, string) {
		n := e.records()
		return n >= int64(held), itoa(n) + " records"
	})
	// The connection drops; the backend is ended too, or its waiting DELETE would still commit.
	e.terminate("fault16")
	proxy.Cut()
	release()
	e.eventually(60*time.Second, "the relay reconnected", func() (bool, string) {
		return r.probe.connects.Load() >= 2, itoa(r.probe.connects.Load()) + " connections"
	})
	e.loader.Run(e.ctx, 100)
	e.waitDrained(60 * time.Second)

	// Then the network goes silent instead (a partition: no error, no answer) for longer than the
	// query timeout: the relay gives the session up, and reconnects once the network is back.
	connects := r.probe.connects.Load()
	stop := e.loader.Go(e.ctx)
	defer stop()
	acked := r.probe.acked.Load()
	e.eventually(60*time.Second, "progress", func() (bool, string) {
		return r.probe.acked.Load() > acked+100, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	proxy.Stall()
	stalled := time.Now()
	// The partition lasts until the relay gave its session up (its next query hit the 1 s query
	// timeout: on a loaded machine that may take longer than the timeout), and 3 s at least.
	e.eventually(60*time.Second, "the relay gives the silent session up", func() (bool, string) {
		return !r.Leader(), "still leading"
	})
	if d := 3*time.Second - time.Since(stalled); d > 0 {
		time.Sleep(d) // let time pass: the partition's minimum length
	}
	proxy.Resume()
	e.eventually(60*time.Second, "a new session after the partition", func() (bool, string) {
		return r.probe.connects.Load() > connects, itoa(r.probe.connects.Load()-connects) + " new sessions"
	})
	acked = r.probe.acked.Load()
	e.eventually(60*time.Second, "progress after the partition", func() (bool, string) {
		return r.probe.acked.Load() > acked+100, itoa(r.probe.acked.Load()) + " acknowledged"
	})
	stop()
	e.waitDrained(60 * time.Second)
	r.stop(t)
	// Bound: what was in flight, once for the terminated session, once more should the cut also
	// catch the session that replaced it, and once for the partition.
	rep := e.check(3 * relayConfig().MaxInFlight)
	if rep.Duplicates == 0 {
		t.Error("no duplicate: the cut did not land between the acknowledgement and the mark")
	}
	result(t, 16, rep, "unmarked batch republished after reconnecting; 3 s silent partition survived")
}
