package prometheus_test

import (
	"context"
	"testing"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// TestRelayKafkaHooksCountProducedBatches: the producer's counts of batches, records and bytes
// per broker and topic (counted by the relay's own hook, not kprom's) are what was produced,
// labelled as kprom labels them, beside kprom's other series; a second client of the outbox
// registers them again once the first closed.
func TestRelayKafkaHooksCountProducedBatches(t *testing.T) {
	t.Parallel()
	broker := kafkatest.Start(t)
	topics := []string{broker.Topic(t, "hooks-a", 1), broker.Topic(t, "hooks-b", 1)}
	reg := prometheus.NewRegistry("test", "abc")
	m := prometheus.ForOutbox(reg, "orders")
	hooks := m.RelayKafkaHooks()
	for round := range 2 {
		cl, err := kgo.NewClient(kgo.SeedBrokers(broker.Addrs...), kgo.WithHooks(hooks), kgo.DefaultProduceTopic(topics[0]))
		if err != nil {
			t.Fatal(err)
		}
		ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
		// Three batches of one record to the first topic, one of two to the second.
		for range 3 {
			if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topics[0], Value: []byte("12345")}).FirstErr(); err != nil {
				t.Fatal(err)
			}
		}
		if err := cl.ProduceSync(ctx, &kgo.Record{Topic: topics[1], Value: []byte("1")}, &kgo.Record{Topic: topics[1], Value: []byte("2")}).FirstErr(); err != nil {
			t.Fatal(err)
		}
		cancel()
		// franz-go may call the hook after the produce's promise: the counts are read until they
		// are complete, or a generous bound passed.
		var got map[string]map[string]float64
		other := false
		for deadline := time.Now().Add(30 * time.Second); ; time.Sleep(10 * time.Millisecond) {
			got, other = gatherProduced(t, reg)
			b := got["outbox_relay_kafka_produce_batches_total"]
			if b[topics[0]] >= 3 && b[topics[1]] >= 1 || time.Now().After(deadline) {
				break
			}
		}
		if !other {
			t.Errorf("round %d: kprom's outbox_relay_kafka_write_bytes_total missing", round)
		}
		if b := got["outbox_relay_kafka_produce_batches_total"]; b[topics[0]] != 3 || b[topics[1]] != 1 {
			t.Errorf("round %d: batches per topic %v, want 3 and 1", round, b)
		}
		if r := got["outbox_relay_kafka_produce_records_total"]; r[topics[0]] != 3 || r[topics[1]] != 2 {
			t.Errorf("round %d: records per topic %v, want 3 and 2", round, r)
		}
		if b := got["outbox_relay_kafka_produce_bytes_total"]; b[topics[0]] <= 3*5 || b[topics[1]] <= 2 {
			t.Errorf("round %d: uncompressed bytes per topic %v, want more than the values", round, b)
		}
		cl.Close()
		hooks = m.RelayKafkaHooks()
	}
}

// gatherProduced returns the outbox "orders"'s counters by family and topic, and whether kprom's
// own outbox_relay_kafka_write_bytes_total is there.
func gatherProduced(t *testing.T, reg prom.Gatherer) (map[string]map[string]float64, bool) {
	t.Helper()
	got := map[string]map[string]float64{}
	other := false
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	for _, f := range families {
		if f.GetName() == "outbox_relay_kafka_write_bytes_total" {
			other = true
		}
		for _, s := range f.GetMetric() {
			labels := map[string]string{}
			for _, l := range s.GetLabel() {
				labels[l.GetName()] = l.GetValue()
			}
			if labels["outbox"] != "orders" || labels["node_id"] == "" || labels["topic"] == "" {
				continue
			}
			if got[f.GetName()] == nil {
				got[f.GetName()] = map[string]float64{}
			}
			got[f.GetName()][labels["topic"]] += s.GetCounter().GetValue()
		}
	}
	return got, other
}
