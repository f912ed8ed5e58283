// Package hrtimer waits a short, exact time: the relay's linger between two claims.
//
// The Go runtime sleeps for its timers in the network poller, whose epoll_wait takes a timeout in
// whole milliseconds, rounded down, with at least one millisecond for a shorter wait. A timer of
// 2 ms set just before the process goes idle is 1.9x ms away when the poller sleeps, so the
// poller sleeps 1 ms, wakes with nothing to do, and sleeps 1 ms again: two sleeps and two
// wake-ups per linger, and the timer fires 0.1-0.5 ms late. A relay at 1,000 events/s lingers
// several hundred times a second, and on a virtual machine each wake-up is a costly context
// switch (BENCHMARKS.md, "The linger's wasted wake-up").
//
// On Linux a Timer is a timerfd (CLOCK_MONOTONIC, nanoseconds) registered with the same poller:
// the poller sleeps until the next runtime timer or the timerfd's expiry, whichever comes first,
// and wakes once, on time. Elsewhere, with OUTBOX_RAW_IO=off (internal/rawconn's kill switch,
// which turns off the relay's other system calls out of the scheduler's sight too), after
// Disable, or if the kernel refuses a timerfd, it is a time.Timer.
package hrtimer

import (
	"context"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/rawconn"
)

// off makes New return Go's timers: Disable.
var off atomic.Bool

// Disable makes New return timers built on Go's time.Timer from now on, whatever OUTBOX_RAW_IO
// says. Timers already made stay as they are.
func Disable() { off.Store(true) }

// Enabled reports whether New makes timers on a timerfd: on Linux, unless OUTBOX_RAW_IO=off
// (rawconn.Enabled) or Disable. (A kernel that refuses a timerfd still gets Go's timers from New.)
func Enabled() bool { return supported && !off.Load() && rawconn.Enabled() }

// Timer waits on one goroutine at a time: Sleep must not be called concurrently.
type Timer struct {
	sys *sysTimer // nil: Go's timers
	// fallback is used without a sysTimer (reused).
	fallback *time.Timer
}

// New returns a Timer. It never fails: without a timerfd it uses Go's timers.
func New() *Timer {
	t := &Timer{}
	if Enabled() {
		t.sys = newSysTimer()
	}
	return t
}

// Precise reports whether t waits on a timerfd rather than on Go's timers.
func (t *Timer) Precise() bool { return t.sys != nil }

// Sleep waits d, or until ctx ends: then it returns ctx's error. A d of zero or less returns at
// once (nil, unless ctx has ended).
func (t *Timer) Sleep(ctx context.Context, d time.Duration) error {
	if err := ctx.Err(); err != nil {
		return err
	}
	if d <= 0 {
		return nil
	}
	if t.sys != nil {
		if err := t.sys.sleep(ctx, d); err == nil || ctx.Err() != nil {
			return ctx.Err()
		}
		// The timerfd failed (it should not): Go's timers from now on.
		t.sys.close()
		t.sys = nil
	}
	if t.fallback == nil {
		t.fallback = time.NewTimer(d)
	} else {
		t.fallback.Reset(d)
	}
	select {
	case <-t.fallback.C:
		return nil
	case <-ctx.Done():
		t.fallback.Stop()
		return ctx.Err()
	}
}

// Close releases the timerfd. Sleep must not run, nor be called after.
func (t *Timer) Close() {
	if t.sys != nil {
		t.sys.close()
		t.sys = nil
	}
	if t.fallback != nil {
		t.fallback.Stop()
	}
}
