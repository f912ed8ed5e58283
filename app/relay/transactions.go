package relay

import (
	"context"
	"fmt"
)

// The optional ports of a transactional sink (exactly-once delivery). The engine checks for them
// with a type assertion; a sink without them sees none of these calls.

// BatchEnder is implemented by a Sink that groups the records it is handed into transactions.
// EndBatch is called, from the goroutine that calls Publish, once the rows of one claim were
// handed over: a claim never ends inside a database transaction when the store reads them whole
// (see Message.TxID), so a sink that ends its transactions only there never splits one.
type BatchEnder interface {
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
