package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"strings"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/redact"
	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracegrpc"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
	"go.opentelemetry.io/otel/trace"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
)

// tracingShutdownTimeout bounds the export of the spans still buffered at exit.
const tracingShutdownTimeout = 5 * time.Second

// setupTracing configures OpenTelemetry tracing from the standard OTEL_* environment variables
// (read by getenv): it is on only when OTEL_EXPORTER_OTLP_ENDPOINT or
// OTEL_EXPORTER_OTLP_TRACES_ENDPOINT is set, OTEL_SDK_DISABLED is not "true" and
// OTEL_TRACES_EXPORTER is unset, "otlp" or (off) "none". It returns the tracer provider, nil when
// tracing is off, and the function that flushes and stops it. The OTLP exporter, the sampler
// (OTEL_TRACES_SAMPLER), the batch span processor (OTEL_BSP_*) and the resource
// (OTEL_SERVICE_NAME, OTEL_RESOURCE_ATTRIBUTES) read their own variables; service is the
// service.name when OTEL_SERVICE_NAME is unset. counts, when not nil, counts the spans sampled,
// exported and failed.
func setupTracing(ctx context.Context, getenv func(string) string, log *slog.Logger, service string, counts *spanCounts) (trace.TracerProvider, func(), error) {
	off := func() {}
	if strings.EqualFold(strings.TrimSpace(getenv("OTEL_SDK_DISABLED")), "true") {
		return nil, off, nil
	}
	switch exp := strings.TrimSpace(getenv("OTEL_TRACES_EXPORTER")); exp {
	case "", "otlp":
	case "none":
		return nil, off, nil
	default:
		return nil, off, fmt.Errorf("OTEL_TRACES_EXPORTER: must be otlp or none, got %q", exp)
	}
	endpoint := getenv("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
	if endpoint == "" {
		endpoint = getenv("OTEL_EXPORTER_OTLP_ENDPOINT")
	}
	if endpoint == "" {
		return nil, off, nil
	}
	protocol := getenv("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL")
	if protocol == "" {
		protocol = getenv("OTEL_EXPORTER_OTLP_PROTOCOL")
	}
	var (
		exp *otlptrace.Exporter
		err error
	)
	// The exporters read the other OTEL_EXPORTER_OTLP_* variables themselves (headers, timeout,
	// compression, certificates, insecure).
	switch protocol {
	case "", "http/protobuf":
		protocol = "http/protobuf"
		exp, err = otlptracehttp.New(ctx)
	case "grpc":
		exp, err = otlptracegrpc.New(ctx)
	default:
		return nil, off, fmt.Errorf("OTEL_EXPORTER_OTLP_PROTOCOL: must be http/protobuf or grpc, got %q", protocol)
	}
	if err != nil {
		return nil, off, fmt.Errorf("opentelemetry exporter: %w", err)
	}
	res, err := resource.New(ctx,
		resource.WithAttributes(semconv.ServiceName(service), semconv.ServiceVersion(version)),
		resource.WithFromEnv(), // OTEL_SERVICE_NAME and OTEL_RESOURCE_ATTRIBUTES win
		resource.WithTelemetrySDK())
	if err != nil {
		return nil, off, fmt.Errorf("opentelemetry resource (OTEL_RESOURCE_ATTRIBUTES, OTEL_SERVICE_NAME): %w", err)
	}
	opts := []sdktrace.TracerProviderOption{sdktrace.WithResource(res)}
	if counts != nil {
		opts = append(opts, sdktrace.WithSpanProcessor(counts), sdktrace.WithBatcher(countingExporter{SpanExporter: exp, counts: counts}))
	} else {
		opts = append(opts, sdktrace.WithBatcher(exp))
	}
	tp := sdktrace.NewTracerProvider(opts...)
	otel.SetTracerProvider(tp)
	otel.SetTextMapPropagator(propagation.NewCompositeTextMapPropagator(propagation.TraceContext{}, propagation.Baggage{}))
	otel.SetErrorHandler(otel.ErrorHandlerFunc(func(err error) {
		log.Warn("opentelemetry: spans not exported", "err", err)
	}))
	// The endpoint alone: OTEL_EXPORTER_OTLP_HEADERS may hold an API key, and is never logged.
	log.Info("tracing on", "protocol", protocol, "endpoint", redact.Text(endpoint))
	return tp, func() {
		sctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), tracingShutdownTimeout)
		defer cancel()
		if err := tp.Shutdown(sctx); err != nil && !errors.Is(err, context.Canceled) {
			log.Warn("opentelemetry: spans lost at exit", "err", err)
		}
	}, nil
}

// spanCounts counts the spans of a tracer provider: those the sampler kept (it is a span
// processor, beside the batch processor: one atomic add per sampled span) and those the exporter
// sent or failed to send (countingExporter). Sampled spans that are neither, beyond what the batch
// processor holds (OTEL_BSP_MAX_QUEUE_SIZE and a batch), were dropped: the SDK does not report
// drops itself.
type spanCounts struct {
	sampled, exported, failed atomic.Int64
}

func (c *spanCounts) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (c *spanCounts) OnEnd(s sdktrace.ReadOnlySpan) {
	if s.SpanContext().IsSampled() {
		c.sampled.Add(1)
	}
}
func (c *spanCounts) Shutdown(context.Context) error   { return nil }
func (c *spanCounts) ForceFlush(context.Context) error { return nil }

// read returns the counts for the metrics.
func (c *spanCounts) read() prometheus.TracingSpans {
	return prometheus.TracingSpans{Sampled: float64(c.sampled.Load()), Exported: float64(c.exported.Load()), Failed: float64(c.failed.Load())}
}

// countingExporter counts the spans its exporter sent and failed to send. The batch processor
// reports each failure to the error handler too, without the count.
type countingExporter struct {
	sdktrace.SpanExporter
	counts *spanCounts
}

func (e countingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	err := e.SpanExporter.ExportSpans(ctx, spans)
	if err != nil {
		e.counts.failed.Add(int64(len(spans)))
	} else {
		e.counts.exported.Add(int64(len(spans)))
	}
	return err
}
