package app

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"math/rand/v2"

	"sync/atomic"
	"time"
)

// Relay moves committed outbox rows to a Sink, in order per aggregate, and marks each row only
// after the sink acknowledged it.
//
// One Relay runs per process. Among replicas sharing an outbox, the one whose Session holds the
// leadership publishes; the others wait and take over when its session ends.
type Relay struct {
	cfg   RelayConfig
	store Store
	sink  Sink
	obs   RelayObserver
	log   *slog.Logger

	leader    atomic.Bool
	connected atomic.Bool
	lastAck   atomic.Int64 // unix nanoseconds of the last acknowledgement
}

// NewRelay returns a relay. cfg is completed with defaults and validated; obs and log may be nil.
func NewRelay(cfg RelayConfig, store Store, sink Sink, obs RelayObserver, log *slog.Logger) (*Relay, error) {
	cfg = cfg.WithDefaults()
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	if store == nil || sink == nil {
		return nil, errors.New("new relay: store and sink are required")
	}
	if obs == nil {
		obs = NopObserver{}
	}
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Relay{cfg: cfg, store: store, sink: sink, obs: obs, log: log}, nil
}

// Leader reports whether this relay currently holds the leadership.
func (r *Relay) Leader() bool { return r.leader.Load() }

// LastAck returns when the broker last acknowledged a message of this relay (zero if never).
func (r *Relay) LastAck() time.Time {
	if n := r.lastAck.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// Connected reports whether this relay's database session is up.
func (r *Relay) Connected() bool { return r.connected.Load() }

// Run relays until ctx is cancelled. On cancellation it stops claiming, waits up to
// ShutdownTimeout for what is in flight, marks what was acknowledged, and returns nil.
// Database failures are retried with capped backoff; Run returns an error only for a session
// the database cannot keep (ErrSessionUnsupported: retrying cannot help, and the relay must not
// lead on it) and for bugs.
func (r *Relay) Run(ctx context.Context) error {
	delay := 100 * time.Millisecond
	for ctx.Err() == nil {
		sess, err := r.store.Open(ctx)
		if err != nil {
			if ctx.Err() != nil {
				break
			}
			if errors.Is(err, ErrSessionUnsupported) {
				return err
			}
			level := slog.LevelWarn
			if delay > 100*time.Millisecond {
				level = slog.LevelDebug // still down: the change of state was logged already
			}
			r.log.Log(ctx, level, "database unreachable, retrying", "err", err, "retry_in", delay)
			if !sleep(ctx, jitter(delay)) {
				break
			}
			delay = min(delay*2, r.cfg.ReconnectBackoffMax)
			continue
		}
		r.setConnected(true)
		delay = 100 * time.Millisecond
		err = r.session(ctx, sess)
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = sess.Close(closeCtx)
		cancel()
		r.setConnected(false)
		if ctx.Err() != nil {
			break
		}
		if errors.Is(err, ErrSessionUnsupported) {
			return err
		}
		r.log.Warn("database session ended, reconnecting", "err", err, "retry_in", delay)
		if !sleep(ctx, jitter(delay)) {
			break
		}
		delay = min(delay*2, r.cfg.ReconnectBackoffMax)
	}
	return nil
}

func (r *Relay) setConnected(up bool) {
	if r.connected.Swap(up) != up {
		r.obs.Connected(up)
		if up {
			r.log.Info("database connected")
		}
	}
}

// session waits for the leadership on sess, then leads until sess fails or ctx ends.
func (r *Relay) session(ctx context.Context, sess Session) error {
	standbyLogged := false
	for {
		ok, err := sess.TryLead(ctx)
		if err != nil {
			if ctx.Err() != nil {
				return nil
			}
			return fmt.Errorf("try lead: %w", err)
		}
		if ok {
			break
		}
		if !standbyLogged {
			r.log.Info("standby: another replica leads")
			standbyLogged = true
		}
		if !sleep(ctx, r.cfg.LeaderRetryInterval) {
			return nil
		}
	}
	// Records go to the sink with the term's context: a sink checks it where they leave the
	// process, so a leader that was frozen past its lease sends nothing when it wakes.
	pubCtx := context.WithoutCancel(ctx)
	if f, ok := sess.(Fenced); ok {
		if tctx, holdOff := f.TermContext(); tctx != nil {
			pubCtx = tctx
			if holdOff > 0 {
				// Another replica led until now, and may be frozen rather than gone: its lease
				// runs out before this one publishes anything.
				r.log.Info("took over from another replica: waiting out its lease before publishing", "wait", holdOff)
				if !sleep(ctx, holdOff) {
					return nil
				}
				if tctx.Err() != nil {
					return fmt.Errorf("lease: %w", tctx.Err())
				}
			}
		}
	}
	r.leader.Store(true)
	r.obs.Leading(true)
	r.log.Info("leadership gained")
	defer func() {
		r.leader.Store(false)
		r.obs.Leading(false)
		r.log.Info("leadership released")
	}()
	l := &leadState{
		Relay:      r,
		sess:       sess,
		pubCtx:     pubCtx,
		inflight:   make(map[int64]*Message),
		results:    make(chan result, r.cfg.MaxInFlight+1),
		cur:        newCursor(r.cfg),
		gate:       newKeyGate(r.cfg.backoff),
		markReq:    make(chan []int64),
		markDone:   make(chan markResult, 1),
		claimReq:   make(chan claimReq),
		claimDone:  make(chan claimed, 1),
		listenReq:  make(chan context.Context),
		listenDone: make(chan error, 1),
		timer:      time.NewTimer(time.Hour),
	}
	l.timer.Stop()
	if rel, ok := sess.(Releaser); ok {
		if rs, ok := r.sink.(ReleasingSink); ok && rs.ReleasesMessages() {
			l.releaser = rel
		}
	}
	// One goroutine runs the term's marks, one at a time: a goroutine per mark grew a fresh stack
	// for the driver's calls every time, which was a tenth of the relay's CPU at low rates.
	go l.markLoop(context.WithoutCancel(ctx))
	defer close(l.markReq)
	// One goroutine runs the term's claims, for the same reason, and watches the session for
	// wake-ups between them. The loop never waits for a claim it can do without: while one
	// reads, it settles the broker's verdicts and starts marks.
	go l.claimLoop(context.WithoutCancel(ctx))
	defer close(l.claimReq)
	return l.run(ctx)
}

// result is the broker's verdict on one message.
type result struct {
	m   *Message
	err error
	at  time.Time
}

// claimReq is a claim for claimLoop to run: rows from from, skipping skip (the ids in flight,
// owned by the claim until its result is back) and the rows of the keys in hold but their heads
// (see holdKeys), at most limit rows and about budget bytes. horizon is the session's horizon
// read before the claim's snapshot, for advance.
type claimReq struct {
	from, horizon int64
	skip          []int64
	hold          Blocked
	limit, budget int
}

// claimed is the result of a claimReq.
type claimed struct {
	claimReq
	rows []Message
	err  error
	took time.Duration
}

// parkReq is a park put off while a claim reads ahead.
type parkReq struct {
	m      *Message
	reason string
}

// markResult is the outcome of one Mark of the rows in leadState.marking.
type markResult struct {
	err  error
	took time.Duration
}

// leadState is the state of one leadership term. It is owned by one goroutine.
type leadState struct {
	*Relay
	sess     Session
	pubCtx   context.Context // what records are published with: the term's context (Fenced)
	inflight map[int64]*Message
	// bytes is the size of the rows in flight not yet acknowledged: the memory they hold.
	// Acknowledged rows wait for their mark in inflight, but their payloads are released.
	bytes   int
	results chan result
	ready   []result // the batch settleReady gathers (reused)
	// gate holds keys back: "may this row go now, and if not why".
	gate     *keyGate
	lastPoll time.Time
	// blockedAt is when the database's blocked keys were last loaded into the gate.
	blockedAt time.Time
	// skip holds the ids a claim skips (reused: one claim runs at a time).
	skip []int64
	// Claims run in claimLoop: claimReq starts one, claimDone brings its result back, and
	// claiming is true in between. The session's connection is the claim's meanwhile: anything
	// else that needs it waits for the result first (await), which is kept in ahead until claim
	// hands its rows to the sink; the parks of that time wait in toPark. There is never both a
	// claim running and a result in ahead.
	claimReq  chan claimReq
	claimDone chan claimed
	claiming  bool
	ahead     *claimed
	// While no claim runs and one could start, claimLoop watches the session for wake-ups
	// instead (listen), so a commit is claimed while the rows before it wait for the broker:
	// listenReq starts the watch, listenDone brings its end back, listening is true in between
	// and stopListen cuts it short. The session is the watch's meanwhile, as it is a claim's.
	listenReq  chan context.Context
	listenDone chan error
	listening  bool
	stopListen context.CancelFunc
	timer      *time.Timer // the loop's wait for the poll interval or a mark falling due (reused)
	toPark     []parkReq
	send       []*Message // the rows of the current claim that go to the sink (reused)
	unused     []*Message // the rows of the current claim that do not (reused)
	acked      []*Message // the rows settle found acknowledged, to release (reused)
	// cur is where the next claim starts and how much it may read.
	cur cursor
	// releaser, when the session and the sink allow it, lets the session reuse the memory of
	// the rows acknowledged (see Releaser).
	releaser Releaser
	// Acknowledged rows are marked by one Mark at a time, running beside the claims so the
	// database's commit of a mark does not hold up the next claim: marking is the batch being
	// marked, toMark the rows acknowledged since. Both stay in inflight until marked, so a
	// claim does not publish them again and they count against MaxInFlight (the duplicate
	// bound), not against MaxInFlightBytes (their payloads were released at the ack).
	marking  []*Message
	toMark   []*Message
	markReq  chan []int64 // to markLoop: the ids of the next mark
	markDone chan markResult
	// toMarkSince is when the oldest row of toMark was acknowledged: a mark waits up to markDelay
	// to gather more rows (see startMark). stopping marks at once.
	toMarkSince time.Time
	stopping    bool
}

// reported is the sink's callback for m: it notes a failure's key in the gate before handing the
// verdict to the loop.
func (l *leadState) reported(m *Message, err error) {
	if err != nil {
		l.gate.failed(m)
	}
	l.results <- result{m: m, err: err, at: time.Now()}
}

func (l *leadState) run(ctx context.Context) error {
	// wake says a claim is wanted now: a wake-up came, or the last claim stopped at its bound.
	// Starting a claim clears it, so a wake-up that comes while the claim reads is kept.
	wake := true
	for {
		if l.claiming {
			select {
			case res := <-l.claimDone:
				if err := l.took(ctx, res); err != nil {
					return l.abandon(err)
				}
			default:
			}
		}
		select {
		case res := <-l.markDone:
			if err := l.marked(ctx, res); err != nil {
				return l.abandon(err)
			}
		default:
		}
		if err := l.settleReady(ctx); err != nil {
			return l.abandon(err)
		}
		if ctx.Err() != nil {
			if err := l.await(ctx); err != nil { // the rows it read stay pending
				return l.abandon(err)
			}
			return l.shutdown(ctx)
		}
		if l.sess.Notified() {
			wake = true
		}
		// Not cancelled by a stop: a query interrupted by cancellation closes the connection
		// (pgx), and the rows in flight could then not be marked once acknowledged. The store's
		// query timeout bounds the claim.
		if l.ahead != nil {
			more, err := l.claim(context.WithoutCancel(ctx))
			if err != nil {
				return l.abandon(err)
			}
			wake = wake || more
			continue
		}
		room := len(l.inflight) < l.cfg.MaxInFlight && l.bytes < l.cfg.MaxInFlightBytes
		l.startMark(!room) // rows that wait only for their mark hold up the claims: mark them now
		if room && !l.claiming && (wake || time.Since(l.lastPoll) >= l.cfg.PollInterval) {
			wake = false
			if err := l.startClaim(context.WithoutCancel(ctx)); err != nil {
				return l.abandon(err)
			}
			continue
		}
		// Wait for what comes first: the claim reading, the broker's verdicts, the running mark,
		// a wake-up, the poll interval or a waiting mark falling due. While no claim runs and
		// the bounds leave room for one, claimLoop watches the session for wake-ups, so a
		// commit is claimed while the rows before it still wait for the broker.
		canClaim := room && !l.claiming
		if canClaim && !l.listening {
			l.listen(ctx)
		}
		d := l.cfg.PollInterval
		if canClaim {
			d -= time.Since(l.lastPoll) // positive: a claim would have started above
		}
		if markIn, pending := l.markDue(); pending {
			d = min(d, markIn)
		}
		var claimDone <-chan claimed // nil, never ready, unless a claim runs
		if l.claiming {
			claimDone = l.claimDone
		}
		var heard <-chan error // likewise, unless claimLoop listens
		if l.listening {
			heard = l.listenDone
		}
		l.timer.Reset(d)
		select {
		case res := <-claimDone:
			if err := l.took(ctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.results:
			if err := l.settleReady(ctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.markDone:
			if err := l.marked(ctx, res); err != nil {
				return l.abandon(err)
			}
		case err := <-heard: // a wake-up (Notified says so), or the watch's own timeout
			if err := l.listened(err); err != nil {
				return l.abandon(err)
			}
		case <-l.timer.C:
		case <-ctx.Done():
		}
		l.timer.Stop()
	}
}

// markDelay is how long acknowledged rows may wait for more to be marked with them. Without it,
// at a thousand events a second each mark carried one or two rows, and marks (two round trips
// and a commit each) were most of the relay's database work; rows are marked at the latest this
// much later, and at once when BatchSize rows wait or the in-flight bounds are reached.
const markDelay = 10 * time.Millisecond

// settleReady settles first (when given) and every result ready now, without blocking. The
// batch is gathered in a buffer kept from one call to the next (at a hundred thousand events a
// second, a new slice each time was a sixth of the relay's allocations), and cleared after:
// it must not keep the messages alive.
func (l *leadState) settleReady(ctx context.Context, first ...result) error {
	batch := append(l.ready[:0], first...)
	for more := true; more; {
		select {
		case res := <-l.results:
			batch = append(batch, res)
		default:
			more = false
		}
	}
	err := l.settle(ctx, batch)
	clear(batch)
	l.ready = batch[:0]
	return err
}

// startClaim starts a claim in claimLoop from the oldest pending row not accounted for. Once per
// poll interval it first reloads the blocked keys, and that claim reads from the oldest row (see
// reload). No claim runs and none waits in ahead when it is called.
func (l *leadState) startClaim(ctx context.Context) error {
	if err := l.unlisten(); err != nil {
		return err
	}
	now := time.Now()
	full := !l.gate.loaded() || now.Sub(l.blockedAt) >= l.cfg.PollInterval
	if full {
		if err := l.reload(ctx, now); err != nil {
			return err
		}
	}
	// Every claim reads from the oldest pending row it has not accounted for, past the rows in
	// flight, in one snapshot: a cursor carried from one claim to the next would pass over a row
	// whose transaction was still open, and the next row of its key, committed after it, would
	// go out first. from never passes the horizon, below which no transaction is open.
	horizon, err := l.horizon(ctx)
	if err != nil {
		return err
	}
	l.skip = l.appendInflight(l.skip[:0])
	limit, budget := l.cur.claimSize(len(l.inflight), l.bytes)
	// The loop claims only below the bounds; the first row always fits.
	l.launch(claimReq{from: l.cur.start(full, l.gate.lowestHead()), horizon: horizon, skip: l.skip, hold: l.gate.holdKeys(time.Now()),
		limit: max(limit, 1), budget: max(budget, 1)})
	return nil
}

// launch hands req to claimLoop.
func (l *leadState) launch(req claimReq) {
	l.claiming = true
	l.claimReq <- req
}

// claimLoop runs the claims sent on claimReq until it is closed, one at a time, and between them
// the watches for wake-ups sent on listenReq.
func (l *leadState) claimLoop(ctx context.Context) {
	for {
		select {
		case req, ok := <-l.claimReq:
			if !ok {
				return
			}
			start := time.Now()
			rows, err := l.sess.Claim(ctx, req.from, req.skip, req.limit, req.budget, req.hold)
			l.claimDone <- claimed{claimReq: req, rows: rows, err: err, took: time.Since(start)} // buffered: one claim at a time
		case lctx := <-l.listenReq:
			err := l.sess.Wait(lctx, l.cfg.PollInterval)
			if lctx.Err() != nil {
				err = nil // cut short by the loop (unlisten) or by the relay's stop: not a failure
			}
			l.listenDone <- err // buffered: one watch at a time
		}
	}
}

// listen starts claimLoop watching the session for wake-ups. No claim runs when it is called.
func (l *leadState) listen(ctx context.Context) {
	lctx, stop := context.WithCancel(ctx)
	l.stopListen = stop
	l.listening = true
	l.listenReq <- lctx
}

// unlisten stops claimLoop watching the session, if it does, and waits until it has: the session
// is free for another query after it. A wake-up that came meanwhile is kept (Notified).
func (l *leadState) unlisten() error {
	if !l.listening {
		return nil
	}
	l.stopListen()
	return l.listened(<-l.listenDone)
}

// listened ends the watch whose result was err: its context is released, and a failure of the
// session is returned.
func (l *leadState) listened(err error) error {
	l.listening = false
	l.stopListen()
	if err != nil {
		return fmt.Errorf("wait for wake-up: %w", err)
	}
	return nil
}

// took keeps the result of the claim that ended in ahead: the session is free again, and the
// parks put off meanwhile are done.
func (l *leadState) took(ctx context.Context, res claimed) error {
	l.claiming = false
	l.ahead = &res
	return l.parkPutOff(ctx)
}

// claim hands the rows of the claim in ahead to the sink and, when the claim stopped at its bound
// and the bounds leave room, starts the next one beside it. It reports whether more rows may be
// waiting right now.
func (l *leadState) claim(ctx context.Context) (bool, error) {
	a := l.ahead
	l.ahead = nil
	if a.err != nil {
		return false, fmt.Errorf("claim: %w", a.err)
	}
	rows, limit, budget := a.rows, a.limit, a.budget
	l.obs.Claimed(len(rows), a.took)
	// Rows may be waiting if the claim stopped at its row or byte bound (more).
	size, more := l.cur.read(a.from, a.horizon, limit, budget, rows)
	now := time.Now()
	l.lastPoll = now
	// The rows that go to the sink: not in flight already, not waiting behind an earlier row.
	l.send, l.unused = l.send[:0], l.unused[:0]
	for i := range rows {
		m := &rows[i]
		if _, dup := l.inflight[m.ID]; !dup && !l.gate.held(m, now) {
			l.send = append(l.send, m)
		} else {
			l.unused = append(l.unused, m)
		}
	}
	// A full batch: read the next one ahead while this one goes to the sink, if the bounds leave
	// room for both. It skips the rows in flight and those of this batch that go to the sink, as
	// a claim after it would; a row held back here must not be skipped, or a later row of its key
	// could be read without it. When the blocked keys are due to be reloaded, the loop starts the
	// next claim itself, after the reload.
	reloadDue := time.Since(l.blockedAt) >= l.cfg.PollInterval
	if more && !reloadDue {
		if nextLimit, nextBudget := l.cur.claimSize(len(l.inflight)+len(rows), l.bytes+size); nextLimit > 0 && nextBudget > 0 {
			l.skip = l.appendInflight(l.skip[:0])
			for _, m := range l.send {
				l.skip = append(l.skip, m.ID)
			}
			// The horizon known now was read before the read-ahead's snapshot, as advance needs.
			l.launch(claimReq{from: l.cur.start(false, l.gate.lowestHead()), horizon: l.cur.horizonSeen, skip: l.skip, hold: l.gate.holdKeys(now),
				limit: nextLimit, budget: nextBudget})
		}
	}
	for _, m := range l.send {
		if l.gate.held(m, time.Now()) { // an earlier row of its key was refused or failed just now: the key waits
			if l.claiming {
				l.cur.passedOver(m.ID) // the read-ahead passes over it: claims must come back to it
			}
			l.unused = append(l.unused, m)
			continue
		}
		err := l.sink.Publish(l.pubCtx, m, func(err error) { l.reported(m, err) })
		if err != nil {
			// Parked once the session is free; until then the key's later rows wait, as the
			// park would make them.
			l.toPark = append(l.toPark, parkReq{m: m, reason: err.Error()})
			if l.cfg.OrderPolicy == OrderPolicyWait {
				l.gate.holdParked(m)
			}
			continue
		}
		l.inflight[m.ID] = m
		l.bytes += m.Size()
	}
	l.release(l.unused) // read but not handed to the sink: held back, or in flight already
	if !l.claiming {
		if err := l.parkPutOff(ctx); err != nil {
			return false, err
		}
	}
	return more, nil
}

// reload reloads the blocked keys, once per poll interval rather than at every claim: a relay
// that is caught up claims at every wake-up, and two more queries per claim doubled its CPU per
// event at low rates. This term's own failures hold their keys in the gate meanwhile. The claim
// after a reload reads from the oldest row: a key it releases may have its parked row back in
// the outbox, below the cursor. No rows read before the reload wait to go to the sink (startClaim): they
// could hold the key's later rows without that one.
func (l *leadState) reload(ctx context.Context, now time.Time) error {
	l.blockedAt = now
	blocked, err := l.sess.Blocked(ctx, l.cfg.OrderPolicy == OrderPolicyWait)
	if err != nil {
		return fmt.Errorf("load blocked keys: %w", err)
	}
	// Parked keys are known to the database: an operator may have retried or dropped the parked
	// row since, and the reload says whether the key still waits.
	l.gate.reload(blocked)
	return nil
}

// release lets the session reuse the memory of msgs, which nothing refers to any more, when the
// session and the sink allow it (see Releaser).
func (l *leadState) release(msgs []*Message) {
	if l.releaser != nil && len(msgs) > 0 {
		l.releaser.Release(msgs)
	}
}

// horizon asks the session for its horizon (see Session.Horizon), once it is known to have one.
func (l *leadState) horizon(ctx context.Context) (int64, error) {
	if l.cur.noHorizon {
		return 0, nil
	}
	h, err := l.sess.Horizon(ctx)
	if errors.Is(err, ErrNoHorizon) {
		l.cur.noHorizon = true
		l.log.Warn("every claim reads from the oldest pending row", "reason", err)
		return 0, nil
	}
	if err != nil {
		return 0, fmt.Errorf("read the id horizon: %w", err)
	}
	l.cur.horizonSeen = h
	return h, nil
}

// appendInflight appends the ids in flight to dst, for a claim to skip.
func (l *leadState) appendInflight(dst []int64) []int64 {
	for id := range l.inflight {
		dst = append(dst, id)
	}
	return dst
}

// await waits for the running claim, if any, and keeps its result in ahead (took), or stops the
// watch for wake-ups: the session is free for another query after it.
func (l *leadState) await(ctx context.Context) error {
	if err := l.unlisten(); err != nil {
		return err
	}
	if !l.claiming {
		return nil
	}
	return l.took(ctx, <-l.claimDone)
}

// parkPutOff parks the rows refused while a claim was reading ahead.
func (l *leadState) parkPutOff(ctx context.Context) error {
	for len(l.toPark) > 0 {
		p := l.toPark[0]
		l.toPark = l.toPark[1:]
		if err := l.park(ctx, p.m, p.reason); err != nil {
			return err
		}
	}
	return nil
}

// missingRetryMax caps the delay between two sends of a row whose destination is missing, so
// that rows go out soon after an operator creates it.
const missingRetryMax = 10 * time.Second

// destinationMissing holds m's key and sends m again after a backoff, without an attempt counted
// against it: its destination does not exist (ErrDestinationMissing), which is no fault of the
// row. The sink says so once per destination; the row stays due in the database.
func (l *leadState) destinationMissing(m *Message) {
	at := l.gate.resendAfter(m, missingRetryMax, time.Now())
	l.log.Debug("destination missing, sending again without counting an attempt", "row_id", m.ID,
		"event_id", m.EventID, "retry_in", time.Until(at).Round(time.Millisecond))
}

// settle queues the acknowledged messages for marking and records the failures.
func (l *leadState) settle(ctx context.Context, results []result) error {
	if len(results) == 0 {
		return nil
	}
	ctx = context.WithoutCancel(ctx) // what the broker acknowledged is marked even when stopping
	defer l.startMark(false)
	acked := l.acked[:0]
	defer func() {
		// The broker has them: nothing reads their payloads and headers again. Their bytes leave
		// the byte budget now, their rows the in-flight set only once marked.
		l.release(acked)
		clear(acked)
		l.acked = acked[:0]
	}()
	for _, res := range results {
		m := res.m
		if res.err == nil {
			if len(l.toMark) == 0 {
				l.toMarkSince = time.Now()
			}
			l.toMark = append(l.toMark, m) // in flight until marked
			l.bytes -= m.Size()
			acked = append(acked, m)
			if l.gate.acked(m, time.Now()) {
				l.cur.rewind(m.ID) // its key's later rows may lie below where claims start
			}
			l.obs.Acked(m, res.at)
			l.lastAck.Store(res.at.UnixNano())
			continue
		}
		if errors.Is(res.err, ErrNotLeader) {
			// The sink refused it for the term's lease: the leadership may be gone, so nothing
			// is counted against the row; the term ends and the row stays pending.
			return fmt.Errorf("row %d not sent: %w", m.ID, res.err)
		}
		// A failure is recorded, or its row parked, on the session: the claim running on it ends
		// first. Its rows are handed to the sink after this failure is settled, so the key's
		// later rows among them are held back.
		if err := l.await(ctx); err != nil {
			return err
		}
		delete(l.inflight, m.ID)
		l.bytes -= m.Size()
		l.gate.taken(m) // the key stays held below, by the gate or the park's order policy
		l.obs.Failed(m, res.err)
		if l.gate.behindOwnFailure(m) {
			continue // an earlier row of this key failed first: this one only waits behind it
		}
		if errors.Is(res.err, ErrDestinationMissing) {
			l.destinationMissing(m)
			continue
		}
		if l.gate.collateral(m, res.err, res.at, time.Now()) { // the key's later rows wait behind m
			l.log.Debug("publish failed with its group, resending without counting an attempt",
				"row_id", m.ID, "event_id", m.EventID, "aggregate_type", m.AggregateType,
				"aggregate_id", m.AggregateID, "retry_in", time.Until(l.gate.resendTime(m.ID)).Round(time.Millisecond), "err", res.err)
			continue
		}
		if errors.Is(res.err, ErrInvalidMessage) || m.Attempts+1 >= l.cfg.MaxAttempts {
			if err := l.park(ctx, m, res.err.Error()); err != nil {
				return err
			}
			continue
		}
		delay := l.cfg.backoff(m.Attempts + 1)
		if err := l.sess.Retry(ctx, m.ID, res.err.Error(), delay); err != nil {
			return fmt.Errorf("record failed attempt of row %d: %w", m.ID, err)
		}
		l.gate.holdBehind(m)
		l.log.Warn("publish failed, will retry", "row_id", m.ID, "event_id", m.EventID,
			"aggregate_type", m.AggregateType, "aggregate_id", m.AggregateID,
			"attempt", m.Attempts+1, "retry_in", delay, "err", res.err)
	}
	return nil
}

// startMark hands the acknowledged rows waiting in toMark to markLoop, unless a mark is running
// (its result comes back on markDone, and the next batch starts then) or the rows may still wait
// for others (markDelay); now starts them regardless.
func (l *leadState) startMark(now bool) {
	if l.marking != nil || len(l.toMark) == 0 {
		return
	}
	if !now && !l.stopping && len(l.toMark) < l.cfg.BatchSize && time.Since(l.toMarkSince) < markDelay {
		return
	}
	l.marking, l.toMark = l.toMark, nil
	ids := make([]int64, len(l.marking))
	for i, m := range l.marking {
		ids[i] = m.ID
	}
	l.markReq <- ids
}

// markDue reports whether rows wait for a mark that has not started, and how long until it is
// due.
func (l *leadState) markDue() (time.Duration, bool) {
	if l.marking != nil || len(l.toMark) == 0 {
		return 0, false
	}
	return max(markDelay-time.Since(l.toMarkSince), 0), true
}

// markLoop runs the marks sent on markReq until it is closed. The acknowledged rows are marked
// even when the relay is stopping: ctx is not cancelled by a stop.
func (l *leadState) markLoop(ctx context.Context) {
	for ids := range l.markReq {
		start := time.Now()
		mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := l.sess.Mark(mctx, ids)
		cancel()
		l.markDone <- markResult{err: err, took: time.Since(start)} // buffered: one mark at a time
	}
}

// marked ends the running mark: its rows leave the in-flight set, and the next batch starts.
func (l *leadState) marked(ctx context.Context, res markResult) error {
	batch := l.marking
	l.marking = nil
	if res.err != nil {
		// The rows stay pending and are published again by the next leader: duplicates
		// bounded by what was in flight.
		return fmt.Errorf("mark %d published rows: %w", len(batch), res.err)
	}
	for _, m := range batch {
		delete(l.inflight, m.ID) // their bytes left the budget, and were released, at the ack
	}
	l.obs.Marked(len(batch), res.took)
	l.startMark(false)
	return nil
}

// park moves m to the parked rows and applies the order policy to its key.
func (l *leadState) park(ctx context.Context, m *Message, reason string) error {
	if err := l.sess.Park(context.WithoutCancel(ctx), m.ID, reason); err != nil {
		return fmt.Errorf("park row %d: %w", m.ID, err)
	}
	if l.gate.parked(m, l.cfg.OrderPolicy == OrderPolicyWait, time.Now()) {
		l.cur.rewind(m.ID) // its key's later rows may lie below where claims start
	}
	l.obs.Parked(m, reason)
	l.log.Warn("row parked", "row_id", m.ID, "event_id", m.EventID, "aggregate_type", m.AggregateType,
		"aggregate_id", m.AggregateID, "attempts", m.Attempts+1, "reason", reason, "order_policy", l.cfg.OrderPolicy)
	return nil
}

// abandon ends a term whose session failed: it stops the sink from publishing anything more of
// this term, since another replica may lead by now.
func (l *leadState) abandon(cause error) error {
	_ = l.unlisten() // the session is closed next: let the watch end first
	if l.claiming {
		<-l.claimDone // the session is closed next: let the running claim end first
		l.claiming = false
	}
	l.toPark = nil // still pending in the outbox: the next leader sees them again
	if len(l.inflight) > 0 {
		ctx, cancel := context.WithTimeout(context.Background(), l.cfg.ShutdownTimeout)
		_ = l.sink.Abort(ctx)
		cancel()
		for len(l.results) > 0 { // the verdicts of the aborted rows: nothing is marked now
			<-l.results
		}
	}
	if l.marking != nil {
		<-l.markDone // the session is closed next: let the running mark end first (it has a timeout)
		l.marking = nil
	}
	return cause
}

// shutdown waits for what is in flight, marks it and ends the term.
func (l *leadState) shutdown(ctx context.Context) error {
	deadline := time.NewTimer(l.cfg.ShutdownTimeout)
	defer deadline.Stop()
	sctx := context.WithoutCancel(ctx)
	l.stopping = true
	l.startMark(true)
	for len(l.inflight) > 0 {
		select {
		case res := <-l.results:
			if err := l.settleReady(sctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.markDone:
			if err := l.marked(sctx, res); err != nil {
				return l.abandon(err)
			}
		case <-deadline.C:
			l.log.Warn("shutdown timeout: abandoning unacknowledged rows, they will be published again",
				"rows", len(l.inflight))
			return l.abandon(nil)
		}
	}
	l.log.Info("in-flight rows flushed and marked")
	return nil
}

// sleep waits d or until ctx ends; it reports whether d passed.
func sleep(ctx context.Context, d time.Duration) bool {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-ctx.Done():
		return false
	}
}

// jitter spreads d by ±20% so replicas do not retry in step.
func jitter(d time.Duration) time.Duration {
	return d + time.Duration((rand.Float64()*0.4-0.2)*float64(d))
}
