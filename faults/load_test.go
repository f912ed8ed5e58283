package faults_test

import (
	"strings"
	"testing"
	"time"

	dto "github.com/prometheus/client_model/go"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
	"github.com/outbox-relay/outbox-relay/internal/pgcluster"
)

// Entry 17: a long open transaction holds an outbox row (and pins the snapshot) while others
// commit. The relay keeps publishing the others, publishes the old row once it commits, and the
// lag shows in the commit-to-ack metric.
func TestFault17LongTransaction(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	metrics := prometheus.New("test", "test")
	r := e.startRelay(relayOpts{observer: metrics})
	long, err := e.loader.Begin(e.ctx, "long", 1)
	if err != nil {
		t.Fatal(err)
	}
	begun := time.Now()
	e.loader.Run(e.ctx, 300)
	e.eventually(60*time.Second, "the others published", func() (bool, string) {
		n, err := e.pending()
		return err == nil && n == 0, itoa(int64(n)) + " pending"
	})
	if d := 3*time.Second - time.Since(begun); d > 0 {
		time.Sleep(d) // keep the transaction open for at least 3s
	}
	if err := long.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.waitDrained(60 * time.Second)
	r.stop(t)
	slow := histogramAbove(t, metrics, "outbox_relay_commit_to_ack_seconds", 2.5)
	if slow < 1 {
		t.Errorf("commit-to-ack metric: %d observations above 2.5s, want the long transaction's row", slow)
	}
	rep := e.check(0)
	result(t, 17, rep, "old row published after its commit; lag visible in outbox_relay_commit_to_ack_seconds")
}

// histogramAbove returns how many observations of histogram name exceed le (a bucket bound).
func histogramAbove(t *testing.T, m *prometheus.Metrics, name string, le float64) uint64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() != name || mf.GetType() != dto.MetricType_HISTOGRAM {
			continue
		}
		h := mf.GetMetric()[0].GetHistogram()
		for _, b := range h.GetBucket() {
			if b.GetUpperBound() == le {
				return h.GetSampleCount() - b.GetCumulativeCount()
			}
		}
		t.Fatalf("%s has no bucket %g", name, le)
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// counterValue returns the value of counter name.
func counterValue(t *testing.T, m *prometheus.Metrics, name string) float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, mf := range mfs {
		if mf.GetName() == name && mf.GetType() == dto.MetricType_COUNTER {
			return mf.GetMetric()[0].GetCounter().GetValue()
		}
	}
	t.Fatalf("metric %s not found", name)
	return 0
}

// Entry 18 at test scale: 50,000 events through the relay in five rounds of 10,000 written while
// the relay is stopped, then published. Each round the outbox is vacuumed (as autovacuum would):
// the space of published rows is reused, so the outbox's size at the peak of each round (10,000
// rows pending), indexes included, stays flat instead of growing round after round. Poll latency
// is not asserted here (no timing in tests): make bench measures it.
func TestFault18ManyEvents(t *testing.T) {
	t.Parallel()
	// A cluster of its own: another test's open transaction on a shared server would keep VACUUM
	// from reclaiming anything.
	c := pgcluster.Start(t)
	e := setup(t, options{cluster: c, load: oracle.Config{EventsPerTx: 25, Workers: 4, Keys: 64}})
	cfg := relayConfig()
	cfg.BatchSize = 1000
	cfg.MaxInFlight = 5000
	var sizes []int64
	for range 5 {
		e.loader.Run(e.ctx, 400) // 10,000 events
		r := e.startRelay(relayOpts{cfg: cfg})
		e.waitDrained(180 * time.Second)
		r.stop(t)
		var size int64
		if err := e.pool.QueryRow(e.ctx, e.sql(`SELECT pg_total_relation_size('{outbox}')`)).Scan(&size); err != nil {
			t.Fatal(err)
		}
		sizes = append(sizes, size)
		e.exec(`VACUUM {outbox}`)
	}
	t.Logf("outbox size (table and indexes) after each round of 10,000 events: %v bytes", sizes)
	// A B-tree recycles the pages emptied by one VACUUM only at a later one, so the indexes settle
	// in round 2; from there the size must stay flat. Without reuse, round 5 would be 2.5 times
	// round 2.
	for i, size := range sizes[2:] {
		if size > sizes[1]*13/10 {
			t.Errorf("round %d: outbox of %d bytes, round 2 needed %d: published rows' space is not reused", i+3, size, sizes[1])
		}
	}
	rep := e.check(0)
	result(t, 18, rep, "50,000 events; outbox size at each round's peak: "+strings.ReplaceAll(fmtInts(sizes), " ", ", ")+" bytes")
}

// Entry 19 at test scale: a backlog of 40,000 rows of about 1 kB exists when the relay starts.
// The bytes it holds in flight never exceed relay.max_in_flight_bytes (1 MiB) plus one row,
// whatever the backlog.
func TestFault19BacklogAtStart(t *testing.T) {
	t.Parallel()
	e := setup(t, options{load: oracle.Config{Keys: 64, PayloadBytes: 1000}})
	start := time.Now()
	if err := e.loader.Bulk(e.ctx, 40000, 5000); err != nil {
		t.Fatal(err)
	}
	t.Logf("backlog written in %s", time.Since(start).Round(time.Millisecond))
	start = time.Now()
	cfg := relayConfig()
	cfg.BatchSize = 10000
	cfg.MaxInFlight = 100000
	cfg.MaxInFlightBytes = 1 << 20
	r := e.startRelay(relayOpts{cfg: cfg})
	e.waitDrained(300 * time.Second)
	t.Logf("backlog drained in %s", time.Since(start).Round(time.Millisecond))
	r.stop(t)
	r.sink.mu.Lock()
	maxBytes := r.sink.maxBytes
	r.sink.mu.Unlock()
	t.Logf("most bytes in flight: %d (bound %d plus one row)", maxBytes, cfg.MaxInFlightBytes)
	if maxBytes > cfg.MaxInFlightBytes+4096 {
		t.Errorf("%d bytes in flight, above relay.max_in_flight_bytes %d plus one row", maxBytes, cfg.MaxInFlightBytes)
	}
	if maxBytes < cfg.MaxInFlightBytes/4 {
		t.Errorf("only %d bytes ever in flight: the bound was not exercised", maxBytes)
	}
	rep := e.check(0)
	result(t, 19, rep, "40,000-row backlog; most bytes in flight "+itoa(int64(maxBytes))+" (bound 1 MiB)")
}

// Entry 20: occurred_at is skewed at random by up to an hour, so timestamps disagree with commit
// order. Records follow commit order (the per-key sequence), not timestamps.
func TestFault20ClockSkew(t *testing.T) {
	t.Parallel()
	e := setup(t, options{load: oracle.Config{ClockSkew: time.Hour, Keys: 8}})
	r := e.startRelay(relayOpts{})
	e.loader.Run(e.ctx, 400)
	e.waitDrained(60 * time.Second)
	r.stop(t)
	// The skew is real: some record's occurred-at header is earlier than its predecessor's.
	backwards := 0
	for _, topic := range e.topics {
		last := map[string]string{}
		for _, rec := range e.broker.ReadToEnd(t, topic, 2*time.Minute) {
			at := kafkatest.Header(rec, "occurred-at")
			if prev, ok := last[string(rec.Key)]; ok && at < prev {
				backwards++
			}
			last[string(rec.Key)] = at
		}
	}
	if backwards == 0 {
		t.Error("no occurred-at went backwards: the skew was not exercised")
	}
	rep := e.check(0)
	result(t, 20, rep, itoa(int64(backwards))+" records with an earlier occurred-at than their predecessor; order by commit")
}
