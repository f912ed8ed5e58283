package e2e_test

import (
	"encoding/json"
	"fmt"
	"strconv"
	"strings"
	"testing"

	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
)

// recorder is a reporter that keeps the errors instead of failing the test.
type recorder struct{ errs []string }

func (r *recorder) Helper()             {}
func (r *recorder) Logf(string, ...any) {}
func (r *recorder) Errorf(format string, a ...any) {
	r.errs = append(r.errs, fmt.Sprintf(format, a...))
}

// TestOracleCatchesEveryFault feeds the oracle hand-made topics: the faults the e2e tests look
// for must each be reported, and a correct topic with repeats must pass with the repeats counted.
func TestOracleCatchesEveryFault(t *testing.T) {
	t.Parallel()
	o := newOracle()
	ev := func(token, key string, seq int64, s txState) *written {
		w := &written{token: token, eventID: "00000000-0000-4000-8000-" + fmt.Sprintf("%012d", len(o.byToken)),
			rowID: int64(len(o.byToken) + 1), key: key, seq: seq, state: s}
		o.add(w)
		return w
	}
	a1 := ev("a1", "a", 1, txCommitted)
	a2 := ev("a2", "a", 2, txCommitted)
	a2rb := ev("a2rb", "a", 3, txRolledBack)
	a3 := ev("a3", "a", 3, txCommitted)
	b1 := ev("b1", "b", 1, txCommitted)
	rec := func(w *written, partition int32) *kgo.Record {
		v, _ := json.Marshal(eventPayload{Key: w.key, Seq: w.seq, Token: w.token})
		return &kgo.Record{Key: []byte(w.key), Value: v, Partition: partition, Headers: []kgo.RecordHeader{
			{Key: kafka.HeaderEventID, Value: []byte(w.eventID)},
			{Key: kafka.HeaderAggregateType, Value: []byte(aggType)},
			{Key: "x-seq", Value: []byte(strconv.FormatInt(w.seq, 10))},
		}}
	}
	badHeader := rec(a2, 0)
	badHeader.Headers[0].Value = []byte(a1.eventID)
	wrongKey := rec(b1, 1)
	wrongKey.Key = []byte("a")

	cases := []struct {
		name    string
		records []*kgo.Record
		want    string // a fragment of the expected error; "" means no error
		dups    int
	}{
		{"correct", []*kgo.Record{rec(a1, 0), rec(a2, 0), rec(a3, 0), rec(b1, 1)}, "", 0},
		{"repeats after a restart", []*kgo.Record{rec(a1, 0), rec(a2, 0), rec(a1, 0), rec(a2, 0), rec(a3, 0), rec(b1, 1), rec(b1, 1)}, "", 3},
		{"lost", []*kgo.Record{rec(a1, 0), rec(a3, 0), rec(b1, 1)}, "L:", 0},
		{"phantom", []*kgo.Record{rec(a1, 0), rec(a2, 0), rec(a2rb, 0), rec(a3, 0), rec(b1, 1)}, "P:", 0},
		{"reordered", []*kgo.Record{rec(a2, 0), rec(a1, 0), rec(a3, 0), rec(b1, 1)}, "O:", 0},
		{"wrong event-id header", []*kgo.Record{rec(a1, 0), badHeader, rec(a3, 0), rec(b1, 1)}, "H:", 0},
		{"wrong key", []*kgo.Record{rec(a1, 0), rec(a2, 0), rec(a3, 0), wrongKey}, "want key", 0},
		{"key on two partitions", []*kgo.Record{rec(a1, 0), rec(a2, 1), rec(a3, 0), rec(b1, 1)}, "partitions", 0},
	}
	for _, c := range cases {
		var r recorder
		v := o.check(&r, c.records)
		joined := strings.Join(r.errs, "\n")
		switch {
		case c.want == "" && len(r.errs) > 0:
			t.Errorf("%s: unexpected errors:\n%s", c.name, joined)
		case c.want != "" && !strings.Contains(joined, c.want):
			t.Errorf("%s: errors %q do not report %q", c.name, joined, c.want)
		}
		if c.want == "" && v.duplicates != c.dups {
			t.Errorf("%s: duplicates = %d, want %d", c.name, v.duplicates, c.dups)
		}
	}
}
