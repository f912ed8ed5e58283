package faults_test

import (
	"context"
	"fmt"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/internal/oracle"
)

// Exactly-once delivery (kafka.delivery=exactly_once): every fault below must end with 0 lost,
// 0 phantoms, 0 reorders, 0 duplicates, each database transaction's records on a partition in
// one Kafka transaction, and the tx-id header naming it, read at read_committed.

// eoOptions are the options of an exactly-once test: transactions of 2 events of each of 3 keys
// (so across topics and partitions), with their row ids for the oracle's all-or-none check
// across partitions (checkEO).
func eoOptions() options {
	return options{load: oracle.Config{EventsPerTx: 2, KeysPerTx: 3, Keys: 32, RowIDs: true}}
}

// eoEnv returns the environment variables of a relay in exactly-once mode on e.
func (e *env) eoEnv() []string {
	return []string{"OUTBOX_KAFKA_DELIVERY=exactly_once",
		"OUTBOX_KAFKA_PROGRESS_TOPIC=" + e.progressTopic(),
		"OUTBOX_KAFKA_TRANSACTION_TIMEOUT=10s"}
}

// progressTopic is the env's progress topic: one per test, named after its first topic.
func (e *env) progressTopic() string { return e.topics[0] + "-progress" }

// checkEO runs the oracle at read_committed, with the all-or-none check across partitions (the
// progress records name each Kafka transaction's rows), and requires no duplicate.
func (e *env) checkEO() oracle.Report {
	e.t.Helper()
	rep, err := oracle.CheckWith(e.ctx, e.broker.Addrs, e.loader, 90*time.Second,
		oracle.Options{ReadCommitted: true, TxHeader: true, ProgressTopic: e.progressTopic()})
	if err != nil {
		e.t.Fatalf("oracle: %v", err)
	}
	rep.Assert(e.t, 0)
	return rep
}

// settled reports whether no Kafka transaction is open on the env's topics (every partition's
// last stable offset is its end) and how many offsets they hold.
func (e *env) settled() (bool, int64) {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	adm := kadm.NewClient(cl)
	ends, err := adm.ListEndOffsets(ctx, e.topics...)
	if err != nil {
		return false, 0
	}
	stable, err := adm.ListCommittedOffsets(ctx, e.topics...)
	if err != nil {
		return false, 0
	}
	ok, n := true, int64(0)
	ends.Each(func(o kadm.ListedOffset) {
		n += o.Offset
		if s, found := stable.Lookup(o.Topic, o.Partition); !found || s.Offset < o.Offset {
			ok = false
		}
	})
	return ok, n
}

// TestFaultEO01KillBetweenCommitAndMark: the leader's mark waits on rows locked FOR SHARE while
// its Kafka transactions commit; it is killed (-9) once everything it published is committed.
// The next leader reads the progress topic, marks those rows without publishing them again (it
// says so in its log), and drains the rest: no duplicate.
func TestFaultEO01KillBetweenCommitAndMark(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	e.loader.Run(e.ctx, 100)
	held, release := e.holdRows()
	p1 := e.startProcess("eo01-a", e.eoEnv()...)
	e.eventually(60*time.Second, "the held rows committed in Kafka", func() (bool, string) {
		ok, n := e.settled()
		return ok && n >= int64(held), fmt.Sprintf("settled %t, offsets %d of %d rows", ok, n, held)
	})
	p1.signal(t, syscall.SIGKILL)
	p1.wait(t, 30*time.Second)
	e.terminate("eo01-a")
	release()
	if n, err := e.pending(); err != nil || n != held {
		t.Fatalf("pending rows after the kill: %d (%v), want the %d committed but unmarked rows", n, err, held)
	}
	p2 := e.startProcess("eo01-b", e.eoEnv()...)
	e.loader.Run(e.ctx, 50)
	e.waitDrained(90 * time.Second)
	if p2.logs.count("marked the rows an earlier term published without marking them") == 0 {
		t.Errorf("the second relay did not recover the committed rows from the progress topic:\n%s", p2.logs.tail(30))
	}
	p2.signal(t, syscall.SIGTERM)
	if code := p2.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	result(t, 101, e.checkEO(), "killed between the Kafka commit and the mark")
}

// TestFaultEO02KillsUnderLoad: writers run all along while three leaders in turn are killed (-9)
// in whatever phase they are (claiming, a Kafka transaction open, committing, marking); a fourth
// drains. No duplicate, no split transaction.
func TestFaultEO02KillsUnderLoad(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	stop := e.loader.Go(e.ctx)
	defer stop()
	var last int64
	for i := range 3 {
		p := e.startProcess(fmt.Sprintf("eo02-%d", i), e.eoEnv()...)
		e.eventually(60*time.Second, "the relay publishes", func() (bool, string) {
			n := e.records()
			return n > last+150, fmt.Sprintf("offsets %d, waiting past %d", n, last+150)
		})
		last = e.records()
		p.signal(t, syscall.SIGKILL)
		p.wait(t, 30*time.Second)
		e.terminate(fmt.Sprintf("eo02-%d", i))
		e.terminate(fmt.Sprintf("eo02-%d marks", i))
	}
	stop()
	p := e.startProcess("eo02-final", e.eoEnv()...)
	e.waitDrained(90 * time.Second)
	p.signal(t, syscall.SIGTERM)
	p.wait(t, 60*time.Second)
	result(t, 102, e.checkEO(), "three leaders killed -9 under load")
}

// TestFaultEO03LostResponses: the broker applies produce requests but answers REQUEST_TIMED_OUT
// (the producer retries them, deduplicated), and drops the connection instead of answering
// EndTxn requests, several times. No duplicate.
func TestFaultEO03LostResponses(t *testing.T) {
	t.Parallel()
	o := eoOptions()
	o.kfake = []kfake.Opt{kfake.NumBrokers(1)} // faults need kfake
	e := setup(t, o)
	if e.broker.Fake == nil {
		t.Skip("injects faults into kfake")
	}
	e.loader.Run(e.ctx, 100)
	e.broker.Fake.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: e.topics[0], Err: kerr.RequestTimedOut, Count: 5})
	dropped := 0
	e.broker.Fake.ControlKey(int16(kmsg.EndTxn), func(kmsg.Request) (kmsg.Response, error, bool) {
		dropped++
		if dropped < 3 {
			e.broker.Fake.KeepControl()
		} else {
			e.broker.Fake.DropControl() // kfake keeps a control once kept, until dropped
		}
		return nil, fmt.Errorf("dropped EndTxn %d", dropped), true
	})
	p := e.startProcess("eo03", e.eoEnv()...)
	stop := e.loader.Go(e.ctx)
	e.eventually(60*time.Second, "load published", func() (bool, string) { return e.records() > 600, "records " + itoa(e.records()) })
	stop()
	e.waitDrained(90 * time.Second)
	p.signal(t, syscall.SIGTERM)
	p.wait(t, 60*time.Second)
	result(t, 103, e.checkEO(), fmt.Sprintf("produce responses lost, %d EndTxn connections dropped", dropped))
}

// TestFaultEO04FrozenLeaderAndTwoReplicas: two replicas; the leader is frozen (SIGSTOP) under
// load, its database sessions ended; the standby takes over, fencing the frozen one's
// transactional producer; the frozen one wakes (SIGCONT) and publishes nothing a read_committed
// consumer sees. No duplicate.
func TestFaultEO04FrozenLeaderAndTwoReplicas(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	stop := e.loader.Go(e.ctx)
	defer stop()
	a := e.startProcess("eo04-a", e.eoEnv()...)
	e.eventually(60*time.Second, "a publishes", func() (bool, string) { return e.records() > 100, "records " + itoa(e.records()) })
	b := e.startProcess("eo04-b", e.eoEnv()...)
	e.eventually(30*time.Second, "b waits as a standby", func() (bool, string) {
		return b.logs.count("standby") > 0, "b not standby yet"
	})
	a.signal(t, syscall.SIGSTOP)
	frozen := true
	defer func() {
		if frozen {
			_ = a.cmd.Process.Signal(syscall.SIGCONT)
		}
	}()
	e.terminate("eo04-a")
	e.terminate("eo04-a marks")
	e.eventually(60*time.Second, "b takes over", func() (bool, string) {
		return b.logs.count("leadership gained") == 1, "b not leading"
	})
	n := e.records()
	e.eventually(60*time.Second, "b publishes", func() (bool, string) { return e.records() > n+100, "records " + itoa(e.records()) })
	a.signal(t, syscall.SIGCONT)
	frozen = false
	stop()
	e.waitDrained(90 * time.Second)
	result(t, 104, e.checkEO(), "frozen leader, standby takes over, frozen one woken")
}
