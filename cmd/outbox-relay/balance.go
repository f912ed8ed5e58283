package main

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"log/slog"
	"slices"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// balancer spreads the leaderships of the outboxes a configuration lists over the replicas that
// serve them, with no coordination but what PostgreSQL shows: every session of a replica is
// named "outbox-relay <replica> <outbox>" (application_name), so pg_stat_activity tells which
// replicas are alive, and the holder of each outbox's leadership lock which replica leads it.
//
// From that view every replica computes the same quotas: the live replicas, sorted by id, the
// first M mod R of them get ceil(M/R) outboxes and the others floor(M/R). A replica tries for an
// outbox's leadership only while it leads fewer than its quota, and gives up leaderships it holds
// beyond its quota while another replica is below its own. The quotas are a preference, never a
// condition of progress: an outbox no replica led for a grace period (a view that missed a dead
// replica's departure, or counted a replica that cannot lead) is tried by every replica, quota or
// not. The leadership lock itself, as with one outbox, keeps every outbox to one leader.
type balancer struct {
	self     string        // this replica's id
	every    time.Duration // how often the view is read: the shortest relay.leader_retry_interval
	grace    time.Duration // how long an outbox may go unled before every replica tries for it
	log      *slog.Logger
	outboxes []*served

	mu        sync.Mutex
	slots     map[string]*slot // per outbox
	replicas  []string         // the live replicas, sorted, self included
	leaders   map[string]string
	over      int       // consecutive views in which this replica led beyond its quota
	lastYield time.Time // when this replica last gave up a leadership
}

// slot is what the balancer knows of one outbox.
type slot struct {
	trying, leading bool
	unledSince      time.Time // zero while some replica leads it
}

// newBalancer returns the balancer of the outboxes of cfg, with a new replica id.
func newBalancer(cfg *Config, log *slog.Logger) *balancer {
	var b [4]byte
	_, _ = rand.Read(b[:])
	every := cfg.Outboxes[0].Relay.LeaderRetryInterval
	for _, o := range cfg.Outboxes {
		every = min(every, o.Relay.LeaderRetryInterval)
	}
	every = max(every, 100*time.Millisecond)
	return &balancer{self: hex.EncodeToString(b[:]), every: every, grace: 3 * every, log: log,
		slots: map[string]*slot{}, leaders: map[string]string{}}
}

// applicationName is the application_name of this replica's sessions on outbox: 13 + 8 + 1 +
// at most 32 bytes, leaving room for the " marks" and " probe" suffixes within PostgreSQL's 63.
func (b *balancer) applicationName(outbox string) string {
	return "outbox-relay " + b.self + " " + outbox
}

// add registers a served outbox.
func (b *balancer) add(o *served) {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.outboxes = append(b.outboxes, o)
	b.slots[o.cfg.Name] = &slot{unledSince: time.Now()}
}

// wrap returns store with sessions that ask the balancer before trying for the leadership.
func (b *balancer) wrap(outbox string, store relay.Store) relay.Store {
	return &balancedStore{Store: store, b: b, outbox: outbox}
}

// quota returns the outboxes replica should lead in the current view. Called with mu held.
func (b *balancer) quota(replica string) int {
	n, r := len(b.slots), max(len(b.replicas), 1)
	i := slices.Index(b.replicas, replica)
	if i < 0 {
		return 0
	}
	q := n / r
	if i < n%r {
		q++
	}
	return q
}

// mine counts the outboxes this replica leads or tries for. Called with mu held.
func (b *balancer) mine() int {
	n := 0
	for _, s := range b.slots {
		if s.leading || s.trying {
			n++
		}
	}
	return n
}

// acquire reports whether this replica may try for outbox's leadership now, and if so counts
// the try against its quota until settle.
func (b *balancer) acquire(outbox string) bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	s := b.slots[outbox]
	if s == nil {
		return true
	}
	if len(b.replicas) == 0 { // no view yet: the first one is read within a second
		return false
	}
	starved := !s.unledSince.IsZero() && time.Since(s.unledSince) > b.grace
	if b.mine() >= b.quota(b.self) && !starved {
		return false
	}
	s.trying = true
	return true
}

// settle records whether this replica leads outbox.
func (b *balancer) settle(outbox string, leading bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if s := b.slots[outbox]; s != nil {
		s.trying, s.leading = false, leading
		if leading {
			s.unledSince = time.Time{}
			b.leaders[outbox] = b.self
		}
	}
}

// watch reads the view every b.every until ctx ends, and gives up leaderships beyond the quota.
func (b *balancer) watch(ctx context.Context) {
	t := time.NewTicker(b.every)
	defer t.Stop()
	for {
		b.refresh(ctx)
		select {
		case <-ctx.Done():
			return
		case <-t.C:
		}
	}
}

// refresh reads which replicas are alive and who leads each outbox, from every database the
// outboxes are in, and yields the leaderships this replica holds beyond its quota while another
// replica is below its own.
func (b *balancer) refresh(ctx context.Context) {
	ctx, cancel := context.WithTimeout(ctx, max(b.every, time.Second))
	defer cancel()
	names := make([]string, 0, len(b.outboxes))
	for _, o := range b.outboxes {
		names = append(names, o.cfg.Name)
	}
	alive := map[string]bool{b.self: true}
	leaders := map[string]string{}
	asked := map[*pgxpool.Pool]bool{}
	failed := false
	for _, o := range b.outboxes {
		// One look at pg_stat_activity per database server is enough; asking each outbox's
		// pool also covers outboxes on different servers.
		if !asked[o.pool] {
			asked[o.pool] = true
			ids, err := replicasOf(ctx, o.pool, names)
			if err != nil {
				failed = true
				b.log.Debug("balance: read replicas", "outbox", o.cfg.Name, "err", err)
				continue
			}
			for _, id := range ids {
				alive[id] = true
			}
		}
		h, err := postgres.LeaderOf(ctx, o.pool, o.cfg.Store.Table)
		if err != nil {
			failed = true
			b.log.Debug("balance: read leader", "outbox", o.cfg.Name, "err", err)
			continue
		}
		if h != nil {
			leaders[o.cfg.Name] = replicaOf(h.ApplicationName)
			if leaders[o.cfg.Name] == "" {
				leaders[o.cfg.Name] = "?" // led by a relay outside the fleet
			}
		}
	}
	var yield []*served
	b.mu.Lock()
	b.replicas = b.replicas[:0]
	for id := range alive {
		b.replicas = append(b.replicas, id)
	}
	slices.Sort(b.replicas)
	now := time.Now()
	for name, s := range b.slots {
		switch {
		case leaders[name] != "" || s.leading:
			s.unledSince = time.Time{}
		case s.unledSince.IsZero():
			s.unledSince = now
		}
	}
	b.leaders = leaders
	// Give up leaderships beyond the quota only on a complete view, when some other replica
	// leads fewer than its quota, twice in a row, and not again before the last one was taken.
	counts := map[string]int{}
	for _, r := range leaders {
		counts[r]++
	}
	led := 0
	for _, s := range b.slots {
		if s.leading {
			led++
		}
	}
	excess := led - b.quota(b.self)
	short := false
	for _, r := range b.replicas {
		short = short || (r != b.self && counts[r] < b.quota(r))
	}
	if !failed && excess > 0 && short {
		b.over++
	} else {
		b.over = 0
	}
	if b.over >= 2 && now.Sub(b.lastYield) > b.grace {
		for i := len(b.outboxes) - 1; i >= 0 && excess > 0; i-- {
			if o := b.outboxes[i]; b.slots[o.cfg.Name].leading {
				yield = append(yield, o)
				excess--
			}
		}
		b.over, b.lastYield = 0, now
	}
	b.mu.Unlock()
	for _, o := range yield {
		b.log.Info("balance: giving up a leadership to a replica below its share", "outbox", o.cfg.Name,
			"replicas", len(alive), "quota", b.quotaLocked())
		o.yield()
	}
}

// quotaLocked returns this replica's quota, taking mu.
func (b *balancer) quotaLocked() int {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.quota(b.self)
}

// replicasOf returns the ids of the replicas with a session on one of the outboxes named, as
// pg_stat_activity shows them (to the relay's role: its own sessions at least).
func replicasOf(ctx context.Context, pool *pgxpool.Pool, outboxes []string) ([]string, error) {
	rows, err := pool.Query(ctx, `SELECT DISTINCT split_part(application_name, ' ', 2) FROM pg_stat_activity
		WHERE application_name LIKE 'outbox-relay %' AND split_part(application_name, ' ', 3) = ANY($1)`, outboxes)
	if err != nil {
		return nil, err
	}
	defer rows.Close()
	var out []string
	for rows.Next() {
		var id string
		if err := rows.Scan(&id); err != nil {
			return nil, err
		}
		if replicaIDOK(id) {
			out = append(out, id)
		}
	}
	return out, rows.Err()
}

// replicaOf returns the replica id in a session's application_name, or "".
func replicaOf(applicationName string) string {
	f := strings.Fields(applicationName)
	if len(f) < 3 || f[0] != "outbox-relay" || !replicaIDOK(f[1]) {
		return ""
	}
	return f[1]
}

func replicaIDOK(id string) bool {
	_, err := hex.DecodeString(id)
	return err == nil && len(id) == 8
}

// balancedStore opens balancedSessions.
type balancedStore struct {
	relay.Store
	b      *balancer
	outbox string
}

// Open implements relay.Store.
func (s *balancedStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &balancedSession{Session: sess, b: s.b, outbox: s.outbox}, nil
}

// balancedSession is a session that tries for the leadership only when the balancer lets it.
// It passes on the optional interfaces of the postgres session.
type balancedSession struct {
	relay.Session
	b      *balancer
	outbox string
}

var (
	_ relay.Fenced   = (*balancedSession)(nil)
	_ relay.Releaser = (*balancedSession)(nil)
)

// TryLead implements relay.Session: a replica at its quota stays standby without asking.
func (s *balancedSession) TryLead(ctx context.Context) (bool, error) {
	if !s.b.acquire(s.outbox) {
		return false, nil
	}
	ok, err := s.Session.TryLead(ctx)
	s.b.settle(s.outbox, ok && err == nil)
	return ok, err
}

// Close implements relay.Session: the leadership ends with the session.
func (s *balancedSession) Close(ctx context.Context) error {
	s.b.settle(s.outbox, false)
	return s.Session.Close(ctx)
}

// TermContext implements relay.Fenced.
func (s *balancedSession) TermContext() (context.Context, time.Duration) {
	if f, ok := s.Session.(relay.Fenced); ok {
		return f.TermContext()
	}
	return nil, 0
}

// Release implements relay.Releaser.
func (s *balancedSession) Release(msgs []*relay.Message) {
	if r, ok := s.Session.(relay.Releaser); ok {
		r.Release(msgs)
	}
}
