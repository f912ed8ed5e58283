// Package sinktest is the conformance suite of the relay's publisher port, relay.Sink: every sink
// (Kafka, RabbitMQ, in-memory) runs it from its own tests against a real broker, and passes it.
//
// The suite checks what the relay relies on: per-key order, the headers consumers use, invalid
// messages refused at once, broker refusals surfaced through done, nothing reported acknowledged
// before the broker confirmed it, and Abort settling every message before it returns.
package sinktest

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"slices"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
)

// Delivered is a message as a consumer of the broker reads it.
type Delivered struct {
	Key     string            // the aggregate id: the Kafka record key, or the aggregate-id header
	Headers map[string]string // every header
	Payload []byte
}

// Env is one sink under test with its broker, fresh for each test of the suite.
type Env struct {
	// Sink is the sink under test; it sends every message to a destination of this Env only.
	Sink relay.Sink
	// Delivered returns every message the broker holds for this Env so far, in the broker's
	// order (per key at least). It is called repeatedly until enough messages arrived.
	Delivered func(t *testing.T) []Delivered
	// Pause stops the broker's acknowledgements from reaching the sink, until Resume. Both nil
	// when the Env cannot do it (the tests needing it are skipped).
	Pause, Resume func(t *testing.T)
	// Reject changes m so that the broker refuses it (a missing topic, an unroutable routing
	// key...); nil when the Env cannot (the test is skipped).
	Reject func(m *relay.Message)
}

// Timeout bounds every wait of the suite. It is generous: the machine may be loaded.
var Timeout = 60 * time.Second

// Run runs the suite. newEnv is called once per test, with that test's t; register cleanups on it.
func Run(t *testing.T, newEnv func(t *testing.T) *Env) {
	tests := []struct {
		name string
		fn   func(t *testing.T, e *Env)
	}{
		{"PerKeyOrder", testPerKeyOrder},
		{"Headers", testHeaders},
		{"InvalidMessageRefusedAtOnce", testInvalid},
		{"ReservedHeadersRefused", testReservedHeaders},
		{"OccurredAtRange", testOccurredAtRange},
		{"BrokerRefusalSurfaced", testRefusal},
		{"NothingAckedBeforeConfirm", testNoEarlyAck},
		{"Abort", testAbort},
		{"RelayMarksOnlyConfirmed", testRelayMarks},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			tc.fn(t, newEnv(t))
		})
	}
}

// message returns a valid message of key with sequence number seq in its payload.
func message(id int64, key string, seq int) *relay.Message {
	payload, _ := json.Marshal(map[string]any{"key": key, "seq": seq})
	now := time.Now()
	return &relay.Message{ID: id, EventID: domain.NewID(), AggregateType: "order", AggregateID: key,
		EventType: "OrderPlaced", Payload: payload, OccurredAt: now, CreatedAt: now}
}

// tracker publishes messages and records their verdicts; it fails the test on a second done.
type tracker struct {
	t       *testing.T
	sink    relay.Sink
	mu      sync.Mutex
	verdict map[string]error // by event id, once done ran
	calls   map[string]int
	changed chan struct{}
}

func newTracker(t *testing.T, s relay.Sink) *tracker {
	return &tracker{t: t, sink: s, verdict: map[string]error{}, calls: map[string]int{}, changed: make(chan struct{}, 1)}
}

func (tr *tracker) publish(m *relay.Message) error {
	return tr.sink.Publish(context.Background(), m, func(err error) {
		tr.mu.Lock()
		tr.calls[m.EventID]++
		if tr.calls[m.EventID] > 1 {
			tr.t.Errorf("done called %d times for event %s", tr.calls[m.EventID], m.EventID)
		}
		tr.verdict[m.EventID] = err
		tr.mu.Unlock()
		select {
		case tr.changed <- struct{}{}:
		default:
		}
	})
}

func (tr *tracker) mustPublish(m *relay.Message) {
	tr.t.Helper()
	if err := tr.publish(m); err != nil {
		tr.t.Fatalf("publish %s: %v", m.EventID, err)
	}
}

// settled returns how many of ids have a verdict, and how many of those are acknowledgements.
func (tr *tracker) settled(ids []string) (n, acked int) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	for _, id := range ids {
		if err, ok := tr.verdict[id]; ok {
			n++
			if err == nil {
				acked++
			}
		}
	}
	return n, acked
}

// wait blocks until every id has a verdict.
func (tr *tracker) wait(ids []string) {
	tr.t.Helper()
	deadline := time.Now().Add(Timeout)
	for {
		if n, _ := tr.settled(ids); n == len(ids) {
			return
		}
		if time.Now().After(deadline) {
			n, _ := tr.settled(ids)
			tr.t.Fatalf("%d of %d messages have no verdict after %s", len(ids)-n, len(ids), Timeout)
		}
		select {
		case <-tr.changed:
		case <-time.After(100 * time.Millisecond):
		}
	}
}

func (tr *tracker) err(id string) (error, bool) {
	tr.mu.Lock()
	defer tr.mu.Unlock()
	err, ok := tr.verdict[id]
	return err, ok
}

// waitDelivered polls e.Delivered until want event ids are all there.
func waitDelivered(t *testing.T, e *Env, want []string) []Delivered {
	t.Helper()
	deadline := time.Now().Add(Timeout)
	for {
		got := e.Delivered(t)
		seen := map[string]bool{}
		for _, d := range got {
			seen[d.Headers["event-id"]] = true
		}
		missing := 0
		for _, id := range want {
			if !seen[id] {
				missing++
			}
		}
		if missing == 0 {
			return got
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d acknowledged messages are not at the broker after %s", missing, len(want), Timeout)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func testPerKeyOrder(t *testing.T, e *Env) {
	tr := newTracker(t, e.Sink)
	const keys, per = 4, 40
	var ids []string
	var id int64
	for seq := range per {
		for k := range keys {
			id++
			m := message(id, fmt.Sprintf("key-%d", k), seq)
			tr.mustPublish(m)
			ids = append(ids, m.EventID)
		}
	}
	tr.wait(ids)
	for _, evID := range ids {
		if err, _ := tr.err(evID); err != nil {
			t.Fatalf("event %s failed: %v", evID, err)
		}
	}
	got := waitDelivered(t, e, ids)
	last := map[string]int{}
	count := map[string]int{}
	for _, d := range got {
		var p struct {
			Key string
			Seq int
		}
		if err := json.Unmarshal(d.Payload, &p); err != nil {
			t.Fatalf("payload %q: %v", d.Payload, err)
		}
		if d.Key != p.Key {
			t.Errorf("message of key %q delivered with key %q", p.Key, d.Key)
		}
		prev, ok := last[p.Key]
		if ok && p.Seq <= prev {
			continue // a repeat, allowed (at least once); ignoring repeats, seq must increase
		}
		if (ok && p.Seq != prev+1) || (!ok && p.Seq != 0) {
			t.Errorf("key %s: seq %d delivered after %d (missing or out of order)", p.Key, p.Seq, prev)
		}
		last[p.Key] = p.Seq
		count[p.Key]++
	}
	for k := range keys {
		if key := fmt.Sprintf("key-%d", k); count[key] != per {
			t.Errorf("key %s: %d distinct messages delivered, want %d", key, count[key], per)
		}
	}
}

func testHeaders(t *testing.T, e *Env) {
	tr := newTracker(t, e.Sink)
	m := message(1, "order-7", 0)
	m.OccurredAt = time.Date(2026, 3, 4, 5, 6, 7, 890123456, time.FixedZone("X", 3600))
	m.Headers = []byte(`{"content-type":"application/json","trace-id":"trace-42"}`)
	tr.mustPublish(m)
	tr.wait([]string{m.EventID})
	if err, _ := tr.err(m.EventID); err != nil {
		t.Fatalf("publish failed: %v", err)
	}
	got := waitDelivered(t, e, []string{m.EventID})
	d := got[len(got)-1]
	want := map[string]string{
		"event-id":       m.EventID,
		"event-type":     "OrderPlaced",
		"aggregate-type": "order",
		"occurred-at":    "2026-03-04T04:06:07.890123456Z",
		"content-type":   "application/json",
		"trace-id":       "trace-42",
	}
	for k, v := range want {
		if d.Headers[k] != v {
			t.Errorf("header %s = %q, want %q", k, d.Headers[k], v)
		}
	}
	if d.Key != "order-7" {
		t.Errorf("key %q, want order-7", d.Key)
	}
	if string(d.Payload) != string(m.Payload) {
		t.Errorf("payload %q, want %q", d.Payload, m.Payload)
	}
}

func testInvalid(t *testing.T, e *Env) {
	notObject := message(1, "k", 0)
	notObject.Headers = []byte(`["a"]`)
	emptyKey := message(2, "", 0)
	nullKey := message(3, "", 0)
	nullKey.AggregateIDNull = true
	infinite := message(4, "k", 0)
	infinite.OccurredAt, infinite.OccurredAtInfinite = time.Time{}, true // the claim's decoding of 'infinity'
	refuseAll(t, e, map[string]*relay.Message{"headers not an object": notObject, "empty key": emptyKey,
		"NULL key": nullKey, "infinite occurred_at": infinite}, "")
}

// refuseAll publishes each of bad, which Publish must refuse at once with an error wrapping
// relay.ErrInvalidMessage whose text contains reason (when not ""), without calling done; then a
// valid message, which must go through.
func refuseAll(t *testing.T, e *Env, bad map[string]*relay.Message, reason string) {
	t.Helper()
	tr := newTracker(t, e.Sink)
	for name, m := range bad {
		err := tr.publish(m)
		if !errors.Is(err, relay.ErrInvalidMessage) || !strings.Contains(fmt.Sprint(err), reason) {
			t.Errorf("publish of an invalid message (%s) returned %v, want an error wrapping relay.ErrInvalidMessage saying %q", name, err, reason)
		}
	}
	good := message(100, "k", 1)
	tr.mustPublish(good)
	tr.wait([]string{good.EventID})
	if err, _ := tr.err(good.EventID); err != nil {
		t.Fatalf("valid message after invalid ones failed: %v", err)
	}
	for name, m := range bad {
		if _, called := tr.err(m.EventID); called {
			t.Errorf("done was called for a message refused by Publish (%s)", name)
		}
	}
}

// testReservedHeaders: a message whose headers set one of the relay's own, in any letter case,
// is refused: published, a consumer would read two event-id headers (or only the writer's).
func testReservedHeaders(t *testing.T, e *Env) {
	bad := map[string]*relay.Message{}
	for i, name := range append(relay.ReservedHeaders(), "Event-ID", "OCCURRED-AT") {
		m := message(int64(i+1), "k", 0)
		m.Headers = []byte(`{"trace-id":"t","` + name + `":"spoofed"}`)
		bad[name] = m
	}
	refuseAll(t, e, bad, "is reserved")
}

// testOccurredAtRange: occurred-at is RFC 3339, whose years are 0001 to 9999 in UTC. A message
// outside them is refused; the first and last instants of the range are sent as they are.
func testOccurredAtRange(t *testing.T, e *Env) {
	bad := map[string]*relay.Message{}
	for i, at := range []time.Time{
		time.Date(-3999, 1, 1, 0, 0, 0, 0, time.UTC), // '4000 BC'
		time.Date(0, 12, 31, 23, 59, 59, 999999000, time.UTC),
		time.Date(1, 1, 1, 0, 30, 0, 0, time.FixedZone("+01", 3600)), // year 0 in UTC
		time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC),
	} {
		m := message(int64(i+1), "k", 0)
		m.OccurredAt = at
		bad[at.Format(time.RFC3339)] = m
	}
	refuseAll(t, e, bad, "is outside 0001 to 9999")

	tr := newTracker(t, e.Sink)
	want := map[string]string{} // event id: occurred-at header
	var ids []string
	for i, at := range []time.Time{
		{}, // 0001-01-01T00:00:00Z, the zero time.Time: valid, not infinite
		time.Date(1, 1, 1, 1, 30, 0, 0, time.FixedZone("+01", 3600)),
		time.Date(9999, 12, 31, 23, 59, 59, 999999000, time.UTC),
	} {
		m := message(int64(10+i), fmt.Sprintf("range-%d", i), 0)
		m.OccurredAt = at
		tr.mustPublish(m)
		ids = append(ids, m.EventID)
		want[m.EventID] = at.UTC().Format(time.RFC3339Nano)
	}
	tr.wait(ids)
	for _, id := range ids {
		if err, _ := tr.err(id); err != nil {
			t.Errorf("message with occurred-at %s failed: %v", want[id], err)
		}
	}
	for _, d := range waitDelivered(t, e, ids) {
		id := d.Headers[relay.HeaderEventID]
		if w, ok := want[id]; ok && d.Headers[relay.HeaderOccurredAt] != w {
			t.Errorf("occurred-at header %q, want %q", d.Headers[relay.HeaderOccurredAt], w)
		}
	}
}

func testRefusal(t *testing.T, e *Env) {
	if e.Reject == nil {
		t.Skip("this env cannot make the broker refuse a message")
	}
	tr := newTracker(t, e.Sink)
	bad := message(1, "k", 0)
	e.Reject(bad)
	tr.mustPublish(bad)
	good := message(2, "other", 0)
	tr.mustPublish(good)
	tr.wait([]string{bad.EventID, good.EventID})
	if err, _ := tr.err(bad.EventID); err == nil {
		t.Errorf("a message the broker refused was reported acknowledged")
	} else {
		t.Logf("refusal surfaced: %v", err)
	}
	if err, _ := tr.err(good.EventID); err != nil {
		t.Errorf("a valid message published after a refused one failed: %v", err)
	}
	waitDelivered(t, e, []string{good.EventID})
}

func testNoEarlyAck(t *testing.T, e *Env) {
	if e.Pause == nil {
		t.Skip("this env cannot hold the broker's acknowledgements")
	}
	tr := newTracker(t, e.Sink)
	e.Pause(t)
	var ids []string
	for i := range 10 {
		m := message(int64(i+1), fmt.Sprintf("k%d", i%3), i)
		tr.mustPublish(m)
		ids = append(ids, m.EventID)
	}
	// While the broker's answers are held back, nothing may be reported acknowledged.
	for range 10 {
		if _, acked := tr.settled(ids); acked > 0 {
			t.Fatalf("%d messages reported acknowledged while the broker's acknowledgements were held back", acked)
		}
		time.Sleep(100 * time.Millisecond)
	}
	e.Resume(t)
	tr.wait(ids)
	var acked []string
	for _, id := range ids {
		if err, _ := tr.err(id); err == nil {
			acked = append(acked, id)
		}
	}
	if len(acked) != len(ids) {
		t.Errorf("%d of %d messages acknowledged after the broker resumed, want all", len(acked), len(ids))
	}
	waitDelivered(t, e, acked)
}

func testAbort(t *testing.T, e *Env) {
	tr := newTracker(t, e.Sink)
	if e.Pause != nil {
		e.Pause(t)
	}
	var ids []string
	for i := range 10 {
		m := message(int64(i+1), "k", i)
		tr.mustPublish(m)
		ids = append(ids, m.EventID)
	}
	type outcome struct {
		err     error
		settled int
		acked   int
	}
	aborted := make(chan outcome, 1)
	go func() {
		ctx, cancel := context.WithTimeout(context.Background(), Timeout)
		defer cancel()
		err := e.Sink.Abort(ctx)
		n, acked := tr.settled(ids)
		aborted <- outcome{err, n, acked}
	}()
	var res outcome
	resumed := e.Pause == nil
	select {
	case res = <-aborted:
		if !resumed && res.acked > 0 {
			t.Errorf("Abort returned with %d messages acknowledged while the broker's acknowledgements were held back", res.acked)
		}
	case <-time.After(3 * time.Second):
		// Some sinks (Kafka) wait for the requests in flight to be answered before aborting.
		e.Resume(t)
		resumed = true
		res = <-aborted
	}
	if !resumed {
		e.Resume(t)
	}
	if res.err != nil {
		t.Errorf("Abort: %v", res.err)
	}
	if res.settled != len(ids) {
		t.Errorf("Abort returned with %d of %d messages settled, want all", res.settled, len(ids))
	}
	var acked []string
	for _, id := range ids {
		if err, _ := tr.err(id); err == nil {
			acked = append(acked, id)
		}
	}
	waitDelivered(t, e, acked)
	// The sink works after Abort.
	m := message(100, "k", 100)
	tr.mustPublish(m)
	tr.wait([]string{m.EventID})
	if err, _ := tr.err(m.EventID); err != nil {
		t.Errorf("publish after Abort failed: %v", err)
	}
	waitDelivered(t, e, []string{m.EventID})
	t.Logf("aborted %d, acknowledged %d of %d", len(ids)-len(acked), len(acked), len(ids))
}

// memStore is an in-memory relay.Store for the relay test: it keeps rows in id order and checks,
// at each Mark, that the sink confirmed every row marked.
type memStore struct {
	t      *testing.T
	mu     sync.Mutex
	rows   []relay.Message
	marked map[int64]bool
	check  func(ids []int64)
}

func (s *memStore) Open(context.Context) (relay.Session, error) { return memSession{s}, nil }

func (s *memStore) markedCount() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.marked)
}

type memSession struct{ s *memStore }

func (m memSession) TryLead(context.Context) (bool, error) { return true, nil }

func (m memSession) Claim(_ context.Context, from int64, skip []int64, limit, _ int, hold relay.Blocked) ([]relay.Message, error) {
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	var out []relay.Message
	for _, r := range m.s.rows {
		if head, held := hold[relay.BlockKey(r.AggregateType, r.AggregateID)]; held && head != r.ID {
			continue
		}
		if r.ID >= from && !slices.Contains(skip, r.ID) && !m.s.marked[r.ID] {
			out = append(out, r)
			if len(out) == limit {
				break
			}
		}
	}
	return out, nil
}

func (m memSession) Horizon(context.Context) (int64, error) { return 0, nil }

func (m memSession) Mark(_ context.Context, ids []int64) error {
	m.s.check(ids)
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	for _, id := range ids {
		m.s.marked[id] = true
	}
	return nil
}

func (m memSession) Retry(_ context.Context, id int64, reason string, _ time.Duration) error {
	m.s.t.Errorf("row %d failed: %s", id, reason)
	return nil
}

func (m memSession) Park(_ context.Context, id int64, reason string) error {
	m.s.t.Errorf("row %d parked: %s", id, reason)
	m.s.mu.Lock()
	defer m.s.mu.Unlock()
	m.s.marked[id] = true
	return nil
}

func (m memSession) Blocked(context.Context, bool) (relay.Blocked, error) {
	return relay.Blocked{}, nil
}

func (m memSession) Wait(ctx context.Context, timeout time.Duration) error {
	select {
	case <-ctx.Done():
	case <-time.After(timeout):
	}
	return nil
}

func (m memSession) Notified() bool { return false }

func (m memSession) Close(context.Context) error { return nil }

// ConfirmLog wraps a sink and records which rows it reported confirmed, so a test can check
// that a row is marked only after its confirmation.
type ConfirmLog struct {
	relay.Sink
	mu        sync.Mutex
	handed    int
	confirmed map[int64]bool
}

// NewConfirmLog returns a ConfirmLog over s.
func NewConfirmLog(s relay.Sink) *ConfirmLog {
	return &ConfirmLog{Sink: s, confirmed: map[int64]bool{}}
}

// Publish implements relay.Sink.
func (c *ConfirmLog) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	c.mu.Lock()
	c.handed++
	c.mu.Unlock()
	return c.Sink.Publish(ctx, m, func(err error) {
		if err == nil {
			c.mu.Lock()
			c.confirmed[m.ID] = true
			c.mu.Unlock()
		}
		done(err)
	})
}

// Unconfirmed returns those of ids the sink has not reported confirmed.
func (c *ConfirmLog) Unconfirmed(ids []int64) []int64 {
	c.mu.Lock()
	defer c.mu.Unlock()
	var out []int64
	for _, id := range ids {
		if !c.confirmed[id] {
			out = append(out, id)
		}
	}
	return out
}

// Handed returns how many messages were handed to the sink.
func (c *ConfirmLog) Handed() int {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.handed
}

// testRelayMarks runs the relay over the sink: while the broker's acknowledgements are held
// back nothing is marked; afterwards every row is marked, each only after the sink confirmed it,
// and every row is at the broker in order per key.
func testRelayMarks(t *testing.T, e *Env) {
	sink := NewConfirmLog(e.Sink)
	store := &memStore{t: t, marked: map[int64]bool{}}
	store.check = func(ids []int64) {
		for _, id := range sink.Unconfirmed(ids) {
			t.Errorf("row %d marked before the sink confirmed it", id)
		}
	}
	const keys, per = 3, 10
	var ids []string
	for seq := range per {
		for k := range keys {
			m := message(int64(len(store.rows)+1), fmt.Sprintf("rk-%d", k), seq)
			store.rows = append(store.rows, *m)
			ids = append(ids, m.EventID)
		}
	}
	relay, err := relay.New(relay.Config{PollInterval: 20 * time.Millisecond, BatchSize: 10, MaxInFlight: 100},
		store, sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	if e.Pause != nil {
		e.Pause(t)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- relay.Run(ctx) }()
	defer func() {
		cancel()
		if err := <-done; err != nil {
			t.Errorf("relay: %v", err)
		}
	}()
	if e.Pause != nil {
		deadline := time.Now().Add(Timeout)
		for {
			handed := sink.Handed()
			if handed >= len(ids) {
				break
			}
			if time.Now().After(deadline) {
				t.Fatalf("the relay handed %d of %d rows to the sink", handed, len(ids))
			}
			time.Sleep(20 * time.Millisecond)
		}
		for range 5 {
			if n := store.markedCount(); n > 0 {
				t.Fatalf("%d rows marked while the broker's acknowledgements were held back", n)
			}
			time.Sleep(100 * time.Millisecond)
		}
		e.Resume(t)
	}
	deadline := time.Now().Add(Timeout)
	for store.markedCount() < len(ids) {
		if time.Now().After(deadline) {
			t.Fatalf("%d of %d rows marked after %s", store.markedCount(), len(ids), Timeout)
		}
		time.Sleep(20 * time.Millisecond)
	}
	got := waitDelivered(t, e, ids)
	last := map[string]int{}
	for _, d := range got {
		var p struct {
			Key string
			Seq int
		}
		if err := json.Unmarshal(d.Payload, &p); err != nil || !strings.HasPrefix(p.Key, "rk-") {
			continue // another test's message in a shared destination, or not ours
		}
		prev, ok := last[p.Key]
		if ok && p.Seq <= prev {
			continue
		}
		if (ok && p.Seq != prev+1) || (!ok && p.Seq != 0) {
			t.Errorf("key %s: seq %d delivered after %d", p.Key, p.Seq, prev)
		}
		last[p.Key] = p.Seq
	}
}
