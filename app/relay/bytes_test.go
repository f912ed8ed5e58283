package relay_test

import (
	"context"
	"fmt"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// markGateStore opens sessions whose marks wait until the test closes gate, and records which
// rows the relay released (relay.Releaser) and when a mark first returned.
type markGateStore struct {
	relay.Store
	gate     chan struct{}
	marked   atomic.Bool
	mu       sync.Mutex
	released map[int64]bool
}

func (s *markGateStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &markGateSession{Session: sess, s: s}, nil
}

func (s *markGateStore) releasedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.released)
}

type markGateSession struct {
	relay.Session
	s *markGateStore
}

func (m *markGateSession) Mark(ctx context.Context, ids []int64) error {
	select {
	case <-m.s.gate:
	case <-ctx.Done():
		return ctx.Err()
	}
	err := m.Session.Mark(ctx, ids)
	m.s.marked.Store(true)
	return err
}

func (m *markGateSession) Release(msgs []*relay.Message) {
	m.s.mu.Lock()
	for _, msg := range msgs {
		m.s.released[msg.ID] = true
	}
	m.s.mu.Unlock()
	m.Session.(relay.Releaser).Release(msgs)
}

// ackSink acknowledges every message at once and keeps only its id: an relay.ReleasingSink.
type ackSink struct {
	mu   sync.Mutex
	ids  map[int64]bool
	acks sync.WaitGroup
}

func (s *ackSink) Publish(_ context.Context, m *relay.Message, done func(error)) error {
	s.mu.Lock()
	s.ids[m.ID] = true
	s.mu.Unlock()
	s.acks.Go(func() { done(nil) })
	return nil
}

// Abort returns once every acknowledgement was delivered: nothing is left to fail.
func (s *ackSink) Abort(context.Context) error {
	s.acks.Wait()
	return nil
}

func (s *ackSink) ReleasesMessages() bool { return true }

func (s *ackSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ids)
}

// TestRelayByteBudgetEndsAtTheAck: relay.max_in_flight_bytes bounds the payloads the relay holds,
// and an acknowledged row waiting for its mark holds none (the relay releases its payload at the
// ack). With every mark held back, the relay must still publish a backlog four times the byte
// budget, as long as it fits in relay.max_in_flight rows, and release each row before any mark
// returned; once the marks go through, every row is marked.
func TestRelayByteBudgetEndsAtTheAck(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	const n = 1000
	payload := []byte(strings.Repeat("p", 4096))
	var msgs []postgres.Message
	for i := range n {
		msgs = append(msgs, postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("k%d", i%7),
			EventType: "created", Payload: payload})
	}
	if err := w.Append(ctx, pool, msgs...); err != nil {
		t.Fatal(err)
	}
	store := &markGateStore{Store: dbtest.Store(t, table), gate: make(chan struct{}), released: map[int64]bool{}}
	sink := &ackSink{ids: map[int64]bool{}}
	// 1 MiB holds about 250 of these rows; 2000 rows in flight hold them all.
	cfg := relay.Config{BatchSize: 100, MaxInFlight: 2000, MaxInFlightBytes: 1 << 20, PollInterval: time.Minute}
	startRelay(t, ctx, cfg, store, sink)

	for sink.count() < n || store.releasedCount() < n {
		if ctx.Err() != nil {
			t.Fatalf("with the marks held back, %d of %d rows published and %d released: acknowledged rows still hold the byte budget",
				sink.count(), n, store.releasedCount())
		}
		time.Sleep(10 * time.Millisecond)
	}
	if store.marked.Load() {
		t.Fatal("a mark returned while the gate was closed")
	}
	close(store.gate)
	waitDrained(t, ctx, pool, table, "the marks were let through")
	if got := sink.count(); got != n {
		t.Errorf("%d distinct rows published, want %d", got, n)
	}
}
