package relay

import (
	"context"
	"fmt"
)

// listen starts claimLoop watching the session for wake-ups. No claim runs when it is called.
func (l *term) listen(ctx context.Context) {
	lctx, stop := context.WithCancel(ctx)
	l.stopListen = stop
	l.listening = true
	l.listenReq <- lctx
}

// unlisten stops claimLoop watching the session, if it does, and waits until it has: the session
// is free for another query after it. A wake-up that came meanwhile is kept (Notified).
func (l *term) unlisten() error {
	if !l.listening {
		return nil
	}
	l.stopListen()
	return l.watchEnded(<-l.listenDone)
}

// watchEnded ends the watch whose result was err: its context is released, and a failure of the
// session is returned.
func (l *term) watchEnded(err error) error {
	l.listening = false
	l.stopListen()
	if err != nil {
		return fmt.Errorf("wait for wake-up: %w", err)
	}
	return nil
}
