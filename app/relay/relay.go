package relay

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync/atomic"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/backoff"
)

// Relay moves committed outbox rows to a Sink, in order per aggregate, and marks each row only
// after the sink acknowledged it.
//
// One Relay runs per process. Among replicas sharing an outbox, the one whose Session holds the
// leadership publishes; the others wait and take over when its session ends.
type Relay struct {
	cfg   Config
	store Store
	sink  Sink
	obs   Observer
	log   *slog.Logger

	leader    atomic.Bool
	connected atomic.Bool
	lastAck   atomic.Int64 // unix nanoseconds of the last acknowledgement
}

// New returns a relay. cfg is completed with defaults and validated; obs and log may be nil.
func New(cfg Config, store Store, sink Sink, obs Observer, log *slog.Logger) (*Relay, error) {
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
			if !backoff.Sleep(ctx, backoff.Jitter(delay)) {
				break
			}
			delay = backoff.Double(delay, r.cfg.ReconnectBackoffMax)
			continue
		}
		r.setConnected(true)
		delay = 100 * time.Millisecond
		// From here on every use of the session goes through its owner, one at a time.
		conn := newOwner(sess, r.sink, r.cfg.PollInterval)
		err = r.session(ctx, conn)
		closeCtx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
		_ = conn.close(closeCtx)
		cancel()
		r.setConnected(false)
		if ctx.Err() != nil {
			break
		}
		if errors.Is(err, ErrSessionUnsupported) {
			return err
		}
		r.log.Warn("database session ended, reconnecting", "err", err, "retry_in", delay)
		if !backoff.Sleep(ctx, backoff.Jitter(delay)) {
			break
		}
		delay = backoff.Double(delay, r.cfg.ReconnectBackoffMax)
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

// session waits for the leadership on the session conn owns, then leads until the session fails
// or ctx ends.
func (r *Relay) session(ctx context.Context, conn *owner) error {
	standbyLogged, deniedLogged := false, false
	for {
		var ok bool
		err := conn.call(ctx, func(ctx context.Context, s Session) (err error) {
			ok, err = s.TryLead(ctx)
			return err
		})
		if errors.Is(err, ErrTakeoverDenied) {
			// The leader is silent and this replica may not end its session: stay standby, say
			// it once (readiness shows the stall), and try again at the next interval.
			if !deniedLogged {
				r.log.Error("standby: the leader gave no sign of life for its lease while rows wait, and cannot be taken over", "err", err)
				deniedLogged = true
			}
			ok, err = false, nil
		}
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
		if !backoff.Sleep(ctx, r.cfg.LeaderRetryInterval) {
			return nil
		}
	}
	// Records go to the sink with the term's context: a sink checks it where they leave the
	// process, so a leader that was frozen past its lease sends nothing when it wakes.
	pubCtx := context.WithoutCancel(ctx)
	if f, ok := conn.sess.(Fenced); ok { // not a use of the connection: beside any call
		if tctx, holdOff := f.TermContext(); tctx != nil {
			pubCtx = tctx
			if holdOff > 0 {
				// Another replica led until now, and may be frozen rather than gone: its lease
				// runs out before this one publishes anything.
				r.log.Info("took over from another replica: waiting out its lease before publishing", "wait", holdOff)
				if !backoff.Sleep(ctx, holdOff) {
					return nil
				}
				if tctx.Err() != nil {
					return fmt.Errorf("lease: %w", tctx.Err())
				}
			}
		}
	}
	if err := r.recoverPublished(ctx, pubCtx, conn.sess); err != nil { // Mark: beside any call but TryLead and Close
		if ctx.Err() != nil {
			return nil
		}
		return err
	}
	r.leader.Store(true)
	r.obs.Leading(true)
	r.log.Info("leadership gained")
	defer func() {
		r.leader.Store(false)
		r.obs.Leading(false)
		r.log.Info("leadership released")
	}()
	return newTerm(r, conn, pubCtx).run(ctx)
}
