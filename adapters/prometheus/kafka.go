package prometheus

import (
	"sync"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/plugin/kprom"
)

// RelayKafkaHooks returns the franz-go hooks of the relay's producer metrics
// (outbox_relay_kafka_*: requests, end-to-end request durations, batches, records and bytes by
// broker and topic), registered in m's registry. Pass them with kgo.WithHooks.
func (m *Metrics) RelayKafkaHooks() *kprom.Metrics {
	return kprom.NewMetrics("outbox_relay_kafka", kprom.Registerer(m.reg), kprom.Gatherer(m.Registry),
		kprom.Histograms(kprom.RequestDurationE2E),
		kprom.FetchAndProduceDetail(kprom.ByNode, kprom.ByTopic, kprom.Batches, kprom.Records, kprom.UncompressedBytes))
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
