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

// ExplainClaimFew returns EXPLAIN (FORMAT JSON) of the claim of two ranges that leaves the ids
// in flight outside the run out one by one (restFew) sess runs from from, with nothing in
// flight, on the session's own connection.
func ExplainClaimFew(ctx context.Context, sess relay.Session, from int64, limit int) (string, error) {
	s := sess.(*session)
	var plan string
	err := s.conn.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+s.store.q.claimFew, int64(1), int64(0), []int64{}, limit, from).Scan(&plan)
	return plan, err
}

// ExplainClaimAbove returns EXPLAIN (FORMAT JSON) of the claim of one range (claimAboveQuery)
// sess runs from from, leaving out no id, on the session's own connection.
func ExplainClaimAbove(ctx context.Context, sess relay.Session, from int64, limit int) (string, error) {
	s := sess.(*session)
	var plan string
	err := s.conn.QueryRow(ctx, `EXPLAIN (FORMAT JSON) `+s.store.q.claimAbove, from, []int64{}, limit).Scan(&plan)
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

// ClaimQueries returns the claim queries of s, without and with held keys, and the same built
// with wholeTxsBefore: TestWholeTxsReadsWhatTheirFirstFormRead compares them.
func ClaimQueries(s *Store) (claim, claimHold, refClaim, refClaimHold string) {
	t := s.table
	base := claimQuery(t, claimCols(t, true), "", restHashed)
	baseHold := claimQuery(t, claimCols(t, true), holdCond(t), restHashed)
	return s.q.claim, s.q.claimHold, wholeTxsBefore(t, base, ""), wholeTxsBefore(t, baseHold, holdExpr(t))
}

// wholeTxsBefore is the first form of wholeTxs: it read each transaction of the claim whole
// through an index of tx, and left out the rows the claim returned. Plain, and slow; the
// reference of what wholeTxs must return.
func wholeTxsBefore(t Table, claim, held string) string {
	waits := mayNotGo(t, held)
	return `WITH c AS (` + claim + `)
		SELECT * FROM c
		UNION ALL
		(SELECT ` + claimColsTx(t, `CASE WHEN `+waits+` THEN -(tx::text::bigint) ELSE tx::text::bigint END`) + ` FROM ` + t.outbox() + `
		WHERE dispatched_at IS NULL
			AND tx IN (SELECT tx::text::xid8 FROM c WHERE tx <> 0)
			AND ` + t.id("") + ` NOT IN (SELECT id FROM c)
		ORDER BY ` + t.id("") + `)
		ORDER BY id`
}

// ClaimOfTwoRangesOnly makes sess's claims the claim of two ranges around the ids in flight,
// never the claim of one range (claimAboveQuery), and with hashed, when hashed, the ids in
// flight outside the run left out by a hashed subplan however few (restHashed):
// BenchmarkClaimCaughtUp compares them.
func ClaimOfTwoRangesOnly(sess relay.Session, hashed bool) {
	s := sess.(*session)
	q := *s.store
	q.q.claimAbove = ""
	if hashed {
		q.q.claimFew = ""
	}
	s.store = &q
}

// BackendPID returns the process id of sess's server backend.
func BackendPID(sess relay.Session) int32 { return sess.(*session).pid }
