package postgres

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// How often Horizon looks at the writers again. Each look is one round trip reading the
// sequence and pg_locks, and the horizon trails the newest id by about two of them. What a
// trailing horizon costs is the rows (their index entries) a claim walks past from where it
// starts, so the session looks every horizonEvery once it claimed horizonRows rows since the last
// look, and at least every horizonEveryMax otherwise. At 1,000 events a second that is every 50
// ms, as before; at 30 a second, woken by each commit, a look every 50 ms was 20 of the relay's
// 50 round trips a second. Looking less often is always safe: the horizon only moves less far,
// and claims start further back (see cursor.advance in app/relay).
const (
	horizonEvery    = 50 * time.Millisecond
	horizonRows     = 50
	horizonEveryMax = time.Second
)

// horizon finds ids below which no row can appear any more.
//
// A writer's INSERT takes a RowExclusiveLock on the outbox before it draws its id from the
// sequence, and keeps it until its transaction ends. So once every transaction that held that
// lock when the sequence's last value was F has ended, every row with an id up to F is committed
// or never will be. (A transaction's xid is no such bound: an INSERT draws its id before the
// transaction is given an xid.) Only rows with the ids the relay did not draw from the sequence,
// those 'parked retry' puts back, can appear below it; the relay finds them in the claims it
// makes from the oldest row once per poll interval.
type horizon struct {
	resolved bool
	off      bool   // no horizon: the sequence caches ids per session, or cannot be read
	table    uint32 // the outbox's oid
	seq      uint32 // its id sequence's oid
	safe     int64  // every id up to safe is committed or never will be
	cand     int64  // the sequence's last value at the last look...
	candVx   []string
	hasCand  bool // ...and the transactions that held the outbox's write lock then
	last     time.Time
	// claimed is the session's count of claimed rows at the last look.
	claimed int64
}

// Horizon implements relay.Session.
func (s *session) Horizon(ctx context.Context) (int64, error) {
	s.dropPrefetched()
	h := &s.hz
	since := time.Since(h.last)
	if h.off || since < horizonEvery || (s.claimedRows-h.claimed < horizonRows && since < horizonEveryMax) {
		return h.safe, nil
	}
	ctx, cancel := s.op(ctx)
	defer cancel()
	h.last, h.claimed = time.Now(), s.claimedRows
	if !h.resolved {
		var seq *uint32
		var cache *int64
		err := s.conn.QueryRow(ctx, `SELECT $1::text::regclass::oid, pg_get_serial_sequence($1::text, $2)::regclass::oid,
				(SELECT seqcache FROM pg_sequence WHERE seqrelid = pg_get_serial_sequence($1::text, $2)::regclass)`,
			s.store.table.outbox(), s.store.table.Columns.ID).Scan(&h.table, &seq, &cache)
		if err != nil {
			return 0, s.wrap(err)
		}
		h.resolved = true
		switch {
		case seq == nil:
			h.off = true
			return 0, fmt.Errorf("%w: %s.%s has no sequence", relay.ErrNoHorizon, s.store.table, s.store.table.Columns.ID)
		case cache == nil || *cache != 1:
			// A session caching ids can insert, much later, a row with an id below the last one.
			h.off = true
			return 0, fmt.Errorf("%w: the sequence of %s.%s caches ids per session (CACHE > 1)", relay.ErrNoHorizon, s.store.table, s.store.table.Columns.ID)
		}
		h.seq = *seq
	}
	// Two statements in one round trip, in this order: a transaction that drew an id up to the
	// last value read by the first holds the lock, if still open, when the second reads pg_locks.
	b := &pgx.Batch{}
	b.Queue(`SELECT coalesce(pg_sequence_last_value($1::oid::regclass), 0)`, h.seq)
	b.Queue(`SELECT coalesce(array_agg(virtualtransaction), '{}') FROM pg_locks
		WHERE locktype = 'relation' AND relation = $1::oid AND mode = 'RowExclusiveLock'
			AND database = (SELECT oid FROM pg_database WHERE datname = current_database())`, h.table)
	br := s.conn.SendBatch(ctx, b)
	var last int64
	var holders []string
	err := br.QueryRow().Scan(&last)
	if err == nil {
		err = br.QueryRow().Scan(&holders)
	}
	if cerr := br.Close(); err == nil {
		err = cerr
	}
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "42501" { // insufficient_privilege
		h.off = true
		return 0, fmt.Errorf("%w: cannot read the sequence of %s.id (grant SELECT on it: sql/roles/relay_role.sql): %s",
			relay.ErrNoHorizon, s.store.table, pgErr.Message)
	}
	if err != nil {
		return 0, s.wrap(err)
	}
	if h.hasCand && !slices.ContainsFunc(h.candVx, func(vx string) bool { return slices.Contains(holders, vx) }) {
		h.safe = max(h.safe, h.cand)
		h.hasCand = false
	}
	if !h.hasCand { // a candidate is kept until it resolves, so a stream of writers cannot starve it
		h.cand, h.candVx, h.hasCand = last, holders, true
	}
	return h.safe, nil
}
