package app_test

import (
	"context"
	"fmt"
	"slices"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/memory"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// gateSink stops the relay inside its first Publish until the test opens the gate: the relay is
// then between two claims of a backlog, where the test commits what it needs.
type gateSink struct {
	*memory.Sink
	reached chan struct{}
	open    chan struct{}
	first   bool
}

func (g *gateSink) Publish(ctx context.Context, m *app.Message, done func(error)) error {
	if !g.first {
		g.first = true
		close(g.reached)
		<-g.open
	}
	return g.Sink.Publish(ctx, m, done)
}

// TestRelayKeepsKeyOrderAcrossTheVisibilityGap: the first event of key k is written by a
// transaction still open while the relay reads a backlog past its id; the transaction commits,
// then the key's second event commits, while the relay is in the middle of the backlog. The
// second event must not go out before the first. (A relay that carried a cursor from one claim to
// the next published the second event at its next claim and found the first only at its next
// rescan from the oldest row.)
func TestRelayKeepsKeyOrderAcrossTheVisibilityGap(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	event := func(key, name string) postgres.Message {
		return postgres.Message{AggregateType: "order", AggregateID: key, EventType: name, Payload: []byte(name)}
	}
	txA, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = txA.Rollback(context.Background()) }()
	if err := w.Append(ctx, txA, event("k", "k-1")); err != nil {
		t.Fatal(err)
	}
	var backlog []postgres.Message
	for i := range 20 {
		backlog = append(backlog, event(fmt.Sprintf("o-%d", i), fmt.Sprintf("o-%d", i)))
	}
	if err := w.Append(ctx, pool, backlog...); err != nil { // committed, with ids above k-1's
		t.Fatal(err)
	}

	store := dbtest.Store(t, table)
	sink := &gateSink{Sink: memory.NewSink(), reached: make(chan struct{}), open: make(chan struct{})}
	// Batches of 5 rows: the backlog takes four claims. A long poll interval keeps the periodic
	// rescan out of the way.
	relay, err := app.NewRelay(app.RelayConfig{BatchSize: 5, MaxInFlight: 100, PollInterval: time.Minute}, store, sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- relay.Run(rctx) }()
	defer func() {
		stop()
		<-done
	}()

	select {
	case <-sink.reached: // the first claim read past k-1, which it could not see
	case <-ctx.Done():
		t.Fatal("the relay never published")
	}
	if err := txA.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Append(ctx, pool, event("k", "k-2")); err != nil {
		t.Fatal(err)
	}
	close(sink.open)

	var order []string
	for ctx.Err() == nil {
		order = order[:0]
		for _, d := range sink.Deliveries() {
			order = append(order, d.Message.EventType)
		}
		if len(order) >= 22 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	i1, i2 := slices.Index(order, "k-1"), slices.Index(order, "k-2")
	if i1 < 0 || i2 < 0 {
		t.Fatalf("deliveries %v: k-1 or k-2 missing", order)
	}
	if i2 < i1 {
		t.Fatalf("key k out of order: k-2 published before k-1 (deliveries %v)", order)
	}
	if len(order) != 22 {
		t.Errorf("%d deliveries, want 22: %v", len(order), order)
	}
}

// failFirstSink refuses the first row of key "k" the instant it is handed over: its verdict
// reaches the relay while the relay is still handing over the rest of the claim, as a broker's
// rejection does when its answer comes back between two Publish calls.
type failFirstSink struct {
	*memory.Sink
	failed bool
}

func (f *failFirstSink) Publish(ctx context.Context, m *app.Message, done func(error)) error {
	if m.AggregateID == "k" && !f.failed {
		f.failed = true
		done(&app.GroupError{Group: "t/0", Err: fmt.Errorf("MESSAGE_TOO_LARGE (injected)")})
		return nil
	}
	return f.Sink.Publish(ctx, m, done)
}

// TestRelayHoldsAKeyTheMomentItsRowFails: key k's first row fails while the relay hands over
// the rest of the same claim, which holds k's second row. The second row must wait for the first
// to be published again, not go out ahead of it because the relay had not yet read the failure.
func TestRelayHoldsAKeyTheMomentItsRowFails(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	msgs := []postgres.Message{
		{AggregateType: "order", AggregateID: "k", EventType: "k-1", Payload: []byte("1")},
		{AggregateType: "order", AggregateID: "other", EventType: "other", Payload: []byte("o")},
		{AggregateType: "order", AggregateID: "k", EventType: "k-2", Payload: []byte("2")},
	}
	if err := w.Append(ctx, pool, msgs...); err != nil {
		t.Fatal(err)
	}
	sink := &failFirstSink{Sink: memory.NewSink()}
	relay, err := app.NewRelay(app.RelayConfig{RetryBackoffMin: 50 * time.Millisecond, RetryBackoffMax: 100 * time.Millisecond},
		dbtest.Store(t, table), sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- relay.Run(rctx) }()
	defer func() {
		stop()
		<-done
	}()

	var order []string
	for ctx.Err() == nil {
		order = order[:0]
		for _, d := range sink.Deliveries() {
			order = append(order, d.Message.EventType)
		}
		if len(order) >= 3 {
			break
		}
		time.Sleep(10 * time.Millisecond)
	}
	if want := "[other k-1 k-2]"; fmt.Sprint(order) != want {
		t.Fatalf("deliveries %v, want %s: k-2 must wait for k-1's retry", order, want)
	}
}
