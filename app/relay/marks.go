package relay

import (
	"context"
	"fmt"
	"time"
)

// markResult is the outcome of one Mark of the rows in term.marking.
type markResult struct {
	err     error
	elapsed time.Duration
}

// markDelay is how long acknowledged rows may wait for more to be marked with them. Marks are not
// on the latency path (a row's latency ends at its acknowledgement), but each one is two round
// trips and a commit: at a thousand events a second a mark per row was most of the relay's
// database work (10 ms gathered 11-12 rows a mark, 100 ms about a hundred). Rows are marked at
// the latest this much after the first of them was acknowledged, and at once when BatchSize rows
// wait or the in-flight bounds are reached (see markWaits). They stay in flight until then, so
// a crash republishes at most BatchSize rows, or markDelay of acknowledgements, more than a
// mark running when it crashed, and never more than MaxInFlight.
const markDelay = 100 * time.Millisecond

// markWaits reports whether n acknowledged rows, the first of them acknowledged waited ago, may
// still wait for others before they are marked: fewer than batch of them, for less than
// markDelay.
func markWaits(n, batch int, waited time.Duration) bool {
	return n < batch && waited < markDelay
}

// startMark hands the acknowledged rows waiting in toMark to the session's owner (owner.mark), unless a mark is running
// (its result comes back on markDone, and the next batch starts then) or the rows may still wait
// for others (markWaits); now starts them regardless.
func (l *term) startMark(now bool) {
	if l.marking != nil || l.markingIDs > 0 || len(l.toMark)+len(l.toMarkIDs) == 0 {
		return
	}
	if len(l.toMarkIDs) == 0 && !now && !l.stopping && markWaits(len(l.toMark), l.cfg.BatchSize, time.Since(l.toMarkSince)) {
		return
	}
	l.marking, l.toMark = l.toMark, nil
	if l.marking == nil {
		l.marking = []*Message{} // a mark runs: marking is not nil
	}
	// A committed stream's rows are marked streamMarkMax at a time, after the rows of messages.
	l.markingIDs = min(len(l.toMarkIDs), streamMarkMax)
	ids := make([]int64, len(l.marking), len(l.marking)+l.markingIDs)
	for i, m := range l.marking {
		ids[i] = m.ID
	}
	ids = append(ids, l.toMarkIDs[:l.markingIDs]...)
	l.conn.mark(ids)
}

// streamMarkMax is the most rows of a committed stream one mark marks: a mark of a million rows
// would run past the session's query timeout. Each mark is fenced and idempotent, and the
// progress record names every row of the stream until all are marked.
const streamMarkMax = 20000

// markDue reports whether rows wait for a mark that has not started, and how long until it is
// due.
func (l *term) markDue() (time.Duration, bool) {
	if l.marking != nil || l.markingIDs > 0 || len(l.toMark)+len(l.toMarkIDs) == 0 {
		return 0, false
	}
	if len(l.toMarkIDs) > 0 {
		return 0, true
	}
	return max(markDelay-time.Since(l.toMarkSince), 0), true
}

// marked ends the running mark: its rows leave the in-flight set, and the next batch starts.
func (l *term) marked(ctx context.Context, res markResult) error {
	batch := l.marking
	streamed := l.toMarkIDs[:l.markingIDs:l.markingIDs]
	l.marking, l.markingIDs = nil, 0
	if res.err != nil {
		// The rows stay pending and are published again by the next leader: duplicates
		// bounded by what was in flight.
		return fmt.Errorf("mark %d published rows: %w", len(batch)+len(streamed), res.err)
	}
	for _, m := range batch {
		delete(l.inflight, m.ID) // their bytes left the budget, and were released, at the ack
	}
	l.toMarkIDs = l.toMarkIDs[len(streamed):]
	l.obs.Marked(len(batch)+len(streamed), res.elapsed)
	l.notedMarked(batch, streamed)
	if len(l.toMarkIDs) == 0 {
		l.toMarkIDs = nil
		if l.stream != nil && l.stream.committed { // the stream's rows are all marked: claims resume
			l.stream, l.resume = nil, true
		}
	}
	l.startMark(false)
	return nil
}
