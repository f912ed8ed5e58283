package relay

import (
	"errors"
	"fmt"
	"maps"
	"testing"
	"time"
)

// row returns a message of the key ("" for a row without a valid key) of aggregate type order.
func row(id int64, key string) *Message {
	return &Message{ID: id, AggregateType: "order", AggregateID: key}
}

func testGate() *keyGate {
	return newKeyGate(func(n int) time.Duration { return time.Duration(n) * time.Second })
}

func TestKeyGateWhy(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	cases := []struct {
		name  string
		setup func(g *keyGate)
		m     *Message
		at    time.Time
		want  holdReason
	}{
		{name: "open gate", setup: func(*keyGate) {}, m: row(5, "a"), want: mayGo},
		{name: "the failing head itself", setup: func(g *keyGate) { g.holdBehind(row(5, "a")) }, m: row(5, "a"), want: mayGo},
		{name: "a later row behind a failing head", setup: func(g *keyGate) { g.holdBehind(row(5, "a")) }, m: row(6, "a"), want: behindOwnHead},
		{name: "an earlier row of a held key", setup: func(g *keyGate) { g.holdBehind(row(5, "a")) }, m: row(3, "a"), want: behindOwnHead},
		{name: "another key", setup: func(g *keyGate) { g.holdBehind(row(5, "a")) }, m: row(6, "b"), want: mayGo},
		{name: "another aggregate type", setup: func(g *keyGate) { g.holdBehind(row(5, "a")) },
			m: &Message{ID: 6, AggregateType: "user", AggregateID: "a"}, want: mayGo},
		{name: "behind a row parked in this term", setup: func(g *keyGate) { g.parked(row(5, "a"), true, t0) }, m: row(6, "a"), want: behindOwnParked},
		{name: "parked under the skip policy", setup: func(g *keyGate) { g.parked(row(5, "a"), false, t0) }, m: row(6, "a"), want: mayGo},
		{name: "behind a head the database holds", setup: func(g *keyGate) { g.reload(Blocked{BlockKey("order", "a"): 5}) }, m: row(6, "a"), want: behindStoredHead},
		{name: "the head the database holds", setup: func(g *keyGate) { g.reload(Blocked{BlockKey("order", "a"): 5}) }, m: row(5, "a"), want: mayGo},
		// The sink reported a later row's failure of a group before an earlier one's: the term
		// holds the key behind 5, the database behind 9. The lower goes first, the other waits.
		{name: "held behind different rows: the lower may go", setup: func(g *keyGate) {
			g.reload(Blocked{BlockKey("order", "a"): 9})
			g.holdBehind(row(5, "a"))
		}, m: row(5, "a"), want: mayGo},
		{name: "held behind different rows: the higher waits", setup: func(g *keyGate) {
			g.reload(Blocked{BlockKey("order", "a"): 9})
			g.holdBehind(row(5, "a"))
		}, m: row(9, "a"), want: behindOwnHead},
		{name: "held behind different rows, the database's lower", setup: func(g *keyGate) {
			g.reload(Blocked{BlockKey("order", "a"): 5})
			g.holdBehind(row(9, "a"))
		}, m: row(9, "a"), want: behindStoredHead},
		{name: "behind a parked row the database holds", setup: func(g *keyGate) { g.reload(Blocked{BlockKey("order", "a"): 0}) }, m: row(5, "a"), want: behindStoredHead},
		// A NULL or empty key keeps no order: each such row is parked on its own.
		{name: "a row without a key behind a parked one", setup: func(g *keyGate) {
			g.reload(Blocked{BlockKey("order", ""): 0})
			g.parked(row(4, ""), true, t0)
		}, m: row(5, ""), want: mayGo},
		{name: "waiting to be sent again", setup: func(g *keyGate) { g.resendAfter(row(5, "a"), time.Minute, t0) }, m: row(5, "a"), at: t0.Add(999 * time.Millisecond), want: resendBackoff},
		{name: "due to be sent again", setup: func(g *keyGate) { g.resendAfter(row(5, "a"), time.Minute, t0) }, m: row(5, "a"), at: t0.Add(time.Second), want: mayGo},
		{name: "behind a row waiting to be sent again", setup: func(g *keyGate) { g.resendAfter(row(5, "a"), time.Minute, t0) }, m: row(6, "a"), at: t0.Add(time.Hour), want: behindOwnHead},
		// The sink's callback holds the key the moment a row fails, before the loop settles it.
		{name: "a failure reported, not settled", setup: func(g *keyGate) { g.failed(row(5, "a")) }, m: row(6, "a"), want: failureUnsettled},
		{name: "a failure reported and settled", setup: func(g *keyGate) { g.failed(row(5, "a")); g.failureSettled(row(5, "a")) }, m: row(6, "a"), want: mayGo},
		{name: "a failure of another key reported", setup: func(g *keyGate) { g.failed(row(5, "b")) }, m: row(6, "a"), want: mayGo},
		{name: "acknowledged head releases its key", setup: func(g *keyGate) { g.holdBehind(row(5, "a")); g.acked(row(5, "a"), t0) }, m: row(6, "a"), want: mayGo},
		{name: "acknowledged head the database held", setup: func(g *keyGate) {
			g.reload(Blocked{BlockKey("order", "a"): 5})
			g.acked(row(5, "a"), t0)
		}, m: row(6, "a"), want: mayGo},
		// An operator retried the parked row: the reload no longer names its key (the row is due
		// again), or names it with the retried row as its failing head.
		{name: "parked, then retried by an operator", setup: func(g *keyGate) {
			g.parked(row(5, "a"), true, t0)
			g.reload(Blocked{})
		}, m: row(5, "a"), want: mayGo},
		{name: "parked, then retried and failing again", setup: func(g *keyGate) {
			g.parked(row(5, "a"), true, t0)
			g.reload(Blocked{BlockKey("order", "a"): 5})
		}, m: row(6, "a"), want: behindStoredHead},
		{name: "a failing head outlives the reload", setup: func(g *keyGate) {
			g.holdBehind(row(5, "a"))
			g.reload(Blocked{})
		}, m: row(6, "a"), want: behindOwnHead},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := testGate()
			tc.setup(g)
			at := tc.at
			if at.IsZero() {
				at = t0
			}
			if got := g.why(tc.m, at); got != tc.want {
				t.Fatalf("why(row %d) = %q, want %q", tc.m.ID, got, tc.want)
			}
			if g.mustWait(tc.m, at) != (tc.want != mayGo) {
				t.Fatalf("held disagrees with why")
			}
		})
	}
}

func TestKeyGateHoldKeys(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	a, b, c, none := BlockKey("order", "a"), BlockKey("order", "b"), BlockKey("order", "c"), BlockKey("order", "")
	cases := []struct {
		name  string
		setup func(g *keyGate)
		want  Blocked
	}{
		{name: "no key waits", setup: func(*keyGate) {}, want: nil},
		{name: "no key waits after a load", setup: func(g *keyGate) { g.reload(Blocked{}) }, want: nil},
		{name: "failing and parked keys with their heads", setup: func(g *keyGate) {
			g.holdBehind(row(5, "a"))
			g.parked(row(7, "b"), true, t0)
		}, want: Blocked{a: 5, b: 0}},
		{name: "the database's keys", setup: func(g *keyGate) { g.reload(Blocked{a: 5, b: 0}) }, want: Blocked{a: 5, b: 0}},
		{name: "rows without a key are never held", setup: func(g *keyGate) {
			g.reload(Blocked{none: 0, a: 3})
			g.own[none] = 0
		}, want: Blocked{a: 3}},
		{name: "a head waiting to be sent again is held with its key", setup: func(g *keyGate) {
			g.resendAfter(row(5, "a"), time.Minute, t0.Add(time.Hour))
		}, want: Blocked{a: 0}},
		{name: "a head due to be sent again may go", setup: func(g *keyGate) {
			g.resendAfter(row(5, "a"), time.Minute, t0.Add(-time.Hour))
		}, want: Blocked{a: 5}},
		{name: "held by both with the same head", setup: func(g *keyGate) {
			g.reload(Blocked{a: 5})
			g.holdBehind(row(5, "a"))
		}, want: Blocked{a: 5}},
		{name: "held by both with different heads: the lower goes first", setup: func(g *keyGate) {
			g.reload(Blocked{a: 5, c: 9})
			g.holdBehind(row(6, "a"))
		}, want: Blocked{a: 5, c: 9}},
		{name: "held by both, parked on one side", setup: func(g *keyGate) {
			g.reload(Blocked{a: 0})
			g.holdBehind(row(6, "a"))
		}, want: Blocked{a: 0}},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			g := testGate()
			tc.setup(g)
			got := g.holdKeys(t0)
			if !maps.Equal(got, tc.want) || (got == nil) != (tc.want == nil) {
				t.Fatalf("holdKeys = %v, want %v", got, tc.want)
			}
			if got != nil {
				// The claim's own copy: changing the gate after does not change it.
				g.holdBehind(row(99, "z"))
				if _, ok := got[BlockKey("order", "z")]; ok {
					t.Fatal("holdKeys shares its map with the gate")
				}
			}
		})
	}
}

func TestKeyGateLowestHead(t *testing.T) {
	g := testGate()
	if got := g.lowestHead(); got != 0 {
		t.Fatalf("lowestHead of an open gate = %d, want 0", got)
	}
	g.parked(row(2, "p"), true, time.Now()) // parked: no head that may go
	g.holdBehind(row(9, "a"))
	g.reload(Blocked{BlockKey("order", "b"): 7, BlockKey("order", "c"): 0})
	if got := g.lowestHead(); got != 7 {
		t.Fatalf("lowestHead = %d, want 7", got)
	}
}

func TestKeyGateReleases(t *testing.T) {
	t0 := time.Now()
	g := testGate()
	if g.acked(row(5, "a"), t0) {
		t.Fatal("an acknowledged row of an open gate released a key")
	}
	g.holdBehind(row(5, "a"))
	if g.acked(row(6, "a"), t0) {
		t.Fatal("a row that is not the head released its key")
	}
	if !g.acked(row(5, "a"), t0) {
		t.Fatal("the acknowledged head did not release its key")
	}
	g.holdBehind(row(8, "b"))
	if g.parked(row(8, "b"), true, t0) {
		t.Fatal("a head parked under the wait policy released its key")
	}
	g.holdBehind(row(9, "c"))
	if !g.parked(row(9, "c"), false, t0) {
		t.Fatal("a head parked under the skip policy did not release its key")
	}
	if g.loaded() {
		t.Fatal("loaded before a reload")
	}
	g.reload(nil)
	if g.loaded() {
		t.Fatal("loaded by a nil reload")
	}
}

func TestKeyGateBehindOwnFailure(t *testing.T) {
	g := testGate()
	g.holdBehind(row(5, "a"))
	for _, tc := range []struct {
		m    *Message
		want bool
	}{{row(6, "a"), true}, {row(5, "a"), false}, {row(4, "a"), false}, {row(6, "b"), false}} {
		if got := g.behindOwnFailure(tc.m); got != tc.want {
			t.Errorf("behindOwnFailure(row %d of %q) = %v, want %v", tc.m.ID, tc.m.AggregateID, got, tc.want)
		}
	}
}

func TestKeyGateCollateral(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	group := func(g string) error {
		return fmt.Errorf("batch failed: %w", &GroupError{Group: g, Err: errors.New("boom")})
	}
	g := testGate()
	if g.collateral(row(1, "a"), errors.New("plain"), t0, t0) {
		t.Fatal("a failure outside a group is collateral")
	}
	if g.collateral(row(1, "a"), group(""), t0, t0) {
		t.Fatal("a failure of an unnamed group is collateral")
	}
	// The first failure of the group is counted against its row.
	if g.collateral(row(1, "a"), group("p0"), t0, t0) {
		t.Fatal("the group's first failure is collateral")
	}
	// Another key's row of the group failed with it: not its fault, resent after half a backoff.
	if !g.collateral(row(2, "b"), group("p0"), t0, t0) {
		t.Fatal("another key's failure in a failing group is counted")
	}
	if got, want := g.resendTime(2), t0.Add(500*time.Millisecond); !got.Equal(want) {
		t.Fatalf("resend at %v, want %v", got, want)
	}
	if got := g.why(row(3, "b"), t0.Add(time.Hour)); got != behindOwnHead {
		t.Fatalf("a later row of the collateral key: %q, want %q", got, behindOwnHead)
	}
	if got := g.why(row(2, "b"), t0); got != resendBackoff {
		t.Fatalf("the collateral row: %q, want %q", got, resendBackoff)
	}
	// Again collateral: the backoff grows with the failures not counted.
	if !g.collateral(row(2, "b"), group("p0"), t0, t0) {
		t.Fatal("a second collateral failure is counted")
	}
	if got, want := g.resendTime(2), t0.Add(time.Second); !got.Equal(want) {
		t.Fatalf("second resend at %v, want %v", got, want)
	}
	// The same key failing again is its own fault.
	if g.collateral(row(4, "a"), group("p0"), t0, t0) {
		t.Fatal("the counted key's own failure is collateral")
	}
	// Once the counted row is resolved, a failure reported after is counted; one reported before
	// still belongs to it.
	g.resolved(4, t0.Add(time.Minute))
	if !g.collateral(row(5, "c"), group("p0"), t0.Add(30*time.Second), t0.Add(time.Minute)) {
		t.Fatal("a failure reported before the counted row resolved is counted")
	}
	if g.collateral(row(6, "c"), group("p0"), t0.Add(2*time.Minute), t0.Add(2*time.Minute)) {
		t.Fatal("a failure reported after the counted row resolved is collateral")
	}
	// Resolving a row forgets its resend.
	g.resolved(2, t0)
	if got := g.why(row(2, "b"), t0); got != mayGo {
		t.Fatalf("the resolved row: %q, want %q", got, mayGo)
	}
}

func TestKeyGateDestinationMissingCapsItsBackoff(t *testing.T) {
	t0 := time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)
	g := testGate()
	var at time.Time
	for range 20 {
		at = g.resendAfter(row(5, "a"), 10*time.Second, t0)
	}
	if want := t0.Add(10 * time.Second); !at.Equal(want) {
		t.Fatalf("resend at %v, want the cap %v", at, want)
	}
}
