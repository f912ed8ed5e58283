package relay

import (
	"errors"
	"sync"
	"sync/atomic"
	"time"
)

// keyGate answers, for one leadership term, "may this row go to the sink now, and if not why"
// (why), and which keys a claim leaves out (holdKeys). It is the one owner of everything that
// holds a key back: the keys this term's failures hold, the keys the database holds, the rows
// waiting in memory to be sent again, the groups that fail together and the failures reported
// but not yet settled. Its rules are tested without a database (relay_gate_test.go).
//
// The term's loop owns it, but for failed, which the sink's callbacks call from their own
// goroutines (failing is guarded by failMu).
type keyGate struct {
	// own holds the keys blocked by this term's own failures until their head is acknowledged,
	// with that head (0: the head was parked, and no row of the key may go).
	own Blocked
	// stored is the keys the database says wait (Session.Blocked), reloaded once per poll
	// interval; nil until the first load.
	stored Blocked
	// groups holds, per group of messages that fail together (GroupError), the failure counted
	// against a row; resend holds rows whose failure was not counted, until they may go again.
	groups map[string]groupFailure
	resend map[int64]resendAt
	// backoff is the delay before attempt number n+1 of a failing row (Config.backoff).
	backoff func(n int) time.Duration
	// failing counts, per order key, the failures the sink reported that settle has not yet
	// begun to settle. The sink's callback adds to it before the result reaches the loop, so a later row
	// of a key whose row just failed is held back at once, not only after the loop reads the
	// failure: in between, the broker would take the later row first. failingN is the total,
	// read without the lock on the path of every row.
	failMu   sync.Mutex
	failing  map[string]int
	failingN atomic.Int64
}

// newKeyGate returns an open gate: no key waits.
func newKeyGate(backoff func(int) time.Duration) *keyGate {
	return &keyGate{
		own:     make(Blocked),
		groups:  make(map[string]groupFailure),
		resend:  make(map[int64]resendAt),
		failing: make(map[string]int),
		backoff: backoff,
	}
}

// quiet reports whether no key waits: no failure of this term unsettled, held or resending,
// no group failing, and no key blocked in the database at the last reload (none loaded yet
// counts as not quiet).
func (g *keyGate) quiet() bool {
	return g.stored != nil && len(g.stored) == 0 && len(g.own) == 0 && len(g.groups) == 0 &&
		len(g.resend) == 0 && g.failingN.Load() == 0
}

// holdReason says why a row may not go to the sink now; mayGo when it may.
type holdReason int

const (
	mayGo            holdReason = iota
	behindOwnHead               // an earlier row of its key failed in this term and was not acknowledged
	behindOwnParked             // a row of its key was parked in this term (order policy wait)
	behindStoredHead            // the database holds its key: a failing or parked row comes first
	resendBackoff               // its failure was not counted (collateral, destination missing): it waits its backoff
	failureUnsettled            // a failure of its key was reported by the sink and not settled yet
)

// String names the reason, for logs and test failures.
func (r holdReason) String() string {
	switch r {
	case mayGo:
		return "may go"
	case behindOwnHead:
		return "behind a failing head"
	case behindOwnParked:
		return "behind a parked row"
	case behindStoredHead:
		return "behind a row the database holds"
	case resendBackoff:
		return "waiting to be sent again"
	case failureUnsettled:
		return "a failure of its key is not settled"
	}
	return "unknown"
}

// why reports whether m must wait behind an earlier row of its key, and why, at now.
func (g *keyGate) why(m *Message, now time.Time) holdReason {
	// The order key is built only when some key waits; a row without a valid key waits for none.
	if (len(g.own) > 0 || len(g.stored) > 0) && m.keyed() {
		k := m.orderKey()
		if head, ok := g.head(k); ok && head != m.ID {
			own, held := g.own[k]
			switch {
			case held && own == 0:
				return behindOwnParked
			case held && own == head:
				return behindOwnHead
			}
			return behindStoredHead
		}
	}
	if r, ok := g.resend[m.ID]; ok && now.Before(r.at) {
		return resendBackoff
	}
	if g.unsettled(m) {
		return failureUnsettled
	}
	return mayGo
}

// head returns the row of key k that may go while the key waits (0: none, it is parked), and
// whether the key waits. When the term and the database hold the key behind different rows, the
// lower one is its head: both are pending rows of the key, and the lower must go first. (They
// differ when the sink reports a later row's failure of a group before an earlier one's, as rows
// of one key sent to two partitions can: holding the key behind both stalled it for good.)
func (g *keyGate) head(k string) (int64, bool) {
	own, inOwn := g.own[k]
	stored, inStored := g.stored[k]
	switch {
	case inOwn && inStored:
		if own == 0 || stored == 0 {
			return 0, true
		}
		return min(own, stored), true
	case inOwn:
		return own, true
	case inStored:
		return stored, true
	}
	return 0, false
}

// holding reports whether some key waits (the term's own or the database's).
func (g *keyGate) holding() bool { return len(g.own) > 0 || len(g.stored) > 0 }

// mustWait reports whether m must wait at now (why is not mayGo).
func (g *keyGate) mustWait(m *Message, now time.Time) bool { return g.why(m, now) != mayGo }

// holdKeys returns the keys whose rows a claim leaves out, with the head of each that may still
// go (see why): a claim that returned them would only hand them back. Without it, more rows of
// waiting keys at the front of the outbox than a batch filled every claim, and no other key got
// through. A head waiting in memory to be sent again is held with its key until it is due. The
// map is the claim's own: the claim reads it while the loop changes the gate. Nil when no key
// waits.
func (g *keyGate) holdKeys(now time.Time) Blocked {
	if len(g.own) == 0 && len(g.stored) == 0 {
		return nil
	}
	hold := make(Blocked, len(g.own)+len(g.stored))
	for k, head := range g.stored {
		// A row without a valid key (NULL or empty aggregate_id) waits for none: a parked one
		// must not keep the claims from the next, which is to be parked on its own.
		if _, id := SplitBlockKey(k); id != "" {
			hold[k] = head
		}
	}
	for k, head := range g.own {
		if _, id := SplitBlockKey(k); id == "" {
			continue
		}
		if r, ok := g.resend[head]; ok && now.Before(r.at) {
			head = 0
		}
		if h, ok := hold[k]; ok && h != head {
			if h == 0 || head == 0 {
				head = 0 // parked on either side, or its head waits to be sent again
			} else {
				head = min(h, head) // held by both with different heads: the lower goes first (head)
			}
		}
		hold[k] = head
	}
	return hold
}

// lowestHead returns the lowest id of a failing head that may still go (0 for none): claims
// start no later than it (cursor.start).
func (g *keyGate) lowestHead() int64 {
	var low int64
	for _, b := range [2]Blocked{g.own, g.stored} {
		for _, head := range b {
			if head > 0 && (low == 0 || head < low) {
				low = head
			}
		}
	}
	return low
}

// loaded reports whether the database's blocked keys were loaded once.
func (g *keyGate) loaded() bool { return g.stored != nil }

// reload replaces the keys the database holds with stored. Keys this term parked are dropped
// from its own: the database knows them, and an operator may have retried or dropped the parked
// row since; stored says whether the key still waits.
func (g *keyGate) reload(stored Blocked) {
	g.stored = stored
	for k, head := range g.own {
		if head == 0 {
			delete(g.own, k)
		}
	}
}

// failed notes a failure the sink reported for m, before the loop settles it. Safe for
// concurrent use.
func (g *keyGate) failed(m *Message) {
	g.failMu.Lock()
	g.failing[m.orderKey()]++
	g.failMu.Unlock()
	g.failingN.Add(1)
}

// failureSettled removes one failure of m's key from the failures not settled: the loop settles
// it now.
func (g *keyGate) failureSettled(m *Message) {
	k := m.orderKey()
	g.failMu.Lock()
	if g.failing[k]--; g.failing[k] <= 0 {
		delete(g.failing, k)
	}
	g.failMu.Unlock()
	g.failingN.Add(-1)
}

// unsettled reports whether a failure of m's key was reported and not yet settled.
func (g *keyGate) unsettled(m *Message) bool {
	if g.failingN.Load() == 0 {
		return false
	}
	g.failMu.Lock()
	defer g.failMu.Unlock()
	return g.failing[m.orderKey()] > 0
}

// acked records that the broker acknowledged m at now. It reports whether m was the head of a
// waiting key, which it releases: the claims must then come back to m (cursor.rewind).
func (g *keyGate) acked(m *Message, now time.Time) (released bool) {
	g.resolved(m.ID, now)
	if len(g.own) == 0 && len(g.stored) == 0 { // the order key is built only when some key waits
		return false
	}
	k := m.orderKey()
	if h, ok := g.own[k]; ok && h == m.ID {
		delete(g.own, k)
		released = true
	}
	if h, ok := g.stored[k]; ok && h == m.ID {
		delete(g.stored, k)
		released = true
	}
	return released
}

// behindOwnFailure reports whether a row of m's key before m failed in this term and still
// holds the key: m's own failure then only means it waits behind that row.
func (g *keyGate) behindOwnFailure(m *Message) bool {
	head, ok := g.own[m.orderKey()]
	return ok && head < m.ID
}

// holdBehind makes m's key wait behind m: its later rows are held until m is acknowledged.
func (g *keyGate) holdBehind(m *Message) { g.own[m.orderKey()] = m.ID }

// holdParked makes m's key wait behind m, which is parked or about to be: no row of the key may
// go until the database says otherwise (reload). A row without a valid key holds none.
func (g *keyGate) holdParked(m *Message) {
	if m.keyed() {
		g.own[m.orderKey()] = 0
	}
}

// parked records that m was parked at now, under the order policy wait (keys wait behind parked
// rows) or not. It reports whether m was the head of a key it releases: the claims must then
// come back to m (cursor.rewind).
func (g *keyGate) parked(m *Message, wait bool, now time.Time) (released bool) {
	g.resolved(m.ID, now)
	if wait && m.keyed() { // without a valid key, no order to keep
		g.holdParked(m)
		return false
	}
	k := m.orderKey()
	if h, ok := g.own[k]; ok && h == m.ID {
		delete(g.own, k)
		return true
	}
	return false
}

// resendAfter holds m and its key, without an attempt counted against m, until m may be sent
// again after a backoff of attempt n (the failures not counted so far) capped at maxDelay; it
// returns when that is.
func (g *keyGate) resendAfter(m *Message, maxDelay time.Duration, now time.Time) time.Time {
	r := g.resend[m.ID]
	r.n++
	r.at = now.Add(min(g.backoff(r.n), maxDelay))
	g.resend[m.ID] = r
	g.holdBehind(m)
	return r.at
}

// resendTime returns when row id may be sent again, if it waits in memory.
func (g *keyGate) resendTime(id int64) time.Time { return g.resend[id].at }

// collateral reports whether m's failure belongs to another row: the sink failed m's whole group
// (for Kafka, every buffered record of a partition fails when one batch fails fatally) while a
// failure counted against a row of another key of the group was not resolved yet (neither
// acknowledged nor parked when m's failure was reported, at failedAt). No attempt is then
// recorded against m: it waits half a backoff in memory and is sent again, its key held behind
// it. Otherwise m's failure is counted and m becomes the group's counted row.
func (g *keyGate) collateral(m *Message, err error, failedAt, now time.Time) bool {
	var ge *GroupError
	if !errors.As(err, &ge) || ge.Group == "" {
		return false
	}
	k := m.orderKey()
	if f, ok := g.groups[ge.Group]; ok && f.key != k && (f.resolved.IsZero() || failedAt.Before(f.resolved)) {
		r := g.resend[m.ID]
		r.n++
		r.at = now.Add(g.backoff(r.n) / 2)
		g.resend[m.ID] = r
		g.holdBehind(m)
		return true
	}
	g.groups[ge.Group] = groupFailure{id: m.ID, key: k}
	return false
}

// resolved records that row id no longer fails at now: acknowledged or parked.
func (g *keyGate) resolved(id int64, now time.Time) {
	delete(g.resend, id)
	for grp, f := range g.groups {
		if f.id == id && f.resolved.IsZero() {
			f.resolved = now
			g.groups[grp] = f
		}
	}
}

// groupFailure is the failure counted against one row of a group of messages that fail together.
type groupFailure struct {
	id       int64     // the row the attempt was counted against
	key      string    // its order key
	resolved time.Time // when that row was acknowledged or parked; zero while it is failing
}

// resendAt holds back a row whose failure was not counted against it.
type resendAt struct {
	at time.Time
	n  int // failures not counted so far, for the backoff
}
