package postgres

import (
	"context"
	"fmt"
	"sync"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// LeaderLeaseDefault is the default of StoreConfig.LeaderLease.
const LeaderLeaseDefault = 4 * time.Second

// errLeaseExpired is the error of a term's context once its lease ran out.
var errLeaseExpired = fmt.Errorf("%w: not confirmed within relay.leader_lease", relay.ErrNotLeader)

// lease is the context of one leadership term, as the relay hands records to the sink with it:
// done as soon as the leadership was last confirmed more than the lease ago, or the term ended.
//
// A leader whose process was frozen (SIGSTOP, a paused VM, a long GC) cannot learn that its
// session was ended and another replica leads before its buffered records go out: on waking, the
// producer's goroutine may send them before any of the relay's own code runs. So the check is
// made where the record is sent, by the producer itself (franz-go fails an unsent batch whose
// record context is done), and Done works out expiry from the clock at the moment it is asked,
// instead of waiting for a timer goroutine that a frozen process did not run. Every confirmation
// counts from when its query was sent, so a reply read after a freeze extends nothing.
type lease struct {
	base  time.Time    // monotonic origin of until
	until atomic.Int64 // confirmed until base+until (nanoseconds)
	ended atomic.Bool
	once  sync.Once
	done  chan struct{}
}

var _ context.Context = (*lease)(nil)

func newLease() *lease { return &lease{base: time.Now(), done: make(chan struct{})} }

// confirm extends the lease to sent+d, sent being when the confirming query was sent.
func (l *lease) confirm(sent time.Time, d time.Duration) {
	next := int64(sent.Sub(l.base) + d)
	for {
		cur := l.until.Load()
		if next <= cur || l.until.CompareAndSwap(cur, next) {
			return
		}
	}
}

// end ends the term: the context is done from now on.
func (l *lease) end() {
	l.ended.Store(true)
	l.Done()
}

// confirmedSince reports whether a confirmation sent at or after t extended the lease.
func (l *lease) confirmedSince(t time.Time, d time.Duration) bool {
	return time.Duration(l.until.Load()) >= t.Sub(l.base)+d
}

func (l *lease) expired() bool {
	return l.ended.Load() || time.Since(l.base) > time.Duration(l.until.Load())
}

// Deadline implements context.Context: the lease moves, so it reports none.
func (l *lease) Deadline() (time.Time, bool) { return time.Time{}, false }

// Done implements context.Context. The channel is closed by the call that finds the lease
// expired; the session's heartbeat calls it on every tick, so waiters on an expired lease are
// woken within a tick even if nothing else asks.
func (l *lease) Done() <-chan struct{} {
	if l.expired() {
		l.once.Do(func() { close(l.done) })
	}
	return l.done
}

// Err implements context.Context.
func (l *lease) Err() error {
	select {
	case <-l.Done():
		return errLeaseExpired
	default:
		return nil
	}
}

// Value implements context.Context: a term carries no values.
func (l *lease) Value(any) any { return nil }
