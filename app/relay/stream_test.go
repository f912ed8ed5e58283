package relay_test

import (
	"context"
	"fmt"
	"log/slog"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// meterSink is an exactly-once publisher that measures the bytes of the rows handed to it and not
// yet produced (streamed rows) or decided (the others), and can fail one streamed row's produce.
type meterSink struct {
	*kafka.TxPublisher
	mu              sync.Mutex
	bytes, maxBytes int
	streamed        atomic.Int64
	failAt          int64 // fail the produce of this streamed row (its order in the stream, from 1); 0: none
	failed          atomic.Bool
}

func (s *meterSink) add(n int) {
	s.mu.Lock()
	s.bytes += n
	s.maxBytes = max(s.maxBytes, s.bytes)
	s.mu.Unlock()
}

func (s *meterSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	size := m.Size()
	s.add(size)
	err := s.TxPublisher.Publish(ctx, m, func(err error) { s.add(-size); done(err) })
	if err != nil {
		s.add(-size)
	}
	return err
}

func (s *meterSink) PublishStreamed(ctx context.Context, m *relay.Message, produced func(error)) error {
	size := m.Size()
	s.add(size)
	n := s.streamed.Add(1)
	err := s.TxPublisher.PublishStreamed(ctx, m, func(err error) {
		s.add(-size)
		if err == nil && n == s.failAt && s.failed.CompareAndSwap(false, true) {
			err = fmt.Errorf("injected failure of streamed row %d", m.ID)
		}
		produced(err)
	})
	if err != nil {
		s.add(-size)
	}
	return err
}

func (s *meterSink) peak() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.maxBytes
}

// streamEnv is an outbox whose claims read whole transactions, a broker and an exactly-once
// relay's configuration on them, with a byte budget of 1 MiB.
type streamEnv struct {
	t      *testing.T
	ctx    context.Context
	table  postgres.Table
	pool   *pgxpool.Pool
	exec   func(sql string)
	broker *kafkatest.Broker
	topic  string
	tx     kafka.TxConfig
	cfg    relay.Config
	// acked counts the rows the relays of this env reported published (Observer.Acked).
	acked ackCounter
}

// ackCounter is an Observer that counts the rows reported published.
type ackCounter struct {
	relay.NopObserver
	n atomic.Int64
}

func (c *ackCounter) Acked(*relay.Message, time.Time) { c.n.Add(1) }

func newStreamEnv(t *testing.T) *streamEnv {
	t.Helper()
	pool, table := integrationSchema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	t.Cleanup(cancel)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "stream", 3)
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	return &streamEnv{t: t, ctx: ctx, table: table, pool: pool, broker: b, topic: topic,
		exec: func(sql string) {
			t.Helper()
			if _, err := pool.Exec(ctx, strings.ReplaceAll(sql, "{outbox}", ident)); err != nil {
				t.Fatal(err)
			}
		},
		tx: kafka.TxConfig{TransactionalID: kafkatest.Name("txid"), ProgressTopic: kafkatest.Name("progress"),
			Identity: "db/" + table.Schema + "/" + table.Name, TransactionTimeout: 30 * time.Second},
		cfg: relay.Config{BatchSize: 200, MaxInFlight: 1000, MaxInFlightBytes: 1 << 20, PollInterval: 100 * time.Millisecond,
			RetryBackoffMin: 100 * time.Millisecond, RetryBackoffMax: time.Second, ShutdownTimeout: 20 * time.Second},
	}
}

// write writes one database transaction of n rows of about 1 KB, keys k0..k(keys-1) in turn, each
// payload the row's sequence number in the transaction, from first.
func (e *streamEnv) write(first, n, keys int) {
	e.t.Helper()
	e.exec(fmt.Sprintf(`INSERT INTO {outbox} (aggregate_type, aggregate_id, event_type, payload)
		SELECT 't', 'k' || (i %% %d), 'E', convert_to(rpad(i::text || ' ', 1000, 'x'), 'UTF8')
		FROM generate_series(%d, %d) i ORDER BY i`, keys, first, first+n-1))
}

// run starts an exactly-once relay with sink around a new publisher; it returns the sink and a
// function that stops the relay and waits for it.
func (e *streamEnv) run(failAt int64, logs *strings.Builder) (*meterSink, func()) {
	e.t.Helper()
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		e.t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: e.table, Transactions: true})
	if err != nil {
		e.t.Fatal(err)
	}
	pub, err := kafka.NewTxPublisher(kafka.Config{Brokers: e.broker.Addrs, TopicTemplate: e.topic}, e.tx, kafka.PublisherDeps{})
	if err != nil {
		e.t.Fatal(err)
	}
	sink := &meterSink{TxPublisher: pub, failAt: failAt}
	if logs == nil {
		logs = &strings.Builder{}
	}
	lw := &lockedWriter{b: logs}
	log := slog.New(slog.NewTextHandler(lw, &slog.HandlerOptions{Level: slog.LevelDebug}))
	e.t.Cleanup(func() {
		if e.t.Failed() {
			lw.mu.Lock()
			e.t.Logf("relay logs:\n%s", logs.String())
			lw.mu.Unlock()
		}
	})
	r, err := relay.New(e.cfg, store, sink, &e.acked, log)
	if err != nil {
		e.t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	stop := func() {
		once.Do(func() {
			cancel()
			if err := <-done; err != nil {
				e.t.Errorf("relay: %v", err)
			}
			pub.Close()
		})
	}
	e.t.Cleanup(stop)
	return sink, stop
}

// lockedWriter is a strings.Builder the relay's goroutines may write to.
type lockedWriter struct {
	mu sync.Mutex
	b  *strings.Builder
}

func (w *lockedWriter) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.b.Write(p)
}

// pending returns how many rows are not marked.
func (e *streamEnv) pending() int {
	e.t.Helper()
	var n int
	if err := e.pool.QueryRow(e.ctx, `SELECT count(*) FROM `+pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()).Scan(&n); err != nil {
		e.t.Fatal(err)
	}
	return n
}

// waitPending waits until want rows are pending.
func (e *streamEnv) waitPending(want int, timeout time.Duration) {
	e.t.Helper()
	deadline := time.Now().Add(timeout)
	for n := e.pending(); n != want; n = e.pending() {
		if time.Now().After(deadline) {
			e.t.Fatalf("%d rows pending after %s, want %d", n, timeout, want)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// readCommitted reads the topic at read_committed until want records came, or nothing came for
// idle, and checks that each row's record came once and each key's in order.
func (e *streamEnv) readCommitted(want int, idle time.Duration) []*kgo.Record {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...), kgo.ConsumeTopics(e.topic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	var out []*kgo.Record
	for len(out) < want {
		ctx, cancel := context.WithTimeout(e.ctx, idle)
		fetches := cl.PollFetches(ctx)
		cancel()
		n := 0
		fetches.EachRecord(func(r *kgo.Record) { out = append(out, r); n++ })
		if n == 0 && ctx.Err() != nil {
			break
		}
	}
	seen := map[string]bool{}
	last := map[string]int{}
	for _, r := range out {
		seq, _ := strconv.Atoi(strings.Fields(string(r.Value))[0])
		if seen[string(r.Value)] {
			e.t.Errorf("record %d of key %s published twice", seq, r.Key)
		}
		seen[string(r.Value)] = true
		if seq <= last[string(r.Key)] {
			e.t.Errorf("key %s: record %d after %d", r.Key, seq, last[string(r.Key)])
		}
		last[string(r.Key)] = seq
	}
	return out
}

// progress returns the row ids named by each progress record, in order.
func (e *streamEnv) progress() [][]int64 {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...), kgo.ConsumeTopics(e.tx.ProgressTopic),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()), kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	var recs []*kgo.Record
	for {
		ctx, cancel := context.WithTimeout(e.ctx, 3*time.Second)
		fetches := cl.PollFetches(ctx)
		cancel()
		n := len(recs)
		fetches.EachRecord(func(r *kgo.Record) { recs = append(recs, r) })
		if len(recs) == n && ctx.Err() != nil {
			break
		}
	}
	var out [][]int64
	for _, r := range recs {
		ids, err := kafka.DecodeProgress(r.Value)
		if err != nil {
			e.t.Fatal(err)
		}
		out = append(out, ids)
	}
	return out
}

// TestRelayStreamsAHugeTransaction: one database transaction of 20,000 rows of 1 KB (20 MB)
// between small ones, under a byte budget of 1 MiB, is published in pieces inside one Kafka
// transaction: the bytes handed to the sink and not yet held by the broker stay within the
// budget, a read_committed reader sees every row once and each key in order, and the first
// progress record naming a row of the huge transaction names all of them (one Kafka
// transaction). Every row is marked.
func TestRelayStreamsAHugeTransaction(t *testing.T) {
	t.Parallel()
	e := newStreamEnv(t)
	e.write(1, 50, 7)
	e.write(51, 20000, 13)
	e.write(20051, 50, 7)
	var logs strings.Builder
	sink, _ := e.run(0, &logs)
	e.waitPending(0, time.Minute)
	recs := e.readCommitted(20100, 20*time.Second)
	if len(recs) != 20100 {
		t.Fatalf("%d records at read_committed, want 20100", len(recs))
	}
	if n := sink.streamed.Load(); n < 15000 {
		t.Errorf("%d rows streamed, want most of the 20,000 of the huge transaction", n)
	}
	if peak := sink.peak(); peak > e.cfg.MaxInFlightBytes+2000 {
		t.Errorf("peak bytes handed over and not yet held by the broker: %d, want at most the budget %d", peak, e.cfg.MaxInFlightBytes)
	}
	checkWhole(t, e.progress(), 51, 20050)
	if !strings.Contains(logs.String(), "streamed transaction committed") {
		t.Errorf("no stream committed:\n%s", logs.String())
	}
	if n := e.acked.n.Load(); n != 20100 {
		t.Errorf("%d rows reported published, want 20100", n)
	}
}

// checkWhole checks that the first progress record naming a row of first..last names all of
// them: they were committed in one Kafka transaction.
func checkWhole(t *testing.T, progress [][]int64, first, last int64) {
	t.Helper()
	ids, err := rowIDs(t, first, last)
	if err != nil {
		t.Fatal(err)
	}
	for _, named := range progress {
		n := 0
		for _, id := range ids {
			if _, ok := slices.BinarySearch(named, id); ok {
				n++
			}
		}
		if n == 0 {
			continue
		}
		if n != len(ids) {
			t.Fatalf("the first progress record naming the huge transaction names %d of its %d rows", n, len(ids))
		}
		return
	}
	t.Fatal("no progress record names the huge transaction")
}

// rowIDs returns the outbox ids first..last: the tests' rows are numbered from 1 in one schema.
func rowIDs(_ *testing.T, first, last int64) ([]int64, error) {
	ids := make([]int64, 0, last-first+1)
	for id := first; id <= last; id++ {
		ids = append(ids, id)
	}
	return ids, nil
}

// TestRelayStreamAbortsAndRetries: the produce of one row in the middle of a stream fails. The
// stream's Kafka transaction is aborted (nothing of it visible at read_committed), the failure is
// counted against that row, and once its retry is due the transaction streams again, whole:
// every row once, in order per key.
func TestRelayStreamAbortsAndRetries(t *testing.T) {
	t.Parallel()
	e := newStreamEnv(t)
	e.write(1, 8000, 13)
	var logs strings.Builder
	sink, _ := e.run(4000, &logs)
	e.waitPending(0, 30*time.Second)
	if !sink.failed.Load() {
		t.Fatal("the injected failure never ran")
	}
	recs := e.readCommitted(8000, 20*time.Second)
	if len(recs) != 8000 {
		t.Fatalf("%d records at read_committed, want 8000", len(recs))
	}
	if !strings.Contains(logs.String(), "streamed transaction aborted") {
		t.Errorf("the stream was not aborted:\n%s", logs.String())
	}
	checkWhole(t, e.progress(), 1, 8000)
	// The rows the aborted stream handed over were not published: each row is counted once.
	if n := e.acked.n.Load(); n != 8000 {
		t.Errorf("%d rows reported published, want 8000 (the aborted stream's rows counted too?)", n)
	}
}

// TestRelayStopsMidStream: the relay is stopped while it streams a transaction: the stream's Kafka
// transaction is aborted and nothing of it is visible at read_committed, every row stays pending
// and the stop returns; the next relay publishes them all once.
func TestRelayStopsMidStream(t *testing.T) {
	t.Parallel()
	e := newStreamEnv(t)
	e.write(1, 20000, 13)
	sink, stop := e.run(0, nil)
	deadline := time.Now().Add(time.Minute)
	for sink.streamed.Load() < 3000 {
		if time.Now().After(deadline) {
			t.Fatal("the relay did not stream")
		}
		time.Sleep(time.Millisecond)
	}
	stop()
	if n := e.pending(); n != 20000 {
		t.Fatalf("%d rows pending after a stop mid-stream, want all 20000", n)
	}
	if recs := e.readCommitted(1, 3*time.Second); len(recs) != 0 {
		t.Fatalf("%d records visible at read_committed after a stop mid-stream, want 0", len(recs))
	}
	e.run(0, nil)
	e.waitPending(0, 2*time.Minute)
	if recs := e.readCommitted(20000, 20*time.Second); len(recs) != 20000 {
		t.Fatalf("%d records at read_committed, want 20000", len(recs))
	}
}

// slowSink is a meterSink whose PublishStreamed takes a millisecond a row.
type slowSink struct{ *meterSink }

func (s slowSink) PublishStreamed(ctx context.Context, m *relay.Message, produced func(error)) error {
	time.Sleep(time.Millisecond)
	return s.meterSink.PublishStreamed(ctx, m, produced)
}

// TestRelayStreamTooSlowForTheTransactionTimeout: a stream that cannot be published within
// kafka.transaction_timeout (1 s here; the sink takes a millisecond a row of 20,000) is aborted
// by the relay once three quarters of it passed, with an error that says so, instead of waiting
// for the broker to abort it: nothing is visible at read_committed, every row stays pending.
func TestRelayStreamTooSlowForTheTransactionTimeout(t *testing.T) {
	t.Parallel()
	e := newStreamEnv(t)
	e.tx.TransactionTimeout = time.Second
	e.write(1, 20000, 13)
	var logs strings.Builder
	lw := &lockedWriter{b: &logs}
	conn, err := postgres.ParseURL(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	store, err := postgres.NewStore(conn, postgres.StoreConfig{Table: e.table, Transactions: true})
	if err != nil {
		t.Fatal(err)
	}
	pub, err := kafka.NewTxPublisher(kafka.Config{Brokers: e.broker.Addrs, TopicTemplate: e.topic}, e.tx, kafka.PublisherDeps{})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	r, err := relay.New(e.cfg, store, slowSink{&meterSink{TxPublisher: pub}}, nil, slog.New(slog.NewTextHandler(lw, nil)))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(e.ctx)
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	deadline := time.Now().Add(time.Minute)
	for {
		lw.mu.Lock()
		aborted := strings.Contains(logs.String(), "streamed transaction aborted") && strings.Contains(logs.String(), "too old")
		lw.mu.Unlock()
		if aborted {
			break
		}
		if time.Now().After(deadline) {
			cancel()
			<-done
			t.Fatalf("no stream aborted for its age within a minute:\n%s", logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	cancel()
	if err := <-done; err != nil {
		t.Errorf("relay: %v", err)
	}
	if n := e.pending(); n != 20000 {
		t.Errorf("%d rows pending, want all 20000: none may be marked", n)
	}
	if recs := e.readCommitted(1, 3*time.Second); len(recs) != 0 {
		t.Errorf("%d records visible at read_committed, want 0", len(recs))
	}
}
