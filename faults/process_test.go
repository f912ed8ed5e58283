package faults_test

import (
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kmsg"
)

// Entry 3, on both layouts: the relay is killed (SIGKILL) after the broker acknowledged a batch and before the
// batch was marked. The next relay publishes the batch again: nothing is lost, and the duplicates
// are that one batch.
func TestFault03SigkillBetweenAckAndMark(t *testing.T) {
	t.Parallel()
	forLayouts(t, fault03)
}

func fault03(t *testing.T, layout string) {
	e := setup(t, options{layout: layout})
	e.loader.Run(e.ctx, 300)
	held, release := e.holdRows() // the relay's DELETE will wait on these rows
	p1 := e.startProcess("fault03-a")
	e.eventually(60*time.Second, "the held batch acknowledged by the broker", func() (bool, string) {
		n := e.records()
		return n >= int64(held), "records: " + itoa(n)
	})
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	// The dead relay's backend may still be waiting on the lock: end it, as the crash would have.
	e.terminate("fault03-a")
	release()
	if n, err := e.pending(); err != nil || n != held {
		t.Fatalf("pending rows after the kill: %d (%v), want the %d acknowledged but unmarked rows", n, err, held)
	}

	p2 := e.startProcess("fault03-b")
	e.loader.Run(e.ctx, 100)
	e.waitDrained(90 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	if code := p2.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	rep := e.check(1000) // bound: relay.max_in_flight
	if rep.Duplicates == 0 {
		t.Errorf("no duplicate: the kill did not land between the acknowledgement and the mark")
	}
	result(t, 3, rep, "the acknowledged, unmarked batch is published again")
}

// Entry 4: SIGTERM while records are in flight (the broker holds the produce request). The relay
// waits for the acknowledgements, marks them, and exits 0; the next relay publishes no duplicate.
func TestFault04SigtermMidFlight(t *testing.T) {
	t.Parallel()
	e := setup(t, options{kfake: nil})
	if e.broker.Fake == nil {
		t.Skip("holds produce requests in kfake: KAFKA_BROKERS is set")
	}
	e.loader.Run(e.ctx, 300)
	got := make(chan struct{})
	release := make(chan struct{})
	var once sync.Once
	e.broker.Fake.ControlKey(int16(kmsg.Produce), func(kmsg.Request) (kmsg.Response, error, bool) {
		first := false
		once.Do(func() { first = true })
		if first {
			close(got)
			e.broker.Fake.SleepControl(func() { <-release })
		}
		return nil, nil, false
	})
	p1 := e.startProcess("fault04-a", "OUTBOX_RELAY_SHUTDOWN_TIMEOUT=60s")
	select {
	case <-got:
	case <-time.After(60 * time.Second):
		t.Fatal("no produce request reached the broker")
	}
	p1.signal(t, syscall.SIGTERM)
	time.Sleep(500 * time.Millisecond) // let the signal land while the request is held
	close(release)
	if code := p1.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	if c := p1.logs.count("in-flight rows flushed and marked"); c != 1 {
		t.Errorf("the relay did not report its flush (%d lines)", c)
	}
	published := e.records()
	pending, err := e.pending()
	if err != nil {
		t.Fatal(err)
	}
	committed, _, _, _ := e.loader.Counts()
	if int(published)+pending != committed {
		t.Errorf("after the flush: %d records published and %d rows pending, want %d in all: acknowledged rows were not marked", published, pending, committed)
	}
	p2 := e.startProcess("fault04-b")
	e.loader.Run(e.ctx, 100)
	e.waitDrained(90 * time.Second)
	p2.signal(t, syscall.SIGTERM)
	if code := p2.wait(t, 60*time.Second); code != 0 {
		t.Errorf("second relay exit code after SIGTERM: %d, want 0", code)
	}
	rep := e.check(0)
	result(t, 4, rep, "in-flight rows acknowledged, marked, exit 0")
}
