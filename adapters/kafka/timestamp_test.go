package kafka_test

import (
	"context"
	"errors"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// publishAcked publishes m with pub and waits for the broker's answer.
func publishAcked(t *testing.T, pub *kafka.Publisher, m *relay.Message) {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	if err := publishAll(ctx, pub, []*relay.Message{m}); err != nil {
		t.Fatalf("publish: %v", err)
	}
}

// TestRecordTimestamp: kafka.record_timestamp=occurred_at stamps the record with the row's
// occurred_at (to the millisecond, Kafka's unit), produce with the time it was sent; an
// occurred_at before 1970 cannot be a record timestamp and is refused as invalid.
func TestRecordTimestamp(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	occurred := time.Date(2021, 3, 4, 5, 6, 7, 891234567, time.UTC)
	msg := func(topic string) *relay.Message {
		return &relay.Message{EventID: domain.NewID(), AggregateType: "order", AggregateID: "k1",
			EventType: "OrderPlaced", Payload: []byte(`{}`), Topic: topic, OccurredAt: occurred}
	}
	read := func(topic string) *kgo.Record {
		recs := b.ReadAll(t, topic, 1, 10*time.Second)
		if len(recs) != 1 {
			t.Fatalf("topic %s: %d records, want 1", topic, len(recs))
		}
		return recs[0]
	}
	newPub := func(mode string) *kafka.Publisher {
		pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, RecordTimestamp: mode})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		return pub
	}

	evt := newPub(kafka.TimestampOccurredAt)
	topic := b.Topic(t, "ts-event", 1)
	publishAcked(t, evt, msg(topic))
	if got, want := read(topic).Timestamp.UnixMilli(), occurred.UnixMilli(); got != want {
		t.Errorf("occurred_at: record timestamp %d ms, want occurred_at %d ms", got, want)
	}

	before := time.Now().Add(-time.Second)
	prod := newPub(kafka.TimestampProduce)
	topic = b.Topic(t, "ts-produce", 1)
	publishAcked(t, prod, msg(topic))
	if got := read(topic).Timestamp; got.Before(before) {
		t.Errorf("produce: record timestamp %s, want the time it was sent (after %s)", got, before)
	}

	old := msg(topic)
	old.OccurredAt = time.Date(1969, 12, 31, 23, 59, 59, 0, time.UTC)
	if _, err := evt.Record(old); !errors.Is(err, relay.ErrInvalidMessage) {
		t.Errorf("occurred_at in 1969: %v, want relay.ErrInvalidMessage", err)
	}
	if _, err := prod.Record(old); err != nil {
		t.Errorf("occurred_at in 1969 with produce timestamps: %v, want no error", err)
	}
}
