package kafka_test

import (
	"bytes"
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// produceWrites is a franz-go hook that records the Produce requests a client wrote.
type produceWrites struct{ n, most atomic.Int64 }

// OnBrokerWrite implements kgo.HookBrokerWrite.
func (w *produceWrites) OnBrokerWrite(_ kgo.BrokerMetadata, key int16, written int, _, _ time.Duration, err error) {
	if key != kmsg.Produce.Int16() || err != nil {
		return
	}
	w.n.Add(1)
	for {
		m := w.most.Load()
		if int64(written) <= m || w.most.CompareAndSwap(m, int64(written)) {
			return
		}
	}
}

// publishAll publishes msgs without waiting between them, then waits until the broker answered
// every one, and returns the first error. ctx bounds the wait: the producer fails the records
// still buffered when it ends. Safe to call from any goroutine.
func publishAll(ctx context.Context, pub *kafka.Publisher, msgs []*relay.Message) error {
	var wg sync.WaitGroup
	var mu sync.Mutex
	var first error
	fail := func(err error) {
		mu.Lock()
		defer mu.Unlock()
		if first == nil {
			first = err
		}
	}
	for _, m := range msgs {
		wg.Add(1)
		err := pub.Publish(ctx, m, func(err error) {
			defer wg.Done()
			if err != nil {
				fail(fmt.Errorf("row %d: %w", m.ID, err))
			}
		})
		if err != nil {
			wg.Done()
			fail(fmt.Errorf("publish row %d: %w", m.ID, err))
			break
		}
	}
	wg.Wait()
	return first
}

// TestPublisherProduceRequestsStayNearOneBatch: franz-go encodes each produce request whole into
// one buffer, so the publisher caps a request at one batch (kafka.max_record_bytes) and its
// framing, however many partitions have batches waiting. 2 MB published at once over 6
// partitions with 64 KB batches would otherwise go out in requests of up to 6 batches.
func TestPublisherProduceRequestsStayNearOneBatch(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "request-cap", 6)
	const maxRecord = 64 << 10
	writes := &produceWrites{}
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic, MaxRecordBytes: maxRecord,
		Linger: 50 * time.Millisecond}, kgo.WithHooks(writes))
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	const n, size = 2000, 1000
	msgs := make([]*relay.Message, n)
	for i := range msgs {
		msgs[i] = &relay.Message{ID: int64(i + 1), EventID: fmt.Sprintf("e-%d", i), AggregateType: "order",
			AggregateID: fmt.Sprintf("o-%d", i%600), EventType: "order.placed", Payload: bytes.Repeat([]byte{'x'}, size),
			OccurredAt: time.Now()}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
	defer cancel()
	if err := publishAll(ctx, pub, msgs); err != nil {
		t.Fatal(err)
	}
	most, limit := writes.most.Load(), int64(maxRecord+kafka.ProduceRequestSlack)
	t.Logf("%d produce requests, the largest %d bytes (cap %d)", writes.n.Load(), most, limit)
	if most > limit {
		t.Errorf("a produce request of %d bytes; want at most %d (kafka.max_record_bytes %d and the request's framing)", most, limit, maxRecord)
	}
	if least := int64(n * size / (maxRecord + kafka.ProduceRequestSlack)); writes.n.Load() < least {
		t.Errorf("%d produce requests for %d bytes of payloads; want at least %d", writes.n.Load(), n*size, least)
	}
	if got := len(b.ReadAll(t, topic, n, time.Minute)); got != n {
		t.Errorf("read %d records back; want %d", got, n)
	}
}

// TestPublisherRecycledRecordsKeepTheirContent: the publisher reuses a record once its promise
// returned. Records published from several goroutines at once, each reused many times over,
// arrive with their own key, value and headers: a record recycled while the producer still held
// it would carry another row's.
func TestPublisherRecycledRecordsKeepTheirContent(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "recycled", 4)
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	const writers, each = 4, 1500
	var wg sync.WaitGroup
	for w := range writers {
		wg.Add(1)
		go func() {
			defer wg.Done()
			// In rounds of 100, so that the records of a round are those the last one handed back.
			for round := 0; round < each; round += 100 {
				msgs := make([]*relay.Message, 100)
				for i := range msgs {
					id := w*each + round + i + 1
					msgs[i] = &relay.Message{ID: int64(id), EventID: fmt.Sprintf("event-%d", id), AggregateType: "order",
						AggregateID: fmt.Sprintf("order-%d", id), EventType: fmt.Sprintf("order.type-%d", id%7),
						Payload:    fmt.Appendf(nil, `{"id":%d,"pad":"%s"}`, id, bytes.Repeat([]byte{'p'}, id%300)),
						OccurredAt: time.Unix(int64(id), 0)}
				}
				ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
				err := publishAll(ctx, pub, msgs)
				cancel()
				if err != nil {
					t.Error(err) // not Fatal: this is not the test's goroutine
					return
				}
			}
		}()
	}
	wg.Wait()
	recs := b.ReadAll(t, topic, writers*each, time.Minute)
	if len(recs) != writers*each {
		t.Fatalf("read %d records back; want %d", len(recs), writers*each)
	}
	seen := make(map[int]bool, len(recs))
	for _, r := range recs {
		var id int
		if _, err := fmt.Sscanf(string(r.Key), "order-%d", &id); err != nil {
			t.Fatalf("key %q: %v", r.Key, err)
		}
		seen[id] = true
		want := map[string]string{
			kafka.HeaderEventID:    fmt.Sprintf("event-%d", id),
			kafka.HeaderEventType:  fmt.Sprintf("order.type-%d", id%7),
			kafka.HeaderOccurredAt: time.Unix(int64(id), 0).UTC().Format(time.RFC3339Nano),
		}
		for k, v := range want {
			if got := kafkatest.Header(r, k); got != v {
				t.Errorf("record of key %s: header %s = %q; want %q", r.Key, k, got, v)
			}
		}
		if want := fmt.Sprintf(`{"id":%d,"pad":"%s"}`, id, bytes.Repeat([]byte{'p'}, id%300)); string(r.Value) != want {
			t.Errorf("record of key %s: value %.40q; want %.40q", r.Key, r.Value, want)
		}
	}
	if len(seen) != writers*each {
		t.Errorf("%d distinct keys; want %d", len(seen), writers*each)
	}
}
