package relay

import (
	"context"
	"fmt"
	"slices"
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
// written before the store recorded transactions (TxID 0) is a transaction of its own. The
// transactions in seed wait whatever their rows (a claim's rest that may not stream, see
// mayStream).
func (l *term) wholeTxs(rows []Message, now time.Time, seed ...int64) map[int64]bool {
	l.headTxs(rows, now)
	var waits map[int64]bool
	for _, tx := range seed {
		if waits == nil {
			waits = make(map[int64]bool)
		}
		waits[tx] = true
	}
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
		if head, _ := l.gate.head(m.orderKey()); m.ID < head {
			// Before its key's head, not behind it: pending again with the head because their
			// Kafka transaction was aborted (a stream's, its head further on). It goes first.
			return false
		}
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

// notedMarked tells a MarkNoter sink which rows a mark marked: those of batch, and streamed.
func (l *term) notedMarked(batch []*Message, streamed []int64) {
	mn, ok := l.sink.(MarkNoter)
	if !ok {
		return
	}
	ids := make([]int64, len(batch), len(batch)+len(streamed))
	for i, m := range batch {
		ids[i] = m.ID
	}
	mn.Marked(append(ids, streamed...))
}

// TxRest is what a claim that stopped inside its database transactions left to claim (see
// TxStreamer): the pending rows with ids in (After, End] of the transactions Txs and the rows IDs
// (rows without a transaction). The claim read them in its snapshot, so they are exactly the
// rows it would have returned past After: together with what it returned, whole transactions.
type TxRest struct {
	After, End int64
	Txs        []int64  // the database transactions of the rows left, sorted
	IDs        []int64  // the rows left that have no transaction (TxID 0), sorted
	Keys       []uint64 // KeyHash of the order key of every row left, sorted, distinct
	Rows       int      // how many rows are left
	// Held is set when a row left may not go now (the claim would have flagged it TxHeld): its
	// transaction is not whole now.
	Held bool
}

// hasKey reports whether a row left is of the order key whose KeyHash is h.
func (r *TxRest) hasKey(h uint64) bool {
	_, ok := slices.BinarySearch(r.Keys, h)
	return ok
}

// KeyHash returns a 64-bit FNV-1a hash of an order key (BlockKey of aggregateType and
// aggregateID), for TxRest.Keys. Equal keys have equal hashes; a collision only makes a stream
// wait when it need not.
func KeyHash[T string | []byte](aggregateType, aggregateID T) uint64 {
	const offset, prime = 14695981039346656037, 1099511628211
	h := uint64(offset)
	for i := 0; i < len(aggregateType); i++ {
		h = (h ^ uint64(aggregateType[i])) * prime
	}
	h *= prime // the NUL between the two (h ^ 0)
	for i := 0; i < len(aggregateID); i++ {
		h = (h ^ uint64(aggregateID[i])) * prime
	}
	return h
}

// TxStreamer is implemented by a Session whose claims read whole database transactions
// (Message.TxID) and can stop inside transactions too large for the relay's byte budget, so that
// a huge transaction is never held in memory whole (exactly-once delivery). Its methods run as
// the Session's other calls do, one at a time (see Session).
type TxStreamer interface {
	// CutClaims allows the claims from now on to stop inside their transactions once they read
	// about twice their byte bound: such a claim returns the rows read so far, and ClaimedRest
	// what it left. Called once, before the first claim, when the sink is a StreamSink.
	CutClaims()
	// ClaimedRest returns what the last Claim left to claim: nil when it returned every row it
	// read (whole transactions).
	ClaimedRest() *TxRest
	// ClaimRest returns the next rows of rest, in id order, at most limit rows and, past the
	// first row, about maxBytes, and what is left after them: nil when nothing is.
	ClaimRest(ctx context.Context, rest *TxRest, limit, maxBytes int) ([]Message, *TxRest, error)
}

// StreamSink is implemented by a BatchEnder sink that can keep one transaction open across
// hand-overs, so that the rows of a database transaction too large for memory are handed over in
// pieces, each released once the broker holds it, and committed together (a stream).
type StreamSink interface {
	// BeginStream opens a stream: the sink's transaction (the one the hand-over under way joins)
	// is not ended until EndStream. Called between BeginBatch and EndBatch.
	BeginStream()
	// PublishStreamed hands m to the stream's transaction. produced is called once, when the
	// broker holds m's record inside the transaction (nil) or could not take it; the sink keeps
	// nothing of m after that but its id, and the row is committed, or not, with the stream. An
	// error wrapping ErrInvalidMessage, returned at once, means m can never be published; any
	// other means the stream cannot go on (its transaction is too old, say); produced is then not
	// called.
	PublishStreamed(ctx context.Context, m *Message, produced func(error)) error
	// EndStream ends the stream. With commit, its transaction commits at once, and with it every
	// row the stream handed over and every message published since it began (their done called
	// as usual); without, it is aborted (those messages fail with ErrSendAgain). done is called
	// once with the outcome, nil only when the transaction committed; it must not block.
	EndStream(commit bool, done func(error))
}
