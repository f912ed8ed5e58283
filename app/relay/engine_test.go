package relay_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/memory"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// The engine's unit tests: the relay against fakeStore (fake_test.go), without a database. Each
// fake session fails the test when the relay breaks a rule of the Session port. The tests that
// need PostgreSQL are the integration tests (they skip under -short).

// ackLog wraps a sink and records, per key, the ids the broker acknowledged, in the order it
// did, before the relay hears of it: what the fake store checks every Mark against.
type ackLog struct {
	relay.Sink
	mu        sync.Mutex
	published int
	acked     map[int64]int // how many times each row was acknowledged
	order     map[string][]int64
}

func newAckLog(s relay.Sink) *ackLog {
	return &ackLog{Sink: s, acked: map[int64]int{}, order: map[string][]int64{}}
}

func (a *ackLog) Publish(ctx context.Context, m *relay.Message, done func(error)) error {
	id, key := m.ID, m.AggregateID // m's memory may be reused once done ran (Releaser)
	a.mu.Lock()
	a.published++
	a.mu.Unlock()
	return a.Sink.Publish(ctx, m, func(err error) {
		if err == nil {
			a.mu.Lock()
			a.acked[id]++
			a.order[key] = append(a.order[key], id)
			a.mu.Unlock()
		}
		done(err)
	})
}

// ReleasesMessages passes on what the wrapped sink says (relay.ReleasingSink).
func (a *ackLog) ReleasesMessages() bool {
	rs, ok := a.Sink.(relay.ReleasingSink)
	return ok && rs.ReleasesMessages()
}

func (a *ackLog) wasAcked(id int64) bool {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.acked[id] > 0
}

func (a *ackLog) publishedCount() int {
	a.mu.Lock()
	defer a.mu.Unlock()
	return a.published
}

// checkOrder fails the test unless every id of want was acknowledged exactly once and, per key,
// in commit order (RELIABILITY.md): no row before one that committed before its transaction
// began. Rows of one key from transactions that overlapped have no order between them: the
// later id may commit first (appendConcurrently's writers do not lock their key), and go first.
func (a *ackLog) checkOrder(t *testing.T, store *fakeStore, want []int64) {
	t.Helper()
	a.mu.Lock()
	defer a.mu.Unlock()
	for _, id := range want {
		if n := a.acked[id]; n != 1 {
			t.Errorf("row %d acknowledged %d times, want once", id, n)
		}
	}
	for key, ids := range a.order {
		for i, early := range ids {
			for _, late := range ids[i+1:] {
				if store.committedBefore(late, early) {
					t.Errorf("key %s: row %d acknowledged before row %d, which committed before it was inserted: %v", key, early, late, ids)
				}
			}
		}
	}
}

// runFake starts a relay on store and sink and returns its stop, which cancels it and returns
// what Run returned. The test stops it at its end if it did not.
func runFake(t *testing.T, cfg relay.Config, store relay.Store, sink relay.Sink) (stop func() error) {
	t.Helper()
	r, err := relay.New(cfg, store, sink, nil, nil)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- r.Run(ctx) }()
	var once sync.Once
	var runErr error
	stop = func() error {
		once.Do(func() {
			cancel()
			select {
			case runErr = <-done:
			case <-time.After(time.Minute):
				runErr = errors.New("the relay did not stop within a minute")
			}
		})
		return runErr
	}
	t.Cleanup(func() { _ = stop() })
	return stop
}

// eventually waits up to 30 s for cond, and fails the test saying what was awaited if it does
// not hold by then.
func eventually(t *testing.T, what string, cond func() bool) {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s", what)
		}
		time.Sleep(5 * time.Millisecond)
	}
}

// fastCfg is a configuration with short backoffs, for the fake.
func fastCfg() relay.Config {
	return relay.Config{BatchSize: 10, MaxInFlight: 40, PollInterval: 50 * time.Millisecond,
		RetryBackoffMin: time.Millisecond, RetryBackoffMax: 10 * time.Millisecond}
}

// appendConcurrently commits 400 rows over 9 keys from 4 writers at once and returns their ids.
func appendConcurrently(store *fakeStore) []int64 {
	var mu sync.Mutex
	var ids []int64
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 100 {
				got := store.append(fmt.Sprintf("k%d", (w*7+i)%9), "e")
				mu.Lock()
				ids = append(ids, got...)
				mu.Unlock()
			}
		})
	}
	wg.Wait()
	return ids
}

// TestEngineKeepsKeyOrderThroughFailures: rows committed while the relay runs, the first attempt
// of some failing alone and of some with their group, go out exactly once each (their failed
// attempts aside), in order per key, and are marked only once acknowledged.
func TestEngineKeepsKeyOrderThroughFailures(t *testing.T) {
	t.Parallel()
	store := newFakeStore(t)
	mem := memory.NewSink()
	var mu sync.Mutex
	tried := map[int64]bool{}
	mem.Reject = func(m *relay.Message) error {
		mu.Lock()
		defer mu.Unlock()
		first := !tried[m.ID]
		tried[m.ID] = true
		switch {
		case first && m.ID%7 == 0:
			return &relay.GroupError{Group: "t/0", Err: fmt.Errorf("row %d: NOT_ENOUGH_REPLICAS (injected)", m.ID)}
		case first && m.ID%11 == 0:
			return fmt.Errorf("row %d: %w", m.ID, errFake)
		}
		return nil
	}
	sink := newAckLog(mem)
	store.acked = sink.wasAcked
	runFake(t, fastCfg(), store, sink)
	ids := appendConcurrently(store)
	eventually(t, "every row marked", func() bool { return store.pending() == 0 })
	sink.checkOrder(t, store, ids)
	if got := len(store.markedIDs()); got != len(ids) {
		t.Errorf("%d rows marked, want %d", got, len(ids))
	}
}

// TestEngineDrainsThroughAsynchronousVerdicts: with a sink that gives its verdicts later, from
// its own goroutines, and fails some first attempts (flakySink), every row is acknowledged once
// and marked only after; the messages' memory is released once each, and every call keeps to
// the Session port while claims, watches, retries, parks and marks interleave.
func TestEngineDrainsThroughAsynchronousVerdicts(t *testing.T) {
	t.Parallel()
	store := newFakeStore(t)
	sink := newAckLog(&flakySink{tried: map[int64]bool{}, last: map[string]chan struct{}{}})
	store.acked = sink.wasAcked
	runFake(t, fastCfg(), store, sink)
	ids := appendConcurrently(store)
	eventually(t, "every row marked", func() bool { return store.pending() == 0 })
	sink.mu.Lock()
	defer sink.mu.Unlock()
	for _, id := range ids {
		if n := sink.acked[id]; n != 1 {
			t.Errorf("row %d acknowledged %d times, want once", id, n)
		}
	}
}

// TestEngineKeepsKeyOrderAcrossTheGap: the first row of key k is inserted by a transaction left
// open while the relay drains a backlog past it; then it commits, and k's second row after it.
// The horizon stays below the open row, so the claims come back to it: k's rows go out in order,
// long before the next claim from the oldest row (a minute away). With a session without a
// horizon, every claim reads from the oldest row.
func TestEngineKeepsKeyOrderAcrossTheGap(t *testing.T) {
	t.Parallel()
	for _, noHorizon := range []bool{false, true} {
		t.Run(fmt.Sprintf("noHorizon=%v", noHorizon), func(t *testing.T) {
			t.Parallel()
			store := newFakeStore(t)
			store.noHoriz = noHorizon
			mem := memory.NewSink()
			sink := newAckLog(mem)
			store.acked = sink.wasAcked
			first := store.begin("k", "k-1")
			var backlog []int64
			for i := range 20 {
				backlog = append(backlog, store.append(fmt.Sprintf("o-%d", i), "o")...)
			}
			cfg := fastCfg()
			cfg.BatchSize, cfg.PollInterval = 5, time.Minute
			runFake(t, cfg, store, sink)
			eventually(t, "the backlog marked", func() bool { return len(store.markedIDs()) == len(backlog) })
			k1 := first.commit()
			k2 := store.append("k", "k-2")[0]
			eventually(t, "both rows of k marked", func() bool { return store.pending() == 0 })
			sink.checkOrder(t, store, append(backlog, k1, k2))
			var got []string
			for _, d := range mem.Deliveries() {
				if d.Key == "k" {
					got = append(got, d.Message.EventType)
				}
			}
			if !slices.Equal(got, []string{"k-1", "k-2"}) {
				t.Errorf("key k delivered as %v, want [k-1 k-2]", got)
			}
		})
	}
}

// TestEngineParksPoison: a row the sink refuses at once (no key) is parked on its own and holds
// nothing back; a row the broker rejects as invalid is parked, and under the order policy wait
// its key's later rows stay pending while other keys go on; a row that keeps failing is retried
// (each attempt recorded) and parked after MaxAttempts.
func TestEngineParksPoison(t *testing.T) {
	t.Parallel()
	store := newFakeStore(t)
	mem := memory.NewSink()
	mem.Reject = func(m *relay.Message) error {
		switch m.EventType {
		case "invalid":
			return fmt.Errorf("%w: too large (injected)", relay.ErrInvalidMessage)
		case "failing":
			return errFake
		}
		return nil
	}
	sink := newAckLog(mem)
	store.acked = sink.wasAcked
	noKey := store.append("", "e")[0]
	invalid := store.append("a", "invalid", "a-2", "a-3")
	failing := store.append("b", "failing", "b-2")
	fine := store.append("c", "c-1", "c-2")
	cfg := fastCfg()
	cfg.MaxAttempts = 3
	runFake(t, cfg, store, sink)
	eventually(t, "three rows parked", func() bool { return len(store.parkedIDs()) == 3 })
	eventually(t, "c's rows marked", func() bool { return len(store.markedIDs()) == 2 })
	if got, want := store.parkedIDs(), []int64{noKey, invalid[0], failing[0]}; !slices.Equal(got, want) {
		t.Errorf("parked %v, want %v", got, want)
	}
	if r, _ := store.row(failing[0]); r.msg.Attempts != cfg.MaxAttempts-1 {
		t.Errorf("the failing row was parked after %d recorded attempts, want %d", r.msg.Attempts, cfg.MaxAttempts-1)
	}
	if got := store.markedIDs(); !slices.Equal(got, fine) {
		t.Errorf("marked %v, want only c's rows %v", got, fine)
	}
	for _, id := range []int64{invalid[1], invalid[2], failing[1]} {
		if r, ok := store.row(id); !ok || r.msg.Attempts != 0 {
			t.Errorf("row %d behind a parked row: pending %v, attempts %d; want pending, never tried", id, ok, r.msg.Attempts)
		}
	}
	if sink.wasAcked(invalid[1]) || sink.wasAcked(failing[1]) {
		t.Error("a row behind a parked one went to the broker")
	}
}

// TestEngineRetriesAFailingHead: a row that fails twice is retried (each attempt recorded, the
// attempts sent with it) and then acknowledged; its key's later rows wait behind it and follow
// in order.
func TestEngineRetriesAFailingHead(t *testing.T) {
	t.Parallel()
	store := newFakeStore(t)
	mem := memory.NewSink()
	var mu sync.Mutex
	fails := 2
	mem.Reject = func(m *relay.Message) error {
		mu.Lock()
		defer mu.Unlock()
		if m.EventType == "head" && fails > 0 {
			fails--
			return errFake
		}
		return nil
	}
	sink := newAckLog(mem)
	store.acked = sink.wasAcked
	ids := store.append("k", "head", "k-2", "k-3")
	runFake(t, fastCfg(), store, sink)
	eventually(t, "every row marked", func() bool { return store.pending() == 0 })
	sink.checkOrder(t, store, ids)
	var got []string
	for _, d := range mem.Deliveries() {
		got = append(got, fmt.Sprintf("%s/%d", d.Message.EventType, d.Message.Attempts))
	}
	if want := []string{"head/2", "k-2/0", "k-3/0"}; !slices.Equal(got, want) {
		t.Errorf("delivered %v (event type/attempts), want %v", got, want)
	}
}

// TestEngineHeldKeysDoNotHoldUpOthers: a key whose head is parked (order policy wait) with many
// rows behind it, more than a claim takes, does not keep the claims from the other keys' rows
// after them.
func TestEngineHeldKeysDoNotHoldUpOthers(t *testing.T) {
	t.Parallel()
	store := newFakeStore(t)
	mem := memory.NewSink()
	mem.Reject = func(m *relay.Message) error {
		if m.EventType == "invalid" {
			return fmt.Errorf("%w: injected", relay.ErrInvalidMessage)
		}
		return nil
	}
	sink := newAckLog(mem)
	store.acked = sink.wasAcked
	held := store.append("a", "invalid")
	for range 60 {
		held = append(held, store.append("a", "a")...)
	}
	others := store.append("b", "b", "b", "b", "b", "b")
	cfg := fastCfg()
	cfg.BatchSize, cfg.MaxInFlight = 5, 10
	runFake(t, cfg, store, sink)
	eventually(t, "b's rows marked", func() bool { return len(store.markedIDs()) == len(others) })
	if got := store.parkedIDs(); !slices.Equal(got, held[:1]) {
		t.Errorf("parked %v, want %v", got, held[:1])
	}
	if got := store.pending(); got != len(held)-1 {
		t.Errorf("%d rows pending, want a's %d", got, len(held)-1)
	}
}

// TestEngineStopDrainsAndMarks: a relay stopped while the broker holds its rows unacknowledged
// waits for the acknowledgements and marks every row before Run returns; one whose broker never
// answers gives up after ShutdownTimeout and marks nothing, the rows staying pending.
func TestEngineStopDrainsAndMarks(t *testing.T) {
	t.Parallel()
	for _, answers := range []bool{true, false} {
		t.Run(fmt.Sprintf("brokerAnswers=%v", answers), func(t *testing.T) {
			t.Parallel()
			store := newFakeStore(t)
			mem := memory.NewSink()
			mem.Hold()
			sink := newAckLog(mem)
			store.acked = sink.wasAcked
			ids := store.append("k", "1", "2", "3")
			ids = append(ids, store.append("j", "1", "2")...)
			cfg := fastCfg()
			cfg.ShutdownTimeout = 500 * time.Millisecond
			if answers {
				cfg.ShutdownTimeout = time.Minute
			}
			stop := runFake(t, cfg, store, sink)
			eventually(t, "every row handed to the broker", func() bool { return sink.publishedCount() == len(ids) })
			stopped := make(chan error, 1)
			go func() { stopped <- stop() }()
			if answers {
				mem.Release()
			}
			if err := <-stopped; err != nil {
				t.Fatalf("Run returned %v", err)
			}
			if answers {
				sink.checkOrder(t, store, ids)
				if got := len(store.markedIDs()); got != len(ids) || store.pending() != 0 {
					t.Errorf("%d rows marked, %d pending, want %d marked", got, store.pending(), len(ids))
				}
				return
			}
			if got := store.markedIDs(); len(got) != 0 || store.pending() != len(ids) {
				t.Errorf("marked %v with no acknowledgement; %d rows pending, want %d", got, store.pending(), len(ids))
			}
		})
	}
}

// integrationSchema skips t under -short, as every test that needs PostgreSQL (the TestRelay…
// tests, the integration tests) does, and otherwise gives it its own outbox (dbtest.Schema).
// `go test -short ./app/relay/` runs the engine's unit tests alone, in seconds.
func integrationSchema(t *testing.T) (*pgxpool.Pool, postgres.Table) {
	t.Helper()
	if testing.Short() {
		t.Skip("integration test: needs PostgreSQL (skipped by -short)")
	}
	return dbtest.Schema(t)
}
