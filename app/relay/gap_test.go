package relay_test

import (
	"context"
	"errors"
	"fmt"
	"math/rand/v2"
	"slices"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/memory"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// gateSink stops the relay inside its first Publish until the test opens the gate: the relay is
// then between two claims of a backlog, where the test commits what it needs.
type gateSink struct {
	*memory.Sink
	reached chan struct{}
	open    chan struct{}
	first   bool
}

func (g *gateSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	if !g.first {
		g.first = true
		close(g.reached)
		<-g.open
	}
	return g.Sink.Publish(ctx, m, done)
}

// TestRelayKeepsKeyOrderAcrossTheVisibilityGap: the first event of key k is written by a
// transaction still open while the relay reads a backlog past its id; the transaction commits,
// then the key's second event commits, while the relay is in the middle of the backlog. The
// second event must not go out before the first. (A relay that carried a cursor from one claim to
// the next published the second event at its next claim and found the first only at its next
// rescan from the oldest row.)
func TestRelayKeepsKeyOrderAcrossTheVisibilityGap(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	event := func(key, name string) postgres.Message {
		return postgres.Message{AggregateType: "order", AggregateID: key, EventType: name, Payload: []byte(name)}
	}
	txA, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = txA.Rollback(context.Background()) }()
	if err := w.Append(ctx, txA, event("k", "k-1")); err != nil {
		t.Fatal(err)
	}
	var backlog []postgres.Message
	for i := range 20 {
		backlog = append(backlog, event(fmt.Sprintf("o-%d", i), fmt.Sprintf("o-%d", i)))
	}
	if err := w.Append(ctx, pool, backlog...); err != nil { // committed, with ids above k-1's
		t.Fatal(err)
	}

	store := dbtest.Store(t, table)
	sink := &gateSink{Sink: memory.NewSink(), reached: make(chan struct{}), open: make(chan struct{})}
	// Batches of 5 rows: the backlog takes four claims. A long poll interval keeps the periodic
	// rescan out of the way.
	startRelay(t, ctx, relay.Config{BatchSize: 5, MaxInFlight: 100, PollInterval: time.Minute}, store, sink)

	select {
	case <-sink.reached: // the first claim read past k-1, which it could not see
	case <-ctx.Done():
		t.Fatal("the relay never published")
	}
	if err := txA.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	if err := w.Append(ctx, pool, event("k", "k-2")); err != nil {
		t.Fatal(err)
	}
	close(sink.open)

	order := deliveredTypes(t, ctx, sink.Sink, 22)
	i1, i2 := slices.Index(order, "k-1"), slices.Index(order, "k-2")
	if i1 < 0 || i2 < 0 {
		t.Fatalf("deliveries %v: k-1 or k-2 missing", order)
	}
	if i2 < i1 {
		t.Fatalf("key k out of order: k-2 published before k-1 (deliveries %v)", order)
	}
	if len(order) != 22 {
		t.Errorf("%d deliveries, want 22: %v", len(order), order)
	}
}

// failFirstSink refuses the first row of key "k" the instant it is handed over: its verdict
// reaches the relay while the relay is still handing over the rest of the claim, as a broker's
// rejection does when its answer comes back between two Publish calls.
type failFirstSink struct {
	*memory.Sink
	failed bool
}

func (f *failFirstSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	if m.AggregateID == "k" && !f.failed {
		f.failed = true
		done(&relay.GroupError{Group: "t/0", Err: fmt.Errorf("MESSAGE_TOO_LARGE (injected)")})
		return nil
	}
	return f.Sink.Publish(ctx, m, done)
}

// TestRelayHoldsAKeyTheMomentItsRowFails: key k's first row fails while the relay hands over
// the rest of the same claim, which holds k's second row. The second row must wait for the first
// to be published again, not go out ahead of it because the relay had not yet read the failure.
func TestRelayHoldsAKeyTheMomentItsRowFails(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	msgs := []postgres.Message{
		{AggregateType: "order", AggregateID: "k", EventType: "k-1", Payload: []byte("1")},
		{AggregateType: "order", AggregateID: "other", EventType: "other", Payload: []byte("o")},
		{AggregateType: "order", AggregateID: "k", EventType: "k-2", Payload: []byte("2")},
	}
	if err := w.Append(ctx, pool, msgs...); err != nil {
		t.Fatal(err)
	}
	sink := &failFirstSink{Sink: memory.NewSink()}
	startRelay(t, ctx, relay.Config{RetryBackoffMin: 50 * time.Millisecond, RetryBackoffMax: 100 * time.Millisecond},
		dbtest.Store(t, table), sink)
	order := deliveredTypes(t, ctx, sink.Sink, 3)
	if want := "[other k-1 k-2]"; fmt.Sprint(order) != want {
		t.Fatalf("deliveries %v, want %s: k-2 must wait for k-1's retry", order, want)
	}
}

// claimGateStore opens sessions whose second claim waits, once started, until the test opens the
// gate.
type claimGateStore struct {
	relay.Store
	claims  atomic.Int32
	reached chan struct{}
	open    chan struct{}
}

func (s *claimGateStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &claimGateSession{Session: sess, s: s}, nil
}

type claimGateSession struct {
	relay.Session
	s *claimGateStore
}

func (g *claimGateSession) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	if g.s.claims.Add(1) == 2 {
		close(g.s.reached)
		<-g.s.open
	}
	return g.Session.Claim(ctx, from, skip, limit, maxBytes, hold)
}

// laterFailSink keeps the verdict on the first row of key "k" until the test gives it.
type laterFailSink struct {
	*memory.Sink
	mu    sync.Mutex
	held  bool
	fail  func(error)
	ready chan struct{}
}

func (f *laterFailSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	f.mu.Lock()
	if m.AggregateID == "k" && !f.held {
		f.held, f.fail = true, done
		f.mu.Unlock()
		close(f.ready)
		return nil
	}
	f.mu.Unlock()
	return f.Sink.Publish(ctx, m, done)
}

// TestRelaySettlesAFailureWhileAClaimReads: the broker's refusal of key k's first row comes back
// while the relay's next claim, which holds k's second row, is reading. The relay takes verdicts
// while a claim reads; the second row must still wait for the first to be published again.
func TestRelaySettlesAFailureWhileAClaimReads(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	var msgs []postgres.Message
	for _, name := range []string{"k-1", "o-1", "k-2", "o-2"} {
		msgs = append(msgs, postgres.Message{AggregateType: "order", AggregateID: name[:1], EventType: name, Payload: []byte(name)})
	}
	if err := w.Append(ctx, pool, msgs...); err != nil {
		t.Fatal(err)
	}
	store := &claimGateStore{Store: dbtest.Store(t, table), reached: make(chan struct{}), open: make(chan struct{})}
	sink := &laterFailSink{Sink: memory.NewSink(), ready: make(chan struct{})}
	// Claims of two rows: the first holds k-1 and o-1, the second (read ahead as the first goes
	// to the sink) k-2 and o-2.
	startRelay(t, ctx, relay.Config{BatchSize: 2, PollInterval: 200 * time.Millisecond,
		RetryBackoffMin: 50 * time.Millisecond, RetryBackoffMax: 100 * time.Millisecond}, store, sink)
	for _, ch := range []chan struct{}{sink.ready, store.reached} {
		select {
		case <-ch:
		case <-ctx.Done():
			t.Fatal("the relay never handed k-1 to the sink and started its second claim")
		}
	}
	sink.mu.Lock()
	fail := sink.fail
	sink.mu.Unlock()
	fail(errors.New("NOT_ENOUGH_REPLICAS (injected)"))
	// Let time pass, not a wait for a condition: the relay reads the verdict while the claim
	// waits. On a loaded machine it may read it only after the gate opens; the order asserted
	// below must hold either way.
	time.Sleep(50 * time.Millisecond)
	close(store.open)
	order := deliveredTypes(t, ctx, sink.Sink, 4)
	i1, i2 := slices.Index(order, "k-1"), slices.Index(order, "k-2")
	if i1 < 0 || i2 < 0 || i2 < i1 {
		t.Fatalf("deliveries %v: k-2 must follow k-1's retry", order)
	}
	time.Sleep(100 * time.Millisecond) // let time pass: a fifth delivery would show by now
	if got := deliveredTypes(t, ctx, sink.Sink, 4); len(got) != 4 {
		t.Errorf("deliveries %v, want each of the 4 rows once", got)
	}
}

// fromStore records where each claim of its sessions starts.
type fromStore struct {
	relay.Store
	mu    sync.Mutex
	froms []int64
}

func (s *fromStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return &fromSession{Session: sess, s: s}, nil
}

func (s *fromStore) maxFrom() int64 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return slices.Max(append([]int64{0}, s.froms...))
}

type fromSession struct {
	relay.Session
	s *fromStore
}

func (f *fromSession) Claim(ctx context.Context, from int64, skip []int64, limit, maxBytes int, hold relay.Blocked) ([]relay.Message, error) {
	f.s.mu.Lock()
	f.s.froms = append(f.s.froms, from)
	f.s.mu.Unlock()
	return f.Session.Claim(ctx, from, skip, limit, maxBytes, hold)
}

// TestRelayClaimsStartPastWhatItPublished: once the horizon has passed the rows the relay
// published, its claims start after them instead of walking the index from the oldest entry (in
// delete mode, over every row deleted since the last vacuum); what comes next is still
// delivered in order.
func TestRelayClaimsStartPastWhatItPublished(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	wave := func(name string, n int) {
		t.Helper()
		var msgs []postgres.Message
		for i := range n {
			msgs = append(msgs, postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("k%d", i%3),
				EventType: fmt.Sprintf("%s-%02d", name, i), Payload: []byte("x")})
		}
		if err := w.Append(ctx, pool, msgs...); err != nil {
			t.Fatal(err)
		}
	}
	wave("a", 30)
	var lastA int64
	if err := pool.QueryRow(ctx, `SELECT max(id) FROM `+pgx.Identifier{table.Schema, table.Name}.Sanitize()).Scan(&lastA); err != nil {
		t.Fatal(err)
	}
	store := &fromStore{Store: dbtest.Store(t, table)}
	sink := memory.NewSink()
	// A long poll interval: no claim from the oldest row but the first, so every later claim
	// starts where the relay's horizon lets it.
	startRelay(t, ctx, relay.Config{BatchSize: 5, PollInterval: time.Minute}, store, sink)
	deliveredTypes(t, ctx, sink, 30)
	for i, name := range []string{"b", "c", "d"} { // each wave's claims let the horizon take a step
		// The previous wave is out; then let time pass beyond the horizon's pause between looks
		// (50 ms), so that this wave's claims see it move.
		deliveredTypes(t, ctx, sink, 30+12*i)
		time.Sleep(150 * time.Millisecond)
		wave(name, 12)
	}
	got := deliveredTypes(t, ctx, sink, 66)
	if from := store.maxFrom(); from <= lastA {
		t.Errorf("claims started at most at id %d, want past the first wave (ids up to %d)", from, lastA)
	}
	// Per key, the events arrive in the order they were written.
	last := map[string]string{}
	for _, d := range sink.Deliveries() {
		k := d.Message.AggregateID
		if d.Message.EventType < last[k] && d.Message.EventType[0] == last[k][0] {
			t.Errorf("key %s: %s after %s", k, d.Message.EventType, last[k])
		}
		last[k] = d.Message.EventType
	}
	if len(got) != 66 {
		t.Errorf("%d deliveries, want 66", len(got))
	}
}

// startRelay runs a relay over store and sink until the test ends.
func startRelay(t *testing.T, ctx context.Context, cfg relay.Config, store relay.Store, sink relay.Sink) {
	t.Helper()
	relay, err := relay.New(cfg, store, sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	rctx, stop := context.WithCancel(ctx)
	done := make(chan error, 1)
	go func() { done <- relay.Run(rctx) }()
	t.Cleanup(func() {
		stop()
		<-done
	})
}

// deliveredTypes waits until sink holds at least n deliveries and returns their event types in
// delivery order; it fails the test when ctx ends first.
func deliveredTypes(t *testing.T, ctx context.Context, sink *memory.Sink, n int) []string {
	t.Helper()
	for {
		var got []string
		for _, d := range sink.Deliveries() {
			got = append(got, d.Message.EventType)
		}
		if len(got) >= n {
			return got
		}
		if ctx.Err() != nil {
			t.Fatalf("timed out with %d deliveries, want %d: %v", len(got), n, got)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// writerEnv returns a fresh outbox, a writer for it and a context that ends with the test (at
// most a minute).
func writerEnv(t *testing.T) (*pgxpool.Pool, postgres.Table, *postgres.Writer, context.Context) {
	t.Helper()
	pool, table := integrationSchema(t)
	// Generous: the bound of every wait of the test, on a machine that may be loaded.
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	t.Cleanup(cancel)
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	return pool, table, w, ctx
}

// waitDrained waits until table holds no row, and fails the test, saying after what, when ctx
// ends first.
func waitDrained(t *testing.T, ctx context.Context, pool *pgxpool.Pool, table postgres.Table, after string) {
	t.Helper()
	t0 := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	for {
		var left int
		if err := pool.QueryRow(context.WithoutCancel(ctx), `SELECT count(*) FROM `+t0).Scan(&left); err != nil {
			t.Fatal(err)
		}
		if left == 0 {
			return
		}
		if ctx.Err() != nil {
			t.Fatalf("%d rows still pending after %s", left, after)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

// TestRelayHorizonUnderWritersThatInsertFirst: writers whose transaction starts with the outbox
// INSERT (so the row's id is drawn before the transaction has an xid) and commit a random moment
// later (now and then 80-200 ms), six at once, while the relay drains with claims from the id horizon (a long poll
// interval: no claim from the oldest row but the first). Every event arrives, each key in order.
func TestRelayHorizonUnderWritersThatInsertFirst(t *testing.T) {
	t.Parallel()
	pool, table, w, ctx := writerEnv(t)
	sink := memory.NewSink()
	startRelay(t, ctx, relay.Config{BatchSize: 20, PollInterval: time.Minute}, dbtest.Store(t, table), sink)

	const writers, perWriter = 6, 120
	var wg sync.WaitGroup
	errs := make(chan error, writers)
	for i := range writers {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), 7))
			for n := range perWriter {
				tx, err := pool.Begin(ctx)
				if err != nil {
					errs <- err
					return
				}
				err = w.Append(ctx, tx, postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("w%d", i),
					EventType: fmt.Sprintf("%04d", n), Payload: []byte("x")})
				if err == nil {
					pause := time.Duration(rng.IntN(4000)) * time.Microsecond
					if rng.IntN(15) == 0 { // now and then longer than the horizon's pause between looks
						pause = time.Duration(80+rng.IntN(120)) * time.Millisecond
					}
					time.Sleep(pause)
					err = tx.Commit(ctx)
				}
				if err != nil {
					_ = tx.Rollback(ctx)
					errs <- err
					return
				}
			}
		})
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	deliveredTypes(t, ctx, sink, writers*perWriter)
	last := map[string]string{}
	for _, d := range sink.Deliveries() {
		k, ev := d.Message.AggregateID, d.Message.EventType
		if ev <= last[k] {
			t.Errorf("key %s: %s after %s", k, ev, last[k])
		}
		last[k] = ev
	}
}

// retryHoldSink refuses the first row of key "k" once, at once, and keeps the verdict on its
// second attempt until the test gives it (ack).
type retryHoldSink struct {
	*memory.Sink
	mu       sync.Mutex
	attempts int
	ack      func()
	retried  chan struct{}
}

func (s *retryHoldSink) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	if m.EventType != "k-1" {
		return s.Sink.Publish(ctx, m, done)
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.attempts++
	switch s.attempts {
	case 1:
		done(&relay.GroupError{Group: "t/0", Err: errors.New("NOT_ENOUGH_REPLICAS (injected)")})
	case 2:
		s.ack = func() { _ = s.Sink.Publish(ctx, m, done) }
		close(s.retried)
	default:
		return s.Sink.Publish(ctx, m, done)
	}
	return nil
}

// knownHorizonStore opens sessions whose horizon is the test's: the test writes one transaction
// at a time, so every id up to the last it committed is settled. The claims then pass the rows
// they leave out as soon as a row above them is returned, not about a tenth of a second later.
type knownHorizonStore struct {
	relay.Store
	h atomic.Int64
}

func (s *knownHorizonStore) Open(ctx context.Context) (relay.Session, error) {
	sess, err := s.Store.Open(ctx)
	if err != nil {
		return nil, err
	}
	return knownHorizonSession{Session: sess, h: &s.h}, nil
}

type knownHorizonSession struct {
	relay.Session
	h *atomic.Int64
}

func (s knownHorizonSession) Horizon(context.Context) (int64, error) { return s.h.Load(), nil }

// TestRelayComesBackToAReleasedKey: while key k waits for its first row's retry, claims pass
// over k's later rows (they leave the held keys out). A claim woken meanwhile moves past them.
// When the first row is acknowledged, the claims must come back to them: a row of k written
// after that, claimed at its wake-up long before the next claim from the oldest row, must not go
// out first.
func TestRelayComesBackToAReleasedKey(t *testing.T) {
	t.Parallel()
	pool, table, _, ctx := writerEnv(t)
	store := &knownHorizonStore{Store: dbtest.Store(t, table)}
	write := func(key, name string) {
		t.Helper()
		var id int64
		err := pool.QueryRow(ctx, `INSERT INTO `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+`
			(aggregate_type, aggregate_id, event_type, payload) VALUES ('order', $1, $2, '') RETURNING id`,
			key, name).Scan(&id)
		if err != nil {
			t.Fatal(err)
		}
		store.h.Store(id)
	}
	write("k", "k-1")
	write("k", "k-2")
	write("k", "k-3")
	sink := &retryHoldSink{Sink: memory.NewSink(), retried: make(chan struct{})}
	// No claim from the oldest row during the test: only wake-ups start claims.
	startRelay(t, ctx, relay.Config{PollInterval: time.Minute, RetryBackoffMin: 10 * time.Millisecond,
		RetryBackoffMax: 10 * time.Millisecond}, store, sink)
	// k-1 failed and its retry is due.
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	for {
		var due bool
		err := pool.QueryRow(ctx, `SELECT coalesce(bool_or(attempts > 0 AND next_attempt_at <= now()), false) FROM `+outbox).Scan(&due)
		if err != nil {
			t.Fatal(err)
		}
		if due {
			break
		}
		if ctx.Err() != nil {
			t.Fatal("k-1 never failed")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A wake-up: the claim sends k-1 again (the sink keeps its verdict) and o-1.
	write("o", "o-1")
	select {
	case <-sink.retried:
	case <-ctx.Done():
		t.Fatal("k-1 was not retried")
	}
	deliveredTypes(t, ctx, sink.Sink, 1)
	// Another: its claim passes over k-2 and k-3, held behind k-1 in flight.
	write("o", "o-2")
	deliveredTypes(t, ctx, sink.Sink, 2)
	sink.mu.Lock()
	sink.ack()
	sink.mu.Unlock()
	deliveredTypes(t, ctx, sink.Sink, 3)
	write("k", "k-4")
	if order := deliveredTypes(t, ctx, sink.Sink, 4); order[3] != "k-2" {
		t.Fatalf("deliveries %v, want k-2 after k-1: the claims must come back to the released key", order)
	}
	order := deliveredTypes(t, ctx, sink.Sink, 6)
	if want := "[o-1 o-2 k-1 k-2 k-3 k-4]"; fmt.Sprint(order) != want {
		t.Fatalf("deliveries %v, want %s", order, want)
	}
}
