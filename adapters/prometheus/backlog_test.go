package prometheus_test

import (
	"context"
	"errors"
	"fmt"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
)

// gauges gathers m and returns the value of every sample of family name by its topic label.
func gauges(t *testing.T, m *prometheus.Metrics, name string) map[string]float64 {
	t.Helper()
	mfs, err := m.Registry.Gather()
	if err != nil {
		t.Fatalf("gather: %v", err)
	}
	out := map[string]float64{}
	for _, mf := range mfs {
		if mf.GetName() != name {
			continue
		}
		for _, s := range mf.GetMetric() {
			topic := ""
			for _, l := range s.GetLabel() {
				if l.GetName() == "topic" {
					topic = l.GetValue()
				}
			}
			out[topic] = s.GetGauge().GetValue()
		}
	}
	return out
}

// TestBacklogGauges checks what the backlog gauges report as the backlog changes: the read
// values, a drained topic as 0, topics past the limit summed under _other, and no stale values
// when the read fails.
func TestBacklogGauges(t *testing.T) {
	t.Parallel()
	var next prometheus.Backlog
	var fail error
	m := prometheus.New("test", "abc")
	m.WatchBacklog(func(context.Context) (prometheus.Backlog, error) { return next, fail },
		prometheus.BacklogOptions{Cache: time.Nanosecond, MaxTopics: 3})

	next = prometheus.Backlog{Topics: []prometheus.TopicBacklog{
		{Topic: "a", Pending: 5, OldestAge: 2 * time.Second, Parked: 1},
		{Topic: "b", Pending: 7, OldestAge: time.Second},
	}}
	if got := gauges(t, m, "outbox_relay_pending_rows"); fmt.Sprint(got) != "map[a:5 b:7]" {
		t.Fatalf("pending %v", got)
	}
	if got := gauges(t, m, "outbox_relay_oldest_pending_age_seconds"); got["a"] != 2 || got["b"] != 1 {
		t.Fatalf("oldest age %v", got)
	}
	if got := gauges(t, m, "outbox_relay_parked_rows"); got["a"] != 1 || got["b"] != 0 {
		t.Fatalf("parked %v", got)
	}

	// b drained: reported as 0, not dropped. Two new topics exceed MaxTopics: the smaller one
	// goes to _other with the topics already reported kept.
	next = prometheus.Backlog{Topics: []prometheus.TopicBacklog{
		{Topic: "a", Pending: 1, OldestAge: time.Second},
		{Topic: "c", Pending: 100, OldestAge: 9 * time.Second},
		{Topic: "d", Pending: 3, OldestAge: 4 * time.Second},
	}, Estimated: true}
	got := gauges(t, m, "outbox_relay_pending_rows")
	if fmt.Sprint(got) != "map[_other:103 a:1 b:0]" {
		t.Fatalf("pending after drain and overflow %v", got)
	}
	if age := gauges(t, m, "outbox_relay_oldest_pending_age_seconds"); age[prometheus.OtherTopic] != 9 || age["b"] != 0 {
		t.Fatalf("oldest age after drain and overflow %v", age)
	}
	if est := gauges(t, m, "outbox_relay_pending_estimated"); est[""] != 1 {
		t.Fatalf("estimated %v", est)
	}

	// The database fails: success 0 and no backlog gauges rather than stale ones.
	fail = errors.New("connection refused")
	if got := gauges(t, m, "outbox_relay_pending_rows"); len(got) != 0 {
		t.Fatalf("pending while the query fails %v", got)
	}
	if ok := gauges(t, m, "outbox_relay_backlog_query_success"); ok[""] != 0 {
		t.Fatalf("backlog_query_success %v", ok)
	}

	// Back: the overflow drained reports 0 under _other too.
	fail = nil
	next = prometheus.Backlog{Topics: []prometheus.TopicBacklog{{Topic: "a", Pending: 2, OldestAge: time.Second}}}
	if got := gauges(t, m, "outbox_relay_pending_rows"); fmt.Sprint(got) != "map[_other:0 a:2 b:0]" {
		t.Fatalf("pending after the overflow drained %v", got)
	}
}
