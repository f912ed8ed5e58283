package relay

import (
	"testing"
	"time"
)

// Acknowledged rows wait for others before they are marked: marks are not on the latency path,
// and at a thousand events a second a mark every 10 ms was most of the relay's database work.
func TestMarkWaits(t *testing.T) {
	cases := []struct {
		name   string
		n      int
		waited time.Duration
		want   bool
	}{
		{name: "one row just acknowledged", n: 1, want: true},
		{name: "a few rows for 50 ms", n: 50, waited: 50 * time.Millisecond, want: true},
		{name: "a few rows for 99 ms", n: 50, waited: 99 * time.Millisecond, want: true},
		{name: "a few rows for markDelay", n: 50, waited: markDelay, want: false},
		{name: "a batch", n: 1000, want: false},
		{name: "more than a batch", n: 1001, waited: time.Millisecond, want: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			if got := markWaits(tc.n, 1000, tc.waited); got != tc.want {
				t.Fatalf("markWaits(%d, 1000, %s) = %v, want %v", tc.n, tc.waited, got, tc.want)
			}
		})
	}
}

// A relay whose session sleeps with nothing to do polls asleepPolls times less often; anything
// that may need a claim without a wake-up keeps the poll interval.
func TestTermPollEvery(t *testing.T) {
	const poll = 500 * time.Millisecond
	m := &Message{ID: 7, AggregateType: "order", AggregateID: "1"}
	cases := []struct {
		name  string
		awake bool
		rows  bool // the last claim returned rows
		set   func(l *term)
		want  time.Duration
	}{
		{name: "asleep with nothing to do", want: asleepPolls * poll},
		{name: "awake", awake: true, want: poll},
		{name: "the last claim returned rows", rows: true, want: poll},
		{name: "a row in flight", set: func(l *term) { l.inflight[m.ID] = m }, want: poll},
		{name: "a park put off", set: func(l *term) { l.toPark = append(l.toPark, parkReq{m: m}) }, want: poll},
		{name: "a failure not yet settled", set: func(l *term) { l.gate.failed(m) }, want: poll},
		{name: "a failing head held", set: func(l *term) { l.gate.holdBehind(m) }, want: poll},
		{name: "a key blocked in the database", set: func(l *term) { l.gate.reload(Blocked{m.orderKey(): m.ID}) }, want: poll},
		{name: "blocked keys not loaded yet", set: func(l *term) { l.gate.stored = nil }, want: poll},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			l := &term{cfg: Config{PollInterval: poll}, conn: &owner{}, inflight: map[int64]*Message{},
				gate: newKeyGate(func(int) time.Duration { return time.Second })}
			l.conn.asleep.Store(!tc.awake)
			l.gate.reload(Blocked{})
			l.cur.idle = !tc.rows
			if tc.set != nil {
				tc.set(l)
			}
			if got := l.pollEvery(); got != tc.want {
				t.Fatalf("pollEvery() = %s, want %s", got, tc.want)
			}
		})
	}
}
