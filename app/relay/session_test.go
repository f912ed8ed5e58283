package relay_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"sort"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// mayOverlap reports whether the relay may call a and b of a Session at once, as the Session
// port documents it (and nothing more): Mark beside any but TryLead, Close and another Mark;
// TermContext beside any but Close; nothing else beside anything.
func mayOverlap(a, b string) bool {
	if a > b {
		a, b = b, a
	}
	switch pair := a + "+" + b; {
	case a == "Close" || b == "Close":
		return false
	case a == "TermContext" || b == "TermContext":
		return true
	case pair == "Mark+Mark" || pair == "Mark+TryLead":
		return false
	}
	return a == "Mark" || b == "Mark"
}

// contractStore opens sessions that record every overlap of two calls the Session port does not
// allow (mayOverlap): a fake written from the documentation alone would race there.
type contractStore struct {
	relay.Store
	mu         sync.Mutex
	active     map[string]int
	violations map[string]int
	overlaps   map[string]int // the overlaps the port allows that did happen
}

func (s *contractStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &contractSession{Session: sess, s: s}, nil
}

// enter records a call of name and returns its end.
func (s *contractStore) enter(name string) func() {
	s.mu.Lock()
	defer s.mu.Unlock()
	for other, n := range s.active {
		if n == 0 {
			continue
		}
		pair := name + " beside " + other
		if mayOverlap(name, other) {
			s.overlaps[pair]++
		} else {
			s.violations[pair]++
		}
	}
	s.active[name]++
	return func() {
		s.mu.Lock()
		s.active[name]--
		s.mu.Unlock()
	}
}

type contractSession struct {
	relay.Session
	s *contractStore
}

func (c *contractSession) TryLead(ctx context.Context) (bool, error) {
	defer c.s.enter("TryLead")()
	return c.Session.TryLead(ctx)
}

func (c *contractSession) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	defer c.s.enter("Claim")()
	time.Sleep(time.Millisecond) // a claim long enough for the loop to act beside it
	return c.Session.Claim(ctx, from, skip, limit, maxBytes, hold)
}

func (c *contractSession) Horizon(ctx context.Context) (int64, error) {
	defer c.s.enter("Horizon")()
	return c.Session.Horizon(ctx)
}

func (c *contractSession) Mark(ctx context.Context, ids []int64) error {
	defer c.s.enter("Mark")()
	return c.Session.Mark(ctx, ids)
}

func (c *contractSession) Retry(ctx context.Context, id int64, reason string, delay time.Duration) error {
	defer c.s.enter("Retry")()
	return c.Session.Retry(ctx, id, reason, delay)
}

func (c *contractSession) Park(ctx context.Context, id int64, reason string) error {
	defer c.s.enter("Park")()
	return c.Session.Park(ctx, id, reason)
}

func (c *contractSession) Blocked(ctx context.Context, withParked bool) (relay.Blocked, error) {
	defer c.s.enter("Blocked")()
	return c.Session.Blocked(ctx, withParked)
}

func (c *contractSession) Wait(ctx context.Context, timeout time.Duration) error {
	defer c.s.enter("Wait")()
	return c.Session.Wait(ctx, timeout)
}

func (c *contractSession) Notified() bool {
	defer c.s.enter("Notified")()
	return c.Session.Notified()
}

func (c *contractSession) Close(ctx context.Context) error {
	defer c.s.enter("Close")()
	return c.Session.Close(ctx)
}

// Release implements relay.Releaser when the session does.
func (c *contractSession) Release(msgs []*relay.Message) {
	defer c.s.enter("Release")()
	if r, ok := c.Session.(relay.Releaser); ok {
		r.Release(msgs)
	}
}

// TermContext implements relay.Fenced when the session does.
func (c *contractSession) TermContext() (context.Context, time.Duration) {
	defer c.s.enter("TermContext")()
	if f, ok := c.Session.(relay.Fenced); ok {
		return f.TermContext()
	}
	return nil, 0
}

// flakySink acknowledges each message a moment after Publish, from its own goroutine, but fails
// the first attempt of some: every seventh row with its whole group (GroupError), every eleventh
// alone. Unless unordered, the verdicts of one key come in the order its rows were published, as
// a Kafka partition's do. It keeps nothing of a message once done ran, so the relay releases the
// rows' memory.
type flakySink struct {
	// unordered gives each verdict after its own random delay, so one key's verdicts may come in
	// any order (rows of one key sent to two partitions, through topic overrides).
	unordered bool
	mu        sync.Mutex
	tried     map[int64]bool
	last      map[string]chan struct{} // per key, closed once the verdict of its last row was given
	wg        sync.WaitGroup
}

func (s *flakySink) Publish(_ context.Context, m *relay.Message, done func(error)) error {
	s.mu.Lock()
	var err error
	if !s.tried[m.ID] {
		switch {
		case m.ID%7 == 0:
			err = &relay.GroupError{Group: "t/0", Err: fmt.Errorf("row %d: NOT_ENOUGH_REPLICAS (injected)", m.ID)}
		case m.ID%11 == 0:
			err = fmt.Errorf("row %d: timed out (injected)", m.ID)
		}
	}
	s.tried[m.ID] = true
	prev, mine := s.last[m.AggregateID], make(chan struct{})
	s.last[m.AggregateID] = mine
	s.mu.Unlock()
	s.wg.Go(func() {
		defer close(mine)
		time.Sleep(time.Duration(rand.IntN(2000)) * time.Microsecond)
		if prev != nil && !s.unordered {
			<-prev
		}
		done(err)
	})
	return nil
}

func (s *flakySink) Abort(context.Context) error {
	s.wg.Wait()
	return nil
}

func (s *flakySink) ReleasesMessages() bool { return true }

// TestRelayKeepsToTheSessionConcurrencyContract: the relay, draining rows that commit while it
// runs, through read-ahead claims, wake-ups, failures, retries and marks, never calls two methods
// of its Session at once unless the Session port says they may overlap.
func TestRelayKeepsToTheSessionConcurrencyContract(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	store := &contractStore{Store: dbtest.Store(t, table), active: map[string]int{},
		violations: map[string]int{}, overlaps: map[string]int{}}
	sink := &flakySink{tried: map[int64]bool{}, last: map[string]chan struct{}{}}
	cfg := relay.Config{BatchSize: 20, MaxInFlight: 60, PollInterval: 50 * time.Millisecond,
		RetryBackoffMin: time.Millisecond, RetryBackoffMax: 20 * time.Millisecond}
	const rows = 400
	var wg sync.WaitGroup
	for wr := range 4 {
		wg.Go(func() {
			for i := range rows / 4 {
				m := postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("k%d", (wr*7+i)%9),
					EventType: "e", Payload: []byte("x")}
				if err := w.Append(ctx, pool, m); err != nil && !errors.Is(err, context.Canceled) {
					t.Error(err)
					return
				}
			}
		})
	}
	startRelay(t, ctx, cfg, store, sink)
	wg.Wait()
	waitDrained(t, ctx, pool, table, "the writers ended")

	store.mu.Lock()
	defer store.mu.Unlock()
	var bad []string
	for pair, n := range store.violations {
		bad = append(bad, fmt.Sprintf("%s (%d times)", pair, n))
	}
	sort.Strings(bad)
	if len(bad) > 0 {
		t.Errorf("calls overlapped that the Session port does not allow:\n%s", strings.Join(bad, "\n"))
	}
	t.Logf("overlaps the port allows, seen: %v", store.overlaps)
}

// TestRelayDrainsWithVerdictsOutOfKeyOrder: a sink that reports one key's verdicts in any order,
// failing some rows alone and some with their group, still has every row published. The term
// held a key behind an earlier row while the database held it behind a later failed one, and no
// row of the key passed both: the key stalled for good (keyGate.head now lets the lower go).
func TestRelayDrainsWithVerdictsOutOfKeyOrder(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	sink := &flakySink{unordered: true, tried: map[int64]bool{}, last: map[string]chan struct{}{}}
	cfg := relay.Config{BatchSize: 20, MaxInFlight: 60, PollInterval: 50 * time.Millisecond,
		RetryBackoffMin: time.Millisecond, RetryBackoffMax: 20 * time.Millisecond}
	for i := range 400 {
		m := postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("k%d", i%9), EventType: "e", Payload: []byte("x")}
		if err := w.Append(ctx, pool, m); err != nil {
			t.Fatal(err)
		}
	}
	startRelay(t, ctx, cfg, dbtest.Store(t, table), sink)
	waitDrained(t, ctx, pool, table, "verdicts out of key order")
}
