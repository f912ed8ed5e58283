package relay_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// fakeStore is an outbox in memory, written from the ports' documentation alone (ports.go):
// rows pending, failing (attempts recorded by Retry, due again after their delay) or parked, a
// horizon below the lowest row not yet committed, wake-ups on commit. Its sessions fail the test
// when the relay calls them in a way the Session port does not allow: two calls at once that
// the port does not let overlap (mayOverlap), a call after Close, a Mark or Retry of a row that
// is not pending, a claim of more than asked, a Release of a message twice.
//
// The engine's unit tests run on it, without a database; the same behaviours are checked
// against PostgreSQL by the integration tests (see CONTRIBUTING.md).
type fakeStore struct {
	t *testing.T

	mu     sync.Mutex
	nextID int64
	rows   map[int64]*fakeRow // pending rows, committed or not
	parked map[int64]*fakeRow
	marked []int64 // in the order they were marked
	// committed numbers the rows in the order their transactions committed; began holds, per
	// row, how many had committed when its transaction inserted it. A row committed before
	// another's transaction began must reach the broker first; two writers of one key whose
	// transactions overlap have no order between them (ids are taken at insert, and the later
	// id may commit first).
	committed, began map[int64]int
	leader           *fakeSession
	noHoriz          bool          // Horizon returns ErrNoHorizon
	wake             chan struct{} // closed and replaced at every commit
	// claimLatency is how long a claim takes, so the relay acts beside it as it would beside a
	// database's.
	claimLatency time.Duration
	// marksBeforeAck, when set, is asked about every row marked: the test's record of what the
	// broker acknowledged. A row marked that it does not know fails the test.
	acked func(id int64) bool

	active     map[string]int // calls running now, by method
	violations []string
}

// fakeRow is one outbox row of a fakeStore.
type fakeRow struct {
	msg       relay.Message
	committed bool
	due       time.Time
	reason    string // the last failure or the park's reason
}

func newFakeStore(t *testing.T) *fakeStore {
	s := &fakeStore{t: t, rows: map[int64]*fakeRow{}, parked: map[int64]*fakeRow{},
		committed: map[int64]int{}, began: map[int64]int{},
		wake: make(chan struct{}), active: map[string]int{}, claimLatency: 200 * time.Microsecond}
	t.Cleanup(func() {
		s.mu.Lock()
		defer s.mu.Unlock()
		if len(s.violations) > 0 {
			t.Errorf("the relay broke the Session port's rules:\n%s", joinLines(s.violations))
		}
	})
	return s
}

func joinLines(s []string) string {
	sort.Strings(s)
	out := ""
	for _, l := range slices.Compact(s) {
		out += l + "\n"
	}
	return out
}

// fakeTx is a row inserted by a transaction not yet committed: its id is taken, the row is not
// visible, and the horizon stays below it.
type fakeTx struct {
	s  *fakeStore
	id int64
}

// begin inserts a row of key in a transaction left open.
func (s *fakeStore) begin(key, eventType string) *fakeTx {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.nextID++
	s.rows[s.nextID] = &fakeRow{msg: relay.Message{ID: s.nextID, EventID: fmt.Sprintf("e-%d", s.nextID),
		AggregateType: "order", AggregateID: key, EventType: eventType, Payload: []byte(eventType),
		CreatedAt: time.Now(), OccurredAt: time.Now()}}
	s.began[s.nextID] = len(s.committed)
	return &fakeTx{s: s, id: s.nextID}
}

// commit makes the row visible and wakes the relay.
func (tx *fakeTx) commit() int64 {
	tx.s.mu.Lock()
	defer tx.s.mu.Unlock()
	tx.s.rows[tx.id].committed = true
	tx.s.committed[tx.id] = len(tx.s.committed) + 1
	close(tx.s.wake)
	tx.s.wake = make(chan struct{})
	return tx.id
}

// append commits one row per event type, of key, and returns their ids.
func (s *fakeStore) append(key string, eventTypes ...string) []int64 {
	var ids []int64
	for _, e := range eventTypes {
		ids = append(ids, s.begin(key, e).commit())
	}
	return ids
}

// committedBefore reports whether row x committed before the transaction of row y began: then
// x must reach the broker before y, if they share a key.
func (s *fakeStore) committedBefore(x, y int64) bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	rank, ok := s.committed[x]
	return ok && rank <= s.began[y]
}

// pending returns the number of rows neither marked nor parked.
func (s *fakeStore) pending() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return len(s.rows)
}

// parkedIDs returns the ids of the parked rows, in order.
func (s *fakeStore) parkedIDs() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	var ids []int64
	for id := range s.parked {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	return ids
}

// markedIDs returns the ids marked so far, in the order they were.
func (s *fakeStore) markedIDs() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Clone(s.marked)
}

// row returns a copy of pending or parked row id.
func (s *fakeStore) row(id int64) (fakeRow, bool) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if r, ok := s.rows[id]; ok {
		return *r, true
	}
	r, ok := s.parked[id]
	if ok {
		return *r, true
	}
	return fakeRow{}, false
}

// violate records a breach of the port's rules. s.mu is held.
func (s *fakeStore) violate(format string, args ...any) {
	s.violations = append(s.violations, fmt.Sprintf(format, args...))
}

func (s *fakeStore) Open(context.Context) (relay.Session, error) {
	return &fakeSession{s: s, released: map[*relay.Message]bool{}}, nil
}

// fakeSession is a session of a fakeStore. It is a Releaser.
type fakeSession struct {
	s        *fakeStore
	closed   bool
	notified bool
	seen     chan struct{} // the store's wake channel when the session last looked
	released map[*relay.Message]bool
}

// enter records a call of name, checks it against the calls running (mayOverlap) and returns
// its end. s.mu is not held.
func (f *fakeSession) enter(name string) func() {
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if f.closed {
		s.violate("%s after Close", name)
	}
	for other, n := range s.active {
		if n > 0 && !mayOverlap(name, other) {
			s.violate("%s beside %s", name, other)
		}
	}
	s.active[name]++
	return func() {
		s.mu.Lock()
		s.active[name]--
		s.mu.Unlock()
	}
}

func (f *fakeSession) TryLead(context.Context) (bool, error) {
	defer f.enter("TryLead")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.leader != nil && s.leader != f {
		return false, nil
	}
	s.leader = f
	f.seen = s.wake
	return true, nil
}

// lookForWakeUp notes a commit since the session last looked (Notified). s.mu is held.
func (f *fakeSession) lookForWakeUp() {
	if f.seen != f.s.wake {
		f.notified = true
		f.seen = f.s.wake
	}
}

func (f *fakeSession) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	defer f.enter("Claim")()
	time.Sleep(f.s.claimLatency)
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.lookForWakeUp()
	if limit < 1 || maxBytes < 1 {
		s.violate("Claim with limit %d, maxBytes %d", limit, maxBytes)
	}
	skipped := map[int64]bool{}
	for _, id := range skip {
		if skipped[id] {
			s.violate("Claim with id %d twice in skip", id)
		}
		skipped[id] = true
	}
	ids := make([]int64, 0, len(s.rows))
	for id := range s.rows {
		ids = append(ids, id)
	}
	slices.Sort(ids)
	now := time.Now()
	var out []relay.Message
	bytes := 0
	for _, id := range ids {
		r := s.rows[id]
		if id < from || !r.committed || r.due.After(now) || skipped[id] {
			continue
		}
		k := relay.BlockKey(r.msg.AggregateType, r.msg.AggregateID)
		if head, held := hold[k]; held && head != id {
			continue
		}
		if len(out) == limit || (len(out) > 0 && bytes+r.msg.Size() > maxBytes) {
			break
		}
		bytes += r.msg.Size()
		m := r.msg
		m.Payload = slices.Clone(m.Payload)
		out = append(out, m)
	}
	return out, nil
}

func (f *fakeSession) Horizon(context.Context) (int64, error) {
	defer f.enter("Horizon")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.lookForWakeUp()
	if s.noHoriz {
		return 0, fmt.Errorf("fake: %w", relay.ErrNoHorizon)
	}
	h := s.nextID
	for id, r := range s.rows {
		if !r.committed && id <= h {
			h = id - 1
		}
	}
	return h, nil
}

func (f *fakeSession) Mark(_ context.Context, ids []int64) error {
	defer f.enter("Mark")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, id := range ids {
		if _, ok := s.rows[id]; !ok {
			s.violate("Mark of row %d, which is not pending", id)
			continue
		}
		if s.acked != nil && !s.acked(id) {
			s.violate("Mark of row %d, which the broker did not acknowledge", id)
		}
		delete(s.rows, id)
		s.marked = append(s.marked, id)
	}
	return nil
}

func (f *fakeSession) Retry(_ context.Context, id int64, reason string, delay time.Duration) error {
	defer f.enter("Retry")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.lookForWakeUp()
	r, ok := s.rows[id]
	if !ok {
		s.violate("Retry of row %d, which is not pending", id)
		return nil
	}
	r.msg.Attempts++
	r.reason = reason
	r.due = time.Now().Add(delay)
	return nil
}

func (f *fakeSession) Park(_ context.Context, id int64, reason string) error {
	defer f.enter("Park")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.lookForWakeUp()
	r, ok := s.rows[id]
	if !ok {
		s.violate("Park of row %d, which is not pending", id)
		return nil
	}
	delete(s.rows, id)
	r.reason = reason
	s.parked[id] = r
	return nil
}

func (f *fakeSession) Blocked(_ context.Context, withParked bool) (relay.Blocked, error) {
	defer f.enter("Blocked")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.lookForWakeUp()
	out := relay.Blocked{}
	for id, r := range s.rows {
		k := relay.BlockKey(r.msg.AggregateType, r.msg.AggregateID)
		if r.msg.Attempts > 0 && r.committed {
			if head, ok := out[k]; !ok || id < head {
				out[k] = id
			}
		}
	}
	if withParked {
		for _, r := range s.parked {
			out[relay.BlockKey(r.msg.AggregateType, r.msg.AggregateID)] = 0
		}
	}
	return out, nil
}

func (f *fakeSession) Wait(ctx context.Context, timeout time.Duration) error {
	defer f.enter("Wait")()
	s := f.s
	s.mu.Lock()
	f.lookForWakeUp()
	wake, woken := s.wake, f.notified
	s.mu.Unlock()
	if woken {
		return nil
	}
	t := time.NewTimer(timeout)
	defer t.Stop()
	select {
	case <-wake:
		s.mu.Lock()
		f.lookForWakeUp()
		s.mu.Unlock()
		return nil
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

func (f *fakeSession) Notified() bool {
	defer f.enter("Notified")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	n := f.notified
	f.notified = false
	return n
}

// Release implements relay.Releaser: it checks each message is released once.
func (f *fakeSession) Release(msgs []*relay.Message) {
	defer f.enter("Release")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	for _, m := range msgs {
		if f.released[m] {
			s.violate("Release of row %d twice", m.ID)
		}
		f.released[m] = true
	}
}

func (f *fakeSession) Close(context.Context) error {
	defer f.enter("Close")()
	s := f.s
	s.mu.Lock()
	defer s.mu.Unlock()
	f.closed = true
	if s.leader == f {
		s.leader = nil
	}
	return nil
}

// errFake is a failure a test sink injects.
var errFake = errors.New("injected failure")
