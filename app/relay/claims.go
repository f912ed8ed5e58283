package relay

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// claimReq is a claim for the session's owner to run: rows from from, skipping skip (the ids in
// flight, owned by the claim until its result is back) and the rows of the keys in hold but
// their heads (see holdKeys), at most limit rows and about budget bytes. With readHorizon, the
// owner reads the session's horizon first, before the claim's snapshot, into horizon (as
// advance needs); a read-ahead claim gives the horizon known already instead.
type claimReq struct {
	from, horizon int64
	readHorizon   bool
	skip          []int64
	hold          Blocked
	limit, budget int
	// rest, when set, makes the claim the next page of a stream (TxStreamer.ClaimRest): the
	// fields above but limit and budget are unused.
	rest *TxRest
}

// claimed is the result of a claimReq: the rows, or why there are none (horizonErr when the
// horizon could not be read, and the claim did not run), and how long the claim took.
type claimed struct {
	claimReq
	rows       []Message
	err        error
	horizonErr error
	elapsed    time.Duration
	// next is what the claim left to claim (TxStreamer): nil when it returned whole transactions.
	next *TxRest
}

// parkReq is a park put off while a claim reads ahead.
type parkReq struct {
	m      *Message
	reason string
}

// startClaim starts a claim on the session's owner from the oldest pending row not accounted
// for. Once per poll interval it first reloads the blocked keys, and that claim reads from the
// oldest row (see reload). No claim runs and none waits in ahead when it is called. A running
// watch is ended first: if a wake-up made it claim (claimOnWake), that claim is the one started.
func (l *term) startClaim(ctx context.Context) error {
	if err := l.conn.unwatch(); err != nil {
		return err
	}
	if l.conn.claiming {
		return nil
	}
	now := time.Now()
	fromOldest := !l.gate.loaded() || now.Sub(l.blockedAt) >= l.cfg.PollInterval
	if fromOldest {
		if err := l.reload(ctx, now); err != nil {
			return err
		}
	}
	// Every claim reads from the oldest pending row it has not accounted for, past the rows in
	// flight, in one snapshot: a cursor carried from one claim to the next would pass over a row
	// whose transaction was still open, and the next row of its key, committed after it, would
	// go out first. from never passes the horizon, below which no transaction is open: the
	// owner reads it just before the claim.
	return l.conn.claim(ctx, l.nextClaim(fromOldest, time.Now()))
}

// nextClaim is the claim of the rows not accounted for, past the rows in flight, from the oldest
// pending row when fromOldest (startClaim), with the keys held at now left out. The loop claims
// only below the bounds; the first row always fits. A claim that reads no horizon
// (cursor.readsHorizon) advances under the one seen before.
func (l *term) nextClaim(fromOldest bool, now time.Time) claimReq {
	l.skip = l.appendInflight(l.skip[:0])
	limit, budget := l.cur.claimSize(len(l.inflight), l.bytes)
	return claimReq{from: l.cur.start(fromOldest, l.gate.lowestHead()), readHorizon: l.cur.readsHorizon(fromOldest),
		horizon: l.cur.horizonSeen, skip: l.skip, hold: l.gate.holdKeys(now), limit: max(limit, 1), budget: max(budget, 1)}
}

// claimOnWake returns the claim a watch runs when a wake-up comes before until (owner.watch):
// the claim startClaim would start then, unless it would first reload the blocked keys (until
// is when that falls due), or a stream is under way. It is called as a watch starts, when the
// loop may claim (no claim runs, nothing waits in ahead, the bounds leave room). Until the
// watch ended, the rows in flight only leave and the bounds only grow, so the claim asks for no
// more than startClaim would when the wake-up comes; it is taken as a claim that started when
// the watch did and ran while verdicts came, as the read-ahead claim does: a row that left the
// rows in flight meanwhile was marked, or failed (its key then waits behind it, and claims
// start at the lowest such head: cursor.start), and a key that starts waiting has its rows held
// back when they are handed to the sink (sendClaimed).
func (l *term) claimOnWake() (*claimReq, time.Time) {
	now := time.Now()
	until := l.blockedAt.Add(l.cfg.PollInterval)
	if !l.gate.loaded() || !now.Before(until) || l.stream != nil {
		return nil, time.Time{}
	}
	req := l.nextClaim(false, now)
	return &req, until
}

// claimEnded keeps the result of the claim that ended in ahead: the session is free again, and the
// parks put off meanwhile are done.
func (l *term) claimEnded(ctx context.Context, res claimed) error {
	l.conn.claimTaken()
	l.ahead = &res
	return l.parkPutOff(ctx)
}

// sendClaimed hands the rows of the claim in ahead to the sink and, when the claim stopped at its
// bound and the bounds leave room, starts the next one beside it. It reports whether more rows
// may be waiting right now.
func (l *term) sendClaimed(ctx context.Context) (bool, error) {
	a := l.ahead
	l.ahead = nil
	if a.horizonErr != nil {
		return l.noHorizon(a.horizonErr)
	}
	if a.err != nil {
		return false, fmt.Errorf("claim: %w", a.err)
	}
	if a.rest != nil { // a stream's page: driveStream claims the next
		l.obs.Claimed(len(a.rows), a.elapsed)
		l.lastPoll = time.Now()
		l.sendStreamPage(a)
		if !l.conn.claiming {
			if err := l.parkPutOff(ctx); err != nil {
				return false, err
			}
		}
		return false, nil
	}
	if a.readHorizon {
		l.cur.horizonSeen = a.horizon
	}
	rows, limit, budget := a.rows, a.limit, a.budget
	l.obs.Claimed(len(rows), a.elapsed)
	// Rows may be waiting if the claim stopped at its row or byte bound (more).
	size, more := l.cur.read(a.from, a.horizon, limit, budget, rows)
	now := time.Now()
	l.lastPoll = now
	// The rows that go to the sink: not in flight already, not waiting behind an earlier row, and
	// in exactly-once delivery only with their whole database transaction (wholeTxs). From here to
	// endBatch a transactional sink ends no transaction, so no failure of one reaches the gate.
	l.beginBatch()
	waits := l.wholeTxs(rows, now)
	// A claim that stopped inside its transactions (a.next): the rest streams if nothing it could
	// be behind waits; else its transactions wait, with every later row of their keys.
	var st *txStream
	if a.next != nil {
		l.streamWaiting = false
		switch {
		case l.mayStream(rows, a.next, waits, now):
			st = l.startStream(a.next, now)
			more = false // the stream's pages come next (driveStream)
		case l.streamWaiting: // nothing goes: the rows in flight commit first, then the stream starts
			waits = l.wholeTxs(rows, now, restTxs(a.next)...)
			for i := range rows {
				waits[txOf(&rows[i])] = true
			}
		default:
			l.log.Debug("a claim's rest waits", "rows_left", a.next.Rows, "held", a.next.Held, "waiting", len(waits), "retry_at", l.streamRetryAt)
			waits = l.wholeTxs(rows, now, restTxs(a.next)...)
		}
	}
	l.send, l.unused = l.send[:0], l.unused[:0]
	for i := range rows {
		m := &rows[i]
		if _, dup := l.inflight[m.ID]; !dup && !m.TxHeld && !waits[txOf(m)] && !l.mustWait(m, now) {
			l.send = append(l.send, m)
		} else {
			l.unused = append(l.unused, m)
		}
	}
	// A full batch: read the next one ahead while this one goes to the sink, if the bounds leave
	// room for both. It skips the rows in flight and those of this batch that go to the sink, as
	// a claim after it would; a row held back here must not be skipped, or a later row of its key
	// could be read without it. When the blocked keys are due to be reloaded, the loop starts the
	// next claim itself, after the reload.
	reloadDue := time.Since(l.blockedAt) >= l.cfg.PollInterval
	if len(waits) > 0 && len(l.send) == 0 {
		// Every row waits with its transaction: claiming again at once would read them again.
		// The next claim comes with a result, a wake-up or the poll.
		more = false
	}
	if more && !reloadDue {
		if nextLimit, nextBudget := l.cur.claimSize(len(l.inflight)+len(rows), l.bytes+size); nextLimit > 0 && nextBudget > 0 {
			l.skip = l.appendInflight(l.skip[:0])
			for _, m := range l.send {
				l.skip = append(l.skip, m.ID)
			}
			// The horizon known now was read before the read-ahead's snapshot, as advance needs.
			if err := l.conn.claim(ctx, claimReq{from: l.cur.start(false, l.gate.lowestHead()), horizon: l.cur.horizonSeen,
				skip: l.skip, hold: l.gate.holdKeys(now), limit: nextLimit, budget: nextBudget}); err != nil {
				return false, err
			}
		}
	}
	for _, m := range l.send {
		if l.mustWait(m, time.Now()) { // an earlier row of its key was refused or failed just now: the key waits
			if l.conn.claiming {
				l.cur.passedOver(m.ID) // the read-ahead passes over it: claims must come back to it
			}
			l.unused = append(l.unused, m)
			continue
		}
		if st != nil { // the rows of a hand-over that starts a stream are the stream's
			l.publishStreamed(st, m)
			continue
		}
		err := l.sink.Publish(l.pubCtx, m, func(err error) { l.verdict(m, err) })
		if err != nil {
			// Parked once the session is free; until then the key's later rows wait, as the
			// park would make them.
			l.toPark = append(l.toPark, parkReq{m: m, reason: err.Error()})
			if l.cfg.OrderPolicy == OrderPolicyWait {
				l.gate.holdParked(m)
			}
			continue
		}
		l.inflight[m.ID] = m
		l.bytes += m.Size()
	}
	l.endBatch()
	l.conn.release(l.unused) // read but not handed to the sink: held back, or in flight already
	if !l.conn.claiming {
		if err := l.parkPutOff(ctx); err != nil {
			return false, err
		}
	}
	return more, nil
}

// mustWait reports whether m must wait behind an earlier row of its key at now: keyGate.mustWait,
// or for a row of a database transaction txMustWait.
func (l *term) mustWait(m *Message, now time.Time) bool {
	if m.TxID != 0 {
		return l.txMustWait(m, now)
	}
	return l.gate.mustWait(m, now)
}

// reload reloads the blocked keys, once per poll interval rather than at every claim: a relay
// that is caught up claims at every wake-up, and two more queries per claim doubled its CPU per
// event at low rates. This term's own failures hold their keys in the gate meanwhile. The claim
// after a reload reads from the oldest row: a key it releases may have its parked row back in
// the outbox, below the cursor. No rows read before the reload wait to go to the sink
// (startClaim): they could hold the key's later rows without that one.
func (l *term) reload(ctx context.Context, now time.Time) error {
	l.blockedAt = now
	withParked := l.cfg.OrderPolicy == OrderPolicyWait
	var blocked Blocked
	err := l.conn.call(ctx, func(ctx context.Context, s Session) (err error) {
		blocked, err = s.Blocked(ctx, withParked)
		return err
	})
	if err != nil {
		return fmt.Errorf("load blocked keys: %w", err)
	}
	// Parked keys are known to the database: an operator may have retried or dropped the parked
	// row since, and the reload says whether the key still waits.
	l.gate.reload(blocked)
	return nil
}

// noHorizon takes the failure of the horizon read before a claim, which then did not run: a
// session that has none (ErrNoHorizon) makes every claim read from the oldest row from now on,
// starting with the next, at once; any other failure ends the term.
func (l *term) noHorizon(err error) (more bool, _ error) {
	if !errors.Is(err, ErrNoHorizon) {
		return false, fmt.Errorf("read the id horizon: %w", err)
	}
	l.cur.noHorizon = true
	l.log.Warn("every claim reads from the oldest pending row", "reason", err)
	return true, nil
}

// appendInflight appends the ids in flight to dst, for a claim to skip.
func (l *term) appendInflight(dst []int64) []int64 {
	for id := range l.inflight {
		dst = append(dst, id)
	}
	return dst
}

// parkPutOff parks the rows refused while a claim was reading ahead.
func (l *term) parkPutOff(ctx context.Context) error {
	for len(l.toPark) > 0 {
		p := l.toPark[0]
		l.toPark = l.toPark[1:]
		if err := l.park(ctx, p.m, p.reason); err != nil {
			return err
		}
	}
	return nil
}
