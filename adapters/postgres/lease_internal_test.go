package postgres

import (
	"testing"
	"time"
)

// TestLeaseConfirmedSince: the heartbeat skips its check only when a confirmation sent at or
// after the tick's start extended the lease; an older one does not count, and the lease still
// runs out from the latest confirmation.
func TestLeaseConfirmedSince(t *testing.T) {
	const d = 4 * time.Second
	l := newLease()
	sent := l.base.Add(10 * time.Second)
	l.confirm(sent, d)
	if !l.confirmedSince(sent, d) {
		t.Fatal("a confirmation sent at t does not count as confirmed since t")
	}
	if !l.confirmedSince(sent.Add(-time.Second), d) {
		t.Fatal("a confirmation sent after t-1s does not count as confirmed since t-1s")
	}
	if l.confirmedSince(sent.Add(time.Millisecond), d) {
		t.Fatal("a confirmation sent before t counts as confirmed since t")
	}
	l.confirm(sent.Add(-time.Second), d) // an older confirmation answered late extends nothing
	if l.confirmedSince(sent.Add(time.Millisecond), d) {
		t.Fatal("an older confirmation moved the lease")
	}
}
