package prometheus

import (
	"net/http"
	"runtime"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/prometheus/client_golang/prometheus/collectors"
	"github.com/prometheus/client_golang/prometheus/promhttp"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
)

// ConsumerMetrics records what an event consumer does: kafka.ConsumerObserver, on a private
// registry of its own.
type ConsumerMetrics struct {
	Registry *prom.Registry

	handled      *prom.CounterVec
	failed       *prom.CounterVec
	deadLettered *prom.CounterVec
	commits      prom.Counter
}

var _ kafka.ConsumerObserver = (*ConsumerMetrics)(nil)

// NewConsumerMetrics returns ConsumerMetrics registered in a new private registry, with Go and
// process collectors and outbox_consumer_build_info.
func NewConsumerMetrics(version, revision string) *ConsumerMetrics {
	reg := prom.NewRegistry()
	m := &ConsumerMetrics{
		Registry: reg,
		handled: prom.NewCounterVec(prom.CounterOpts{Name: "outbox_consumer_events_total",
			Help: "Consumed events handled, by topic and outcome (processed, duplicate, ignored)."}, []string{"topic", "outcome"}),
		failed: prom.NewCounterVec(prom.CounterOpts{Name: "outbox_consumer_attempts_failed_total",
			Help: "Failed attempts at handling an event, by topic."}, []string{"topic"}),
		deadLettered: prom.NewCounterVec(prom.CounterOpts{Name: "outbox_consumer_dead_lettered_total",
			Help: "Events sent to the dead-letter topic, by topic and kind (invalid: could never be processed; exhausted: attempts ran out)."},
			[]string{"topic", "kind"}),
		commits: prom.NewCounter(prom.CounterOpts{Name: "outbox_consumer_offset_commits_total",
			Help: "Successful offset commits."}),
	}
	build := prom.NewGauge(prom.GaugeOpts{Name: "outbox_consumer_build_info",
		Help:        "Build information; the value is always 1.",
		ConstLabels: prom.Labels{"version": version, "revision": revision, "goversion": runtime.Version()}})
	build.Set(1)
	reg.MustRegister(m.handled, m.failed, m.deadLettered, m.commits, build,
		collectors.NewGoCollector(), collectors.NewProcessCollector(collectors.ProcessCollectorOpts{}))
	return m
}

// Handler serves the registry in the Prometheus text format.
func (m *ConsumerMetrics) Handler() http.Handler {
	return promhttp.HandlerFor(m.Registry, promhttp.HandlerOpts{Registry: m.Registry})
}

// Handled implements kafka.ConsumerObserver.
func (m *ConsumerMetrics) Handled(topic string, o kafka.Outcome) {
	m.handled.WithLabelValues(topic, o.String()).Inc()
}

// Failed implements kafka.ConsumerObserver.
func (m *ConsumerMetrics) Failed(topic string, _ error) { m.failed.WithLabelValues(topic).Inc() }

// DeadLettered implements kafka.ConsumerObserver.
func (m *ConsumerMetrics) DeadLettered(topic string, invalid bool) {
	kind := "exhausted"
	if invalid {
		kind = "invalid"
	}
	m.deadLettered.WithLabelValues(topic, kind).Inc()
}

// Committed implements kafka.ConsumerObserver.
func (m *ConsumerMetrics) Committed(int) { m.commits.Inc() }
