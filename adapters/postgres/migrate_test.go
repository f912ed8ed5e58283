package postgres_test

import (
	"context"
	"fmt"
	"os"
	"sync"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestMigrateTwiceAppliesNothing runs Migrate on a schema that dbtest already migrated: every
// step must report "already applied" and the outbox must still be usable.
func TestMigrateTwiceAppliesNothing(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	var reported []postgres.MigrationStep
	steps, err := postgres.Migrate(ctx, pool, table, func(s postgres.MigrationStep) { reported = append(reported, s) })
	if err != nil {
		t.Fatalf("second Migrate: %v", err)
	}
	if len(steps) == 0 {
		t.Fatal("second Migrate returned no steps: it should list the migrations it found")
	}
	for _, s := range steps {
		if s.Applied {
			t.Errorf("second Migrate applied %s again", s.Name)
		}
	}
	if len(reported) != len(steps) {
		t.Errorf("progress called %d times for %d steps", len(reported), len(steps))
	}
	if err := postgres.CheckOutbox(ctx, pool, table); err != nil {
		t.Fatalf("outbox unusable after the second Migrate: %v", err)
	}
}

// TestMigrateConcurrently starts two migrators on a fresh schema at once (two replicas starting
// together): both succeed, each migration is applied exactly once, and a third run applies nothing.
func TestMigrateConcurrently(t *testing.T) {
	t.Parallel()
	pool := dbtest.Pool(t)
	ctx := context.Background()
	schema := fmt.Sprintf("t_migrate_conc_%d_%d", os.Getpid(), time.Now().UnixNano()%1e9)
	table := postgres.Table{Schema: schema, Name: "events_outbox"}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
	})

	const migrators = 2
	var wg sync.WaitGroup
	results := make([][]postgres.MigrationStep, migrators)
	errs := make([]error, migrators)
	start := make(chan struct{})
	for i := range migrators {
		wg.Go(func() {
			<-start
			results[i], errs[i] = postgres.Migrate(ctx, pool, table, nil)
		})
	}
	close(start)
	wg.Wait()

	applied := map[string]int{}
	for i := range migrators {
		if errs[i] != nil {
			t.Fatalf("migrator %d: %v", i, errs[i])
		}
		for _, s := range results[i] {
			if s.Applied {
				applied[s.Name]++
			}
		}
	}
	if len(results[0]) == 0 || len(results[0]) != len(results[1]) {
		t.Fatalf("migrators saw %d and %d steps", len(results[0]), len(results[1]))
	}
	for _, s := range results[0] {
		if applied[s.Name] != 1 {
			t.Errorf("migration %s applied %d times by %d concurrent migrators, want exactly 1", s.Name, applied[s.Name], migrators)
		}
	}
	if err := postgres.CheckOutbox(ctx, pool, table); err != nil {
		t.Fatalf("outbox after concurrent migrations: %v", err)
	}
	again, err := postgres.Migrate(ctx, pool, table, nil)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range again {
		if s.Applied {
			t.Errorf("third Migrate applied %s", s.Name)
		}
	}
	// The migrated outbox takes writes: the contract's minimal insert works.
	if _, err := pool.Exec(ctx, `INSERT INTO `+schema+`.events_outbox (aggregate_type, aggregate_id, event_type, payload)
		VALUES ('order', 'o-1', 'OrderPlaced', '\x7b7d')`); err != nil {
		t.Fatalf("minimal insert into the migrated outbox: %v", err)
	}
}
