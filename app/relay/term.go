package relay

import (
	"context"
	"log/slog"
	"sync/atomic"
	"time"
)

// result is the broker's verdict on one message.
type result struct {
	m   *Message
	err error
	at  time.Time
	st  *txStream // the stream m was handed over in (PublishStreamed); nil for Publish
}

// term is the state of one leadership term. It is owned by one goroutine, the term's loop (run),
// but for the sink's callbacks (verdict), which send on results and note failures in the gate
// (keyGate.failed). The loop uses the session only through its owner (conn), which runs the
// claims, the watches for wake-ups and the marks beside the loop and brings their results back
// on channels.
type term struct {
	// What the term takes from its Relay: its configuration, sink, observer and logger, and
	// where it notes the last acknowledgement.
	cfg     Config
	sink    Sink
	obs     Observer
	log     *slog.Logger
	lastAck *atomic.Int64

	conn     *owner          // the owner of the session: every use of it goes through conn
	pubCtx   context.Context // what records are published with: the term's context (Fenced)
	inflight map[int64]*Message
	// bytes is the size of the rows in flight not yet acknowledged: the memory they hold.
	// Acknowledged rows wait for their mark in inflight, but their payloads are released.
	bytes   int
	results chan result
	ready   []result // the batch settleReady gathers (reused)
	// gate holds keys back: "may this row go now, and if not why".
	gate *keyGate
	// heads is, per waiting key, the database transaction of its head in the hand-over under
	// way (headTxs): the key's rows of that transaction go with the head.
	heads    map[string]int64
	lastPoll time.Time
	// blockedAt is when the database's blocked keys were last loaded into the gate.
	blockedAt time.Time
	// skip holds the ids a claim skips (reused: one claim runs at a time).
	skip []int64
	// A claim's result waits in ahead, once conn brought it back (claimEnded), until its rows
	// are handed to the sink (sendClaimed); parks refused by the sink while the next claim reads
	// ahead wait in toPark until that claim ended, so the loop is not held up behind it. There
	// is never both a claim running and a result in ahead.
	ahead  *claimed
	toPark []parkReq
	timer  *time.Timer // the loop's wait for the poll interval or a mark falling due (reused)
	send   []*Message  // the rows of the current claim that go to the sink (reused)
	unused []*Message  // the rows of the current claim that do not (reused)
	acked  []*Message  // the rows settle found acknowledged, to release (reused)
	// cur is where the next claim starts and how much it may read.
	cur cursor
	// Acknowledged rows are marked by one Mark at a time, running beside the claims so the
	// database's commit of a mark does not hold up the next claim: marking is the batch being
	// marked, toMark the rows acknowledged since. Both stay in inflight until marked, so a
	// claim does not publish them again and they count against MaxInFlight (the duplicate
	// bound), not against MaxInFlightBytes (their payloads were released at the ack).
	marking []*Message
	toMark  []*Message
	// toMarkSince is when the oldest row of toMark was acknowledged: a mark waits up to markDelay
	// to gather more rows (see startMark). stopping marks at once.
	toMarkSince time.Time
	stopping    bool
	// toMarkIDs are rows of a committed stream waiting for their mark, without their messages
	// (released at the broker's acknowledgement); markingIDs how many of them the running mark
	// holds, after the rows of marking.
	toMarkIDs  []int64
	markingIDs int
	// stream is the stream under way (stream.go), until its rows are marked; streamEnd brings
	// EndStream's outcome. A failed stream makes the next wait until streamRetryAt (streamFails
	// in a row). resume asks the loop for a claim once a stream is over.
	stream        *txStream
	streamEnd     chan streamOutcome
	streamFails   int
	streamRetryAt time.Time
	resume        bool
	// streamWaiting: a claim's rest may stream once nothing is unacknowledged (mayStream).
	streamWaiting bool
}

// newTerm returns the state of a term of r that leads on the session conn owns and publishes
// with pubCtx.
func newTerm(r *Relay, conn *owner, pubCtx context.Context) *term {
	l := &term{
		cfg:      r.cfg,
		sink:     r.sink,
		obs:      r.obs,
		log:      r.log,
		lastAck:  &r.lastAck,
		conn:     conn,
		pubCtx:   pubCtx,
		inflight: make(map[int64]*Message),
		results:  make(chan result, r.cfg.MaxInFlight+1),
		cur:      newCursor(r.cfg),
		gate:     newKeyGate(r.cfg.backoff),
		timer:    time.NewTimer(time.Hour),
		// One outcome at a time, and the sink's Abort may end a stream while no one reads.
		streamEnd: make(chan streamOutcome, 1),
	}
	l.timer.Stop()
	return l
}

// run leads the term until ctx ends or the session fails.
func (l *term) run(ctx context.Context) error {
	// wake says a claim is wanted now: a wake-up came, or the last claim stopped at its bound.
	// Starting a claim clears it, so a wake-up that comes while the claim reads is kept.
	wake := true
	for {
		select {
		case res := <-l.conn.claimResult(): // never ready when no claim runs
			if err := l.claimEnded(ctx, res); err != nil {
				return l.abandon(err)
			}
		default:
		}
		select {
		case res := <-l.conn.markDone:
			if err := l.marked(ctx, res); err != nil {
				return l.abandon(err)
			}
		default:
		}
		select {
		case o := <-l.streamEnd:
			l.streamEnded(o)
		default:
		}
		if err := l.settleReady(ctx); err != nil {
			return l.abandon(err)
		}
		if ctx.Err() != nil {
			return l.shutdown(ctx) // the rows of a claim not handed to the sink stay pending
		}
		if l.streamWaiting && l.bytes == 0 {
			l.streamWaiting, l.resume = false, true // the rows in flight committed: the rest may stream
		}
		if l.conn.wokenUp() || l.resume {
			wake, l.resume = true, false
		}
		// Not cancelled by a stop: a query interrupted by cancellation closes the connection
		// (pgx), and the rows in flight could then not be marked once acknowledged. The store's
		// query timeout bounds the claim.
		if l.ahead != nil {
			more, err := l.sendClaimed(context.WithoutCancel(ctx))
			if err != nil {
				return l.abandon(err)
			}
			wake = wake || more
			continue
		}
		if l.stream != nil {
			if err := l.driveStream(context.WithoutCancel(ctx)); err != nil {
				return l.abandon(err)
			}
		}
		room := len(l.inflight) < l.cfg.MaxInFlight && l.bytes < l.cfg.MaxInFlightBytes
		l.startMark(!room || l.streamBusy()) // rows that wait only for their mark hold up the claims: mark them now
		poll := l.pollEvery()
		if room && !l.conn.claiming && !l.streamBusy() && (wake || time.Since(l.lastPoll) >= poll) {
			wake = false
			if err := l.startClaim(context.WithoutCancel(ctx)); err != nil {
				return l.abandon(err)
			}
			continue
		}
		// Wait for what comes first: the claim reading, the broker's verdicts, the running mark,
		// a wake-up, the poll interval or a waiting mark falling due. While no claim runs and
		// the bounds leave room for one, conn watches the session for wake-ups, so a commit is
		// claimed while the rows before it still wait for the broker.
		canClaim := room && !l.conn.claiming && !l.streamBusy()
		if canClaim && !l.conn.watching {
			then, until := l.claimOnWake()
			l.conn.watch(ctx, poll, then, context.WithoutCancel(ctx), until)
		}
		d := poll
		if canClaim {
			d -= time.Since(l.lastPoll) // positive: a claim would have started above
		}
		if markIn, pending := l.markDue(); pending {
			d = min(d, markIn)
		}
		l.timer.Reset(d)
		select {
		case res := <-l.conn.claimResult(): // nil, never ready, unless a claim runs
			if err := l.claimEnded(ctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.results:
			if err := l.settleReady(ctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.conn.markDone:
			if err := l.marked(ctx, res); err != nil {
				return l.abandon(err)
			}
		case o := <-l.streamEnd:
			l.streamEnded(o)
		case end := <-l.conn.watchResult(): // likewise unless conn watches: a wake-up (which may have claimed), or the watch's timeout
			if err := l.conn.watchEnded(end); err != nil {
				return l.abandon(err)
			}
		case <-l.timer.C:
		case <-ctx.Done():
		}
		l.timer.Stop()
	}
}

// asleepPolls is how many poll intervals apart a relay polls while its session sleeps with
// nothing to do (pollEvery).
const asleepPolls = 2

// pollEvery returns how long after the last claim the next one starts without a wake-up:
// Config.PollInterval, or asleepPolls of it while nothing is to do but wait for a wake-up: the
// session sleeps (Sleeper, so every row committed through the outbox's trigger wakes it), the
// last claim returned no rows, no row is in flight or waits to be parked, and no key waits
// (keyGate.quiet: no failing or resending row of this term, no blocked key in the database at
// the last reload). A poll then finds only rows that sent no wake-up (written with the trigger
// disabled: found up to asleepPolls poll intervals later), as rows whose retry falls due keep
// their key blocked, and parked rows put back are inserted through the trigger. An idle relay's
// poll (the blocked keys and a claim, with their hand-offs between goroutines) was most of its
// cost.
func (l *term) pollEvery() time.Duration {
	if l.conn.sleeping() && l.cur.idle && l.stream == nil && len(l.inflight) == 0 && len(l.toPark) == 0 && l.gate.quiet() {
		return asleepPolls * l.cfg.PollInterval
	}
	return l.cfg.PollInterval
}
