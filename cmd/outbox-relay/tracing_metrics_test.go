package main

import (
	"context"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"
	"time"

	"go.opentelemetry.io/otel"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/logbuf"
)

// TestTracingSpansMetrics: while the collector refuses every export, the relay still publishes
// its row, and outbox_relay_tracing_spans_failed_total counts the row's span (sampled, not
// exported); once the collector takes them again, the next row's span counts as exported. The
// counters are there, at 0, before any span. Not parallel: the OpenTelemetry SDK reads its
// settings from the process's environment, and setupTracing sets the global provider.
func TestTracingSpansMetrics(t *testing.T) {
	var exports atomic.Int32
	var accept atomic.Bool
	coll := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		exports.Add(1)
		if accept.Load() {
			w.Header().Set("Content-Type", "application/x-protobuf") // an empty response: all accepted
			return
		}
		http.Error(w, "refused by the test", http.StatusBadRequest) // not retried by the exporter
	}))
	defer coll.Close()
	for k, v := range map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": coll.URL, "OTEL_BSP_SCHEDULE_DELAY": "100",
		"OTEL_TRACES_SAMPLER": "always_on", "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"} {
		t.Setenv(k, v)
	}
	prevTP, prevProp, prevHandler := otel.GetTracerProvider(), otel.GetTextMapPropagator(), otel.GetErrorHandler()
	defer func() {
		otel.SetTracerProvider(prevTP)
		otel.SetTextMapPropagator(prevProp)
		otel.SetErrorHandler(prevHandler)
	}()
	logs := &logbuf.Buffer{}
	counts := &spanCounts{}
	tp, stopTracing, err := setupTracing(context.Background(), os.Getenv,
		slog.New(slog.NewTextHandler(logs, nil)), "outbox-relay", counts)
	if err != nil || tp == nil {
		t.Fatalf("setupTracing: %v (provider %v)", err, tp)
	}
	defer stopTracing()

	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "traced-failing", 1)
	r := startOpsRelay(t, table, b.Addrs, map[string]string{"kafka.topic_template": topic}, func(c *Config) {
		c.Kafka.Tracing = tp
		c.tracingSpans = counts
	})
	names := []string{"outbox_relay_tracing_spans_sampled_total", "outbox_relay_tracing_spans_exported_total", "outbox_relay_tracing_spans_failed_total"}
	mfs := r.scrape(t)
	for _, name := range names {
		if v, ok := value(mfs, name, nil); !ok || v != 0 {
			t.Fatalf("before any span: %s = %v (present %t), want 0", name, v, ok)
		}
	}
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	write := func(key string) {
		tx, err := pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if err := w.Append(ctx, tx, postgres.Message{AggregateType: "user", AggregateID: key, EventType: "UserCreated", Payload: []byte(`{}`)}); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	// wait polls the metrics until sampled, exported and failed spans and published events are
	// as wanted.
	wait := func(want [3]float64, published float64) {
		t.Helper()
		deadline := time.Now().Add(60 * time.Second)
		for {
			mfs := r.scrape(t)
			var got [3]float64
			for i, name := range names {
				got[i], _ = value(mfs, name, nil)
			}
			pub, _ := value(mfs, "outbox_relay_events_published_total", nil)
			if got == want && pub == published {
				return
			}
			if time.Now().After(deadline) {
				t.Fatalf("after 60s: spans sampled, exported, failed %v, events published %v, %d exports tried; want %v and %v\n%s",
					got, pub, exports.Load(), want, published, logs.String())
			}
			time.Sleep(50 * time.Millisecond)
		}
	}
	write("u-1")
	wait([3]float64{1, 0, 1}, 1) // the collector refuses: the span is lost, the event is not
	accept.Store(true)
	write("u-2")
	wait([3]float64{2, 1, 1}, 2)
}
