package relay

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"time"
)

// owner is the one owner of a session: every call that uses the session's connection runs on
// one goroutine, serve, one at a time, so no two of them overlap by construction. Marks run on a
// second goroutine, markLoop, one at a time: a session marks on a connection of its own (the
// Postgres session does), which is what lets a mark's commit run beside the next claim.
//
// The owner is made for a session when it opens and closed (close) when the relay is done with
// it. The goroutine that calls its methods (the relay's reconnect loop, then the term's loop) is
// its only client: the fields below marked "client's" are that goroutine's.
//
// Calls come in three kinds: a claim (with the horizon read before it) and a watch for wake-ups
// run while the client goes on, their results coming back on claimDone and watchDone; call runs
// any other use of the session and waits for it. A call or a claim cuts a running watch short
// first, so it does not wait for the watch's timeout. The session's Notified is read after every
// use of the connection (woken), and Release runs between them (release).
//
// A watch may be given the claim to run on a wake-up (watch's then): serve then claims at once,
// as if the client had started that claim when the watch began, and the watch's end says so
// (watchEnd.claimed). That spares the two hand-offs between goroutines of the usual way (the
// watch's end to the client, the claim back to serve), which a caught-up relay made for every
// wake-up: at 1,000 events a second, about one per event.
type owner struct {
	sess     Session
	poll     time.Duration // how long a watch waits for a wake-up at most
	releaser Releaser      // nil unless the session and the sink allow releasing (see Releaser)
	sleeper  Sleeper       // nil unless the session is one
	cuts     bool          // the session is a TxStreamer whose claims may leave a rest (CutClaims)

	ops      chan connOp
	served   chan struct{} // closed when serve returned
	reply    chan error    // the result of a call (one at a time)
	markReq  chan []int64
	markDone chan markResult
	markEnd  chan struct{} // closed when markLoop returned

	// claimDone brings a claim's result back, watchDone a watch's end; each holds one, as one
	// claim or watch runs at a time.
	claimDone chan claimed
	watchDone chan watchEnd

	// The client's: whether a claim or a watch runs (its result not yet taken), how to cut the
	// watch short, and whether the owner was closed.
	claiming  bool
	watching  bool
	stopWatch context.CancelFunc
	closed    bool

	// woken is set when the session's Notified said a wake-up arrived; the client reads and
	// clears it (wokenUp). asleep is what the session's Asleep said after the last use of it.
	woken  atomic.Bool
	asleep atomic.Bool

	// toRelease gathers the messages the client released (relMu), until serve hands them to the
	// session between two uses of the connection; releasing is serve's batch (reused).
	relMu     sync.Mutex
	toRelease []*Message
	releasing []*Message
}

// connOpKind says what a connOp runs.
type connOpKind int

const (
	opClaim connOpKind = iota // read the horizon if asked, then claim (claimReq)
	opWatch                   // wait for a wake-up (Session.Wait)
	opCall                    // run fn and reply
)

// connOp is one use of the session, for serve.
type connOp struct {
	kind    connOpKind
	ctx     context.Context
	req     claimReq
	fn      func(context.Context, Session) error
	timeout time.Duration // how long a watch waits at most
	// then is the claim a watch runs on a wake-up that comes before until, with thenCtx.
	then    *claimReq
	thenCtx context.Context
	until   time.Time
}

// watchEnd is how a watch ended: the session's failure, or claimed when it ran the claim it was
// given (its result is then on claimDone).
type watchEnd struct {
	err     error
	claimed bool
}

// newOwner returns the owner of sess and starts its goroutines. Watches wait up to poll, unless
// told otherwise (watch). The
// messages the client releases reach the session when the session is a Releaser and sink a
// ReleasingSink that lets go of its messages.
func newOwner(sess Session, sink Sink, poll time.Duration) *owner {
	o := &owner{
		sess:      sess,
		poll:      poll,
		ops:       make(chan connOp),
		served:    make(chan struct{}),
		reply:     make(chan error, 1),
		markReq:   make(chan []int64),
		markDone:  make(chan markResult, 1),
		markEnd:   make(chan struct{}),
		claimDone: make(chan claimed, 1),
		watchDone: make(chan watchEnd, 1),
	}
	o.sleeper, _ = sess.(Sleeper)
	if rel, ok := sess.(Releaser); ok {
		if rs, ok := sink.(ReleasingSink); ok && rs.ReleasesMessages() {
			o.releaser = rel
		}
	}
	if ts, ok := sess.(TxStreamer); ok {
		if _, ok := sink.(StreamSink); ok {
			ts.CutClaims() // before serve starts: no other call runs
			o.cuts = true
		}
	}
	go o.serve()
	// Marks are not cancelled by a stop: what the broker acknowledged is marked while stopping.
	go o.markLoop(context.Background())
	return o
}

// serve runs the uses of the connection sent on ops, one at a time, until ops is closed. After
// each it reads Notified; before each it hands the released messages to the session.
func (o *owner) serve() {
	defer close(o.served)
	for op := range o.ops {
		o.releasePending()
		switch op.kind {
		case opClaim:
			res := o.runClaim(op.ctx, op.req)
			o.noteWakeUp()
			o.claimDone <- res // buffered: one claim at a time
		case opWatch:
			err := o.sess.Wait(op.ctx, op.timeout)
			if op.ctx.Err() != nil {
				err = nil // cut short by the client (unwatch) or by the relay's stop: not a failure
			} else if err == nil && op.then != nil && time.Now().Before(op.until) && o.sess.Notified() {
				// Woken: the claim the client gave takes the wake-up, as the client would.
				o.releasePending()
				res := o.runClaim(op.thenCtx, *op.then)
				o.noteWakeUp()
				o.claimDone <- res                     // buffered: no other claim runs
				o.watchDone <- watchEnd{claimed: true} // buffered: one watch at a time
				continue
			}
			o.noteWakeUp()
			o.watchDone <- watchEnd{err: err} // buffered: one watch at a time
		case opCall:
			err := op.fn(op.ctx, o.sess)
			o.noteWakeUp()
			o.reply <- err // buffered: one call at a time
		}
	}
}

// runClaim reads the horizon when req asks for it, then claims: both on the connection, one
// after the other, so the horizon is read before the claim's snapshot (as cursor.advance needs)
// at no cost to the client.
func (o *owner) runClaim(ctx context.Context, req claimReq) claimed {
	res := claimed{claimReq: req}
	if req.rest != nil { // a stream's page (only a TxStreamer's claims leave a rest)
		start := time.Now()
		res.rows, res.next, res.err = o.sess.(TxStreamer).ClaimRest(ctx, req.rest, req.limit, req.budget)
		res.elapsed = time.Since(start)
		return res
	}
	if req.readHorizon {
		res.horizon, res.horizonErr = o.sess.Horizon(ctx)
		if res.horizonErr != nil {
			return res
		}
	}
	start := time.Now()
	res.rows, res.err = o.sess.Claim(ctx, req.from, req.skip, req.limit, req.budget, req.hold)
	res.elapsed = time.Since(start)
	if ts, ok := o.sess.(TxStreamer); ok && res.err == nil && o.cuts {
		res.next = ts.ClaimedRest()
	}
	return res
}

// noteWakeUp records a wake-up the last use of the connection brought (Notified), and whether
// the session sleeps now (Sleeper).
func (o *owner) noteWakeUp() {
	if o.sess.Notified() {
		o.woken.Store(true)
	}
	if o.sleeper != nil {
		o.asleep.Store(o.sleeper.Asleep())
	}
}

// sleeping reports whether the session said it sleeps after the last use of it: a row committed
// through the outbox's trigger wakes it (Sleeper).
func (o *owner) sleeping() bool { return o.asleep.Load() }

// wokenUp reports, and clears, whether a wake-up arrived since the last call.
func (o *owner) wokenUp() bool { return o.woken.Load() && o.woken.Swap(false) }

// release hands msgs, which nothing refers to any more, to the session's Release, between two
// uses of the connection; it does not wait. msgs may be reused once it returned.
func (o *owner) release(msgs []*Message) {
	if o.releaser == nil || len(msgs) == 0 {
		return
	}
	o.relMu.Lock()
	o.toRelease = append(o.toRelease, msgs...)
	o.relMu.Unlock()
}

// releasePending hands what release gathered to the session. serve's own.
func (o *owner) releasePending() {
	if o.releaser == nil {
		return
	}
	o.relMu.Lock()
	o.releasing, o.toRelease = o.toRelease, o.releasing[:0]
	o.relMu.Unlock()
	if len(o.releasing) > 0 {
		o.releaser.Release(o.releasing)
		clear(o.releasing) // it must not keep the messages alive
	}
}

// claim starts req on the connection; its result comes on claimDone (claimResult). No claim runs
// when it is called, and no watch that may claim (the client ends it first: unwatch).
func (o *owner) claim(ctx context.Context, req claimReq) error {
	if err := o.unwatch(); err != nil {
		return err
	}
	if o.claiming {
		return errors.New("claim: the watch claimed already") // a bug of the client: it ends a watch that may claim first
	}
	o.claiming = true
	o.ops <- connOp{kind: opClaim, ctx: ctx, req: req}
	return nil
}

// claimResult returns the channel the running claim's result comes on: nil, never ready, when
// none runs.
func (o *owner) claimResult() <-chan claimed {
	if !o.claiming {
		return nil
	}
	return o.claimDone
}

// claimTaken records that the client took the running claim's result from claimDone.
func (o *owner) claimTaken() { o.claiming = false }

// watch starts waiting for a wake-up on the connection, unless a watch or a claim runs; its end
// comes on watchDone (watchResult), at a wake-up or after timeout (poll when 0). When then is
// not nil, a wake-up that comes before until runs the claim then (with thenCtx) at once, the
// wake-up taken by it: the watch's end says claimed, and the claim's result comes on claimDone.
// then is the claim's until the watch ended, as a claim's request is until its result is back.
func (o *owner) watch(ctx context.Context, timeout time.Duration, then *claimReq, thenCtx context.Context, until time.Time) {
	if o.watching || o.claiming {
		return
	}
	wctx, stop := context.WithCancel(ctx)
	o.stopWatch = stop
	o.watching = true
	if timeout <= 0 {
		timeout = o.poll
	}
	o.ops <- connOp{kind: opWatch, ctx: wctx, timeout: timeout, then: then, thenCtx: thenCtx, until: until}
}

// watchResult returns the channel the running watch's end comes on: nil when none runs.
func (o *owner) watchResult() <-chan watchEnd {
	if !o.watching {
		return nil
	}
	return o.watchDone
}

// watchEnded takes the end of the watch that came on watchDone: a failure of the session is
// returned. A watch that claimed leaves the claim's result on claimDone (claimResult).
func (o *owner) watchEnded(end watchEnd) error {
	o.watching = false
	o.stopWatch()
	if end.claimed {
		o.claiming = true
	}
	if end.err != nil {
		return fmt.Errorf("wait for wake-up: %w", end.err)
	}
	return nil
}

// unwatch cuts the running watch short, if one runs, and takes its end.
func (o *owner) unwatch() error {
	if !o.watching {
		return nil
	}
	o.stopWatch()
	return o.watchEnded(<-o.watchDone)
}

// call runs fn on the connection and returns its error. A running watch is cut short first; a
// running claim ends first (its result stays on claimDone for the client).
func (o *owner) call(ctx context.Context, fn func(context.Context, Session) error) error {
	if err := o.unwatch(); err != nil {
		return err
	}
	o.ops <- connOp{kind: opCall, ctx: ctx, fn: fn}
	return <-o.reply
}

// mark starts marking ids on markLoop; the result comes on markDone. No mark runs when it is
// called.
func (o *owner) mark(ids []int64) { o.markReq <- ids }

// markLoop runs the marks sent on markReq until it is closed, one at a time. A goroutine per mark
// grew a fresh stack for the driver's calls every time, which was a tenth of the relay's CPU at
// low rates.
func (o *owner) markLoop(ctx context.Context) {
	defer close(o.markEnd)
	for ids := range o.markReq {
		start := time.Now()
		mctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		err := o.sess.Mark(mctx, ids)
		cancel()
		o.markDone <- markResult{err: err, elapsed: time.Since(start)} // buffered: one mark at a time
	}
}

// close ends the session once the running uses of it ended: the watch is cut short, the running
// claim and mark end (a mark has a timeout), then Close runs alone. Messages still to release are
// dropped: the session goes.
func (o *owner) close(ctx context.Context) error {
	if o.closed {
		return nil
	}
	o.closed = true
	_ = o.unwatch()
	close(o.markReq)
	<-o.markEnd
	close(o.ops)
	<-o.served
	return o.sess.Close(ctx)
}
