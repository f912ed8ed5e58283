package main

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/http"
	"os"
	"sync/atomic"
	"time"

	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/sdk/resource"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	semconv "go.opentelemetry.io/otel/semconv/v1.43.0"
)

// tracingSettings turn tracing on in a relay child, as the OTEL_* variables turn it on in
// 'outbox-relay run': Sampler and SamplerArg are OTEL_TRACES_SAMPLER and its _ARG, Endpoint is
// OTEL_EXPORTER_OTLP_ENDPOINT (OTLP over HTTP, the default protocol).
type tracingSettings struct {
	Endpoint   string `json:"endpoint"`
	Sampler    string `json:"sampler"`
	SamplerArg string `json:"sampler_arg,omitempty"`
}

// childTracing is a relay child's tracer provider, built as 'outbox-relay run' builds it (the
// OTLP/HTTP exporter and the SDK's batch span processor, which read their OTEL_* variables
// themselves), with two counters: the spans the sampler kept (ended and handed to the batch
// processor) and the spans the exporter sent or failed to send.
type childTracing struct {
	tp                *sdktrace.TracerProvider
	sampled           atomic.Int64
	exported, failed  atomic.Int64
	exportCalls       atomic.Int64
	exportFailedCalls atomic.Int64
}

// startChildTracing sets the OTEL_* variables of s in this (child) process and starts the tracer
// provider.
func startChildTracing(ctx context.Context, s tracingSettings) (*childTracing, error) {
	for k, v := range map[string]string{"OTEL_EXPORTER_OTLP_ENDPOINT": s.Endpoint,
		"OTEL_TRACES_SAMPLER": s.Sampler, "OTEL_TRACES_SAMPLER_ARG": s.SamplerArg} {
		if err := os.Setenv(k, v); err != nil {
			return nil, err
		}
	}
	exp, err := otlptracehttp.New(ctx)
	if err != nil {
		return nil, fmt.Errorf("opentelemetry exporter: %w", err)
	}
	res, err := resource.New(ctx, resource.WithAttributes(semconv.ServiceName("outbox-relay")), resource.WithTelemetrySDK())
	if err != nil {
		return nil, err
	}
	ct := &childTracing{}
	ct.tp = sdktrace.NewTracerProvider(sdktrace.WithBatcher(&countingExporter{SpanExporter: exp, ct: ct}),
		sdktrace.WithSpanProcessor(&countingProcessor{ct: ct}), sdktrace.WithResource(res))
	return ct, nil
}

// shutdown exports what the batch processor still holds, within a few seconds.
func (ct *childTracing) shutdown() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = ct.tp.Shutdown(ctx)
}

// countingExporter counts the spans its exporter sent and those it failed to send.
type countingExporter struct {
	sdktrace.SpanExporter
	ct *childTracing
}

func (e *countingExporter) ExportSpans(ctx context.Context, spans []sdktrace.ReadOnlySpan) error {
	err := e.SpanExporter.ExportSpans(ctx, spans)
	e.ct.exportCalls.Add(1)
	if err != nil {
		e.ct.failed.Add(int64(len(spans)))
		e.ct.exportFailedCalls.Add(1)
		return err
	}
	e.ct.exported.Add(int64(len(spans)))
	return nil
}

// countingProcessor counts the spans that end sampled: one atomic add, beside the batch processor.
type countingProcessor struct{ ct *childTracing }

func (p *countingProcessor) OnStart(context.Context, sdktrace.ReadWriteSpan) {}
func (p *countingProcessor) OnEnd(s sdktrace.ReadOnlySpan) {
	if s.SpanContext().IsSampled() {
		p.ct.sampled.Add(1)
	}
}
func (p *countingProcessor) Shutdown(context.Context) error   { return nil }
func (p *countingProcessor) ForceFlush(context.Context) error { return nil }

// spanStats is what a tracing relay child reports about its spans.
type spanStats struct {
	Sampled  int64 `json:"sampled"`  // spans the sampler kept, handed to the batch processor
	Exported int64 `json:"exported"` // spans the exporter sent by the time of the report
	Failed   int64 `json:"failed"`   // spans the exporter failed to send
	Requests int64 `json:"requests"` // export requests
}

func (ct *childTracing) stats() *spanStats {
	if ct == nil {
		return nil
	}
	return &spanStats{Sampled: ct.sampled.Load(), Exported: ct.exported.Load(), Failed: ct.failed.Load(), Requests: ct.exportCalls.Load()}
}

// collector is an OTLP/HTTP trace receiver that accepts every request and discards its spans:
// the relay's exporter does all the work it does against a real collector (encoding, HTTP, the
// batch processor), and the receiving end costs the measured process nothing. It runs in the
// bench process, started at the first tracing run.
type collector struct {
	url      string
	srv      *http.Server
	requests atomic.Int64
	bytes    atomic.Int64
}

// startCollector listens on a loopback port.
func startCollector() (*collector, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, fmt.Errorf("otlp collector: %w", err)
	}
	c := &collector{url: "http://" + ln.Addr().String()}
	c.srv = &http.Server{ReadHeaderTimeout: 10 * time.Second, Handler: http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if r.Method != http.MethodPost || r.URL.Path != "/v1/traces" {
			http.NotFound(w, r)
			return
		}
		n, _ := io.Copy(io.Discard, r.Body)
		c.requests.Add(1)
		c.bytes.Add(n)
		// An empty ExportTraceServiceResponse: everything accepted.
		w.Header().Set("Content-Type", "application/x-protobuf")
		w.WriteHeader(http.StatusOK)
	})}
	go func() { _ = c.srv.Serve(ln) }()
	return c, nil
}

func (c *collector) close() {
	if c != nil {
		_ = c.srv.Close()
	}
}
