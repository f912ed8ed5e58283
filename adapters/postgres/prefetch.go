package postgres

import (
	"context"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// An idle relay polls once every two poll intervals: it reloads the blocked keys (Blocked), then
// claims from the oldest row (Claim), two statements a millisecond apart, each a round trip that
// wakes the session's backend. On a VM, waking the backend costs more than the statements do, and
// the two round trips were most of what an idle relay cost its database (BENCHMARKS.md, "A sidecar
// section in make bench").
//
// So, while the session is asleep and its last claim was such a poll that found nothing, Blocked
// sends the claim that poll makes in the same round trip, after its own statement: from the
// oldest row, nothing in flight, no key held, the last poll's bounds. The Claim that follows takes
// that claim's rows if it asks for exactly that claim, and asks the database otherwise. In either
// case the claim's snapshot is taken after the blocked keys were read, as when the two statements
// went one after the other. Nothing else uses the connection between Blocked and that Claim: the
// relay's loop runs them back to back on the session's one connection, and any other use of the
// session drops the prefetched claim (dropPrefetched).

// idlePoll is the last claim's bounds, when it was an idle poll that found nothing.
type idlePoll struct {
	ok              bool
	limit, maxBytes int
}

// prefetched is the claim Blocked sent with its own statement: its bounds, when it was sent and
// what it returned.
type prefetched struct {
	limit, maxBytes int
	sent            time.Time
	rows            []relay.Message
}

// noteIdleClaim records whether the claim that just ran (from, skip, limit, maxBytes, hold),
// which returned out or failed with err, was an idle poll that found nothing.
func (s *session) noteIdleClaim(from int64, skip []int64, limit, maxBytes int, hold relay.Blocked, out []relay.Message, err error) {
	s.idle = idlePoll{ok: err == nil && len(out) == 0 && from == 0 && len(skip) == 0 && len(hold) == 0,
		limit: limit, maxBytes: maxBytes}
}

// prefetchable reports whether Blocked sends the next claim with its own statement: the session
// sleeps (the writers notify it) and is not about to let its sleep lock go, its last claim was an
// idle poll that found nothing, and its claims are plain ones (not whole transactions, not
// streamed, not waiting for standbys).
func (s *session) prefetchable() bool {
	w := &s.wake
	return s.idle.ok && w.asleep && w.checked && !w.release && !s.store.txs && !s.cuts &&
		s.store.replMode == ReplicationOff
}

// blockedAndClaim reads the blocked keys' query q into out and, in the same round trip, runs the
// idle poll's claim, which it keeps for the next Claim.
func (s *session) blockedAndClaim(ctx context.Context, q string, withParked bool, out relay.Blocked) (relay.Blocked, error) {
	limit, maxBytes := s.idle.limit, s.idle.maxBytes
	s.txRest = nil
	s.dec.pool.budget(maxBytes)
	b := &pgx.Batch{}
	b.Queue(q)
	// The claim from the oldest row with nothing in flight: an empty run [1, 0] and no other id.
	b.Queue(s.store.q.claim, int64(1), int64(0), []int64(nil), limit, int64(0))
	sent := time.Now()
	br := s.conn.SendBatch(ctx, b)
	rows, err := br.Query()
	if err == nil {
		err = readBlocked(rows, withParked, out)
	}
	var claimed []relay.Message
	if err == nil {
		if rows, err = br.Query(); err == nil {
			claimed, err = s.readClaim(rows, limit, maxBytes)
		}
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	if err != nil {
		return nil, s.wrap(err)
	}
	s.pre = &prefetched{limit: limit, maxBytes: maxBytes, sent: sent, rows: claimed}
	return out, nil
}

// takePrefetched returns the claim Blocked sent, if it is the claim asked for now, and drops it
// either way.
func (s *session) takePrefetched(from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) *prefetched {
	p := s.pre
	s.pre = nil
	if p == nil || from != 0 || len(skip) != 0 || len(hold) != 0 || limit != p.limit || maxBytes != p.maxBytes {
		return nil
	}
	return p
}

// dropPrefetched drops the claim Blocked sent: the session is used for something else first, so
// a claim after it must see the database as it is then.
func (s *session) dropPrefetched() { s.pre = nil }
