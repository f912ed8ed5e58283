package relay

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// claimReq is a claim for claimLoop to run: rows from from, skipping skip (the ids in flight,
// owned by the claim until its result is back) and the rows of the keys in hold but their heads
// (see holdKeys), at most limit rows and about budget bytes. horizon is the session's horizon
// read before the claim's snapshot, for advance.
type claimReq struct {
	from, horizon int64
	skip          []int64
	hold          Blocked
	limit, budget int
}

// claimed is the result of a claimReq.
type claimed struct {
	claimReq
	rows []Message
	err  error
	took time.Duration
}

// parkReq is a park put off while a claim reads ahead.
type parkReq struct {
	m      *Message
	reason string
}

// startClaim starts a claim in claimLoop from the oldest pending row not accounted for. Once per
// poll interval it first reloads the blocked keys, and that claim reads from the oldest row (see
// reload). No claim runs and none waits in ahead when it is called.
func (l *term) startClaim(ctx context.Context) error {
	if err := l.unlisten(); err != nil {
		return err
	}
	now := time.Now()
	full := !l.gate.loaded() || now.Sub(l.blockedAt) >= l.cfg.PollInterval
	if full {
		if err := l.reload(ctx, now); err != nil {
			return err
		}
	}
	// Every claim reads from the oldest pending row it has not accounted for, past the rows in
	// flight, in one snapshot: a cursor carried from one claim to the next would pass over a row
	// whose transaction was still open, and the next row of its key, committed after it, would
	// go out first. from never passes the horizon, below which no transaction is open.
	horizon, err := l.horizon(ctx)
	if err != nil {
		return err
	}
	l.skip = l.appendInflight(l.skip[:0])
	limit, budget := l.cur.claimSize(len(l.inflight), l.bytes)
	// The loop claims only below the bounds; the first row always fits.
	l.launch(claimReq{from: l.cur.start(full, l.gate.lowestHead()), horizon: horizon, skip: l.skip, hold: l.gate.holdKeys(time.Now()),
		limit: max(limit, 1), budget: max(budget, 1)})
	return nil
}

// launch hands req to claimLoop.
func (l *term) launch(req claimReq) {
	l.claiming = true
	l.claimReq <- req
}

// claimLoop runs the claims sent on claimReq until it is closed, one at a time, and between them
// the watches for wake-ups sent on listenReq.
func (l *term) claimLoop(ctx context.Context) {
	for {
		select {
		case req, ok := <-l.claimReq:
			if !ok {
				return
			}
			start := time.Now()
			rows, err := l.sess.Claim(ctx, req.from, req.skip, req.limit, req.budget, req.hold)
			l.claimDone <- claimed{claimReq: req, rows: rows, err: err, took: time.Since(start)} // buffered: one claim at a time
		case lctx := <-l.listenReq:
			err := l.sess.Wait(lctx, l.cfg.PollInterval)
			if lctx.Err() != nil {
				err = nil // cut short by the loop (unlisten) or by the relay's stop: not a failure
			}
			l.listenDone <- err // buffered: one watch at a time
		}
	}
}

// claimEnded keeps the result of the claim that ended in ahead: the session is free again, and the
// parks put off meanwhile are done.
func (l *term) claimEnded(ctx context.Context, res claimed) error {
	l.claiming = false
	l.ahead = &res
	return l.parkPutOff(ctx)
}

// claim hands the rows of the claim in ahead to the sink and, when the claim stopped at its bound
// and the bounds leave room, starts the next one beside it. It reports whether more rows may be
// waiting right now.
func (l *term) claim(ctx context.Context) (bool, error) {
	a := l.ahead
	l.ahead = nil
	if a.err != nil {
		return false, fmt.Errorf("claim: %w", a.err)
	}
	rows, limit, budget := a.rows, a.limit, a.budget
	l.obs.Claimed(len(rows), a.took)
	// Rows may be waiting if the claim stopped at its row or byte bound (more).
	size, more := l.cur.read(a.from, a.horizon, limit, budget, rows)
	now := time.Now()
	l.lastPoll = now
	// The rows that go to the sink: not in flight already, not waiting behind an earlier row.
	l.send, l.unused = l.send[:0], l.unused[:0]
	for i := range rows {
		m := &rows[i]
		if _, dup := l.inflight[m.ID]; !dup && !l.gate.held(m, now) {
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
	if more && !reloadDue {
		if nextLimit, nextBudget := l.cur.claimSize(len(l.inflight)+len(rows), l.bytes+size); nextLimit > 0 && nextBudget > 0 {
			l.skip = l.appendInflight(l.skip[:0])
			for _, m := range l.send {
				l.skip = append(l.skip, m.ID)
			}
			// The horizon known now was read before the read-ahead's snapshot, as advance needs.
			l.launch(claimReq{from: l.cur.start(false, l.gate.lowestHead()), horizon: l.cur.horizonSeen, skip: l.skip, hold: l.gate.holdKeys(now),
				limit: nextLimit, budget: nextBudget})
		}
	}
	for _, m := range l.send {
		if l.gate.held(m, time.Now()) { // an earlier row of its key was refused or failed just now: the key waits
			if l.claiming {
				l.cur.passedOver(m.ID) // the read-ahead passes over it: claims must come back to it
			}
			l.unused = append(l.unused, m)
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
	l.release(l.unused) // read but not handed to the sink: held back, or in flight already
	if !l.claiming {
		if err := l.parkPutOff(ctx); err != nil {
			return false, err
		}
	}
	return more, nil
}

// reload reloads the blocked keys, once per poll interval rather than at every claim: a relay
// that is caught up claims at every wake-up, and two more queries per claim doubled its CPU per
// event at low rates. This term's own failures hold their keys in the gate meanwhile. The claim
// after a reload reads from the oldest row: a key it releases may have its parked row back in
// the outbox, below the cursor. No rows read before the reload wait to go to the sink (startClaim): they
// could hold the key's later rows without that one.
func (l *term) reload(ctx context.Context, now time.Time) error {
	l.blockedAt = now
	blocked, err := l.sess.Blocked(ctx, l.cfg.OrderPolicy == OrderPolicyWait)
	if err != nil {
		return fmt.Errorf("load blocked keys: %w", err)
	}
	// Parked keys are known to the database: an operator may have retried or dropped the parked
	// row since, and the reload says whether the key still waits.
	l.gate.reload(blocked)
	return nil
}

// release lets the session reuse the memory of msgs, which nothing refers to any more, when the
// session and the sink allow it (see Releaser).
func (l *term) release(msgs []*Message) {
	if l.releaser != nil && len(msgs) > 0 {
		l.releaser.Release(msgs)
	}
}

// horizon asks the session for its horizon (see Session.Horizon), once it is known to have one.
func (l *term) horizon(ctx context.Context) (int64, error) {
	if l.cur.noHorizon {
		return 0, nil
	}
	h, err := l.sess.Horizon(ctx)
	if errors.Is(err, ErrNoHorizon) {
		l.cur.noHorizon = true
		l.log.Warn("every claim reads from the oldest pending row", "reason", err)
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read the id horizon: %w", err)
	}
	l.cur.horizonSeen = h
	return h, nil
}

// appendInflight appends the ids in flight to dst, for a claim to skip.
func (l *term) appendInflight(dst []int64) []int64 {
	for id := range l.inflight {
		dst = append(dst, id)
	}
	return dst
}

// await waits for the running claim, if any, and keeps its result in ahead (claimEnded), or stops the
// watch for wake-ups: the session is free for another query after it.
func (l *term) await(ctx context.Context) error {
	if err := l.unlisten(); err != nil {
		return err
	}
	if !l.claiming {
		return nil
	}
	return l.claimEnded(ctx, <-l.claimDone)
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
