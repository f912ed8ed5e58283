package faults_test

import (
	"context"
	"fmt"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
	"github.com/outbox-relay/outbox-relay/internal/tcpproxy"
)

// Entry 26: the primary is killed (SIGKILL to every server process) while its asynchronous
// standby lags, and the standby is promoted. The standby's WAL stream goes through a proxy that
// stalls, so the standby misses everything committed from then on while the relay goes on
// reading the primary.
//
// With database.wait_for_replication off (the control: it shows the fault is provoked), the
// relay publishes rows the promoted node never had: events for transactions the new primary
// lost. With all or sync, nothing published is missing from the promoted node, and a relay
// repointed at the promoted node publishes everything it has, with duplicates bounded by what
// was in flight.
func TestFault26AsyncReplicaFailover(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		mode    string
		primary []string // the primary's extra settings
	}{
		{mode: postgres.ReplicationOff},
		{mode: postgres.ReplicationAll},
		// A synchronous standby the writers do not wait for (synchronous_commit local): the relay
		// waits for it instead.
		{mode: postgres.ReplicationSync, primary: []string{
			"synchronous_standby_names = 'standby26'", "synchronous_commit = local"}},
	} {
		t.Run(tc.mode, func(t *testing.T) {
			t.Parallel()
			failover(t, tc.mode, tc.primary)
		})
	}
}

func failover(t *testing.T, mode string, settings []string) {
	primary := pgcluster.Start(t, settings...)
	proxy, err := tcpproxy.New(primary.Addr())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = proxy.Close() })
	standby := primary.StartStandby(t, proxy.Addr(), "standby26")
	e := setup(t, options{cluster: primary})
	on := mode != postgres.ReplicationOff
	r := e.startRelay(relayOpts{name: "fault26", repl: mode, timeout: 3 * time.Second})
	e.waitLeader(r)
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "progress while the standby streams", func() (bool, string) {
		return r.probe.acked.Load() >= 300, itoa(r.probe.acked.Load()) + " acknowledged"
	})

	// The standby stops receiving WAL; the primary goes on committing.
	proxy.Stall()
	committed, _, _, _ := e.loader.Counts()
	acked := r.probe.acked.Load()
	e.eventually(60*time.Second, "commits after the stall", func() (bool, string) {
		n, _, _, _ := e.loader.Counts()
		return n >= committed+300, itoa(int64(n-committed)) + " committed since the stall"
	})
	// The relay claims rows the standby lacks: with the wait on, its wait times out (the query
	// timeout) and says why; with it off (or a build without the wait), it publishes them.
	e.eventually(60*time.Second, "the relay waits for the standby or publishes past it", func() (bool, string) {
		waits, n := r.logs.count("wait for replication"), r.probe.acked.Load()-acked
		return waits > 0 || n >= 200, fmt.Sprintf("%d acknowledged since the stall, %d timed-out waits", n, waits)
	})
	if !on && r.logs.count("wait for replication") > 0 {
		t.Error("the relay waited for replication with the wait off")
	}
	stop()

	// The primary dies with the standby behind; the standby is promoted.
	proxy.Down()
	primary.Kill()
	r.stop(t)
	standby.Promote()

	pool, err := pgxpool.New(e.ctx, standby.URL())
	if err != nil {
		t.Fatal(err)
	}
	defer pool.Close()
	has := ledger(t, e, pool)
	published := publishedIDs(t, e)
	missing := 0
	for id := range published {
		if !has[id] {
			missing++
		}
	}
	t.Logf("mode %s: %d events published, %d of them missing from the promoted standby (which has %d committed)",
		mode, len(published), missing, len(has))
	if on && missing > 0 {
		t.Errorf("%d published events are missing from the promoted standby with database.wait_for_replication=%s",
			missing, mode)
	}
	if !on && missing == 0 {
		t.Errorf("the fault did not reproduce: every published event is on the promoted standby with the wait off")
	}

	// Repointed at the promoted node (a relay with the wait on would wait for a standby the new
	// primary does not have yet), the relay publishes everything the node has.
	r2 := e.startRelay(relayOpts{name: "fault26-after", url: standby.URL()})
	e.waitLeader(r2)
	e.eventually(90*time.Second, "the promoted node's outbox drained", func() (bool, string) {
		var n int
		err := pool.QueryRow(e.ctx, e.sql(`SELECT count(*) FROM {outbox} WHERE dispatched_at IS NULL`)).Scan(&n)
		if err != nil {
			return false, err.Error()
		}
		return n == 0, itoa(int64(n)) + " rows pending"
	})
	r2.stop(t)
	published = publishedIDs(t, e)
	lost, dups := 0, 0
	for id := range has {
		if published[id] == 0 {
			lost++
		}
	}
	for id, n := range published {
		if has[id] {
			dups += n - 1
		}
	}
	if lost > 0 {
		t.Errorf("%d events the promoted node committed were never published", lost)
	}
	if bound := relayConfig().MaxInFlight; on && dups > bound {
		t.Errorf("%d duplicates after the failover, bound %d (relay.max_in_flight)", dups, bound)
	}
	t.Logf("FAULT 26 (%s): published but lost by the failover %d, committed on the promoted node but unpublished %d, "+
		"duplicates %d, committed on the promoted node %d", mode, missing, lost, dups, len(has))
}

// ledger returns the ids of the events committed on the database of pool (the loader's ledger).
func ledger(t *testing.T, e *env, pool *pgxpool.Pool) map[string]bool {
	t.Helper()
	rows, err := pool.Query(e.ctx, `SELECT event_id::text FROM `+pgx.Identifier{e.table.Schema, "oracle_ledger"}.Sanitize())
	if err != nil {
		t.Fatal(err)
	}
	ids, err := pgx.CollectRows(rows, pgx.RowTo[string])
	if err != nil {
		t.Fatal(err)
	}
	out := make(map[string]bool, len(ids))
	for _, id := range ids {
		out[id] = true
	}
	return out
}

// publishedIDs reads the env's topics from the start to their end and counts the records of each
// event id.
func publishedIDs(t *testing.T, e *env) map[string]int {
	t.Helper()
	ctx, cancel := context.WithTimeout(e.ctx, 90*time.Second)
	defer cancel()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...), kgo.ConsumeTopics(e.topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchMaxWait(200*time.Millisecond))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, e.topics...)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		t.Fatalf("list end offsets: %v", err)
	}
	want := map[string]map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if o.Offset > 0 {
			if want[o.Topic] == nil {
				want[o.Topic] = map[int32]int64{}
			}
			want[o.Topic][o.Partition] = o.Offset
		}
	})
	out := map[string]int{}
	for len(want) > 0 {
		fetches := cl.PollFetches(ctx)
		if ctx.Err() != nil {
			t.Fatalf("reading the topics: %v (left: %v)", ctx.Err(), want)
		}
		fetches.EachRecord(func(r *kgo.Record) {
			for _, h := range r.Headers {
				if h.Key == oracle.HeaderEventID {
					out[string(h.Value)]++
				}
			}
			if end, ok := want[r.Topic][r.Partition]; ok && r.Offset+1 >= end {
				delete(want[r.Topic], r.Partition)
				if len(want[r.Topic]) == 0 {
					delete(want, r.Topic)
				}
			}
		})
	}
	return out
}
