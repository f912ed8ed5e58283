package relay

import (
	"context"
	"time"
)

// abandon ends a term whose session failed: it stops the sink from publishing anything more of
// this term, since another replica may lead by now.
func (l *term) abandon(cause error) error {
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
func (l *term) shutdown(ctx context.Context) error {
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
