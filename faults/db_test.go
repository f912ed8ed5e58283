package faults_test

import (
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/oracle"
)

// Entry 1, on the relay's table and on an adopted Debezium table: transaction A takes id n and stays open; B takes n+1 and commits first. The relay
// publishes B, and A once it commits: nothing is skipped.
func TestFault01VisibilityGap(t *testing.T) {
	t.Parallel()
	forLayouts(t, fault01)
}

func fault01(t *testing.T, layout string) {
	e := setup(t, options{layout: layout})
	r := e.startRelay(relayOpts{})
	e.waitLeader(r)
	a, err := e.loader.Begin(e.ctx, "gap-a", 1)
	if err != nil {
		t.Fatal(err)
	}
	b, err := e.loader.Begin(e.ctx, "gap-b", 1)
	if err != nil {
		t.Fatal(err)
	}
	if err := b.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.loader.Run(e.ctx, 200)
	e.eventually(60*time.Second, "every row but A's published", func() (bool, string) {
		n, err := e.pending()
		return err == nil && n == 0, itoa(int64(n)) + " pending"
	})
	if err := a.Commit(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.loader.Run(e.ctx, 100)
	e.waitDrained(60 * time.Second)
	r.stop(t)
	rep := e.check(0)
	result(t, 1, rep, "A's lower id, committed last, found by the rescan")
}

// Entry 2, on both layouts: rolled-back transactions, and transactions whose COMMIT fails on a deferred
// constraint, are never published.
func TestFault02Rollbacks(t *testing.T) {
	t.Parallel()
	forLayouts(t, fault02)
}

func fault02(t *testing.T, layout string) {
	e := setup(t, options{layout: layout, load: oracle.Config{RollbackRatio: 0.25, FailCommitRatio: 0.15, Workers: 6}})
	r := e.startRelay(relayOpts{})
	e.loader.Run(e.ctx, 600)
	e.waitDrained(60 * time.Second)
	r.stop(t)
	rep := e.check(0)
	if rep.RolledBack == 0 {
		t.Error("no transaction rolled back")
	}
	result(t, 2, rep, "rolled-back and failed-commit events never published")
}
