package postgres

import (
	"context"
	"errors"
	"fmt"
	"time"
)

// Replication waits: StoreConfig.WaitForReplication.
const (
	// ReplicationOff hands a claim's rows over as soon as the primary returns them (the default):
	// after a failover to an asynchronous standby, rows already published may be missing from the
	// new primary.
	ReplicationOff = "off"
	// ReplicationSync holds a claim's rows back until every synchronous standby (sync_state
	// 'sync' or 'quorum' in pg_stat_replication) has flushed the WAL that made them visible, and
	// at least one is connected.
	ReplicationSync = "sync"
	// ReplicationAll holds a claim's rows back until every connected standby (state 'streaming'
	// or 'catchup') has flushed the WAL that made them visible, and at least one is connected.
	ReplicationAll = "all"
)

// replPollMin and replPollMax bound the pause between two looks at pg_stat_replication: it
// starts short, as a standby usually confirms within a millisecond or two, and doubles.
const (
	replPollMin = time.Millisecond
	replPollMax = 2 * time.Millisecond
)

// replQuery returns the statement that reads, for the target LSN $1 (or the current WAL insert
// position when $1 is NULL), how many standbys the mode waits for, how many of them flushed the
// target, and whether the role may read the positions at all. The insert position is at or
// above the commit record of every transaction a snapshot taken before it can see, whether or
// not the writer waited for its own flush (synchronous_commit off).
func replQuery(mode string) string {
	which := `r.state IN ('streaming', 'catchup')`
	if mode == ReplicationSync {
		which = `r.state IN ('streaming', 'catchup') AND r.sync_state IN ('sync', 'quorum')`
	}
	return `WITH t AS (SELECT coalesce($1::text::pg_lsn, pg_current_wal_insert_lsn()) AS target)
		SELECT t.target::text,
			pg_has_role('pg_read_all_stats', 'USAGE'),
			count(r.pid) FILTER (WHERE ` + which + `),
			count(r.pid) FILTER (WHERE ` + which + ` AND r.flush_lsn >= t.target),
			coalesce(min(r.flush_lsn) FILTER (WHERE ` + which + `)::text, '')
		FROM t LEFT JOIN pg_stat_replication r ON true
		GROUP BY t.target`
}

// replState is one look at pg_stat_replication.
type replState struct {
	target     string // the LSN waited for
	privileged bool   // the role may read the standbys' positions
	standbys   int    // standbys the mode waits for
	flushed    int    // of which flushed target
	lowest     string // the lowest flush position among them, "" if none
}

func (st replState) done() bool { return st.standbys > 0 && st.flushed == st.standbys }

// errReplicationPrivilege is returned when the relay's role cannot read the standbys' positions.
var errReplicationPrivilege = errors.New("database.wait_for_replication: the relay's role cannot read " +
	"the standbys' positions in pg_stat_replication; GRANT pg_read_all_stats (or pg_monitor) to it, " +
	"or set the key to off")

// waitReplicated returns once the standbys the mode names have flushed the WAL of everything the
// session's last claim could see. It looks at pg_stat_replication on the session's connection,
// with short pauses in between, for at most the query timeout; then it returns an error that
// says what it saw, and the caller's session ends, so that the rows are claimed again later.
func (s *session) waitReplicated(ctx context.Context) error {
	ctx, cancel := s.op(ctx)
	defer cancel()
	start := time.Now()
	var target *string
	var last replState // the last look that got an answer, for the timeout's message
	pause := replPollMin
	for {
		var st replState
		if err := s.conn.QueryRow(ctx, s.store.q.repl, target).Scan(&st.target, &st.privileged,
			&st.standbys, &st.flushed, &st.lowest); err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("wait for replication: %s", s.store.replWaitState(last, time.Since(start)))
			}
			return fmt.Errorf("wait for replication: %w", err)
		}
		last = st
		if !st.privileged {
			return errReplicationPrivilege
		}
		target = &st.target
		if st.done() {
			if s.store.onReplWait != nil {
				s.store.onReplWait(time.Since(start))
			}
			return nil
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("wait for replication: %s", s.store.replWaitState(st, time.Since(start)))
		case <-time.After(pause):
		}
		pause = min(2*pause, replPollMax)
	}
}

// replWaitState describes an unfinished wait for an error message.
func (s *Store) replWaitState(st replState, took time.Duration) string {
	which := "connected standby"
	if s.replMode == ReplicationSync {
		which = "connected synchronous standby"
	}
	if st.target == "" {
		return fmt.Sprintf("no answer from the primary within %s (database.wait_for_replication=%s)",
			took.Round(time.Millisecond), s.replMode)
	}
	if st.standbys == 0 {
		return fmt.Sprintf("no %s in pg_stat_replication for %s: nothing is published until one has "+
			"flushed WAL position %s (database.wait_for_replication=%s; set it to off to publish without one)",
			which, took.Round(time.Millisecond), st.target, s.replMode)
	}
	return fmt.Sprintf("%d of %d %ss flushed WAL position %s within %s (the lowest is at %s; "+
		"database.wait_for_replication=%s)", st.flushed, st.standbys, which, st.target,
		took.Round(time.Millisecond), st.lowest, s.replMode)
}
