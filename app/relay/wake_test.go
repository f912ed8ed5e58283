package relay_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// holdSink acknowledges every message at once but the first, whose acknowledgement it holds
// until the test calls release: a broker slow to answer one produce request.
type holdSink struct {
	mu   sync.Mutex
	ids  []int64
	held func(error)
	acks sync.WaitGroup
}

func (s *holdSink) Publish(_ context.Context, m *relay.Message, done func(error)) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.ids = append(s.ids, m.ID)
	if len(s.ids) == 1 {
		s.held = done
		return nil
	}
	s.acks.Go(func() { done(nil) })
	return nil
}

// release lets the held acknowledgement through, once.
func (s *holdSink) release() {
	s.mu.Lock()
	done := s.held
	s.held = nil
	s.mu.Unlock()
	if done != nil {
		done(nil)
	}
}

// Abort returns once every acknowledgement was delivered (the held one is let through).
func (s *holdSink) Abort(context.Context) error {
	s.release()
	s.acks.Wait()
	return nil
}

func (s *holdSink) count() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.ids)
}

// TestRelayClaimsAWakeUpWhileEarlierRowsAwaitTheBroker: a row committed while the relay waits
// for the broker to acknowledge an earlier one is claimed on its NOTIFY wake-up, not after that
// acknowledgement. (A relay that watched the session for wake-ups only when nothing was
// unacknowledged left the second row to the poll interval, here a minute, or to the first
// row's acknowledgement: at a thousand events a second, commit to publish waited on the
// previous event's produce request, and the latency's tail was the broker's.)
func TestRelayClaimsAWakeUpWhileEarlierRowsAwaitTheBroker(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	event := func(key string) postgres.Message {
		return postgres.Message{AggregateType: "order", AggregateID: key, EventType: "created", Payload: []byte(key)}
	}
	if err := w.Append(ctx, pool, event("a")); err != nil {
		t.Fatal(err)
	}
	sink := &holdSink{}
	defer sink.release()
	startRelay(t, ctx, relay.Config{PollInterval: time.Minute}, dbtest.Store(t, table), sink)

	for sink.count() < 1 {
		if ctx.Err() != nil {
			t.Fatal("the relay never published the first row")
		}
		time.Sleep(5 * time.Millisecond)
	}
	if err := w.Append(ctx, pool, event("b")); err != nil { // its commit sends the wake-up
		t.Fatal(err)
	}
	// The bound is generous for a loaded machine, yet below the poll interval (1 min, the
	// longest allowed): a relay that did not claim on the wake-up publishes the row only then.
	wctx, cancel := context.WithTimeout(ctx, 45*time.Second)
	defer cancel()
	for sink.count() < 2 {
		if wctx.Err() != nil {
			t.Fatalf("a row committed while the first waited for its acknowledgement was not published within 45 s of its wake-up (poll interval 1 min): %d rows published",
				sink.count())
		}
		time.Sleep(5 * time.Millisecond)
	}

	sink.release()
	waitDrained(t, ctx, pool, table, "the first acknowledgement came")
	if got := sink.count(); got != 2 {
		t.Errorf("%d rows published, want 2", got)
	}
}
