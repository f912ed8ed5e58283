package kafka_test

import (
	"context"
	"sync"
	"testing"
	"time"

	"go.opentelemetry.io/otel/attribute"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// The writer's span of the rows below, as its traceparent header says.
const (
	writerTrace = "4bf92f3577b34da6a3ce929d0e0e4736"
	writerSpan  = "00f067aa0ba902b7"
)

// tracedRow returns a row of topic whose headers carry the writer's trace context, in the letter
// case a hand-written JSON may use.
func tracedRow(topic string) *relay.Message {
	return &relay.Message{ID: 7, EventID: domain.NewID(), AggregateType: "order", AggregateID: "k1",
		EventType: "OrderPlaced", Payload: []byte(`{}`), Topic: topic, OccurredAt: time.Now(), CreatedAt: time.Now().Add(-time.Second),
		Headers: []byte(`{"Traceparent": "00-` + writerTrace + `-` + writerSpan + `-01", "tracestate": "vendor=x", "content-type": "application/json"}`)}
}

// spanAttr returns the value of s's attribute key.
func spanAttr(s sdktrace.ReadOnlySpan, key attribute.Key) attribute.Value {
	for _, a := range s.Attributes() {
		if a.Key == key {
			return a.Value
		}
	}
	return attribute.Value{}
}

// TestPublisherTracing: with Config.Tracing the publisher ends one producer span per record, the
// child of the row's traceparent, with the messaging attributes and the broker's partition and
// offset; the record carries the span's traceparent (and the tracestate it inherited) in place of
// the row's, once. Without it the row's headers go out as they are. The consumer's process span
// is the child of the record's traceparent.
func TestPublisherTracing(t *testing.T) {
	t.Parallel()
	b := kafkatest.Start(t)
	rec := tracetest.NewSpanRecorder()
	tp := sdktrace.NewTracerProvider(sdktrace.WithSpanProcessor(rec))
	defer func() { _ = tp.Shutdown(context.Background()) }()

	topic := b.Topic(t, "traced", 1)
	pub, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs, Tracing: tp})
	if err != nil {
		t.Fatal(err)
	}
	defer pub.Close()
	m := tracedRow(topic)
	publishAcked(t, pub, m)
	spans := rec.Ended()
	if len(spans) != 1 {
		t.Fatalf("%d spans ended, want 1", len(spans))
	}
	s := spans[0]
	if s.Name() != "send "+topic || s.SpanKind() != trace.SpanKindProducer {
		t.Errorf("span %q of kind %s, want %q, producer", s.Name(), s.SpanKind(), "send "+topic)
	}
	if s.Parent().TraceID().String() != writerTrace || s.Parent().SpanID().String() != writerSpan || !s.Parent().IsRemote() {
		t.Errorf("span's parent %s/%s, want the row's %s/%s", s.Parent().TraceID(), s.Parent().SpanID(), writerTrace, writerSpan)
	}
	for key, want := range map[attribute.Key]string{"messaging.system": "kafka", "messaging.destination.name": topic,
		"messaging.message.id": m.EventID, "messaging.destination.partition.id": "0", "messaging.operation.type": "send"} {
		if got := spanAttr(s, key).String(); got != want {
			t.Errorf("span attribute %s = %q, want %q", key, got, want)
		}
	}
	if got := spanAttr(s, "messaging.kafka.offset"); got.Type() != attribute.INT64 || got.AsInt64() != 0 {
		t.Errorf("messaging.kafka.offset = %v, want 0", got.String())
	}
	if got := spanAttr(s, kafka.AttrOutboxWaitSeconds).AsFloat64(); got < 1 {
		t.Errorf("outbox.wait_seconds = %v, want at least the second since created_at", got)
	}
	r := b.ReadAll(t, topic, 1, 10*time.Second)[0]
	var tps, tss []string
	for _, h := range r.Headers {
		switch h.Key {
		case "traceparent", "Traceparent":
			tps = append(tps, string(h.Value))
		case "tracestate":
			tss = append(tss, string(h.Value))
		}
	}
	want := "00-" + writerTrace + "-" + s.SpanContext().SpanID().String() + "-01"
	if len(tps) != 1 || tps[0] != want || len(tss) != 1 || tss[0] != "vendor=x" {
		t.Errorf("record's traceparent %q tracestate %q, want once each: %q, \"vendor=x\"", tps, tss, want)
	}
	if kafkatest.Header(r, "content-type") != "application/json" {
		t.Errorf("the row's other headers are lost: %v", r.Headers)
	}

	// Tracing off: the row's headers, untouched.
	topic = b.Topic(t, "untraced", 1)
	plain, err := kafka.NewPublisher(kafka.Config{Brokers: b.Addrs})
	if err != nil {
		t.Fatal(err)
	}
	defer plain.Close()
	publishAcked(t, plain, tracedRow(topic))
	r = b.ReadAll(t, topic, 1, 10*time.Second)[0]
	if got := kafkatest.Header(r, "Traceparent"); got != "00-"+writerTrace+"-"+writerSpan+"-01" {
		t.Errorf("tracing off: record's Traceparent %q, want the row's", got)
	}
	if len(rec.Ended()) != 1 {
		t.Errorf("tracing off started spans")
	}
}

// BenchmarkPublishTracing measures Publish (to an in-process broker, every acknowledgement
// awaited at the end) with tracing off, on with every span sampled and exported (a batch
// processor, an exporter that drops them), and on with none sampled: what per-record spans cost.
func BenchmarkPublishTracing(b *testing.B) {
	br := kafkatest.Start(b)
	topic := br.Topic(b, "bench-tracing", 1)
	for _, c := range []struct {
		name string
		tp   func() *sdktrace.TracerProvider
	}{
		{"off", func() *sdktrace.TracerProvider { return nil }},
		{"sampled", func() *sdktrace.TracerProvider {
			return sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()))
		}},
		{"unsampled", func() *sdktrace.TracerProvider {
			return sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()),
				sdktrace.WithSampler(sdktrace.NeverSample()))
		}},
	} {
		b.Run(c.name, func(b *testing.B) {
			cfg := kafka.Config{Brokers: br.Addrs, Linger: 5 * time.Millisecond}
			if tp := c.tp(); tp != nil {
				cfg.Tracing = tp
				defer func() { _ = tp.Shutdown(context.Background()) }()
			}
			pub, err := kafka.NewPublisher(cfg)
			if err != nil {
				b.Fatal(err)
			}
			defer pub.Close()
			m := &relay.Message{EventID: domain.NewID(), AggregateType: "order", AggregateID: "order-42",
				EventType: "OrderPlaced", Payload: make([]byte, 256), Topic: topic, OccurredAt: time.Now(), CreatedAt: time.Now(),
				Headers: []byte(`{"content-type": "application/json", "traceparent": "00-` + writerTrace + `-` + writerSpan + `-01"}`)}
			ctx := context.Background()
			var wg sync.WaitGroup
			var mu sync.Mutex
			var firstErr error
			done := func(err error) {
				if err != nil {
					mu.Lock()
					firstErr = err
					mu.Unlock()
				}
				wg.Done()
			}
			b.ReportAllocs()
			for b.Loop() {
				wg.Add(1)
				if err := pub.Publish(ctx, m, done); err != nil {
					b.Fatal(err)
				}
			}
			wg.Wait()
			if firstErr != nil {
				b.Fatal(firstErr)
			}
		})
	}
}
