package postgres

import (
	"context"

	"github.com/outbox-relay/outbox-relay/app/relay"
)

// ExplainClaim returns EXPLAIN (FORMAT JSON) of the claim sess runs from from, with nothing in
// flight and no held key, on the session's own connection (with its settings): the plan the
// claim gets for these values.
func ExplainClaim(ctx context.Context, sess relay.Session, from int64, limit int) (string, error) {
	s := sess.(*session)
	var plan string
	err := s.conn.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+s.store.q.claim, int64(1), int64(0), []int64{}, limit, from).Scan(&plan)
	return plan, err
}

// ExplainMark returns EXPLAIN (FORMAT JSON) of the mark of ids on sess's mark connection (opened
// if need be, with its settings), in a transaction rolled back.
func ExplainMark(ctx context.Context, sess relay.Session, ids []int64) (string, error) {
	s := sess.(*session)
	s.markMu.Lock()
	defer s.markMu.Unlock()
	if err := s.openMarkConn(ctx); err != nil {
		return "", err
	}
	tx, err := s.markConn.Begin(ctx)
	if err != nil {
		return "", err
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var plan string
	err = tx.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+s.store.q.mark, ids).Scan(&plan)
	return plan, err
}
