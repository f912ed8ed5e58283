package prometheus

import (
	"sync"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kprom"
)

// RelayKafkaHooks returns the franz-go hooks of the relay's producer metrics
// (outbox_relay_kafka_*: requests, end-to-end request durations, batches, records and bytes by
// broker and topic), registered in m's registry when the client is created. Pass them with
// kgo.WithHooks.
//
// They are kprom's, but for the produced batches: kprom builds a label map and looks up three
// labelled counters for every batch it is told of, which was 3-5 % of the relay's CPU at 1,000
// events a second, one per transaction (a batch or two per claim). produceCounts looks them up
// once per broker and topic, under the same names and labels.
func (m *Metrics) RelayKafkaHooks() kgo.Hook {
	return &kafkaHooks{
		Metrics: kprom.NewMetrics("outbox_relay_kafka", kprom.Registerer(m.reg), kprom.Gatherer(m.Registry),
			kprom.Histograms(kprom.RequestDurationE2E),
			kprom.FetchAndProduceDetail(kprom.ByNode, kprom.ByTopic, kprom.Batches, kprom.Records, kprom.UncompressedBytes)),
		reg:     m.reg,
		produce: newProduceCounts(),
	}
}

// kafkaHooks are kprom's hooks with produceCounts in place of kprom's counts of produced
// batches (OnProduceBatchWritten).
type kafkaHooks struct {
	*kprom.Metrics
	reg     prom.Registerer
	produce *produceCounts
}

// OnNewClient implements kgo.HookNewClient: kprom registers its collectors, then its produce
// counters give way to produceCounts' (a registry takes a collector back given any collector
// with the same descriptors: see prom.Registerer's Unregister).
func (h *kafkaHooks) OnNewClient(c *kgo.Client) {
	h.Metrics.OnNewClient(c)
	for _, v := range newProduceCounts().vecs() {
		h.reg.Unregister(v)
	}
	for _, v := range h.produce.vecs() {
		h.reg.MustRegister(v)
	}
}

// OnClientClosed implements kgo.HookClientClosed: kprom's collectors and produceCounts' go.
func (h *kafkaHooks) OnClientClosed(c *kgo.Client) {
	h.Metrics.OnClientClosed(c)
	for _, v := range h.produce.vecs() {
		h.reg.Unregister(v)
	}
}

// OnProduceBatchWritten implements kgo.HookProduceBatchWritten.
func (h *kafkaHooks) OnProduceBatchWritten(meta kgo.BrokerMetadata, topic string, _ int32, pm kgo.ProduceBatchMetrics) {
	c := h.produce.of(meta.NodeID, topic)
	c.bytes.Add(float64(pm.UncompressedBytes))
	c.batches.Inc()
	c.records.Add(float64(pm.NumRecords))
}

// produceCounts counts the produced batches, records and uncompressed bytes per broker and
// topic: kprom's outbox_relay_kafka_produce_{bytes,batches,records}_total{node_id,topic}, with
// each broker's and topic's counters looked up once.
type produceCounts struct {
	bytes, batches, records *prom.CounterVec

	mu    sync.Mutex
	byKey map[produceKey]*produceCounters
}

// produceKey is a broker and a topic.
type produceKey struct {
	node  int32
	topic string
}

// produceCounters are the counters of one broker and topic.
type produceCounters struct{ bytes, batches, records prom.Counter }

// newProduceCounts returns counters named as kprom's, under the namespace RelayKafkaHooks gives it.
func newProduceCounts() *produceCounts {
	labels := []string{"node_id", "topic"}
	vec := func(name, help string) *prom.CounterVec {
		return prom.NewCounterVec(prom.CounterOpts{Namespace: "outbox_relay_kafka", Name: name, Help: help}, labels)
	}
	return &produceCounts{
		bytes:   vec("produce_bytes_total", "Total number of uncompressed bytes produced"),
		batches: vec("produce_batches_total", "Total number of batches produced"),
		records: vec("produce_records_total", "Total number of records produced"),
		byKey:   map[produceKey]*produceCounters{},
	}
}

// vecs returns the collectors of p.
func (p *produceCounts) vecs() []prom.Collector {
	return []prom.Collector{p.bytes, p.batches, p.records}
}

// of returns the counters of a broker and a topic. It may be called by several goroutines at
// once (franz-go writes to each broker from a goroutine of its own).
func (p *produceCounts) of(node int32, topic string) *produceCounters {
	k := produceKey{node, topic}
	p.mu.Lock()
	defer p.mu.Unlock()
	c, ok := p.byKey[k]
	if !ok {
		n := kgo.NodeName(node)
		c = &produceCounters{bytes: p.bytes.WithLabelValues(n, topic), batches: p.batches.WithLabelValues(n, topic),
			records: p.records.WithLabelValues(n, topic)}
		p.byKey[k] = c
	}
	return c
}

// missingTopicsRemembered bounds the topics outbox_relay_topic_missing reports as 0 once found.
const missingTopicsRemembered = 100

// missingCollector reports the topics a publish found missing, read on each scrape.
type missingCollector struct {
	read        func() []string
	desc, count *prom.Desc

	mu   sync.Mutex
	seen map[string]bool // topics reported missing once, reported as 0 once found
}

// WatchMissingTopics registers outbox_relay_missing_topics, the number of topics read returns
// (the topics a publish found missing and no publish found since), and
// outbox_relay_topic_missing{topic}: 1 for each of them, 0 for those it returned before. read is
// called on each scrape and must be cheap.
func (m *Metrics) WatchMissingTopics(read func() []string) {
	m.reg.MustRegister(&missingCollector{
		read: read,
		desc: prom.NewDesc("outbox_relay_topic_missing",
			"1 while the broker says the topic does not exist: its rows wait, and are sent again until it does (create it, or set kafka.auto_create_topics); 0 once a publish to it succeeded.",
			[]string{"topic"}, nil),
		count: prom.NewDesc("outbox_relay_missing_topics",
			"Topics the broker says do not exist, whose rows wait (outbox_relay_topic_missing names them).", nil, nil),
		seen: map[string]bool{},
	})
}

// Describe implements prom.Collector.
func (c *missingCollector) Describe(ch chan<- *prom.Desc) {
	ch <- c.desc
	ch <- c.count
}

// Collect implements prom.Collector.
func (c *missingCollector) Collect(ch chan<- prom.Metric) {
	missing := c.read()
	ch <- prom.MustNewConstMetric(c.count, prom.GaugeValue, float64(len(missing)))
	c.mu.Lock()
	defer c.mu.Unlock()
	now := map[string]bool{}
	for _, t := range missing {
		now[t] = true
		if !c.seen[t] && len(c.seen) < missingTopicsRemembered {
			c.seen[t] = true
		}
		ch <- prom.MustNewConstMetric(c.desc, prom.GaugeValue, 1, t)
	}
	for t := range c.seen {
		if !now[t] {
			ch <- prom.MustNewConstMetric(c.desc, prom.GaugeValue, 0, t)
		}
	}
}

// SASLTokenFailed counts one failure of the Kafka SASL mechanism (OAUTHBEARER, AWS_MSK_IAM) to
// get a token or credentials: the hook of kafka.SASLConfig.OnTokenError.
func (m *Metrics) SASLTokenFailed(error) { m.tokenErrors.Inc() }
