package faults_test

import (
	"context"
	"fmt"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
)

// pinWarning is the relay's log line when a topic's partition count differs from its pin.
const pinWarning = "topic partition count differs from its pin"

// Entry 24: partitions are added to the topics (3 -> 6) while 40 keys are written and published.
// A producer hashing keys over the live count moves most keys to another partition once its
// metadata refreshes, and a consumer group may then process a key's new events before its old
// ones. The relay keeps each key on the partition of the count pinned when it first published to
// the topic: while it runs, after a restart (a new process reads the pin from the database), and
// until an operator repins the topic; after the repin and a restart, each key goes to its
// partition under the new count, again one partition per key.
func TestFault24PartitionsAddedMidRun(t *testing.T) {
	t.Parallel()
	const keys = 40
	e := setup(t, options{partitions: 3, load: oracle.Config{Keys: keys}})
	// The producer refreshes its metadata every 300ms (default 5 minutes), so it sees the new
	// partitions while the loader still writes.
	a := e.startRelay(relayOpts{name: "fault24-a", pins: true, kgoOpts: []kgo.Opt{kgo.MetadataMaxAge(300 * time.Millisecond)}})
	stop := e.loader.Go(e.ctx)
	defer stop()
	e.eventually(60*time.Second, "a publishes", func() (bool, string) {
		return a.probe.marked.Load() >= 300, fmt.Sprintf("%d marked", a.probe.marked.Load())
	})

	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	adm := kadm.NewClient(cl)
	ctx, cancel := context.WithTimeout(e.ctx, 30*time.Second)
	defer cancel()
	resp, err := adm.CreatePartitions(ctx, 3, e.topics...)
	if err == nil {
		err = resp.Error()
	}
	if err != nil {
		t.Fatalf("add 3 partitions to %v: %v", e.topics, err)
	}
	e.eventually(60*time.Second, "a's producer sees 6 partitions in every topic", func() (bool, string) {
		n := a.logs.count(pinWarning)
		return n >= len(e.topics), fmt.Sprintf("%d warnings", n)
	})
	after := a.probe.marked.Load()
	e.eventually(60*time.Second, "a publishes after the growth", func() (bool, string) {
		return a.probe.marked.Load() >= after+400, fmt.Sprintf("%d marked since", a.probe.marked.Load()-after)
	})
	if n := a.logs.count(pinWarning); n != len(e.topics) {
		t.Errorf("%d warnings about the changed partition count, want one per topic (%d):\n%s", n, len(e.topics), a.logs.tail(20))
	}

	// A restart while the loader writes: the new process reads 6 partitions from the brokers and
	// 3 from the database, warns at once, and hashes over 3.
	a.stop(t)
	before := e.records()
	b := e.startProcess("fault24-b")
	e.eventually(60*time.Second, "b publishes", func() (bool, string) {
		n := e.records()
		return n >= before+400, fmt.Sprintf("%d records since b started", n-before)
	})
	if n := b.logs.count(pinWarning); n != len(e.topics) || b.logs.count("partitions repin") != len(e.topics) {
		t.Errorf("b: %d warnings about the changed partition count, want one per topic naming the repin:\n%s", n, b.logs.tail(20))
	}
	stop()
	e.waitDrained(60 * time.Second)
	b.signal(t, syscall.SIGTERM)
	if code := b.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("b exited %d", code)
	}
	rep := e.check(0)

	recs := e.readTopics()
	onOne := keysOnOnePartition(t, recs, nil)
	for _, r := range recs {
		if r.Partition >= 3 {
			t.Fatalf("record of key %s on partition %d of %s, added after the pin", r.Key, r.Partition, r.Topic)
		}
	}
	pins, err := postgres.ListPins(e.ctx, e.pool, e.table)
	if err != nil {
		t.Fatal(err)
	}
	if len(pins) != len(e.topics) {
		t.Errorf("pins %+v, want one per topic", pins)
	}
	for _, p := range pins {
		if p.Partitions != 3 {
			t.Errorf("topic %s pinned to %d partitions, want 3", p.Topic, p.Partitions)
		}
	}
	result(t, 24, rep, fmt.Sprintf("%d keys on one partition each among the first 3 of 6, across a restart", onOne))

	// The procedure: relay stopped, consumers caught up (the oracle read everything), repin,
	// start. New events go to each key's partition under 6, one partition per key.
	ends := e.endOffsets()
	repin := exec.Command(relayBin, append([]string{"partitions", "repin"}, e.topics...)...)
	repin.Env = append(os.Environ(), "OUTBOX_DATABASE_URL="+e.url, "OUTBOX_DATABASE_SCHEMA="+e.table.Schema,
		"OUTBOX_DATABASE_TABLE="+e.table.Name, "OUTBOX_KAFKA_BROKERS="+strings.Join(e.broker.Addrs, ","))
	if out, err := repin.CombinedOutput(); err != nil || strings.Count(string(out), "pinned to 6 partitions (was 3)") != len(e.topics) {
		t.Fatalf("partitions repin: %v\n%s", err, out)
	}
	c := e.startProcess("fault24-c")
	for i := range keys {
		if err := e.loader.Write(e.ctx, oracle.Key(i), 3); err != nil {
			t.Fatal(err)
		}
	}
	e.waitDrained(60 * time.Second)
	c.signal(t, syscall.SIGTERM)
	if code := c.wait(t, 60*time.Second); code != 0 {
		t.Fatalf("c exited %d", code)
	}
	if n := c.logs.count(pinWarning); n != 0 {
		t.Errorf("c warned %d times after the repin:\n%s", n, c.logs.tail(20))
	}
	var fresh []*kgo.Record
	for _, r := range e.readTopics() {
		if r.Offset >= ends[r.Topic][r.Partition] {
			fresh = append(fresh, r)
		}
	}
	if len(fresh) != keys*3 {
		t.Fatalf("%d records after the repin, want %d", len(fresh), keys*3)
	}
	hash := kgo.StickyKeyPartitioner(nil)
	newParts := 0
	keysOnOnePartition(t, fresh, func(r *kgo.Record) {
		if want := hash.ForTopic(r.Topic).Partition(r, 6); int(r.Partition) != want {
			t.Errorf("key %s on partition %d after the repin, want %d (of 6)", r.Key, r.Partition, want)
		}
		if r.Partition >= 3 {
			newParts++
		}
	})
	if newParts == 0 {
		t.Error("no record on the added partitions after the repin")
	}
}

// readTopics reads every record of the env's topics.
func (e *env) readTopics() []*kgo.Record {
	e.t.Helper()
	var want int64
	for _, ends := range e.endOffsets() {
		for _, o := range ends {
			want += o
		}
	}
	var out []*kgo.Record
	for _, topic := range e.topics {
		// To the end offsets, however long a loaded machine takes (an idle timeout cut a read
		// short on CI).
		out = append(out, e.broker.ReadToEnd(e.t, topic, 2*time.Minute)...)
	}
	if int64(len(out)) != want {
		e.t.Fatalf("read %d records, the topics hold %d", len(out), want)
	}
	return out
}

// endOffsets returns the end offset of every partition of the env's topics.
func (e *env) endOffsets() map[string]map[int32]int64 {
	e.t.Helper()
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...))
	if err != nil {
		e.t.Fatal(err)
	}
	defer cl.Close()
	ctx, cancel := context.WithTimeout(e.ctx, 20*time.Second)
	defer cancel()
	ends, err := kadm.NewClient(cl).ListEndOffsets(ctx, e.topics...)
	if err == nil {
		err = ends.Error()
	}
	if err != nil {
		e.t.Fatalf("list end offsets: %v", err)
	}
	out := map[string]map[int32]int64{}
	ends.Each(func(o kadm.ListedOffset) {
		if out[o.Topic] == nil {
			out[o.Topic] = map[int32]int64{}
		}
		out[o.Topic][o.Partition] = o.Offset
	})
	return out
}

// keysOnOnePartition fails t for every key whose records are on more than one partition, calls
// each (when not nil) for every record, and returns the number of keys.
func keysOnOnePartition(t *testing.T, recs []*kgo.Record, each func(*kgo.Record)) int {
	t.Helper()
	parts := map[string]map[int32]int{}
	for _, r := range recs {
		k := r.Topic + "/" + string(r.Key)
		if parts[k] == nil {
			parts[k] = map[int32]int{}
		}
		parts[k][r.Partition]++
		if each != nil {
			each(r)
		}
	}
	split := 0
	for k, ps := range parts {
		if len(ps) > 1 {
			split++
			if split <= 5 {
				t.Errorf("key %s on %d partitions (records per partition: %v)", k, len(ps), ps)
			}
		}
	}
	if split > 0 {
		t.Errorf("%d of %d keys on more than one partition", split, len(parts))
	}
	return len(parts)
}
