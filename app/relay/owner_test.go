package relay

import (
	"context"
	"sync"
	"testing"
	"time"
)

// wakeSession is a Session whose Wait returns when the test sends on wake (with Notified set)
// or when its context ends, and whose claims record where they started.
type wakeSession struct {
	wake chan struct{}

	mu       sync.Mutex
	notified bool
	claims   []int64 // the from of each Claim
}

func (s *wakeSession) TryLead(context.Context) (bool, error)  { return true, nil }
func (s *wakeSession) Horizon(context.Context) (int64, error) { return 0, nil }
func (s *wakeSession) Mark(context.Context, []int64) error    { return nil }
func (s *wakeSession) Retry(context.Context, int64, string, time.Duration) error {
	return nil
}
func (s *wakeSession) Park(context.Context, int64, string) error { return nil }
func (s *wakeSession) Blocked(context.Context, bool) (Blocked, error) {
	return nil, nil
}
func (s *wakeSession) Close(context.Context) error { return nil }

func (s *wakeSession) Claim(_ context.Context, from int64, _ []int64, _, _ int, _ Blocked) ([]Message, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.claims = append(s.claims, from)
	return []Message{{ID: from}}, nil
}

func (s *wakeSession) Wait(ctx context.Context, timeout time.Duration) error {
	select {
	case <-s.wake:
		s.mu.Lock()
		s.notified = true
		s.mu.Unlock()
	case <-ctx.Done():
	case <-time.After(timeout):
	}
	return nil
}

func (s *wakeSession) Notified() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	n := s.notified
	s.notified = false
	return n
}

func (s *wakeSession) claimed() []int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]int64(nil), s.claims...)
}

// TestOwnerWatchClaimsOnAWakeUp: a watch given a claim runs it on the wake-up, before the
// client hears of the wake-up, which the claim takes; a wake-up after the claim's deadline, or
// a watch cut short, leaves the claim to the client.
func TestOwnerWatchClaimsOnAWakeUp(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	sess := &wakeSession{wake: make(chan struct{})}
	o := newOwner(sess, nil, time.Minute)
	defer func() { _ = o.close(ctx) }()

	// Woken before the deadline: the watch claims, and the wake-up is taken.
	o.watch(ctx, time.Minute, &claimReq{from: 7, limit: 1, budget: 1}, ctx, time.Now().Add(time.Hour))
	sess.wake <- struct{}{}
	if err := o.watchEnded(<-o.watchResult()); err != nil {
		t.Fatal(err)
	}
	if !o.claiming {
		t.Fatal("the watch did not claim on the wake-up")
	}
	res := <-o.claimResult()
	o.claimTaken()
	if res.err != nil || len(res.rows) != 1 || res.rows[0].ID != 7 || res.from != 7 {
		t.Fatalf("claim result %+v, want the row at 7 of the request given", res)
	}
	if o.wokenUp() {
		t.Error("the wake-up the claim took is reported to the client as well: it would claim again")
	}

	// Woken after the deadline: no claim, the client hears of the wake-up.
	o.watch(ctx, time.Minute, &claimReq{from: 8, limit: 1, budget: 1}, ctx, time.Now().Add(-time.Second))
	sess.wake <- struct{}{}
	if err := o.watchEnded(<-o.watchResult()); err != nil {
		t.Fatal(err)
	}
	if o.claiming || !o.wokenUp() {
		t.Errorf("past the deadline: claiming %v, want the wake-up left to the client", o.claiming)
	}

	// Cut short before a wake-up: no claim.
	o.watch(ctx, time.Minute, &claimReq{from: 9, limit: 1, budget: 1}, ctx, time.Now().Add(time.Hour))
	if err := o.unwatch(); err != nil {
		t.Fatal(err)
	}
	if o.claiming {
		t.Error("a watch cut short claimed")
	}
	if got := sess.claimed(); len(got) != 1 || got[0] != 7 {
		t.Errorf("claims from %v, want only the woken watch's, from 7", got)
	}
}
