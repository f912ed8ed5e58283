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

// TestTracingSpansFailedMetric: with a collector that refuses every export, the relay still
// publishes the row, and outbox_relay_tracing_spans_failed_total counts its span; the counter
// is there, at 0, before anything failed. Not parallel: the OpenTelemetry SDK reads its
// settings from the process's environment, and setupTracing sets the global provider.
func TestTracingSpansFailedMetric(t *testing.T) {
	var exports atomic.Int32
	coll := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, _ *http.Request) {
		exports.Add(1)
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
	var failed atomic.Int64
	tp, stopTracing, err := setupTracing(context.Background(), os.Getenv,
		slog.New(slog.NewTextHandler(logs, nil)), "outbox-relay", &failed)
	if err != nil || tp == nil {
		t.Fatalf("setupTracing: %v (provider %v)", err, tp)
	}
	defer stopTracing()

	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "traced-failing", 1)
	r := startOpsRelay(t, table, b.Addrs, map[string]string{"kafka.topic_template": topic}, func(c *Config) {
		c.Kafka.Tracing = tp
		c.tracingFailed = failed.Load
	})
	if v, ok := value(r.scrape(t), "outbox_relay_tracing_spans_failed_total", nil); !ok || v != 0 {
		t.Fatalf("before any export: outbox_relay_tracing_spans_failed_total = %v (present %t), want 0", v, ok)
	}
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := w.Append(ctx, tx, postgres.Message{AggregateType: "user", AggregateID: "u-1", EventType: "UserCreated", Payload: []byte(`{}`)}); err != nil {
		t.Fatal(err)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	deadline := time.Now().Add(60 * time.Second)
	for {
		mfs := r.scrape(t)
		spans, _ := value(mfs, "outbox_relay_tracing_spans_failed_total", nil)
		published, _ := value(mfs, "outbox_relay_events_published_total", nil)
		if spans >= 1 && published == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after 60s: %v spans failed, %v events published, %d exports tried; want 1 and 1\n%s", spans, published, exports.Load(), logs.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	if exports.Load() == 0 {
		t.Error("the collector saw no export")
	}
}
