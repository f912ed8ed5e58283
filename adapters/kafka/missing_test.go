package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"slices"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

// TestPublisherSaysATopicIsMissing: a publish to a topic that does not exist fails after at most
// a couple of metadata answers (franz-go's default waits for five, some 25 s), with an error
// wrapping relay.ErrDestinationMissing that names the topic and the fix; the publisher logs it once
// for the topic, however many records fail, and lists it in MissingTopics until a publish to it
// succeeds once it is created. MissingTopics, asked of the brokers, says the same.
func TestPublisherSaysATopicIsMissing(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	if b.Fake == nil {
		t.Skip("counts metadata requests in kfake (KAFKA_BROKERS is set)")
	}
	topic := kafkatest.Name("missing")
	var asked atomic.Int32 // metadata requests naming the topic
	b.Fake.ControlKey(int16(kmsg.Metadata), func(kr kmsg.Request) (kmsg.Response, error, bool) {
		b.Fake.KeepControl()
		for _, rt := range kr.(*kmsg.MetadataRequest).Topics {
			if rt.Topic != nil && *rt.Topic == topic {
				asked.Add(1)
			}
		}
		return nil, nil, false
	})
	logs := &logbuf.Buffer{}
	cfg := kafka.Config{Brokers: b.Addrs, TopicTemplate: topic, Log: slog.New(slog.NewJSONHandler(logs, nil))}
	pub, err := kafka.NewPublisher(cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(pub.Close)
	ctx := context.Background()
	publish := func(n int) []error {
		t.Helper()
		errs := make(chan error, n)
		for i := range n {
			m := &relay.Message{ID: int64(i + 1), EventID: fmt.Sprintf("e-%d", i), AggregateType: "order",
				AggregateID: fmt.Sprintf("k-%d", i), EventType: "OrderPlaced", Payload: []byte("x"), OccurredAt: time.Now()}
			if err := pub.Publish(ctx, m, func(err error) { errs <- err }); err != nil {
				t.Fatal(err)
			}
		}
		var out []error
		for range n {
			select {
			case err := <-errs:
				out = append(out, err)
			case <-time.After(60 * time.Second):
				t.Fatal("no verdict within 60s")
			}
		}
		return out
	}

	for _, err := range publish(3) {
		if !errors.Is(err, relay.ErrDestinationMissing) || !strings.Contains(err.Error(), topic) ||
			!strings.Contains(err.Error(), "kafka.auto_create_topics=true") {
			t.Errorf("publish to a missing topic: %v; want relay.ErrDestinationMissing naming the topic and the fix", err)
		}
	}
	if n := asked.Load(); n > 3 {
		t.Errorf("the records failed after %d metadata requests for the topic, want at most 3", n)
	}
	publish(3)
	if got := pub.MissingTopics(); !slices.Equal(got, []string{topic}) {
		t.Errorf("MissingTopics %v, want [%s]", got, topic)
	}
	if n := strings.Count(logs.String(), `"msg":"kafka topic does not exist`); n != 1 || !strings.Contains(logs.String(), `"topic":"`+topic+`"`) {
		t.Errorf("%d 'kafka topic does not exist' lines for six failed records, want one naming the topic:\n%s", n, logs)
	}
	if missing, err := kafka.MissingTopics(ctx, cfg, []string{topic}); err != nil || !slices.Equal(missing, []string{topic}) {
		t.Errorf("kafka.MissingTopics: %v %v, want [%s]", missing, err, topic)
	}

	b.Create(t, topic, 1)
	if missing, err := kafka.MissingTopics(ctx, cfg, []string{topic}); err != nil || len(missing) != 0 {
		t.Errorf("kafka.MissingTopics once created: %v %v, want none", missing, err)
	}
	deadline := time.Now().Add(30 * time.Second)
	for {
		err := publish(1)[0]
		if err == nil {
			break
		}
		if !errors.Is(err, relay.ErrDestinationMissing) || time.Now().After(deadline) {
			t.Fatalf("publish once the topic exists: %v", err)
		}
	}
	if got := pub.MissingTopics(); len(got) != 0 {
		t.Errorf("MissingTopics %v once a publish succeeded, want none", got)
	}
	if !strings.Contains(logs.String(), `"msg":"kafka topic exists now`) {
		t.Errorf("no 'kafka topic exists now' line:\n%s", logs)
	}
}
