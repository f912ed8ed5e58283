package kafka_test

import (
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
)

// TestRecordReasonCutsWholeCharacters: a reason that quotes a long value cuts it at a character
// boundary. Cut at a byte count, the quoted topic ended in half a character, printed as \xe2\x82.
func TestRecordReasonCutsWholeCharacters(t *testing.T) {
	t.Parallel()
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: []string{"127.0.0.1:1"}})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	// Byte 300, where the reason cuts the topic, is the last byte of the 100th '€'.
	topic := "x" + strings.Repeat("€", 200)
	_, err = pub.Record(&relay.Message{EventID: domain.NewID(), AggregateType: "order", AggregateID: "k",
		EventType: "OrderPlaced", Payload: []byte("x"), Topic: topic, OccurredAt: time.Now()})
	if !errors.Is(err, relay.ErrInvalidMessage) {
		t.Fatalf("record with topic %q: %v, want relay.ErrInvalidMessage", topic, err)
	}
	if want := `topic "x` + strings.Repeat("€", 99) + `..." is not a valid Kafka topic name`; !strings.Contains(err.Error(), want) {
		t.Errorf("reason %q, want it to contain %q", err, want)
	}
}
