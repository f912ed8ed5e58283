package prometheus_test

import (
	"context"
	"errors"
	"testing"
	"time"

	prom "github.com/prometheus/client_golang/prometheus"
	dto "github.com/prometheus/client_model/go"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/plugin/kprom"

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

// TestRelayKafkaHooksTimeRequestsAsKprom: the relay's own counts of bytes, errors and request
// durations per broker (OnBrokerE2E, which looks each broker's series up once) expose the same
// families as kprom's (name, type, help, labels, buckets), so dashboards built on kprom's keep
// working, and count what they are told: a failed write counts an error and no bytes, a failed
// read the bytes written and a read error, a whole request both sides and its duration.
func TestRelayKafkaHooksTimeRequestsAsKprom(t *testing.T) {
	t.Parallel()
	broker := kafkatest.Start(t)
	cl, err := kgo.NewClient(kgo.SeedBrokers(broker.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	meta := kgo.BrokerMetadata{NodeID: 7, Host: "h", Port: 9092}
	calls := []kgo.BrokerE2E{
		{BytesWritten: 100, BytesRead: 40, WriteWait: time.Millisecond, TimeToWrite: time.Millisecond, ReadWait: 2 * time.Millisecond, TimeToRead: time.Millisecond},
		{BytesWritten: 50, WriteErr: errors.New("broken pipe")},
		{BytesWritten: 30, ReadErr: errors.New("reset by peer")},
	}
	families := func(h kgo.Hook, reg *prom.Registry) map[string]*dto.MetricFamily {
		h.(kgo.HookNewClient).OnNewClient(cl)
		for _, c := range calls {
			h.(kgo.HookBrokerE2E).OnBrokerE2E(meta, 0, c)
		}
		fs, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		out := map[string]*dto.MetricFamily{}
		for _, f := range fs {
			out[f.GetName()] = f
		}
		return out
	}
	kreg := prom.NewRegistry()
	want := families(kprom.NewMetrics("outbox_relay_kafka", kprom.Registerer(kreg), kprom.Gatherer(kreg),
		kprom.Histograms(kprom.RequestDurationE2E)), kreg)
	reg := prometheus.NewRegistry("test", "abc")
	got := families(prometheus.ForOutbox(reg, "orders").RelayKafkaHooks(), reg)

	values := map[string]float64{
		"outbox_relay_kafka_write_bytes_total":  130,
		"outbox_relay_kafka_write_errors_total": 1,
		"outbox_relay_kafka_read_bytes_total":   40,
		"outbox_relay_kafka_read_errors_total":  1,
	}
	for _, name := range []string{"outbox_relay_kafka_write_bytes_total", "outbox_relay_kafka_write_errors_total",
		"outbox_relay_kafka_read_bytes_total", "outbox_relay_kafka_read_errors_total", "outbox_relay_kafka_request_duration_e2e_seconds"} {
		w, g := want[name], got[name]
		if w == nil || g == nil {
			t.Errorf("%s: kprom's family %v, the relay's %v", name, w != nil, g != nil)
			continue
		}
		if w.GetType() != g.GetType() || w.GetHelp() != g.GetHelp() {
			t.Errorf("%s: type %v help %q, kprom's %v %q", name, g.GetType(), g.GetHelp(), w.GetType(), w.GetHelp())
		}
		if len(g.GetMetric()) != 1 || len(w.GetMetric()) != 1 {
			t.Errorf("%s: %d series, kprom %d; want one, for the broker", name, len(g.GetMetric()), len(w.GetMetric()))
			continue
		}
		gm, wm := g.GetMetric()[0], w.GetMetric()[0]
		if l := labelValue(gm, "node_id"); l != "7" || labelValue(wm, "node_id") != "7" || labelValue(gm, "outbox") != "orders" {
			t.Errorf("%s: labels %v, kprom's %v", name, gm.GetLabel(), wm.GetLabel())
		}
		if v, ok := values[name]; ok && (gm.GetCounter().GetValue() != v || wm.GetCounter().GetValue() != v) {
			t.Errorf("%s: %v, kprom's %v, want %v", name, gm.GetCounter().GetValue(), wm.GetCounter().GetValue(), v)
		}
		if h := gm.GetHistogram(); h != nil {
			wh := wm.GetHistogram()
			if h.GetSampleCount() != 1 || wh.GetSampleCount() != 1 || h.GetSampleSum() != wh.GetSampleSum() {
				t.Errorf("%s: %d samples summing %v, kprom's %d summing %v; want the whole request alone",
					name, h.GetSampleCount(), h.GetSampleSum(), wh.GetSampleCount(), wh.GetSampleSum())
			}
			if len(h.GetBucket()) != len(wh.GetBucket()) || h.GetSchema() != wh.GetSchema() {
				t.Errorf("%s: %d buckets (schema %d), kprom's %d (schema %d)", name, len(h.GetBucket()), h.GetSchema(), len(wh.GetBucket()), wh.GetSchema())
			}
			for i := range min(len(h.GetBucket()), len(wh.GetBucket())) {
				if h.GetBucket()[i].GetUpperBound() != wh.GetBucket()[i].GetUpperBound() {
					t.Errorf("%s: bucket %d up to %v, kprom's %v", name, i, h.GetBucket()[i].GetUpperBound(), wh.GetBucket()[i].GetUpperBound())
				}
			}
		}
	}
}

// labelValue returns the value of label name of m, or "".
func labelValue(m *dto.Metric, name string) string {
	for _, l := range m.GetLabel() {
		if l.GetName() == name {
			return l.GetValue()
		}
	}
	return ""
}
