package faults_test

import (
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kgo"
)

// Entry 25: the leader is frozen (SIGSTOP) with records buffered in its producer (kafka.linger
// 1s), its database sessions are ended, the standby takes over and publishes, then the old leader
// wakes (SIGCONT). Nothing it buffered reaches the broker after the new leader's first record:
// its term's lease ran out while it was frozen, and the producer checks the lease before it
// sends a batch.
func TestFault25ZombieLeaderAfterFreeze(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	a, b, stop := e.leaderPublishingWithStandby("fault25")
	defer stop()
	a.signal(t, syscall.SIGSTOP)
	frozen := true
	defer func() {
		if frozen {
			_ = a.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	for _, name := range []string{"fault25-a", "fault25-a marks"} {
		e.terminate(name)
	}
	e.eventually(60*time.Second, "b takes over and publishes", func() (bool, string) {
		return b.logs.count("leadership gained") == 1 && b.logs.count("level=ERROR") == 0 && e.records() > 0 &&
			len(producersAfter(t, e, 0)) > 1, "b not publishing yet"
	})
	a.signal(t, syscall.SIGCONT)
	frozen = false
	e.eventually(60*time.Second, "a notices its term ended", func() (bool, string) {
		return a.logs.count("leadership released") >= 1, "a still thinks it leads"
	})
	stop()
	e.waitDrained(60 * time.Second)
	stale := staleRecords(t, e)
	if stale > 0 {
		t.Errorf("%d records of the old leader's producer after the new leader's first record of their partition", stale)
	}
	if !strings.Contains(a.logs.tail(400), "leadership released") {
		t.Errorf("old leader never released:\n%s", a.logs.tail(40))
	}
	rep := e.check(1000)
	result(t, 25, rep, fmt.Sprintf("frozen leader woken after takeover: %d stale records", stale))
}

// producersAfter returns the producer ids of the env's records in the order they first appear,
// reading every partition from offset from.
func producersAfter(t *testing.T, e *env, from int64) []int64 {
	t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...), kgo.ConsumeTopics(e.topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().At(from)))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	want := e.records()
	var got int64
	var ids []int64
	seen := map[int64]bool{}
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	for got < want && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			got++
			if !seen[r.ProducerID] {
				seen[r.ProducerID] = true
				ids = append(ids, r.ProducerID)
			}
		})
	}
	return ids
}

// staleRecords reads every partition of the env's topics in offset order and counts the records
// of the first leader's producer that follow a record of another producer in their partition:
// what a replaced leader sent after its successor began.
func staleRecords(t *testing.T, e *env) int64 {
	t.Helper()
	first := producersAfter(t, e, 0)
	if len(first) < 2 {
		t.Fatalf("want records from two producers, got %v", first)
	}
	old := first[0]
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...), kgo.ConsumeTopics(e.topics...),
		kgo.ConsumeResetOffset(kgo.NewOffset().AtStart()))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	want := e.records()
	seenNew := map[string]bool{}
	var got, stale int64
	ctx, cancel := context.WithTimeout(e.ctx, 60*time.Second)
	defer cancel()
	for got < want && ctx.Err() == nil {
		cl.PollFetches(ctx).EachRecord(func(r *kgo.Record) {
			got++
			part := fmt.Sprintf("%s/%d", r.Topic, r.Partition)
			if r.ProducerID != old {
				seenNew[part] = true
			} else if seenNew[part] {
				stale++
			}
		})
	}
	if got < want {
		t.Fatalf("read %d of %d records", got, want)
	}
	return stale
}

// Entry 27: the leader is frozen (SIGSTOP) and nobody ends its sessions: its lock stays held. The
// standby sees rows waiting and no sign of life from the leader (no query on its session or on its
// heartbeat's connection) for longer than relay.leader_lease, ends the leader's sessions and takes
// over; the frozen leader, woken later, sends nothing.
func TestFault27FrozenLeaderTakenOver(t *testing.T) {
	t.Parallel()
	e := setup(t, options{})
	a, b, stop := e.leaderPublishingWithStandby("fault27")
	defer stop()
	a.signal(t, syscall.SIGSTOP)
	frozenAt := time.Now()
	frozen := true
	defer func() {
		if frozen {
			_ = a.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	e.eventually(90*time.Second, "b takes over the frozen leader", func() (bool, string) {
		return b.logs.count("leadership gained") == 1, "b still standby"
	})
	t.Logf("b leads %s after a was frozen (lease 2s)", time.Since(frozenAt).Round(10*time.Millisecond))
	before := e.records()
	e.eventually(60*time.Second, "b publishes", func() (bool, string) {
		n := e.records()
		return n > before, itoa(n) + " records"
	})
	a.signal(t, syscall.SIGCONT)
	frozen = false
	e.eventually(60*time.Second, "a notices its term ended", func() (bool, string) {
		return a.logs.count("leadership released") >= 1, "a still thinks it leads"
	})
	stop()
	e.waitDrained(60 * time.Second)
	if stale := staleRecords(t, e); stale > 0 {
		t.Errorf("%d records of the frozen leader's producer after the new leader's first record of their partition", stale)
	}
	rep := e.check(1000)
	result(t, 27, rep, "frozen leader holding the lock: the standby ends its sessions after relay.leader_lease and takes over")
}

// leaderPublishingWithStandby starts two relay processes named name-a and name-b (kafka.linger
// 1s, a 2s lease), waits until a leads and b is standby, starts the loader and waits until a has
// published 300 records. stop stops the loader.
func (e *env) leaderPublishingWithStandby(name string) (a, b *proc, stop func()) {
	e.t.Helper()
	env := []string{"OUTBOX_KAFKA_LINGER=1s", "OUTBOX_RELAY_LEADER_LEASE=2s"}
	a = e.startProcess(name+"-a", env...)
	e.eventually(60*time.Second, "a leads", func() (bool, string) {
		return a.logs.count("leadership gained") == 1, "no leadership yet"
	})
	b = e.startProcess(name+"-b", env...)
	e.eventually(60*time.Second, "b is standby", func() (bool, string) {
		return b.logs.count("standby") >= 1, "no standby line yet"
	})
	stop = e.loader.Go(e.ctx)
	e.eventually(60*time.Second, "a publishes", func() (bool, string) {
		n := e.records()
		return n >= 300, itoa(n) + " records"
	})
	return a, b, stop
}
