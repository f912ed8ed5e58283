package kafka_test

import (
	"context"
	"errors"
	"log/slog"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

// TestPublisherReadsTheTopicsMaxMessageBytes: a topic whose max.message.bytes (4096) is below
// kafka.max_record_bytes. The publisher refuses a record larger than the topic takes before it is
// produced, with relay.ErrInvalidMessage naming the topic and its limit, and says once that the
// topic takes smaller records; a record that fits goes out. When the brokers refuse to describe
// the topic (no DESCRIBE_CONFIGS), it says so once and falls back to kafka.max_record_bytes: the
// broker refuses the record instead, after it was produced.
func TestPublisherReadsTheTopicsMaxMessageBytes(t *testing.T) {
	t.Parallel()
	for _, refused := range []bool{false, true} {
		t.Run(map[bool]string{false: "described", true: "describe refused"}[refused], func(t *testing.T) {
			t.Parallel()
			b := kafkatest.Start(t)
			if refused && b.Fake == nil {
				t.Skip("refuses DescribeConfigs in kfake (KAFKA_BROKERS is set)")
			}
			topic, limit := kafkatest.Name("limit"), "4096"
			b.CreateWith(t, topic, 1, map[string]*string{"max.message.bytes": &limit})
			if refused {
				b.Fake.ControlKey(int16(kmsg.DescribeConfigs), func(kr kmsg.Request) (kmsg.Response, error, bool) {
					b.Fake.KeepControl()
					req := kr.(*kmsg.DescribeConfigsRequest)
					resp := req.ResponseKind().(*kmsg.DescribeConfigsResponse)
					for _, r := range req.Resources {
						rr := kmsg.NewDescribeConfigsResponseResource()
						rr.ResourceType, rr.ResourceName = r.ResourceType, r.ResourceName
						rr.ErrorCode = kerr.TopicAuthorizationFailed.Code
						resp.Resources = append(resp.Resources, rr)
					}
					return resp, nil, true
				})
			}
			logs := &logbuf.Buffer{}
			pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic,
				Log: slog.New(slog.NewJSONHandler(logs, nil))})
			if err != nil {
				t.Fatal(err)
			}
			t.Cleanup(pub.Close)
			publish := func(id int64, size int) (refusedAtOnce, verdict error) {
				t.Helper()
				done := make(chan error, 1)
				m := &relay.Message{ID: id, EventID: "e", AggregateType: "order", AggregateID: "k",
					EventType: "OrderPlaced", Payload: []byte(strings.Repeat("x", size)), OccurredAt: time.Now()}
				if err := pub.Publish(context.Background(), m, func(err error) { done <- err }); err != nil {
					return err, nil
				}
				select {
				case err := <-done:
					return nil, err
				case <-time.After(time.Minute):
					t.Fatal("no verdict within a minute")
				}
				return nil, nil
			}
			if _, verdict := publish(1, 100); verdict != nil {
				t.Fatalf("a record that fits: %v", verdict)
			}
			atOnce, verdict := publish(2, 6000)
			if !refused {
				if !errors.Is(atOnce, relay.ErrInvalidMessage) || !strings.Contains(atOnce.Error(), `max.message.bytes of topic "`+topic+`" (4096)`) {
					t.Errorf("a record too large for the topic: refused with %v, verdict %v; want relay.ErrInvalidMessage naming the topic's limit", atOnce, verdict)
				}
				if n := strings.Count(logs.String(), "topic takes smaller records than kafka.max_record_bytes"); n != 1 {
					t.Errorf("said %d times that the topic takes smaller records, want once:\n%s", n, logs)
				}
				// The operator raises the limit. The publisher reads it again (at most a second
				// after the last read), but its producer keeps the batch cap it was given for the
				// topic: the record is refused, saying to restart. After a restart it goes out.
				raised := "1000000"
				if err := b.AlterTopicConfig(topic, "max.message.bytes", &raised); err != nil {
					t.Fatal(err)
				}
				for deadline := time.Now().Add(30 * time.Second); !strings.Contains(logs.String(), "topic takes records up to kafka.max_record_bytes again"); {
					if time.Now().After(deadline) {
						t.Fatalf("the limit raised, the publisher did not read it again within 30 s:\n%s", logs)
					}
					if atOnce, verdict := publish(3, 6000); atOnce == nil {
						t.Fatalf("a record over the producer's batch cap was handed to it (verdict %v)", verdict)
					}
					time.Sleep(50 * time.Millisecond)
				}
				if atOnce, _ := publish(4, 6000); !errors.Is(atOnce, relay.ErrInvalidMessage) || !strings.Contains(atOnce.Error(), "restart the relay") {
					t.Errorf("the limit raised, before a restart: refused with %v, want relay.ErrInvalidMessage saying to restart", atOnce)
				}
				pub.Close()
				pub, err = kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, TopicTemplate: topic})
				if err != nil {
					t.Fatal(err)
				}
				t.Cleanup(pub.Close)
				if atOnce, verdict := publish(5, 6000); atOnce != nil || verdict != nil {
					t.Errorf("after a restart, a record of 6000 bytes: refused with %v, verdict %v; want it published", atOnce, verdict)
				}
				return
			}
			if atOnce != nil || !errors.Is(verdict, kerr.MessageTooLarge) {
				t.Errorf("a record too large for the topic, its limit unknown: refused with %v, verdict %v; want the broker's MESSAGE_TOO_LARGE", atOnce, verdict)
			}
			if n := strings.Count(logs.String(), "could not read the topic's max.message.bytes"); n != 1 {
				t.Errorf("said %d times that the limit could not be read, want once:\n%s", n, logs)
			}
		})
	}
}
