// Package prometheus exposes outbox-relay's metrics with the Prometheus client, from a private
// registry.
package prometheus

import (
	"errors"
	"net/http"
	"runtime"
	"sync"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kerr"
)

// Metrics records what the relay of one outbox does: relay.Observer.
type Metrics struct {
	// Registry is the registry the metrics are served from, shared by the outboxes of a process.
	Registry *prom.Registry
	// reg registers this outbox's collectors, with its outbox label, and remembers them for
	// Unregister.
	reg *tracked

	published     prom.Counter
	publishErrors *prom.CounterVec
	parked        prom.Counter
	latency       prom.Histogram
	batchSize     prom.Histogram
	claimDuration prom.Histogram
	markDuration  prom.Histogram
	replWait      prom.Histogram
	leader        prom.Gauge
	dbUp          prom.Gauge
	lastPublish   prom.Gauge
	partitions    *prom.GaugeVec
	tokenErrors   prom.Counter
	txs           *prom.CounterVec
	txRows        *prom.CounterVec
	progress      prom.Counter
	recovered     prom.Counter
}

var _ relay.Observer = (*Metrics)(nil)

// New returns Metrics registered in a new private registry (NewRegistry), without an outbox
// label: for a process serving one outbox whose metrics need no label (tests, benchmarks).
func New(version, revision string) *Metrics { return ForOutbox(NewRegistry(version, revision), "") }

// NewRegistry returns a private registry with Go and process collectors and
// outbox_relay_build_info, for the Metrics of one or several outboxes (ForOutbox).
func NewRegistry(version, revision string) *prom.Registry {
	reg := prom.NewRegistry()
	build := prom.NewGauge(prom.GaugeOpts{Name: "outbox_relay_build_info",
		Help:        "Build information; the value is always 1.",
		ConstLabels: prom.Labels{"version": version, "revision": revision, "goversion": runtime.Version()}})
	build.Set(1)
	reg.MustRegister(build, collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return reg
}

// ForOutbox returns the Metrics of one outbox, registered in reg: every series it adds (those
// of WatchBacklog, WatchMissingTopics and RelayKafkaHooks too) has the label outbox="outbox",
// so one process serves the relays of several outboxes from one registry. An empty outbox adds
// no label. Each outbox of a registry must have its own name.
func ForOutbox(reg *prom.Registry, outbox string) *Metrics {
	var r prom.Registerer = reg
	if outbox != "" {
		r = prom.WrapRegistererWith(prom.Labels{"outbox": outbox}, reg)
	}
	m := &Metrics{
		Registry: reg,
		reg:      &tracked{Registerer: r},
		published: prom.NewCounter(prom.CounterOpts{Name: "outbox_relay_events_published_total",
			Help: "Outbox events acknowledged by the broker."}),
		publishErrors: prom.NewCounterVec(prom.CounterOpts{Name: "outbox_relay_publish_errors_total",
			Help: "Failed publish attempts, by reason."}, []string{"reason"}),
		parked: prom.NewCounter(prom.CounterOpts{Name: "outbox_relay_events_parked_total",
			Help: "Outbox rows moved to the parked table."}),
		latency: prom.NewHistogram(prom.HistogramOpts{Name: "outbox_relay_commit_to_ack_seconds",
			Help:    "Time from a row's insertion to the broker's acknowledgement.",
			Buckets: []float64{.001, .002, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10, 30, 60, 300}}),
		batchSize: prom.NewHistogram(prom.HistogramOpts{Name: "outbox_relay_batch_size_rows",
			Help: "Rows returned by one claim query.", Buckets: prom.ExponentialBuckets(1, 4, 8)}),
		claimDuration: prom.NewHistogram(prom.HistogramOpts{Name: "outbox_relay_claim_duration_seconds",
			Help: "Duration of one claim query.", Buckets: prom.ExponentialBuckets(.0005, 2.5, 10)}),
		markDuration: prom.NewHistogram(prom.HistogramOpts{Name: "outbox_relay_mark_duration_seconds",
			Help: "Duration of one statement marking published rows.", Buckets: prom.ExponentialBuckets(.0005, 2.5, 10)}),
		replWait: prom.NewHistogram(prom.HistogramOpts{Name: "outbox_relay_replication_wait_seconds",
			Help:    "Time a claim's rows waited for the standbys to flush them (database.wait_for_replication).",
			Buckets: prom.ExponentialBuckets(.0005, 2.5, 10)}),
		leader: prom.NewGauge(prom.GaugeOpts{Name: "outbox_relay_leader",
			Help: "1 when this replica holds the leadership and publishes, else 0."}),
		dbUp: prom.NewGauge(prom.GaugeOpts{Name: "outbox_relay_database_up",
			Help: "1 when the relay's database session is connected, else 0."}),
		lastPublish: prom.NewGauge(prom.GaugeOpts{Name: "outbox_relay_last_publish_timestamp_seconds",
			Help: "Unix time of the last acknowledged publish."}),
		partitions: prom.NewGaugeVec(prom.GaugeOpts{Name: "outbox_relay_topic_partitions",
			Help: "Partitions of each topic this replica published to: kind=\"pinned\" is the count keys are hashed with, kind=\"live\" the count the brokers have."},
			[]string{"topic", "kind"}),
		tokenErrors: prom.NewCounter(prom.CounterOpts{Name: "outbox_relay_sasl_token_errors_total",
			Help: "Times the Kafka SASL mechanism (OAUTHBEARER, AWS_MSK_IAM) could not get a token or credentials; each fails a connection to a broker."}),
	}
	m.txs = prom.NewCounterVec(prom.CounterOpts{Name: "outbox_relay_transactions_total",
		Help: "Kafka transactions of exactly-once delivery, by outcome: committed, aborted (a record failed, a row of its hand-over was refused, or the term ended), failed (could not be ended or its commit's outcome is unknown: the term ended)."},
		[]string{"outcome"})
	m.txRows = prom.NewCounterVec(prom.CounterOpts{Name: "outbox_relay_transaction_rows_total",
		Help: "Rows in the Kafka transactions of exactly-once delivery, by the transaction's outcome."}, []string{"outcome"})
	m.progress = prom.NewCounter(prom.CounterOpts{Name: "outbox_relay_progress_records_total",
		Help: "Progress records written to kafka.progress_topic (one per Kafka transaction that reached its commit)."})
	m.recovered = prom.NewCounter(prom.CounterOpts{Name: "outbox_relay_recovered_rows_total",
		Help: "Rows an earlier term published without marking them, marked at a term's start from the progress topic without being published again."})
	for _, o := range []string{kafka.TxCommitted, kafka.TxAborted, kafka.TxFailed} {
		m.txs.WithLabelValues(o)
		m.txRows.WithLabelValues(o)
	}
	m.reg.MustRegister(m.published, m.publishErrors, m.parked, m.latency, m.batchSize, m.claimDuration,
		m.markDuration, m.replWait, m.leader, m.dbUp, m.lastPublish, m.partitions, m.tokenErrors, m.txs, m.txRows,
		m.progress, m.recovered)
	return m
}

// Unregister removes every collector of the outbox from the registry (those of WatchBacklog,
// WatchMissingTopics and RelayKafkaHooks too), so that a new Metrics of the same outbox can be
// registered: the wiring of an outbox that failed to start is undone before it is tried again.
func (m *Metrics) Unregister() { m.reg.unregisterAll() }

// tracked is a Registerer that remembers what it registered.
type tracked struct {
	prom.Registerer
	mu  sync.Mutex
	all []prom.Collector
}

// Register implements prom.Registerer.
func (t *tracked) Register(c prom.Collector) error {
	if err := t.Registerer.Register(c); err != nil {
		return err
	}
	t.mu.Lock()
	t.all = append(t.all, c)
	t.mu.Unlock()
	return nil
}

// MustRegister implements prom.Registerer.
func (t *tracked) MustRegister(cs ...prom.Collector) {
	for _, c := range cs {
		if err := t.Register(c); err != nil {
			panic(err)
		}
	}
}

// unregisterAll unregisters everything t registered.
func (t *tracked) unregisterAll() {
	t.mu.Lock()
	defer t.mu.Unlock()
	for _, c := range t.all {
		t.Registerer.Unregister(c)
	}
	t.all = nil
}

var _ kafka.TxObserver = (*Metrics)(nil)

// TxEnded implements kafka.TxObserver.
func (m *Metrics) TxEnded(outcome string, rows int) {
	m.txs.WithLabelValues(outcome).Inc()
	m.txRows.WithLabelValues(outcome).Add(float64(rows))
}

// CommittedRows returns how many rows Kafka transactions committed since the start (exactly-once
// delivery).
func (m *Metrics) CommittedRows() int64 {
	var out dto.Metric
	if err := m.txRows.WithLabelValues(kafka.TxCommitted).Write(&out); err != nil {
		return 0
	}
	return int64(out.GetCounter().GetValue())
}

// ProgressWritten implements kafka.TxObserver.
func (m *Metrics) ProgressWritten(int) { m.progress.Inc() }

// Recovered implements kafka.TxObserver.
func (m *Metrics) Recovered(rows int) { m.recovered.Add(float64(rows)) }

// Handler serves the registry in the Prometheus text format.
func (m *Metrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// ReplicationWaited records how long a claim's rows waited for the standbys: the hook of
// postgres.StoreConfig.OnReplicationWait.
func (m *Metrics) ReplicationWaited(took time.Duration) { m.replWait.Observe(took.Seconds()) }

// Claimed implements relay.Observer.
func (m *Metrics) Claimed(n int, took time.Duration) {
	m.batchSize.Observe(float64(n))
	m.claimDuration.Observe(took.Seconds())
}

// Acked implements relay.Observer.
func (m *Metrics) Acked(msg *relay.Message, at time.Time) {
	m.published.Inc()
	m.latency.Observe(max(at.Sub(msg.CreatedAt).Seconds(), 0))
	m.lastPublish.Set(float64(at.UnixNano()) / 1e9)
}

// Marked implements relay.Observer.
func (m *Metrics) Marked(_ int, took time.Duration) { m.markDuration.Observe(took.Seconds()) }

// Failed implements relay.Observer.
func (m *Metrics) Failed(_ *relay.Message, err error) {
	m.publishErrors.WithLabelValues(Reason(err)).Inc()
}

// Parked implements relay.Observer.
func (m *Metrics) Parked(*relay.Message, string) { m.parked.Inc() }

// Leading implements relay.Observer.
func (m *Metrics) Leading(leader bool) { m.leader.Set(b2f(leader)) }

// Connected implements relay.Observer.
func (m *Metrics) Connected(up bool) { m.dbUp.Set(b2f(up)) }

// TopicPartitions implements kafka.PartitionObserver.
func (m *Metrics) TopicPartitions(topic string, pinned, live int) {
	m.partitions.WithLabelValues(topic, "pinned").Set(float64(pinned))
	m.partitions.WithLabelValues(topic, "live").Set(float64(live))
}

// Labeled is an error that names its own label in outbox_relay_publish_errors_total: a sink's
// kinds of failure (rabbitmq.ErrNacked says "nacked"). The label must come from a small fixed set.
type Labeled interface {
	error
	Reason() string
}

// Reason returns a short, bounded label for a publish error: the label of a Labeled error it
// wraps (the RabbitMQ sink's), the Kafka error code name when there is one, invalid_message for a
// row the relay refuses, else other.
func Reason(err error) string {
	var (
		le Labeled
		ke *kerr.Error
	)
	switch {
	case errors.As(err, &le):
		return le.Reason()
	case errors.As(err, &ke):
		return ke.Message
	case errors.Is(err, relay.ErrInvalidMessage):
		return "invalid_message"
	default:
		return "other"
	}
}

func b2f(b bool) float64 {
	if b {
		return 1
	}
	return 0
}

// TracingSpans counts the relay's spans since it started: those the sampler kept (handed to the
// batch span processor), and of them those the exporter sent and those it failed to send. The
// others are in the processor's queue or were dropped when it was full.
type TracingSpans struct {
	Sampled, Exported, Failed float64
}

// WatchTracing registers in reg outbox_relay_tracing_spans_{sampled,exported,failed}_total,
// which report what read returns (called on each scrape; it must be cheap). Tracing is the
// process's, not an outbox's: register them once per registry, with no outbox label. A nil read
// reports 0, as with tracing off.
func WatchTracing(reg prom.Registerer, read func() TracingSpans) {
	spans := func(name, help string, get func(TracingSpans) float64) prom.Collector {
		return prom.NewCounterFunc(prom.CounterOpts{Name: name, Help: help}, func() float64 {
			if read == nil {
				return 0
			}
			return get(read())
		})
	}
	reg.MustRegister(
		spans("outbox_relay_tracing_spans_sampled_total",
			"Spans the OpenTelemetry sampler kept, handed to the batch span processor. 0 with tracing off.",
			func(s TracingSpans) float64 { return s.Sampled }),
		spans("outbox_relay_tracing_spans_exported_total",
			"Spans the OpenTelemetry exporter sent to the collector. 0 with tracing off.",
			func(s TracingSpans) float64 { return s.Exported }),
		spans("outbox_relay_tracing_spans_failed_total",
			"Spans the OpenTelemetry exporter failed to send to the collector (lost; events are not affected). 0 with tracing off.",
			func(s TracingSpans) float64 { return s.Failed }))
}
