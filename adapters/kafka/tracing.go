package kafka

import (
	"context"
	"strconv"
	"strings"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
	"go.opentelemetry.io/otel/attribute"
	"go.opentelemetry.io/otel/codes"
	"go.opentelemetry.io/otel/propagation"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// Trace context headers of the W3C Trace Context recommendation: a writer puts its span's in a
// row's headers, the relay replaces them with its own span's on the record.
const (
	HeaderTraceparent = "traceparent"
	HeaderTracestate  = "tracestate"
)

// tracerName names the instrumentation scope of the relay's and the consumer's spans.
const tracerName = "github.com/outbox-relay/outbox-relay/adapters/kafka"

// Attributes of the publish span that the messaging conventions do not name: the outbox row and
// how long it waited in the table, from its insertion (created_at, the database's clock) to its
// claim by the relay (the relay's clock).
const (
	AttrOutboxRowID       = attribute.Key("outbox.row.id")
	AttrOutboxWaitSeconds = attribute.Key("outbox.wait_seconds")
	AttrOutboxAttempts    = attribute.Key("outbox.attempts")
)

// traceContext is the W3C Trace Context propagator: the record headers are always traceparent
// and tracestate, whatever global propagator a process set (the relay sets none of its own).
var traceContext propagation.TraceContext

// tracing holds the tracer of a publisher or consumer; a nil *tracing traces nothing and costs a
// nil check.
type tracing struct{ tracer trace.Tracer }

// newTracing returns the tracing of tp, or nil when tp is nil (tracing off).
func newTracing(tp trace.TracerProvider) *tracing {
	if tp == nil {
		return nil
	}
	return &tracing{tracer: tp.Tracer(tracerName)}
}

// headerCarrier reads and writes trace context in a record's headers. Get ignores letter case
// (a writer's JSON may say "Traceparent"); Set replaces every header of that name.
type headerCarrier struct{ rec *kgo.Record }

func (c headerCarrier) Get(key string) string {
	for _, h := range c.rec.Headers {
		if strings.EqualFold(h.Key, key) {
			return string(h.Value)
		}
	}
	return ""
}

func (c headerCarrier) Set(key, value string) {
	c.remove(key)
	c.rec.Headers = append(c.rec.Headers, kgo.RecordHeader{Key: key, Value: []byte(value)})
}

// remove drops every header named key, in any letter case.
func (c headerCarrier) remove(key string) {
	hs := c.rec.Headers[:0]
	for _, h := range c.rec.Headers {
		if !strings.EqualFold(h.Key, key) {
			hs = append(hs, h)
		}
	}
	clear(c.rec.Headers[len(hs):])
	c.rec.Headers = hs
}

func (c headerCarrier) Keys() []string {
	keys := make([]string, len(c.rec.Headers))
	for i, h := range c.rec.Headers {
		keys[i] = h.Key
	}
	return keys
}

// startPublish starts the publish span of m's record rec: a producer span whose parent is the
// trace context of the row's headers (a new trace when they have none), and puts the span's
// traceparent (and tracestate) on rec in place of the row's, so the consumer's span is its child.
// The span ends with the broker's verdict (endPublish).
func (t *tracing) startPublish(ctx context.Context, m *relay.Message, rec *kgo.Record) trace.Span {
	carrier := headerCarrier{rec}
	parent := traceContext.Extract(ctx, carrier)
	now := time.Now()
	_, span := t.tracer.Start(parent, "send "+rec.Topic, trace.WithSpanKind(trace.SpanKindProducer), trace.WithTimestamp(now))
	if span.IsRecording() { // not when the sampler dropped it: the attributes cost more than the span
		span.SetAttributes(
			semconv.MessagingSystemKafka,
			semconv.MessagingOperationTypeSend,
			semconv.MessagingOperationName("send"),
			semconv.MessagingDestinationName(rec.Topic),
			semconv.MessagingMessageID(m.EventID),
			semconv.MessagingKafkaMessageKey(m.AggregateID),
			AttrOutboxRowID.Int64(m.ID),
			AttrOutboxWaitSeconds.Float64(now.Sub(m.CreatedAt).Seconds()),
			AttrOutboxAttempts.Int(m.Attempts),
		)
	}
	if !span.SpanContext().IsValid() {
		return span // a no-op tracer: the row's own trace context goes on
	}
	// The row's traceparent and tracestate belong to the writer's span: the record carries the
	// relay's span's instead (its tracestate is the parent's, unless a sampler changed it).
	carrier.remove(HeaderTraceparent)
	carrier.remove(HeaderTracestate)
	traceContext.Inject(trace.ContextWithSpan(ctx, span), carrier)
	return span
}

// endPublish ends span with the broker's verdict on rec.
func endPublish(span trace.Span, rec *kgo.Record, err error) {
	switch {
	case !span.IsRecording():
	case err != nil:
		span.RecordError(err)
		span.SetStatus(codes.Error, err.Error())
	default:
		span.SetAttributes(semconv.MessagingDestinationPartitionID(strconv.Itoa(int(rec.Partition))),
			semconv.MessagingKafkaOffset(int(rec.Offset)))
	}
	span.End()
}

// startProcess starts the consumer's process span of r, the child of the span whose trace
// context r's headers carry (the relay's publish span).
func (t *tracing) startProcess(ctx context.Context, r *kgo.Record, group, eventID string) (context.Context, trace.Span) {
	parent := traceContext.Extract(ctx, headerCarrier{r})
	ctx, span := t.tracer.Start(parent, "process "+r.Topic, trace.WithSpanKind(trace.SpanKindConsumer))
	if span.IsRecording() {
		span.SetAttributes(
			semconv.MessagingSystemKafka,
			semconv.MessagingOperationTypeProcess,
			semconv.MessagingOperationName("process"),
			semconv.MessagingDestinationName(r.Topic),
			semconv.MessagingDestinationPartitionID(strconv.Itoa(int(r.Partition))),
			semconv.MessagingKafkaOffset(int(r.Offset)),
			semconv.MessagingConsumerGroupName(group),
			semconv.MessagingMessageID(eventID),
			semconv.MessagingKafkaMessageKey(string(r.Key)),
		)
	}
	return ctx, span
}
