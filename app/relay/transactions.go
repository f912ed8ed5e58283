package relay

import (
	"context"
	"fmt"
	"time"
)

// The optional ports of a transactional sink (exactly-once delivery). The engine checks for them
// with a type assertion; a sink without them sees none of these calls.

// BatchEnder is implemented by a Sink that groups the records it is handed into transactions.
// BeginBatch is called, from the goroutine that calls Publish, before the engine decides which
// rows of a claim go to the sink, and EndBatch once they were handed over: between the two the
// sink ends no transaction, so no failure of an earlier one can reach the engine while it hands
// over a database transaction's rows (see wholeTxs). A claim never ends inside a database
// transaction when the store reads them whole (see Message.TxID), and the engine hands a
// database transaction over only whole, so a sink that ends its transactions only at EndBatch
// never splits one.
type BatchEnder interface {
	BeginBatch()
	EndBatch()
}

// Recoverer is implemented by a Sink that records, with what it publishes, which rows were
// published and may not be marked yet. Recover is called once a term leads, before its first
// claim, with the term's context: it returns the ids of the rows the broker has (from any earlier
// term, of this process or another) that may not be marked; the relay marks them without
// publishing them again, and claims only after. An error ends the term.
type Recoverer interface {
	Recover(ctx context.Context) ([]int64, error)
}

// MarkNoter is implemented by a Sink that must know which rows are marked (a Recoverer: what it
// records as published and not yet marked). Marked is called by the term's loop after each
// successful mark, with the ids marked. It must not block.
type MarkNoter interface {
	Marked(ids []int64)
}

// recoverPublished marks the rows the sink says it published in an earlier term without their
// mark (Recoverer), before the term claims anything.
func (r *Relay) recoverPublished(ctx, pubCtx context.Context, sess Session) error {
	rc, ok := r.sink.(Recoverer)
	if !ok {
		return nil
	}
	ids, err := rc.Recover(pubCtx)
	if err != nil {
		return fmt.Errorf("recover what the sink published: %w", err)
	}
	if len(ids) == 0 {
		return nil
	}
	if err := sess.Mark(context.WithoutCancel(ctx), ids); err != nil {
		return fmt.Errorf("mark %d rows published in an earlier term: %w", len(ids), err)
	}
	r.obs.Marked(len(ids), 0)
	if mn, ok := r.sink.(MarkNoter); ok {
		mn.Marked(ids)
	}
	r.log.Info("marked the rows an earlier term published without marking them", "rows", len(ids))
	return nil
}

// beginBatch tells a BatchEnder sink that the rows of a claim are about to be handed over.
func (l *term) beginBatch() {
	if be, ok := l.sink.(BatchEnder); ok {
		be.BeginBatch()
	}
}

// wholeTxs returns, when the claim's rows carry their database transaction (Message.TxID), the
// transactions none of whose rows may go in this hand-over, nil when every one may. A database
// transaction goes to the sink only whole: it waits if any of its rows must (TxHeld: the claim
// saw it in flight, backing off or held; in flight already; or held by the gate at now). Every
// key of a waiting transaction then waits behind its lowest row there: a later row of that key,
// of another transaction, makes that one wait too, and so on, so the order per key holds. A row
// written before the store recorded transactions (TxID 0) is a transaction of its own.
func (l *term) wholeTxs(rows []Message, now time.Time) map[int64]bool {
	l.headTxs(rows, now)
	var waits map[int64]bool
	for i := range rows {
		m := &rows[i]
		if m.TxID == 0 {
			continue
		}
		if _, dup := l.inflight[m.ID]; m.TxHeld || dup || l.txMustWait(m, now) {
			if waits == nil {
				waits = make(map[int64]bool)
			}
			waits[m.TxID] = true
		}
	}
	if waits == nil {
		return nil
	}
	low := make(map[string]int64) // per order key, the lowest row of a waiting transaction
	for changed := true; changed; {
		changed = false
		clear(low)
		for i := range rows {
			if m := &rows[i]; waits[txOf(m)] {
				if lo, ok := low[m.orderKey()]; !ok || m.ID < lo {
					low[m.orderKey()] = m.ID
				}
			}
		}
		for i := range rows {
			m := &rows[i]
			if tx := txOf(m); !waits[tx] {
				if lo, ok := low[m.orderKey()]; ok && m.ID > lo {
					waits[tx], changed = true, true
				}
			}
		}
	}
	return waits
}

// headTxs notes, for each waiting key whose head may go now and is among rows, the head's
// database transaction (in heads): the key's rows of that transaction go with their head (see
// txMustWait). Without it a transaction with two rows of a key behind a failure could never go:
// the head alone may go, and the transaction only whole.
func (l *term) headTxs(rows []Message, now time.Time) {
	clear(l.heads)
	if !l.gate.holding() {
		return
	}
	if l.heads == nil {
		l.heads = make(map[string]int64)
	}
	for i := range rows {
		m := &rows[i]
		if m.TxID == 0 || m.TxHeld || !m.keyed() {
			continue
		}
		if head, ok := l.gate.head(m.orderKey()); ok && head == m.ID && !l.gate.mustWait(m, now) {
			l.heads[m.orderKey()] = m.TxID
		}
	}
}

// txMustWait is keyGate.mustWait for a row of a database transaction: a row held behind its
// key's head may go when the head goes in this hand-over and is of its transaction (headTxs).
func (l *term) txMustWait(m *Message, now time.Time) bool {
	switch l.gate.why(m, now) {
	case mayGo:
		return false
	case behindOwnHead, behindStoredHead:
		tx, ok := l.heads[m.orderKey()]
		return !ok || m.TxID == 0 || tx != m.TxID
	}
	return true
}

// txOf returns the transaction m is handed over with: its TxID, or for a row without one a
// value of its own (its negated id).
func txOf(m *Message) int64 {
	if m.TxID != 0 {
		return m.TxID
	}
	return -m.ID
}

// endBatch tells a BatchEnder sink that the rows of a claim were handed over.
func (l *term) endBatch() {
	if be, ok := l.sink.(BatchEnder); ok {
		be.EndBatch()
	}
}

// notedMarked tells a MarkNoter sink which rows a mark marked.
func (l *term) notedMarked(batch []*Message) {
	mn, ok := l.sink.(MarkNoter)
	if !ok {
		return
	}
	ids := make([]int64, len(batch))
	for i, m := range batch {
		ids[i] = m.ID
	}
	mn.Marked(ids)
}
