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
