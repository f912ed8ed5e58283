package kafka_test

import (
	"context"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/app/relay/sinktest"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// TestPublisherConformance runs the relay.Sink conformance suite against the Kafka publisher and
// kfake (or the cluster named by KAFKA_BROKERS, without the tests that hold acknowledgements).
func TestPublisherConformance(t *testing.T) {
	t.Parallel()
	sinktest.Run(t, func(t *testing.T) *sinktest.Env {
		b := kafkatest.Start(t)
		topic := b.Topic(t, "conformance", 3)
		pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(pub.Close)
		reader, err := kgo.NewClient(kgo.SeedBrokers(b.Addrs...), kgo.ConsumeTopics(topic),
			kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(reader.Close)
		var mu sync.Mutex
		var got []sinktest.Delivered
		env := &sinktest.Env{
			Sink: pub,
			Delivered: func(*testing.T) []sinktest.Delivered {
				mu.Lock()
				defer mu.Unlock()
				ctx, cancel := context.WithTimeout(context.Background(), 300*time.Millisecond)
				defer cancel()
				reader.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
					d := sinktest.Delivered{Key: string(r.Key), Payload: r.Value, Headers: map[string]string{}}
					for _, h := range r.Headers {
						d.Headers[h.Key] = string(h.Value)
					}
					got = append(got, d)
				})
				return append([]sinktest.Delivered(nil), got...)
			},
			// A topic that does not exist (and is not created: auto creation is off).
			Reject: func(m *relay.Message) { m.Topic = "missing-" + domain.NewID()[:8] },
		}
		if b.Fake != nil {
			var paused atomic.Bool
			var resume chan struct{}
			b.Fake.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
				if paused.Load() {
					ch := resume
					b.Fake.SleepControl(func() { <-ch })
				}
				return nil, nil, false
			})
			env.Pause = func(*testing.T) { resume = make(chan struct{}); paused.Store(true) }
			env.Resume = func(*testing.T) { paused.Store(false); close(resume) }
		}
		return env
	})
}
