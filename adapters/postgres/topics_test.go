package postgres_test

import (
	"context"
	"strings"
	"sync"
	"testing"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestPartitionPins: the first Pin of a topic stores the live count, later ones (from this or
// another process, whatever live count they saw) return it; concurrent first pins agree; Repin
// replaces it and reports the old one; ListPins shows them.
func TestPartitionPins(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	pins := postgres.NewPartitionPins(pool, table)
	if err := pins.Check(ctx); err != nil {
		t.Fatalf("check on a migrated outbox: %v", err)
	}
	if n, err := pins.Pin(ctx, "orders", 3); err != nil || n != 3 {
		t.Fatalf("first pin: %d, %v; want 3", n, err)
	}
	// A restarted relay, or another replica, sees the grown topic: it gets the pin.
	if n, err := postgres.NewPartitionPins(pool, table).Pin(ctx, "orders", 6); err != nil || n != 3 {
		t.Fatalf("pin after growth: %d, %v; want 3", n, err)
	}

	// Two relays pin a new topic at once with different counts: both get the same one.
	var wg sync.WaitGroup
	got := make([]int, 8)
	errs := make([]error, 8)
	for i := range got {
		wg.Go(func() { got[i], errs[i] = pins.Pin(ctx, "users", 2+i%2) })
	}
	wg.Wait()
	for i := range got {
		if errs[i] != nil || got[i] != got[0] {
			t.Fatalf("concurrent pins: %v, errors %v", got, errs)
		}
	}

	old, err := postgres.Repin(ctx, pool, table, "orders", 6)
	if err != nil || old != 3 {
		t.Fatalf("repin: old %d, %v; want 3", old, err)
	}
	if n, err := pins.Pin(ctx, "orders", 6); err != nil || n != 6 {
		t.Fatalf("pin after repin: %d, %v; want 6", n, err)
	}
	if old, err := postgres.Repin(ctx, pool, table, "fresh", 4); err != nil || old != 0 {
		t.Fatalf("repin of an unpinned topic: old %d, %v; want 0", old, err)
	}
	list, err := postgres.ListPins(ctx, pool, table)
	if err != nil {
		t.Fatal(err)
	}
	var lines []string
	for _, p := range list {
		if p.PinnedAt.IsZero() {
			t.Errorf("pin of %s without a time", p.Topic)
		}
		lines = append(lines, p.Topic+"="+string(rune('0'+p.Partitions)))
	}
	if got, want := strings.Join(lines, " "), "fresh=4 orders=6 users="+string(rune('0'+got[0])); got != want {
		t.Errorf("pins %q, want %q", got, want)
	}
}

// TestPartitionPinsCheck: an outbox migrated before pins existed is refused with the fix.
func TestPartitionPinsCheck(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	table.Name = "never_migrated"
	err := postgres.NewPartitionPins(pool, table).Check(context.Background())
	if err == nil || !strings.Contains(err.Error(), "never_migrated_topics") || !strings.Contains(err.Error(), "outbox-relay migrate") {
		t.Fatalf("check without the pins table: %v, want a message naming it and 'outbox-relay migrate'", err)
	}
	if _, err := postgres.NewPartitionPins(pool, table).Pin(context.Background(), "orders", 3); err == nil {
		t.Fatal("pin without the pins table succeeded")
	}
}
