package main_test

import (
	"compress/gzip"
	"context"
	"encoding/hex"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"go.opentelemetry.io/otel"
	"go.opentelemetry.io/otel/exporters/otlp/otlptrace/otlptracehttp"
	"go.opentelemetry.io/otel/propagation"
	sdktrace "go.opentelemetry.io/otel/sdk/trace"
	collectortrace "go.opentelemetry.io/proto/otlp/collector/trace/v1"
	commonpb "go.opentelemetry.io/proto/otlp/common/v1"
	tracepb "go.opentelemetry.io/proto/otlp/trace/v1"
	"google.golang.org/grpc"
	"google.golang.org/protobuf/proto"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// otlpSpan is a span an otlpReceiver collected, with the service.name of its resource.
type otlpSpan struct {
	service string
	span    *tracepb.Span
}

// otlpReceiver is an in-process OTLP trace receiver: an HTTP server taking
// ExportTraceServiceRequest protobufs on /v1/traces (OTLP/HTTP), and a gRPC server of the trace
// service (OTLP/gRPC). It keeps every span it is sent.
type otlpReceiver struct {
	collectortrace.UnimplementedTraceServiceServer
	mu    sync.Mutex
	spans []otlpSpan
}

func (r *otlpReceiver) add(req *collectortrace.ExportTraceServiceRequest) {
	r.mu.Lock()
	defer r.mu.Unlock()
	for _, rs := range req.ResourceSpans {
		var service string
		for _, a := range rs.GetResource().GetAttributes() {
			if a.Key == "service.name" {
				service = a.GetValue().GetStringValue()
			}
		}
		for _, ss := range rs.ScopeSpans {
			for _, s := range ss.Spans {
				r.spans = append(r.spans, otlpSpan{service: service, span: s})
			}
		}
	}
}

// Export implements the OTLP/gRPC trace service.
func (r *otlpReceiver) Export(_ context.Context, req *collectortrace.ExportTraceServiceRequest) (*collectortrace.ExportTraceServiceResponse, error) {
	r.add(req)
	return &collectortrace.ExportTraceServiceResponse{}, nil
}

// ServeHTTP implements OTLP/HTTP with protobuf bodies, gzipped or not.
func (r *otlpReceiver) ServeHTTP(w http.ResponseWriter, req *http.Request) {
	if req.Method != http.MethodPost || req.URL.Path != "/v1/traces" {
		http.NotFound(w, req)
		return
	}
	var body io.Reader = req.Body
	if req.Header.Get("Content-Encoding") == "gzip" {
		zr, err := gzip.NewReader(req.Body)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadRequest)
			return
		}
		body = zr
	}
	b, err := io.ReadAll(body)
	if err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	var msg collectortrace.ExportTraceServiceRequest
	if err := proto.Unmarshal(b, &msg); err != nil {
		http.Error(w, err.Error(), http.StatusBadRequest)
		return
	}
	r.add(&msg)
	out, _ := proto.Marshal(&collectortrace.ExportTraceServiceResponse{})
	w.Header().Set("Content-Type", "application/x-protobuf")
	_, _ = w.Write(out)
}

// named returns the spans named name.
func (r *otlpReceiver) named(name string) []otlpSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	var out []otlpSpan
	for _, s := range r.spans {
		if s.span.Name == name {
			out = append(out, s)
		}
	}
	return out
}

// all returns every span received.
func (r *otlpReceiver) all() []otlpSpan {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]otlpSpan(nil), r.spans...)
}

// attr returns the value of s's attribute key as text ("" when absent).
func attr(s *tracepb.Span, key string) string {
	for _, a := range s.Attributes {
		if a.Key == key {
			switch v := a.Value.Value.(type) {
			case *commonpb.AnyValue_StringValue:
				return v.StringValue
			case *commonpb.AnyValue_IntValue:
				return fmt.Sprint(v.IntValue)
			case *commonpb.AnyValue_DoubleValue:
				return fmt.Sprint(v.DoubleValue)
			}
			return a.Value.String()
		}
	}
	return ""
}

// TestTracingCreateUserRelayConsume follows one trace from the CreateUser use case (in this
// process, in a span of its own, writing through postgres.UnitOfWork) through 'outbox-relay run'
// (exporting over OTLP/HTTP) to 'outbox-relay consume' (over OTLP/gRPC), every span collected by
// an in-process OTLP receiver: one trace, CreateUser the parent of the relay's send span, which
// is the parent of the consumer's process span, with the messaging attributes.
func TestTracingCreateUserRelayConsume(t *testing.T) {
	recv := &otlpReceiver{}
	httpSrv := httptest.NewServer(recv)
	defer httpSrv.Close()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	grpcSrv := grpc.NewServer()
	collectortrace.RegisterTraceServiceServer(grpcSrv, recv)
	go func() { _ = grpcSrv.Serve(ln) }()
	defer grpcSrv.Stop()

	pool, table := dbtest.Schema(t)
	b := kafkatest.Start(t)
	topic := b.Topic(t, "traced-users", 2)
	dlt := b.Topic(t, "traced-dlt", 1)
	ctx := context.Background()

	// The writer's service: its own tracer provider and the W3C propagator, as any traced Go
	// service has them.
	exp, err := otlptracehttp.New(ctx, otlptracehttp.WithEndpointURL(httpSrv.URL+"/v1/traces"))
	if err != nil {
		t.Fatal(err)
	}
	tp := sdktrace.NewTracerProvider(sdktrace.WithSyncer(exp))
	defer func() { _ = tp.Shutdown(context.Background()) }()
	prevProp := otel.GetTextMapPropagator()
	otel.SetTextMapPropagator(propagation.TraceContext{})
	defer otel.SetTextMapPropagator(prevProp)

	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	sctx, span := tp.Tracer("test").Start(ctx, "CreateUser")
	userID, err := app.NewCreateUser(uow, nil).Execute(sctx, app.CreateUserCommand{Name: "Ann", Email: "ann@example.com"})
	span.End()
	if err != nil {
		t.Fatal(err)
	}
	var traceparent, eventID string
	if err := pool.QueryRow(ctx, `SELECT headers->>'traceparent', event_id::text FROM `+table.Schema+`.outbox`).Scan(&traceparent, &eventID); err != nil {
		t.Fatal(err)
	}
	rootTrace, rootSpan := span.SpanContext().TraceID().String(), span.SpanContext().SpanID().String()
	if want := "00-" + rootTrace + "-" + rootSpan + "-01"; traceparent != want {
		t.Fatalf("the outbox row's traceparent header is %q, want %q (the CreateUser span's)", traceparent, want)
	}

	common := []string{
		"OUTBOX_DATABASE_URL=" + dbtest.URL(),
		"OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(b.Addrs, ","),
		"OUTBOX_LOG_FORMAT=text",
		"OTEL_BSP_SCHEDULE_DELAY=100",
		"OTEL_TRACES_SAMPLER=parentbased_always_on",
	}
	relayEnv := append([]string{
		"OUTBOX_KAFKA_TOPIC_TEMPLATE=" + topic,
		"OUTBOX_HTTP_ADDR=127.0.0.1:0",
		"OUTBOX_RELAY_POLL_INTERVAL=200ms",
		"OTEL_EXPORTER_OTLP_ENDPOINT=" + httpSrv.URL,
		"OTEL_EXPORTER_OTLP_PROTOCOL=http/protobuf",
	}, common...)
	consumeEnv := append([]string{
		"OUTBOX_CONSUMER_GROUP=traced-" + userID[:8],
		"OUTBOX_CONSUMER_TOPICS=" + topic,
		"OUTBOX_CONSUMER_DEAD_LETTER_TOPIC=" + dlt,
		"OTEL_EXPORTER_OTLP_ENDPOINT=http://" + ln.Addr().String(),
		"OTEL_EXPORTER_OTLP_PROTOCOL=grpc",
		"OTEL_EXPORTER_OTLP_INSECURE=true",
	}, common...)
	relay := startSubcommand(t, relayEnv, "run")
	consumer := startSubcommand(t, consumeEnv, "consume")

	sendName, processName := "send "+topic, "process "+topic
	deadline := time.Now().Add(90 * time.Second)
	for len(recv.named(sendName)) == 0 || len(recv.named(processName)) == 0 {
		if time.Now().After(deadline) {
			t.Fatalf("after 90s the receiver holds %d spans, want CreateUser, %q and %q\nrelay:\n%s\nconsume:\n%s",
				len(recv.all()), sendName, processName, relay.stderr.String(), consumer.stderr.String())
		}
		time.Sleep(50 * time.Millisecond)
	}
	stop(t, relay)
	stop(t, consumer)

	all := recv.all()
	traces := map[string]bool{}
	for _, s := range all {
		traces[hex.EncodeToString(s.span.TraceId)] = true
	}
	if len(traces) != 1 || !traces[rootTrace] {
		t.Errorf("spans of %d traces %v, want the one trace %s", len(traces), traces, rootTrace)
	}
	roots, sends, processes := recv.named("CreateUser"), recv.named(sendName), recv.named(processName)
	if len(roots) != 1 || len(sends) != 1 || len(processes) != 1 || len(all) != 3 {
		var names []string
		for _, s := range all {
			names = append(names, s.service+"/"+s.span.Name)
		}
		t.Fatalf("spans %v, want one each of CreateUser, %s and %s", names, sendName, processName)
	}
	send, process := sends[0].span, processes[0].span
	if got := hex.EncodeToString(send.ParentSpanId); got != rootSpan {
		t.Errorf("the relay's span's parent is %s, want the CreateUser span %s", got, rootSpan)
	}
	if got, want := hex.EncodeToString(process.ParentSpanId), hex.EncodeToString(send.SpanId); got != want {
		t.Errorf("the consumer's span's parent is %s, want the relay's span %s", got, want)
	}
	if send.Kind != tracepb.Span_SPAN_KIND_PRODUCER || process.Kind != tracepb.Span_SPAN_KIND_CONSUMER {
		t.Errorf("span kinds %s and %s, want producer and consumer", send.Kind, process.Kind)
	}
	if sends[0].service != "outbox-relay" || processes[0].service != "outbox-relay-consume" {
		t.Errorf("services %q and %q, want outbox-relay and outbox-relay-consume", sends[0].service, processes[0].service)
	}
	for _, s := range []*tracepb.Span{send, process} {
		for key, want := range map[string]string{"messaging.system": "kafka", "messaging.destination.name": topic,
			"messaging.message.id": eventID, "messaging.kafka.message.key": userID} {
			if got := attr(s, key); got != want {
				t.Errorf("span %s: %s = %q, want %q", s.Name, key, got, want)
			}
		}
		if attr(s, "messaging.kafka.offset") != "0" || attr(s, "messaging.destination.partition.id") == "" {
			t.Errorf("span %s: offset %q partition %q, want offset 0 and a partition", s.Name,
				attr(s, "messaging.kafka.offset"), attr(s, "messaging.destination.partition.id"))
		}
	}
	if attr(send, "outbox.wait_seconds") == "" || attr(send, "outbox.row.id") == "" {
		t.Errorf("the relay's span lacks outbox.wait_seconds or outbox.row.id: %v", send.Attributes)
	}
	if attr(process, "messaging.consumer.group.name") != "traced-"+userID[:8] {
		t.Errorf("the consumer's span's group is %q", attr(process, "messaging.consumer.group.name"))
	}
}

// stop sends SIGTERM to p and waits for it to exit, failing t on a non-zero exit.
func stop(t *testing.T, p *subcommandProc) {
	t.Helper()
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		if err != nil {
			t.Errorf("%s exited: %v\n%s", p.cmd.Args[1], err, p.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatalf("%s did not exit within 60s of SIGTERM", p.cmd.Args[1])
	}
}

// TestTracingConfigErrors: 'run' and 'consume' refuse an OTEL_TRACES_EXPORTER or
// OTEL_EXPORTER_OTLP_PROTOCOL they do not support, before connecting anywhere, with an error
// naming the variable and the values allowed; 'none' turns tracing off and is no error.
func TestTracingConfigErrors(t *testing.T) {
	t.Parallel()
	// Nothing listens on these: the commands must fail on the variables before they connect.
	base := []string{"OUTBOX_DATABASE_URL=postgres://postgres@127.0.0.1:1/none?connect_timeout=1",
		"OUTBOX_KAFKA_BROKERS=127.0.0.1:1", "OUTBOX_CONSUMER_GROUP=g", "OUTBOX_CONSUMER_TOPICS=t",
		"OUTBOX_RELAY_STARTUP_TIMEOUT=2s", "OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:1"}
	for _, tc := range []struct {
		name, env string
		want      []string
	}{
		{"protocol", "OTEL_EXPORTER_OTLP_PROTOCOL=http/json", []string{"OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf or grpc", `"http/json"`}},
		{"traces protocol", "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=thrift", []string{"OTEL_EXPORTER_OTLP_PROTOCOL", `"thrift"`}},
		{"exporter", "OTEL_TRACES_EXPORTER=zipkin", []string{"OTEL_TRACES_EXPORTER", "otlp or none", `"zipkin"`}},
	} {
		for _, cmd := range []string{"run", "consume"} {
			_, stderr, code := runBin(t, 60*time.Second, append(base, tc.env), cmd)
			if code == 0 {
				t.Errorf("%s with %s: exit 0, want an error", cmd, tc.env)
				continue
			}
			for _, w := range tc.want {
				if !strings.Contains(stderr, w) {
					t.Errorf("%s with %s: stderr does not say %s:\n%s", cmd, tc.env, w, stderr)
				}
			}
			if strings.Contains(stderr, "connection refused") {
				t.Errorf("%s with %s: it tried to connect before refusing the variable:\n%s", cmd, tc.env, stderr)
			}
		}
	}
	// OTEL_TRACES_EXPORTER=none is tracing off: the command goes on, to the database it cannot reach.
	_, stderr, code := runBin(t, 60*time.Second, append(base, "OTEL_TRACES_EXPORTER=none"), "run")
	if code == 0 || strings.Contains(stderr, "OTEL_TRACES_EXPORTER") || strings.Contains(stderr, "tracing on") || !strings.Contains(stderr, "connection refused") {
		t.Errorf("run with OTEL_TRACES_EXPORTER=none: exit %d, stderr:\n%s\nwant a database error and no tracing", code, stderr)
	}
}
