package postgres

import (
	"context"
	"errors"
	"fmt"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgconn"

	"github.com/outbox-relay/outbox-relay/internal/hrtimer"
)

// The wake-up protocol: writers notify only while the relay sleeps (sql/migrations/004_wake.sql).
//
// The outbox trigger of a writer's INSERT notifies unless two try-locks, which never wait, say
// that a relay is awake: it cannot take the awake lock in share mode (the relay holds it), and it
// can take the sleep lock in share mode (the relay neither holds it nor waits for it). A writer
// that skips the notification so keeps the sleep lock until its transaction ends.
//
// The session sleeps (waits for a notification) only when
//
//  1. it holds the sleep lock, exclusively, since some moment G, and
//  2. a claim ran after G (its snapshot was taken after G).
//
// Why no wake-up is lost. A writer W that skipped the notification held the sleep lock in
// share mode from its trigger to its commit. The session's exclusive lock was granted at G, so W
// had ended before G: W committed before G, and the claim after G saw its rows (it returns them,
// or stops at its bound and the relay claims again at once). A writer whose trigger ran after G
// cannot take the sleep lock (the session holds it until it wakes), so it notifies; its
// notification is sent at its commit, and the session, LISTENing, receives it whether it waits
// already or not yet (Notified). The same holds while the session waits for the lock: a waiting
// exclusive request makes the writers' share try-locks fail, so they notify. The awake lock
// plays no part in this: it only makes writers notify when no relay follows the protocol.
//
// A writer never waits for the relay: its try-locks return at once. The relay's exclusive
// request waits for the writers in the middle of a transaction that took the sleep lock, at most
// sleepLockWait (lock_timeout); then it claims again and tries later: while a writer holds a
// transaction open, the relay polls every sleepLockWait instead of sleeping.
//
// While rows keep coming, the session does not take the sleep lock: it lingers for its linger
// (StoreConfig.Linger, relay.linger, 2.5 ms by default, on a timerfd: internal/hrtimer) and
// claims again, and writers, finding the
// relay awake, do not notify, so flat-out writers keep their group commits. It takes the lock
// once emptyToSleep claims in a row came back empty: busy writers on a loaded machine often leave
// a millisecond or two without a commit, and with one empty claim the relay went to sleep (and
// writers notified) 25-40 times a second flat out; with two, 6-10 % of their commits notified,
// with five 3-6 %. Holding the lock, it keeps it while the commits trickle in (each one then
// wakes it, as before) and lets it go once it heard busyWakeUps notifications within busyWindow:
// 1,200 notifying commits a second. But a notification costs the writers a commit serialised
// behind the previous notifying one's WAL flush, and a sleeping relay only sees the rate the
// writers reach while they notify: on a loaded host, flat-out writers that notify reached
// 1,200-2,000 commits a second (BENCHMARKS.md), so a threshold of 2,000 kept the relay asleep,
// and a third of their commits notifying, for seconds. The threshold counts notifications, not
// rows: a transaction of many rows notifies once.
//
// The way back: writers at a steady rate leave no gap of five empty claims, so a polling session
// also goes to sleep once a window of claims returned fewer rows than one per linger (quietRows):
// between that and busyWakeUps it stays as it is, so a rate near either threshold does not make
// it switch at every window. (Rows, not commits, as awake writers send nothing to count: a
// transaction of many rows keeps the relay polling at fewer commits a second.)
//
// The linger trades latency for CPU. Woken by each commit, a relay claims, produces and is
// acknowledged about once per event at 1,000 events a second, one per transaction: with a 1 ms
// linger (and so a threshold of 1,000 rows a second, which kept it asleep at that rate),
// commit-to-ack p50 was 0.9-1.5 ms and p99 5.5-9.7 ms, for 2.6-2.8 s of relay CPU and 1.6 s of
// its database sessions' per 10k events. With 2 ms it stays awake from 500 rows a second, the
// writers stop notifying and each claim gathers two or three commits: p50 2.1-2.7 ms, p99
// 4.6-10.6 ms, 1.9-2.2 s and 0.65-0.81 s (BENCHMARKS.md, "CPUs (GOMAXPROCS) follow the load,
// and a 2 ms linger"; p99 is the host's noise in both). Those lingers slept on Go's timers,
// which fire 0.1-0.5 ms late and wake the process twice for a 2 ms sleep; the linger now sleeps
// on a timerfd (internal/hrtimer), and the default 2.5 ms (400 rows a second) claims as often
// as 2 ms did, for about 0.9x the relay's CPU (BENCHMARKS.md, "The linger's wasted wake-up").
// The probe below is what lets a relay asleep at such a rate go back to polling.
const (
	sleepLockWait = 20 * time.Millisecond
	busyWindow    = 20 * time.Millisecond
	busyWakeUps   = 24
	emptyToSleep  = 5
	// A session asleep and woken at probeRate commits a second or more over probeAfter lets the
	// sleep lock go anyway, to see whether the writers go faster without notifying: if they do
	// (flat-out writers held back by NOTIFY), its claims keep returning quietRows and more and
	// it stays awake; if not (a steady rate), the next windows are quiet and it sleeps again. The
	// rate alone missed flat-out writers on a loaded host: while every commit notified they
	// reached only 400-1,000 commits a second, below busyWakeUps, and the relay, asleep, kept
	// them notifying (0.17-0.79 notifications per commit in the write-cost section). A probe
	// costs a lock, its release and a window of claims a linger apart: at most two a second,
	// and none below probeRate. The rate is that of a window of probeAfter or more that starts
	// again whenever one ends below probeRate (wakeState.probe), not of the whole time asleep: a
	// relay asleep over an idle outbox for a while, then woken at 1,000 commits a second, counted
	// the idle spell against them and kept the writers notifying, and itself claiming once per
	// commit, for a quarter of that spell (20 s idle, then 5 s at 1,000 a second: 0.5 claims per
	// event instead of 0.37, and 0.27 notifications per commit, in the bench's sidecar section).
	probeAfter = 500 * time.Millisecond
	probeRate  = 200
)

// wakeState is a session's side of the wake-up protocol.
type wakeState struct {
	// lingerFor is StoreConfig.Linger (LingerDefault when zero): see linger.
	lingerFor time.Duration
	// polling is set while the session holds the awake lock but not the sleep lock: it claims
	// every linger or goes to sleep, so a notification, sent by a writer that found it asleep
	// before, wakes nothing and is dropped (heard). Read by the connection's notification
	// handler, which may run on another goroutine than the claims.
	polling atomic.Bool
	awake   bool // holds the awake lock
	asleep  bool // holds the sleep lock...
	checked bool // ...and a claim ran since it was granted
	release bool // let the sleep lock go before the next claim or wait
	// empty counts the claims in a row that found nothing while polling: emptyToSleep of them,
	// a linger apart, and the session goes to sleep.
	empty int
	// Rows claimed since since, while polling: fewer than quietRows in a window ended makes
	// quiet, and the session goes to sleep.
	rows  int64
	quiet bool
	// heardN counts the notifications heard while asleep (written by the notification handler);
	// busyWakeUps of them within busyWindow of since, when heardN was base, let the lock go.
	heardN atomic.Int64
	since  time.Time
	base   int64
	// probeFrom is when the probe's window began (when the sleep lock was granted, or when the
	// last window ended below probeRate), and probeBase heardN then.
	probeFrom time.Time
	probeBase int64
	// firstAt is when the first notification of the window was heard (Unix nanoseconds), 0
	// before it.
	firstAt atomic.Int64
}

// linger returns how long the session waits between two claims while polling.
func (w *wakeState) linger() time.Duration {
	if w.lingerFor <= 0 {
		return LingerDefault
	}
	return w.lingerFor
}

// quietRows returns the rows a window of busyWindow must bring for a polling session to stay
// awake: one per linger.
func (w *wakeState) quietRows() int64 { return max(1, int64(busyWindow/w.linger())) }

// busy reports, at now, whether the notifications heard since the window began came at
// busyWakeUps per busyWindow or faster: at least busyWakeUps of them, at that rate counted from
// the window's start or, if later, from the first of them (so a burst after a quiet spell counts
// from its own start, not the spell's). A window older than busyWindow ends: the next one starts
// at now.
func (w *wakeState) busy(now time.Time) bool {
	total := w.heardN.Load()
	n, start := total-w.base, w.since
	if f := w.firstAt.Load(); f != 0 {
		if t := time.Unix(0, f); t.After(start) {
			start = t
		}
	}
	busy := n >= busyWakeUps && n*int64(busyWindow) >= busyWakeUps*int64(now.Sub(start))
	if now.Sub(w.since) > busyWindow {
		w.since, w.base = now, total
		w.firstAt.Store(0)
	}
	return busy
}

// probe reports, at now, whether the session, asleep, heard notifications at probeRate a second
// or more over its window, once the window is probeAfter long (see probeAfter). A window that
// ends below the rate starts the next one at now, so a spell of few commits before a rate
// counts for at most one window against it.
func (w *wakeState) probe(now time.Time) bool {
	spell := now.Sub(w.probeFrom)
	if spell < probeAfter {
		return false
	}
	heard := w.heardN.Load()
	if (heard-w.probeBase)*int64(time.Second) >= probeRate*int64(spell) {
		return true
	}
	w.probeFrom, w.probeBase = now, heard // below the rate: the next window starts now
	return false
}

// lockWithin runs pg_advisory_lock on key, waiting at most wait for it (lock_timeout, set for
// this statement only: it ends the statement's implicit transaction). It reports whether the
// lock was granted. The wait is bounded by the server, so the context's cancellation is not
// passed on: pgx closes a connection whose query was cancelled.
func (s *session) lockWithin(ctx context.Context, key string, wait time.Duration) (bool, error) {
	ctx, cancel := s.op(context.WithoutCancel(ctx))
	defer cancel()
	_, err := s.conn.Exec(ctx, `SELECT pg_advisory_lock(hashtextextended($1, 0))
		FROM (SELECT set_config('lock_timeout', $2, true) OFFSET 0) t`, key, fmt.Sprintf("%dms", max(wait.Milliseconds(), 1)))
	var pgErr *pgconn.PgError
	if errors.As(err, &pgErr) && pgErr.Code == "55P03" { // lock_not_available: lock_timeout passed
		return false, nil
	}
	if err != nil {
		return false, s.wrap(err)
	}
	return true, nil
}

// releaseSleep lets the sleep lock go: writers stop notifying.
func (s *session) releaseSleep(ctx context.Context) error {
	ctx, cancel := s.op(context.WithoutCancel(ctx))
	defer cancel()
	w := &s.wake
	w.release = false
	if _, err := s.conn.Exec(ctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, s.store.table.sleepKey()); err != nil {
		return s.wrap(err)
	}
	w.asleep, w.checked, w.empty = false, false, 0
	w.since, w.rows, w.quiet = time.Now(), 0, false
	w.setPolling()
	return nil
}

// heard is the connection's notification handler: a notification makes the relay claim, unless
// it is polling (wakeState.polling).
func (s *session) heard() {
	if !s.wake.polling.Load() {
		s.notified.Store(true)
		s.wake.heardN.Add(1)
		s.wake.firstAt.CompareAndSwap(0, time.Now().UnixNano())
	}
}

// setPolling records whether the session holds the awake lock and not the sleep lock.
func (w *wakeState) setPolling() { w.polling.Store(w.awake && !w.asleep) }

// claimed records a claim that returned n rows.
func (s *session) claimed(n int) {
	w := &s.wake
	if !w.asleep {
		if n == 0 {
			w.empty++
		} else {
			w.empty = 0
		}
		w.rows += int64(n)
		now := time.Now()
		if elapsed := now.Sub(w.since); elapsed > busyWindow {
			w.quiet = w.rows*int64(busyWindow) < w.quietRows()*int64(elapsed)
			w.since, w.rows = now, 0
		}
		return
	}
	w.checked = true
	if n == 0 || !w.awake {
		return // without the awake lock every writer notifies: the sleep lock costs them nothing
	}
	now := time.Now()
	if w.busy(now) || w.probe(now) {
		w.release = true
	}
}

// Asleep implements relay.Sleeper: the session holds the sleep lock and a claim ran since it was
// granted, so (by the protocol above) every writer that commits from now on notifies it, and
// the relay's poll is only a safety net for rows written with the trigger disabled (the awake
// lock plays no part: a writer that cannot take the sleep lock notifies).
func (s *session) Asleep() bool { return s.wake.asleep && s.wake.checked }

// Wait implements relay.Session: see the protocol above. It returns at once, with Notified
// set, when the relay must claim before it may sleep.
func (s *session) Wait(ctx context.Context, timeout time.Duration) error {
	s.dropPrefetched()
	w := &s.wake
	if w.release {
		if err := s.releaseSleep(ctx); err != nil {
			return err
		}
	}
	if !w.awake {
		got, err := s.lockWithin(ctx, s.store.table.awakeKey(), min(timeout, sleepLockWait))
		if err != nil {
			return err
		}
		w.awake, w.since, w.rows = got, time.Now(), 0
		w.setPolling()
	}
	if !w.asleep {
		if w.awake && !w.quiet && (s.lastRows > 0 || w.empty < emptyToSleep) {
			// Rows are coming and the writers do not notify an awake relay: look again soon. A
			// notification now is one sent before the relay woke (see heard): the timer, not it,
			// ends the wait.
			if s.lingerTimer == nil {
				s.lingerTimer = hrtimer.New()
			}
			_ = s.lingerTimer.Sleep(ctx, min(timeout, w.linger())) // a stop ends it early: the loop sees ctx
			s.notified.Store(true)
			return nil
		}
		got, err := s.lockWithin(ctx, s.store.table.sleepKey(), min(timeout, sleepLockWait))
		if err != nil {
			return err
		}
		if got {
			w.asleep, w.checked, w.quiet, w.since, w.base = true, false, false, time.Now(), w.heardN.Load()
			w.firstAt.Store(0)
			w.probeFrom, w.probeBase = w.since, w.base
			w.setPolling()
		}
		s.notified.Store(true) // the claim after the lock (or, without it, a poll)
		return nil
	}
	if !w.checked {
		s.notified.Store(true)
		return nil
	}
	if s.notified.Load() {
		return nil // a wake-up came with the answer to a statement above
	}
	return s.waitNotification(ctx, timeout)
}

// waitNotification waits for a notification at most timeout.
func (s *session) waitNotification(ctx context.Context, timeout time.Duration) error {
	wctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	_, err := s.conn.WaitForNotification(wctx)
	if err != nil && wctx.Err() != nil && ctx.Err() == nil && !s.conn.IsClosed() {
		return nil // the timeout passed: the connection is still good
	}
	return s.wrap(err)
}
