package main

import (
	"context"
	"errors"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/adapters/prometheus"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// brokerCheckInterval is how long a broker check is reused by readiness probes, and how often the
// daemon checks the broker to log when it becomes unreachable or reachable again.
const brokerCheckInterval = 3 * time.Second

// brokerCheck remembers whether the broker answers, so that /readyz costs no broker round trip
// per probe and a change of state is logged once.
type brokerCheck struct {
	name string // the sink: kafka or rabbitmq
	ping func(context.Context) error
	log  *slog.Logger

	mu    sync.Mutex
	at    time.Time // of the last check
	err   error     // its result
	known bool      // a check ran
	since time.Time // of the last change of state
}

func newBrokerCheck(name string, ping func(context.Context) error, log *slog.Logger) *brokerCheck {
	return &brokerCheck{name: name, ping: ping, log: log}
}

// check returns the last result if it is fresh, else asks the broker (bounded by 2s).
func (b *brokerCheck) check() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.known && time.Since(b.at) < brokerCheckInterval {
		return b.err
	}
	ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
	err := b.ping(ctx)
	cancel()
	now := time.Now()
	switch {
	case err != nil && (!b.known || b.err == nil):
		b.log.Warn(b.name+" unreachable", "err", err)
		b.since = now
	case err == nil && b.known && b.err != nil:
		b.log.Info(b.name+" reachable again", "down_for", now.Sub(b.since).Round(time.Millisecond))
		b.since = now
	}
	b.at, b.err, b.known = now, err, true
	return err
}

// watch checks the broker every brokerCheckInterval until ctx ends, for the log lines.
func (b *brokerCheck) watch(ctx context.Context) {
	t := time.NewTicker(brokerCheckInterval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case <-t.C:
			_ = b.check()
		}
	}
}

// ready reports why the relay is not ready, or nil: the database session must be up, the
// database and the broker must answer, and a leader must not be stalled with rows pending that
// it could publish (rows it holds on purpose, behind a parked row or a retry, are no stall: see
// postgres.Stalled). A standby is ready: waiting is its job. It costs one database round trip
// (two for the leader); the broker's answer is reused for brokerCheckInterval.
func (d *served) ready(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, 3*time.Second)
	defer cancel()
	if !d.relay().Connected() {
		return errors.New("database session down")
	}
	if err := d.pool.Ping(ctx); err != nil {
		return errors.New("database unreachable")
	}
	if err := d.broker.check(); err != nil {
		return fmt.Errorf("%s unreachable: %w", d.broker.name, err)
	}
	stalled, err := postgres.Stalled(ctx, d.pool, d.cfg.Store.Table, d.cfg.StallTimeout, holdsParked(d.cfg), d.cfg.BacklogScanRows)
	if err != nil {
		return errors.New("database query failed")
	}
	if !d.relay().Leader() {
		// A standby is ready while the leader works. A leader that gave no sign of life for
		// longer than the stall timeout (and its lease) while rows could go is a stall every
		// replica shows: the standby takes such a leader over after relay.leader_lease, so this
		// lasts only if it cannot (see the log for why).
		if !stalled {
			return nil
		}
		h, err := postgres.LeaderOf(ctx, d.pool, d.cfg.Store.Table)
		if err != nil {
			return errors.New("database query failed")
		}
		silent := max(d.cfg.StallTimeout, d.cfg.Store.LeaderLease)
		if h != nil && h.LastActive != nil && time.Since(*h.LastActive) > silent {
			return fmt.Errorf("stalled: the leader (backend pid %d) gave no sign of life for %s while rows could be published",
				h.PID, time.Since(*h.LastActive).Round(time.Second))
		}
		return nil
	}
	// Progress is the last acknowledgement, or the start of this leadership term: a replica that
	// just took over a backlog has not stalled yet.
	progress := d.relay().LastAck()
	if since := d.leading.since(); progress.Before(since) {
		progress = since
	}
	if stalled && time.Since(progress) > d.cfg.StallTimeout {
		return fmt.Errorf("stalled: rows pending that could be published and nothing published for more than http.stall_timeout (%s)", d.cfg.StallTimeout)
	}
	return nil
}

// leaderClock passes the relay's observations on and remembers when this replica last became
// the leader.
type leaderClock struct {
	relay.Observer
	at atomic.Int64 // unix nanoseconds
}

// Leading implements relay.Observer.
func (c *leaderClock) Leading(leader bool) {
	if leader {
		c.at.Store(time.Now().UnixNano())
	}
	c.Observer.Leading(leader)
}

// since returns when the current (or last) leadership term began; zero if never.
func (c *leaderClock) since() time.Time {
	if n := c.at.Load(); n != 0 {
		return time.Unix(0, n)
	}
	return time.Time{}
}

// backlogOf returns the function the metrics call on scrape to read the backlog per topic: the
// Kafka topic of each row, or with another sink its topic column or else its aggregate_type
// (a routing key template may hold the aggregate id: too many label values).
func backlogOf(cfg *Config, pool *pgxpool.Pool) prometheus.BacklogFunc {
	template := cfg.Kafka.TopicTemplate
	if cfg.Sink != "kafka" {
		template = "{aggregate_type}"
	}
	return func(ctx context.Context) (prometheus.Backlog, error) {
		b, err := postgres.BacklogOf(ctx, pool, cfg.Store.Table, template, cfg.BacklogScanRows, holdsParked(cfg))
		if err != nil {
			return prometheus.Backlog{}, err
		}
		out := prometheus.Backlog{Estimated: b.Estimated || b.ParkedEstimated}
		for _, t := range b.Topics {
			out.Topics = append(out.Topics, prometheus.TopicBacklog{Topic: t.Topic, Pending: t.Pending,
				Held: t.Held, OldestAge: t.OldestAge, Parked: t.Parked})
		}
		return out, nil
	}
}

// holdsParked reports whether the relay holds a key's later rows behind its parked row
// (relay.order_policy wait).
func holdsParked(cfg *Config) bool {
	return cfg.Relay.WithDefaults().OrderPolicy == relay.OrderPolicyWait
}
