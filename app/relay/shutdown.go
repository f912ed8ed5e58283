package relay

import (
	"context"
	"errors"
	"time"
)

// abandon ends a term whose session failed: it stops the sink from publishing anything more of
// this term, since another replica may lead by now.
// The session's owner lets the running claim, watch and mark end before it closes the session.
func (l *term) abandon(cause error) error {
	l.toPark = nil // still pending in the outbox: the next leader sees them again
	if len(l.inflight) > 0 || l.stream != nil {
		ctx, cancel := context.WithTimeout(context.Background(), l.cfg.ShutdownTimeout)
		_ = l.sink.Abort(ctx)
		cancel()
		for len(l.results) > 0 { // the verdicts of the aborted rows: nothing is marked now
			<-l.results
		}
	}
	return cause
}

// shutdown waits for what is in flight, marks it and ends the term.
func (l *term) shutdown(ctx context.Context) error {
	deadline := time.NewTimer(l.cfg.ShutdownTimeout)
	defer deadline.Stop()
	sctx := context.WithoutCancel(ctx)
	if err := l.conn.unwatch(); err != nil { // a watch may have claimed on a wake-up (claimOnWake)
		return l.abandon(err)
	}
	if l.conn.claiming { // its rows stay pending; the rows it found refused are parked
		if err := l.claimEnded(sctx, <-l.conn.claimDone); err != nil {
			return l.abandon(err)
		}
	}
	l.stopping = true
	l.startMark(true)
	// A stream not committed is aborted: its rows stay pending, for the next term whole.
	if st := l.stream; st != nil && !st.ending && !st.committed {
		st.failed = errors.Join(st.failed, errors.New("the relay stops"))
		l.endStream(false)
	}
	for len(l.inflight) > 0 || l.stream != nil {
		select {
		case res := <-l.results:
			if err := l.settleReady(sctx, res); err != nil {
				return l.abandon(err)
			}
		case res := <-l.conn.markDone:
			if err := l.marked(sctx, res); err != nil {
				return l.abandon(err)
			}
		case o := <-l.streamEnd:
			l.streamEnded(o)
		case <-deadline.C:
			l.log.Warn("shutdown timeout: abandoning unacknowledged rows, they will be published again",
				"rows", len(l.inflight))
			return l.abandon(nil)
		}
	}
	l.log.Info("in-flight rows flushed and marked")
	return nil
}
