// Package backoff holds the waits between attempts that the relay, the consumer and the sinks
// share: a wait that ends with its context, a jitter, and capped doubling. It imports only the
// standard library.
package backoff

import (
	"context"
	"math/rand/v2"
	"time"
)

// Sleep waits d or until ctx ends; it reports whether d passed.
func Sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// Jitter spreads d by ±20%, so that processes retrying the same thing do not retry in step.
func Jitter(d time.Duration) time.Duration {
	return d + time.Duration((rand.Float64()*0.4-0.2)*float64(d))
}

// Double returns the delay after d: twice d, at most limit.
func Double(d, limit time.Duration) time.Duration { return min(d*2, limit) }
