package kafka

import (
	"context"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	"go.opentelemetry.io/otel/sdk/trace/tracetest"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// BenchmarkPublishSpan measures the tracing of one record alone, without a broker: the span's
// start (the parent read from the row's traceparent, the record's traceparent written) and end,
// sampled and exported through a batch processor to an exporter that drops them, or not sampled.
// With tracing off the publisher only tests a nil pointer.
func BenchmarkPublishSpan(b *testing.B) {
	for _, c := range []struct {
		name    string
		sampler sdktrace.Sampler
	}{{"sampled", sdktrace.AlwaysSample()}, {"unsampled", sdktrace.NeverSample()}} {
		b.Run(c.name, func(b *testing.B) {
			tp := sdktrace.NewTracerProvider(sdktrace.WithBatcher(tracetest.NewNoopExporter()), sdktrace.WithSampler(c.sampler))
			defer func() { _ = tp.Shutdown(context.Background()) }()
			tr := newTracing(tp)
			m := &relay.Message{ID: 1, EventID: "0b5e1d7c-1111-4222-8333-000000000001", AggregateID: "order-42", CreatedAt: time.Now()}
			headers := []kgo.RecordHeader{{Key: "event-id", Value: []byte(m.EventID)},
				{Key: "traceparent", Value: []byte("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")}}
			ctx := context.Background()
			b.ReportAllocs()
			for b.Loop() {
				rec := &kgo.Record{Topic: "outbox.event.order", Headers: append(make([]kgo.RecordHeader, 0, 4), headers...)}
				span := tr.startPublish(ctx, m, rec)
				endPublish(span, rec, nil)
			}
		})
	}
}
