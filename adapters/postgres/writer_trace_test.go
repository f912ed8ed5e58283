package postgres_test

import (
	"context"
	"encoding/json"
	"testing"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestWriterAppendPropagatesTraceContext: with a span in the context and the W3C propagator set
// globally (as a traced service has it), Append writes the span's traceparent and tracestate into
// every row's headers beside the caller's; a traceparent the caller set is kept; without a span
// the headers are the caller's alone. Not parallel: it sets the global propagator.
func TestWriterAppendPropagatesTraceContext(t *testing.T) {
	prev := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	t.Cleanup(func() { otel.SetTextMapPropagator(prev) })

	pool, table := dbtest.Schema(t)
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	tid, _ := trace.TraceIDFromHex("4bf92f3577b34da6a3ce929d0e0e4736")
	sid, _ := trace.SpanIDFromHex("00f067aa0ba902b7")
	ts, _ := trace.ParseTraceState("vendor=x")
	sc := trace.NewSpanContext(trace.SpanContextConfig{TraceID: tid, SpanID: sid, TraceFlags: trace.FlagsSampled, TraceState: ts})
	traced := trace.ContextWithSpanContext(context.Background(), sc)
	const own = "00-11111111111111111111111111111111-2222222222222222-00"
	msg := func(h map[string]string) postgres.Message {
		return postgres.Message{AggregateType: "order", AggregateID: "o-1", EventType: "OrderPlaced", Payload: []byte("{}"), Headers: h}
	}
	if err := w.Append(traced, pool, msg(map[string]string{"content-type": "application/json"}), msg(nil),
		msg(map[string]string{"traceparent": own})); err != nil {
		t.Fatal(err)
	}
	if err := w.Append(context.Background(), pool, msg(map[string]string{"content-type": "text/plain"})); err != nil {
		t.Fatal(err)
	}
	rows := readOutbox(t, context.Background(), pool, table)
	want := []map[string]string{
		{"content-type": "application/json", "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "vendor=x"},
		{"traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01", "tracestate": "vendor=x"},
		{"traceparent": own, "tracestate": "vendor=x"},
		{"content-type": "text/plain"},
	}
	if len(rows) != len(want) {
		t.Fatalf("%d rows, want %d", len(rows), len(want))
	}
	for i, r := range rows {
		var got map[string]string
		if r.headers == nil || json.Unmarshal([]byte(*r.headers), &got) != nil {
			t.Fatalf("row %d: headers %v", i, r.headers)
		}
		if len(got) != len(want[i]) {
			t.Errorf("row %d: headers %v, want %v", i, got, want[i])
		}
		for k, v := range want[i] {
			if got[k] != v {
				t.Errorf("row %d: header %s = %q, want %q", i, k, got[k], v)
			}
		}
	}
}
