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
// They are kprom's, but for the produced batches and the requests: kprom builds a label map
// and looks up three labelled counters for every batch it is told of, which was 3-5 % of the
// relay's CPU at 1,000 events a second, one per transaction (a batch or two per claim), and
// builds the label values and looks up three labelled series for every request (3.4 %).
// produceCounts and brokerCounts look them up once per broker (and topic), under the same
// names, labels and buckets.
func (m *Metrics) RelayKafkaHooks() kgo.Hook {
	return &kafkaHooks{
		Metrics: kprom.NewMetrics("outbox_relay_kafka", kprom.Registerer(m.reg), kprom.Gatherer(m.Registry),
			kprom.Histograms(kprom.RequestDurationE2E),
			kprom.FetchAndProduceDetail(kprom.ByNode, kprom.ByTopic, kprom.Batches, kprom.Records, kprom.UncompressedBytes)),
		reg:     m.reg,
		produce: newProduceCounts(),
		brokers: newBrokerCounts(),
	}
}

// kafkaHooks are kprom's hooks with produceCounts in place of kprom's counts of produced
// batches (OnProduceBatchWritten), and brokerCounts in place of its counts and durations of
// requests (OnBrokerE2E).
type kafkaHooks struct {
	*kprom.Metrics
	reg     prom.Registerer
	produce *produceCounts
	brokers *brokerCounts
}

// OnNewClient implements kgo.HookNewClient: kprom registers its collectors, then its produce
// counters give way to produceCounts' and its request series to brokerCounts' (a registry
// takes a collector back given any collector with the same descriptors: see
// prom.Registerer's Unregister).
func (h *kafkaHooks) OnNewClient(c *kgo.Client) {
	h.Metrics.OnNewClient(c)
	for _, v := range append(newProduceCounts().vecs(), newBrokerCounts().vecs()...) {
		h.reg.Unregister(v)
	}
	for _, v := range append(h.produce.vecs(), h.brokers.vecs()...) {
		h.reg.MustRegister(v)
	}
}

// OnClientClosed implements kgo.HookClientClosed: kprom's collectors, produceCounts' and
// brokerCounts' go.
func (h *kafkaHooks) OnClientClosed(c *kgo.Client) {
	h.Metrics.OnClientClosed(c)
	for _, v := range append(h.produce.vecs(), h.brokers.vecs()...) {
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

// OnBrokerE2E implements kgo.HookBrokerE2E: what kprom's does with the histograms
// RelayKafkaHooks turns on (the request's end-to-end duration only), with the broker's series
// looked up once. kprom built the label values and looked up three labelled series for each
// request, about 3 % of the relay's CPU at 1,000 events a second.
func (h *kafkaHooks) OnBrokerE2E(meta kgo.BrokerMetadata, _ int16, e2e kgo.BrokerE2E) {
	s := h.brokers.of(meta.NodeID)
	if e2e.WriteErr != nil {
		s.writeErrors.Inc()
		return
	}
	s.writeBytes.Add(float64(e2e.BytesWritten))
	if e2e.ReadErr != nil {
		s.readErrors.Inc()
		return
	}
	s.readBytes.Add(float64(e2e.BytesRead))
	s.duration.Observe(e2e.DurationE2E().Seconds())
}

// brokerCounts counts the bytes written to and read from each broker and the errors doing so,
// and times each request: kprom's outbox_relay_kafka_{write,read}_{bytes,errors}_total{node_id}
// and outbox_relay_kafka_request_duration_e2e_seconds{node_id}, with kprom's names, help,
// buckets and native-histogram settings, and each broker's series looked up once.
type brokerCounts struct {
	writeBytes, writeErrors, readBytes, readErrors *prom.CounterVec
	duration                                       *prom.HistogramVec

	mu     sync.Mutex
	byNode map[int32]*brokerSeries
}

// brokerSeries are the series of one broker.
type brokerSeries struct {
	writeBytes, writeErrors, readBytes, readErrors prom.Counter
	duration                                       prom.Observer
}

// newBrokerCounts returns counters and a histogram named as kprom's, under the namespace
// RelayKafkaHooks gives it.
func newBrokerCounts() *brokerCounts {
	labels := []string{"node_id"}
	vec := func(name, help string) *prom.CounterVec {
		return prom.NewCounterVec(prom.CounterOpts{Namespace: "outbox_relay_kafka", Name: name, Help: help}, labels)
	}
	return &brokerCounts{
		writeBytes:  vec("write_bytes_total", "Total number of bytes written to the TCP connection. The bytes count is tracked after compression (when used)."),
		writeErrors: vec("write_errors_total", "Total number of write errors"),
		readBytes:   vec("read_bytes_total", "Total number of bytes read from the TCP connection. The bytes count is tracked before uncompression (when used)."),
		readErrors:  vec("read_errors_total", "Total number of read errors"),
		duration: prom.NewHistogramVec(prom.HistogramOpts{Namespace: "outbox_relay_kafka", Name: "request_duration_e2e_seconds",
			Help:                            "Time from the start of when a request is written to the end of when the response for that request was fully read",
			Buckets:                         kprom.DefBuckets,
			NativeHistogramBucketFactor:     kprom.DefNativeBucketFactor,
			NativeHistogramMaxBucketNumber:  kprom.DefNativeMaxBuckets,
			NativeHistogramMinResetDuration: kprom.DefNativeBucketMinReset,
		}, labels),
		byNode: map[int32]*brokerSeries{},
	}
}

// vecs returns the collectors of b.
func (b *brokerCounts) vecs() []prom.Collector {
	return []prom.Collector{b.writeBytes, b.writeErrors, b.readBytes, b.readErrors, b.duration}
}

// of returns the series of a broker. It may be called by several goroutines at once.
func (b *brokerCounts) of(node int32) *brokerSeries {
	b.mu.Lock()
	defer b.mu.Unlock()
	s, ok := b.byNode[node]
	if !ok {
		n := kgo.NodeName(node)
		s = &brokerSeries{writeBytes: b.writeBytes.WithLabelValues(n), writeErrors: b.writeErrors.WithLabelValues(n),
			readBytes: b.readBytes.WithLabelValues(n), readErrors: b.readErrors.WithLabelValues(n),
			duration: b.duration.WithLabelValues(n)}
		b.byNode[node] = s
	}
	return s
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
