package faults_test

import (
	"fmt"
	"strings"
	"sync/atomic"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
)

// More faults of exactly-once delivery: a kill -9 stopped deliberately in a phase (during a
// claim, with a Kafka transaction open), a SIGTERM with a transaction open, a broker outage, a
// database restart, and a larger load. Each ends with the oracle's read_committed check across
// partitions (checkEO): 0 lost, 0 phantoms, 0 reorders, 0 duplicates, 0 split transactions.

// holdProduce makes the broker hold the first transactional produce request until release is closed: a Kafka transaction is then open, its records on their way. arrived is
// closed once the request is held. Needs kfake.
func (e *env) holdProduce() (arrived, release chan struct{}) {
	arrived, release = make(chan struct{}), make(chan struct{})
	var held atomic.Bool
	fake := e.broker.Fake
	fake.ControlKey(int16(kmsg.Produce), func(req kmsg.Request) (kmsg.Response, error, bool) {
		fake.KeepControl()
		pr, ok := req.(*kmsg.ProduceRequest)
		// Topics are named by id in recent versions of the request: any transactional produce is
		// the relay's (its first comes before any progress record, which is written at the commit).
		if !ok || pr.TransactionID == nil || !held.CompareAndSwap(false, true) {
			return nil, nil, false
		}
		close(arrived)
		fake.SleepControl(func() { <-release })
		return nil, nil, false
	})
	return arrived, release
}

// waitFor waits until ch is closed, failing after timeout.
func (e *env) waitFor(ch chan struct{}, timeout time.Duration, what string) {
	e.t.Helper()
	select {
	case <-ch:
	case <-time.After(timeout):
		e.t.Fatalf("timed out after %s waiting for %s", timeout, what)
	}
}

// TestFaultEO06KillDuringClaim: the outbox table is locked (ACCESS EXCLUSIVE) while the leader
// has published part of the load, so its next claim waits on the lock; it is killed (-9) while
// that claim is under way (pg_stat_activity shows it waiting). The next leader recovers what was
// committed and drains: no duplicate.
func TestFaultEO06KillDuringClaim(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	e.loader.Run(e.ctx, 100)
	p1 := e.startProcess("eo06-a", e.eoEnv()...)
	e.eventually(60*time.Second, "the relay publishes", func() (bool, string) { return e.records() > 100, "records " + itoa(e.records()) })
	// Connections of their own: the pool's could all wait on the lock.
	lock, err := pgx.Connect(e.ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer lock.Close(e.ctx)
	watch, err := pgx.Connect(e.ctx, e.url)
	if err != nil {
		t.Fatal(err)
	}
	defer watch.Close(e.ctx)
	// The leader claims at its poll interval; a claim first reads the blocked keys (once per
	// interval), then the rows. The lock is taken until the query waiting on it is the claim's
	// own (WITH c AS ...): if another is, the lock is released and taken again.
	var query string
	for try := 0; !strings.Contains(query, "WITH c AS"); try++ {
		if try == 100 {
			t.Fatalf("after %d tries the leader's claim never waited on the lock (last: %.100s)", try, query)
		}
		if try > 0 {
			if _, err := lock.Exec(e.ctx, `ROLLBACK`); err != nil {
				t.Fatal(err)
			}
		}
		if _, err := lock.Exec(e.ctx, `BEGIN; LOCK TABLE `+pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()+` IN ACCESS EXCLUSIVE MODE`); err != nil {
			t.Fatal(err)
		}
		e.eventually(60*time.Second, "a query of the leader's session waits on the lock", func() (bool, string) {
			err := watch.QueryRow(e.ctx, `SELECT coalesce(max(query), '') FROM pg_stat_activity WHERE application_name = 'eo06-a'
				AND wait_event_type = 'Lock'`).Scan(&query)
			return err == nil && query != "", fmt.Sprintf("none waits (%v)", err)
		})
	}
	t.Logf("killed while the claim waits: %.100s", strings.Join(strings.Fields(query), " "))
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	e.terminate("eo06-a")
	e.terminate("eo06-a marks")
	if _, err := lock.Exec(e.ctx, `ROLLBACK`); err != nil {
		t.Fatal(err)
	}
	stop := e.loader.Go(e.ctx)
	defer stop()
	p2 := e.startProcess("eo06-b", e.eoEnv()...)
	n := e.records()
	e.eventually(60*time.Second, "the next leader publishes", func() (bool, string) { return e.records() > n+100, "records " + itoa(e.records()) })
	stop()
	e.waitDrained(90 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	p2.wait(t, 60*time.Second)
	result(t, 106, e.checkEO(), "killed -9 during a claim")
}

// TestFaultEO07KillWithTransactionOpen: the broker holds the leader's produce request, so its
// Kafka transaction is open with records on their way; the leader is killed (-9) then. The next
// leader's InitProducerID aborts that transaction; it drains: no duplicate, nothing of the open
// transaction visible at read_committed.
func TestFaultEO07KillWithTransactionOpen(t *testing.T) {
	t.Parallel()
	o := eoOptions()
	o.kfake = []kfake.Opt{kfake.NumBrokers(1)}
	e := setup(t, o)
	if e.broker.Fake == nil {
		t.Skip("holds requests in kfake")
	}
	e.loader.Run(e.ctx, 100)
	arrived, release := e.holdProduce()
	p1 := e.startProcess("eo07-a", e.eoEnv()...)
	e.waitFor(arrived, 60*time.Second, "the leader's first produce request")
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	e.terminate("eo07-a")
	e.terminate("eo07-a marks")
	close(release)
	p2 := e.startProcess("eo07-b", e.eoEnv()...)
	e.loader.Run(e.ctx, 50)
	e.waitDrained(90 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	if code := p2.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	result(t, 107, e.checkEO(), "killed -9 with a Kafka transaction open")
}

// TestFaultEO08SigtermWithTransactionOpen: the broker holds the leader's produce request, so its
// Kafka transaction is open; the leader gets SIGTERM then, and the request is let through. The
// relay ends what is open (commits or aborts it), marks what committed, releases the leadership
// and exits 0. The next leader drains: no duplicate.
func TestFaultEO08SigtermWithTransactionOpen(t *testing.T) {
	t.Parallel()
	o := eoOptions()
	o.kfake = []kfake.Opt{kfake.NumBrokers(1)}
	e := setup(t, o)
	if e.broker.Fake == nil {
		t.Skip("holds requests in kfake")
	}
	e.loader.Run(e.ctx, 100)
	arrived, release := e.holdProduce()
	p1 := e.startProcess("eo08-a", e.eoEnv()...)
	e.waitFor(arrived, 60*time.Second, "the leader's first produce request")
	p1.signal(t, syscall.SIGTERM)
	close(release)
	if code := p1.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM with a transaction open: %d, want 0\n%s", code, p1.logs.tail(30))
	}
	if p1.logs.count("leadership released") == 0 {
		t.Errorf("the relay did not release its leadership:\n%s", p1.logs.tail(30))
	}
	p2 := e.startProcess("eo08-b", e.eoEnv()...)
	e.loader.Run(e.ctx, 50)
	e.waitDrained(90 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	p2.wait(t, 60*time.Second)
	result(t, 108, e.checkEO(), "SIGTERM with a Kafka transaction open")
}

// TestFaultEO09BrokerOutage: every broker connection is cut and refused for 3 s under load, in
// the middle of Kafka transactions, then the broker is back. The relay resumes alone: no
// duplicate.
func TestFaultEO09BrokerOutage(t *testing.T) {
	t.Parallel()
	o := eoOptions()
	o.brokerGate = true
	e := setup(t, o)
	e.eoOutage(t, 109, "3 s broker outage mid-transaction", 3*time.Second, e.gate.Down, e.gate.Up)
}

// TestFaultEO10DatabaseRestart: the outbox's PostgreSQL is stopped hard (immediate) under load
// and started again. The relay reconnects, recovers from the progress topic and resumes: no
// duplicate (commits whose answer was lost are resolved by the oracle's ledger).
func TestFaultEO10DatabaseRestart(t *testing.T) {
	t.Parallel()
	o := eoOptions()
	o.cluster = pgcluster.Start(t)
	e := setup(t, o)
	e.eoOutage(t, 110, "PostgreSQL stopped hard and restarted", 2*time.Second, o.cluster.StopImmediate, o.cluster.Start)
}

// eoOutage runs a relay process in exactly-once mode under load, calls down once it publishes,
// up after outage (the outage's length, not a wait for a condition), and checks that it makes
// progress again, drains, and published every event once (fault catalog entry).
func (e *env) eoOutage(t *testing.T, entry int, what string, outage time.Duration, down, up func()) {
	t.Helper()
	p := e.startProcess(fmt.Sprintf("eo%02d", entry%100), e.eoEnv()...)
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "the relay publishes", func() (bool, string) { return e.records() > 300, "records " + itoa(e.records()) })
	down()
	time.Sleep(outage)
	up()
	n := e.records()
	e.eventually(90*time.Second, "progress after the outage", func() (bool, string) { return e.records() > n+300, "records " + itoa(e.records()) })
	stop()
	e.waitDrained(120 * time.Second)
	p.signal(t, syscall.SIGTERM)
	p.wait(t, 60*time.Second)
	result(t, entry, e.checkEO(), what)
}

// TestFaultEO11LargeLoad: 12,000 events in transactions of three keys, written while the leader
// runs; it is killed (-9) once a third is published, and the next leader drains the rest.
func TestFaultEO11LargeLoad(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	const txs = 2000 // 6 events each
	done := make(chan struct{})
	go func() {
		defer close(done)
		e.loader.Run(e.ctx, txs)
	}()
	p1 := e.startProcess("eo11-a", e.eoEnv()...)
	e.eventually(120*time.Second, "a third published", func() (bool, string) { return e.records() > txs*2, "records " + itoa(e.records()) })
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	e.terminate("eo11-a")
	e.terminate("eo11-a marks")
	p2 := e.startProcess("eo11-b", e.eoEnv()...)
	e.waitFor(done, 300*time.Second, "the load written")
	e.waitDrained(180 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	p2.wait(t, 60*time.Second)
	rep := e.checkEO()
	if rep.Committed < 10000 {
		t.Errorf("%d events committed, want about 12,000", rep.Committed)
	}
	result(t, 111, rep, "12k events, the leader killed -9 a third of the way")
}
