package prometheus

import "github.com/twmb/franz-go/plugin/kprom"

// RelayKafkaHooks returns the franz-go hooks of the relay's producer metrics
// (outbox_relay_kafka_*: requests, end-to-end request durations, batches, records and bytes by
// broker and topic), registered in m's registry. Pass them with kgo.WithHooks.
func (m *Metrics) RelayKafkaHooks() *kprom.Metrics {
	return kprom.NewMetrics("outbox_relay_kafka", kprom.Registerer(m.Registry), kprom.Gatherer(m.Registry),
		kprom.Histograms(kprom.RequestDurationE2E),
		kprom.FetchAndProduceDetail(kprom.ByNode, kprom.ByTopic, kprom.Batches, kprom.Records, kprom.UncompressedBytes))
}
