package prometheus_test

import (
	"context"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// TestOutboxesShareARegistry: the Metrics of two outboxes register in one registry, every series
// labelled with its outbox, the backlog gauges too.
func TestOutboxesShareARegistry(t *testing.T) {
	reg := prometheus.NewRegistry("test", "abc")
	a, b := prometheus.ForOutbox(reg, "orders"), prometheus.ForOutbox(reg, "billing")
	for _, m := range []*prometheus.Metrics{a, b} {
		m.WatchBacklog(func(context.Context) (prometheus.Backlog, error) {
			return prometheus.Backlog{Topics: []prometheus.TopicBacklog{{Topic: "t", Pending: 3}}}, nil
		}, prometheus.BacklogOptions{})
		m.WatchMissingTopics(func() []string { return nil })
		_ = m.RelayKafkaHooks()
	}
	a.Acked(&relay.Message{CreatedAt: time.Now()}, time.Now())
	a.Acked(&relay.Message{CreatedAt: time.Now()}, time.Now())
	b.Acked(&relay.Message{CreatedAt: time.Now()}, time.Now())
	a.Leading(true)
	families, err := reg.Gather()
	if err != nil {
		t.Fatal(err)
	}
	got := map[string]map[string]float64{}
	for _, f := range families {
		for _, m := range f.GetMetric() {
			outbox := ""
			for _, l := range m.GetLabel() {
				if l.GetName() == "outbox" {
					outbox = l.GetValue()
				}
			}
			if got[f.GetName()] == nil {
				got[f.GetName()] = map[string]float64{}
			}
			got[f.GetName()][outbox] += m.GetCounter().GetValue() + m.GetGauge().GetValue()
		}
	}
	if p := got["outbox_relay_events_published_total"]; p["orders"] != 2 || p["billing"] != 1 || len(p) != 2 {
		t.Errorf("published per outbox: %v", p)
	}
	if l := got["outbox_relay_leader"]; l["orders"] != 1 || l["billing"] != 0 {
		t.Errorf("leader per outbox: %v", l)
	}
	if p := got["outbox_relay_pending_rows"]; p["orders"] != 3 || p["billing"] != 3 {
		t.Errorf("pending per outbox: %v", p)
	}
	if bi := got["outbox_relay_build_info"]; len(bi) != 1 || bi[""] != 1 {
		t.Errorf("build info: %v, want one series without an outbox", bi)
	}
}

// TestUnregisterLetsAnOutboxRegisterAgain: the metrics of an outbox that failed to start are
// unregistered, every series with them, so that the next try registers the same names again
// (without Unregister, MustRegister panics on the duplicates).
func TestUnregisterLetsAnOutboxRegisterAgain(t *testing.T) {
	reg := prometheus.NewRegistry("test", "abc")
	register := func() *prometheus.Metrics {
		m := prometheus.ForOutbox(reg, "late")
		m.WatchBacklog(func(context.Context) (prometheus.Backlog, error) {
			return prometheus.Backlog{Topics: []prometheus.TopicBacklog{{Topic: "t", Pending: 3}}}, nil
		}, prometheus.BacklogOptions{})
		m.WatchMissingTopics(func() []string { return nil })
		return m
	}
	outboxSeries := func() int {
		families, err := reg.Gather()
		if err != nil {
			t.Fatal(err)
		}
		n := 0
		for _, f := range families {
			for _, m := range f.GetMetric() {
				for _, l := range m.GetLabel() {
					if l.GetName() == "outbox" && l.GetValue() == "late" {
						n++
					}
				}
			}
		}
		return n
	}
	first := register()
	if outboxSeries() == 0 {
		t.Fatal("no series with outbox=late after ForOutbox")
	}
	first.Unregister()
	if n := outboxSeries(); n != 0 {
		t.Fatalf("%d series with outbox=late left after Unregister", n)
	}
	second := register() // panics if anything was left registered
	second.Leading(true)
	if outboxSeries() == 0 {
		t.Fatal("no series with outbox=late after registering again")
	}
}
