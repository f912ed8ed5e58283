package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"time"
)

// Streaming a claim too large for memory (exactly-once delivery): a claim reads whole database
// transactions, and a transaction of a million rows would be read, and held, whole. A session
// that is a TxStreamer, with a StreamSink, cuts such a claim once it read about twice its byte
// bound and returns the rest as a TxRest. If nothing of the claim waits that the rest could be
// behind (mayStream), the rest streams: the sink keeps one transaction open (BeginStream), the
// claim's rows go to it as usual, then the rest's rows, a bounded page at a time (ClaimRest),
// each page's payloads released as soon as the broker holds them (PublishStreamed), only their
// ids kept. Once the last page is acknowledged the transaction commits (EndStream), the progress
// record naming every row of it; the stream's rows are marked before any other claim. A failure
// of any row, a row that must wait, a refused row, a stop or a stream older than the sink allows
// aborts the transaction: none of its rows is visible to a read_committed reader, and all of
// them are claimed again, whole, after a backoff.

// txStream is the state of the stream under way: at most one per term, owned by the term's loop
// but for the sink's produced callbacks, which only send on results.
type txStream struct {
	rest *TxRest // what is left to claim; nil once every page was claimed
	ids  []int64 // the rows the broker holds in the stream's transaction, in id order
	// created is when each row of ids was written (Message.CreatedAt, Unix nanoseconds): the
	// rows are reported acknowledged (Observer.Acked) only once the transaction commits, as a
	// row of a Kafka transaction that aborts was not published.
	created []int64
	unacked int // rows handed over whose produce was not acknowledged yet
	rows    int // rows handed over in pages
	began   time.Time
	// heads are the rows the broker holds that were the heads of waiting keys: their keys are
	// released (keyGate.acked) once the stream commits.
	heads []*Message
	// failed is set when the stream cannot commit: it is aborted at the next turn of the loop.
	failed error
	// ending: EndStream was called, its outcome not back yet. committed: the outcome was a
	// commit, and ids wait for their mark.
	ending, committed bool
}

// streamOutcome is EndStream's outcome for st.
type streamOutcome struct {
	st  *txStream
	err error
}

// streamBusy reports whether a stream is under way or its rows wait for their mark: no other
// claim runs then (the stream's rows are not in inflight, so a claim would not skip them).
func (l *term) streamBusy() bool { return l.stream != nil }

// mayStream reports whether rest, what a claim of rows left (TxRest), may stream now, given
// waits, the transactions of rows that wait (wholeTxs): only if nothing left may have to wait.
// None of rest's transactions waits in rows, no row left is held, no waiting row of rows is of a
// key among the rows left (they would go before it), and no failed stream is backing off.
//
// A stream's transaction holds every row handed over until it commits, so it starts only with
// nothing unacknowledged (no row of an earlier hand-over waits for its transaction's commit: it
// would hold the byte budget the stream's pages need). mayStream returns false then, and sets
// streamWaiting: the caller hands nothing over, so that the rows in flight commit and the next
// claim streams.
func (l *term) mayStream(rows []Message, rest *TxRest, waits map[int64]bool, now time.Time) bool {
	if _, ok := l.sink.(StreamSink); !ok || rest.Held || now.Before(l.streamRetryAt) {
		return false
	}
	for _, tx := range rest.Txs {
		if waits[tx] {
			return false
		}
	}
	for i := range rows {
		if m := &rows[i]; waits[txOf(m)] && rest.hasKey(KeyHash(m.AggregateType, m.AggregateID)) {
			return false
		}
	}
	if l.bytes > 0 {
		l.log.Debug("a claim's rest waits to stream until the rows in flight are acknowledged", "bytes", l.bytes, "rows", len(l.inflight))
		l.streamWaiting = true
		return false
	}
	return true
}

// restTxs returns the transactions of rest as wholeTxs's seed: its transactions, and each row
// without one as a transaction of its own.
func restTxs(rest *TxRest) []int64 {
	seed := append([]int64(nil), rest.Txs...)
	for _, id := range rest.IDs {
		seed = append(seed, -id)
	}
	return seed
}

// startStream opens a stream of rest, which the hand-over under way (between beginBatch and
// endBatch) starts.
func (l *term) startStream(rest *TxRest, now time.Time) *txStream {
	l.stream = &txStream{rest: rest, began: now}
	l.sink.(StreamSink).BeginStream()
	defer l.log.Info("streaming database transactions too large for one claim", "rows_left", rest.Rows,
		"transactions", len(rest.Txs)+len(rest.IDs), "from_id", rest.After+1, "to_id", rest.End)
	return l.stream
}

// driveStream moves the stream on: it aborts a failed one, claims its next page when the bounds
// leave room, and commits it once every row was claimed and acknowledged.
func (l *term) driveStream(ctx context.Context) error {
	st := l.stream
	if st.ending || st.committed {
		return nil
	}
	if st.failed != nil {
		l.endStream(false)
		return nil
	}
	if l.conn.claiming || l.ahead != nil {
		return nil
	}
	if st.rest != nil {
		limit, budget := l.cur.claimSize(len(l.inflight)+st.unacked, l.bytes)
		if limit <= 0 || budget <= 0 {
			return nil // the acknowledgements free room
		}
		return l.conn.claim(ctx, claimReq{rest: st.rest, limit: limit, budget: budget})
	}
	if st.unacked == 0 {
		l.endStream(true)
	}
	return nil
}

// endStream ends the stream: commits or aborts its transaction. The outcome comes on streamEnd.
func (l *term) endStream(commit bool) {
	st := l.stream
	st.ending = true
	l.sink.(StreamSink).EndStream(commit, func(err error) { l.streamEnd <- streamOutcome{st: st, err: err} })
}

// sendStreamPage hands the rows of a stream's page, the claim in a, to the sink. A row that must
// wait, or that the sink refuses, fails the stream: its transaction would not be whole.
func (l *term) sendStreamPage(a *claimed) {
	st := l.stream
	l.unused = l.unused[:0]
	if st == nil || st.failed != nil || a.rest != st.rest {
		// Aborted meanwhile: the rows stay pending, claimed again with their transactions.
		for i := range a.rows {
			l.unused = append(l.unused, &a.rows[i])
		}
		l.conn.release(l.unused)
		return
	}
	st.rest = a.next
	now := time.Now()
	for i := range a.rows {
		m := &a.rows[i]
		if st.failed == nil && (m.TxHeld || l.mustWait(m, now)) {
			st.failed = fmt.Errorf("row %d of a streamed transaction must wait now", m.ID)
		}
		l.publishStreamed(st, m)
	}
	l.conn.release(l.unused)
}

// publishStreamed hands m to stream st's transaction, unless st failed (m then goes to unused):
// the sink's verdict comes on results once the broker holds m's record. A row the sink refuses
// fails the stream.
func (l *term) publishStreamed(st *txStream, m *Message) {
	if st.failed != nil {
		l.unused = append(l.unused, m)
		return
	}
	if l.gate.holding() && m.TxID != 0 {
		if head, ok := l.gate.head(m.orderKey()); ok && head == m.ID {
			if l.heads == nil {
				l.heads = make(map[string]int64)
			}
			l.heads[m.orderKey()] = m.TxID // its key's later rows of its transaction go with it (txMustWait)
		}
	}
	err := l.sink.(StreamSink).PublishStreamed(l.pubCtx, m, func(err error) { l.results <- result{m: m, err: err, at: time.Now(), st: st} })
	if err != nil {
		st.failed = fmt.Errorf("row %d: %w", m.ID, err)
		if errors.Is(err, ErrInvalidMessage) {
			l.toPark = append(l.toPark, parkReq{m: m, reason: err.Error()})
			if l.cfg.OrderPolicy == OrderPolicyWait {
				l.gate.holdParked(m)
			}
		} else {
			l.unused = append(l.unused, m)
		}
		return
	}
	st.unacked++
	st.rows++
	l.bytes += m.Size()
}

// streamSettled takes the sink's produced verdict on a row of stream st (res.st). It returns
// whether the verdict is settled; if not, it is the stream's first failure, and settle counts it
// against its row as any failure.
func (l *term) streamSettled(res result, acked *[]*Message) bool {
	st, m := res.st, res.m
	st.unacked--
	current := st == l.stream && st.failed == nil && !st.ending
	if res.err == nil || !current {
		l.bytes -= m.Size()
		*acked = append(*acked, m) // the broker holds it, or it is dropped: its payload is not read again
		if res.err == nil && current {
			st.ids = append(st.ids, m.ID)
			st.created = append(st.created, m.CreatedAt.UnixNano())
			if l.gate.holding() {
				if head, ok := l.gate.head(m.orderKey()); ok && head == m.ID {
					st.heads = append(st.heads, m)
				}
			}
			l.lastAck.Store(res.at.UnixNano())
		}
		return true
	}
	st.failed = fmt.Errorf("row %d: %w", m.ID, res.err)
	l.gate.failed(m) // settled as a failure by the caller (failureSettled)
	return false
}

// streamEnded takes the outcome of EndStream: a committed stream's rows are queued for their
// mark (the stream ends once they are marked, see marked); an aborted one's stay pending and are
// claimed again, whole, after a backoff.
func (l *term) streamEnded(o streamOutcome) {
	st := o.st
	if st != l.stream {
		return
	}
	took := time.Since(st.began).Round(time.Millisecond)
	if o.err == nil && st.failed == nil {
		st.committed = true
		l.streamFails = 0
		for _, m := range st.heads {
			if l.gate.acked(m, time.Now()) {
				l.cur.rewind(m.ID) // its key's later rows may lie below where claims start
			}
		}
		st.heads = nil
		l.toMarkIDs = append(l.toMarkIDs, st.ids...)
		now, acked := time.Now(), &Message{}
		for i, id := range st.ids {
			acked.ID, acked.CreatedAt = id, time.Unix(0, st.created[i])
			l.obs.Acked(acked, now)
		}
		st.ids, st.created = nil, nil
		l.log.Info("streamed transaction committed", "rows", st.rows, "took", took)
		if len(l.toMarkIDs) == 0 && l.markingIDs == 0 {
			l.stream = nil
		}
		l.startMark(true)
		return
	}
	cause := errors.Join(st.failed, o.err)
	l.stream = nil
	l.streamFails++
	delay := l.cfg.backoff(l.streamFails)
	l.streamRetryAt = time.Now().Add(delay)
	level := slog.LevelError
	if l.stopping {
		level = slog.LevelInfo // a stop aborts the stream: nothing is wrong
	}
	l.log.Log(context.Background(), level, "streamed transaction aborted: nothing of it is visible at read_committed, its rows are claimed again",
		"rows_handed_over", st.rows, "took", took, "retry_in", delay, "err", cause)
}
