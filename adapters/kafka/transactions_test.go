package kafka_test

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// txEnv is a broker, a topic and the settings of an exactly-once publisher on them.
type txEnv struct {
	b     *kafkatest.Broker
	topic string
	cfg   kafka.Config
	tx    kafka.TxConfig
}

func newTxEnv(t *testing.T) *txEnv {
	t.Helper()
	b := kafkatest.Start(t)
	topic := b.Topic(t, "eos", 3)
	return &txEnv{b: b, topic: topic, cfg: kafka.Config{Brokers: b.Addrs, TopicTemplate: topic},
		tx: kafka.TxConfig{TransactionalID: kafkatest.Name("txid"), ProgressTopic: kafkatest.Name("progress"),
			Identity: "db/public/" + topic, TransactionTimeout: 10 * time.Second}}
}

// publisher returns a recovered publisher of env, and the ids its Recover returned.
func (e *txEnv) publisher(t *testing.T) (*kafka.TxPublisher, []int64) {
	t.Helper()
	p, err := kafka.NewTxPublisher(e.cfg, e.tx, kafka.PublisherDeps{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(p.Close)
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	ids, err := p.Recover(ctx)
	if err != nil {
		t.Fatalf("recover: %v", err)
	}
	return p, ids
}

// publish hands rows first..last (ids, all of database transaction tx) to p as one claim, and
// returns the verdicts, in id order, once all came.
func publish(t *testing.T, p *kafka.TxPublisher, tx, first, last int64) []error {
	t.Helper()
	type verdict struct {
		id  int64
		err error
	}
	ch := make(chan verdict, last-first+1)
	for id := first; id <= last; id++ {
		m := &relay.Message{ID: id, EventID: domain.NewID(), AggregateType: "order", AggregateID: fmt.Sprintf("k%d", id%4),
			EventType: "E", Payload: []byte(fmt.Sprint(id)), OccurredAt: time.Now(), TxID: tx}
		if err := p.Publish(context.Background(), m, func(err error) { ch <- verdict{id, err} }); err != nil {
			t.Fatalf("publish %d: %v", id, err)
		}
	}
	p.EndBatch()
	out := make([]error, last-first+1)
	for range out {
		select {
		case v := <-ch:
			out[v.id-first] = v.err
		case <-time.After(time.Minute):
			t.Fatal("no verdict within a minute")
		}
	}
	return out
}

// readTopic returns the payloads the topic holds, read at read_committed (or not), each with its
// tx-id header, sorted. It waits up to a minute for want records (a loaded host may take seconds
// to make a committed transaction readable), then until a poll of two seconds brings no more.
func readTopic(t *testing.T, e *txEnv, committed bool, want int) []string {
	t.Helper()
	opts := []kgo.Opt{kgo.SeedBrokers(e.b.Addrs...), kgo.ConsumeTopics(e.topic), kgo.ConsumeResetOffset(kgo.NewOffset().AtStart())}
	if committed {
		opts = append(opts, kgo.FetchIsolationLevel(kgo.ReadCommitted()))
	}
	cl, err := kgo.NewClient(opts...)
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	var out []string
	deadline := time.Now().Add(time.Minute)
	for {
		ctx, cancel := context.WithTimeout(context.Background(), 2*time.Second)
		fs := cl.PollFetches(ctx)
		cancel()
		n := 0
		fs.EachRecord(func(r *kgo.Record) {
			n++
			out = append(out, string(r.Value)+"/"+kafkatest.Header(r, kafka.HeaderTxID))
		})
		if n == 0 && (len(out) >= want || time.Now().After(deadline)) {
			slices.Sort(out)
			return out
		}
	}
}

// TestTxPublisherCommitsRecoversAndFences: rows are committed in one Kafka transaction with their
// tx-id header; a new publisher's Recover returns the rows committed and not known to be marked
// (Marked drops rows); the earlier publisher is fenced: its next transaction fails with
// relay.ErrNotLeader and a read_committed consumer sees nothing of it.
func TestTxPublisherCommitsRecoversAndFences(t *testing.T) {
	t.Parallel()
	e := newTxEnv(t)
	p1, ids := e.publisher(t)
	if len(ids) != 0 {
		t.Fatalf("first recover: %v, want none", ids)
	}
	for i, err := range publish(t, p1, 77, 1, 5) {
		if err != nil {
			t.Fatalf("row %d: %v", i+1, err)
		}
	}
	p1.Marked([]int64{1, 2, 3})
	for i, err := range publish(t, p1, 78, 6, 7) {
		if err != nil {
			t.Fatalf("row %d: %v", i+6, err)
		}
	}
	if got, want := readTopic(t, e, true, 7), []string{"1/77", "2/77", "3/77", "4/77", "5/77", "6/78", "7/78"}; !slices.Equal(got, want) {
		t.Fatalf("read_committed: %v, want %v", got, want)
	}
	p2, ids := e.publisher(t)
	if want := []int64{4, 5, 6, 7}; !slices.Equal(ids, want) {
		t.Fatalf("second publisher's recover: %v, want %v (committed, not marked)", ids, want)
	}
	for i, err := range publish(t, p1, 79, 8, 9) {
		if !errors.Is(err, relay.ErrNotLeader) {
			t.Fatalf("fenced publisher's row %d: %v, want relay.ErrNotLeader", i+8, err)
		}
	}
	for i, err := range publish(t, p2, 80, 10, 10) {
		if err != nil {
			t.Fatalf("row %d: %v", i+10, err)
		}
	}
	if got, want := readTopic(t, e, true, 8), []string{"1/77", "10/80", "2/77", "3/77", "4/77", "5/77", "6/78", "7/78"}; !slices.Equal(got, want) {
		t.Fatalf("read_committed after the fenced publisher: %v, want %v", got, want)
	}
	// Marked rows are left out of the next progress record.
	p2.Marked([]int64{4, 5, 6, 7, 10})
	for i, err := range publish(t, p2, 81, 11, 11) {
		if err != nil {
			t.Fatalf("row %d: %v", i+11, err)
		}
	}
	if _, ids := e.publisher(t); !slices.Equal(ids, []int64{11}) {
		t.Fatalf("recover after rows 4 to 10 were marked: %v, want [11]", ids)
	}
}

// TestTxPublisherAbortsOnAFailedRecord: a record the broker refuses aborts its transaction: the
// row fails with the broker's error, the others with kafka.ErrTransactionAborted, all in one
// group; a read_committed consumer sees none of them, a read_uncommitted one may see the records
// of the aborted transaction (what the README says). The next transaction commits.
func TestTxPublisherAbortsOnAFailedRecord(t *testing.T) {
	t.Parallel()
	e := newTxEnv(t)
	if e.b.Fake == nil {
		t.Skip("injects a broker error with kfake")
	}
	p, _ := e.publisher(t)
	// The next produce request to the topic is refused: INVALID_RECORD, not retriable.
	e.b.Fake.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.Produce}, Topic: e.topic, Err: kerr.InvalidRecord})
	errs := publish(t, p, 90, 1, 8)
	refused, aborted := 0, 0
	for i, err := range errs {
		var ge *relay.GroupError
		if !errors.As(err, &ge) || ge.Group != "kafka-transaction" {
			t.Fatalf("row %d: %v, want a relay.GroupError of the transaction", i+1, err)
		}
		if errors.Is(err, kafka.ErrTransactionAborted) {
			aborted++
		} else {
			refused++
		}
	}
	if refused == 0 {
		t.Fatalf("no row failed with the broker's error: %v", errs)
	}
	if got := readTopic(t, e, true, 0); len(got) != 0 {
		t.Fatalf("read_committed sees %v of an aborted transaction", got)
	}
	for i, err := range publish(t, p, 91, 11, 12) {
		if err != nil {
			t.Fatalf("row %d after the abort: %v", i+11, err)
		}
	}
	if got, want := readTopic(t, e, true, 2), []string{"11/91", "12/91"}; !slices.Equal(got, want) {
		t.Fatalf("read_committed: %v, want %v", got, want)
	}
	t.Logf("refused %d, aborted %d; read_uncommitted sees %d records", refused, aborted, len(readTopic(t, e, false, 0)))
}

// TestTxPublisherLostEndTxn: a commit whose EndTxn gets no answer (the connection drops) has an
// unknown outcome: every row fails with relay.ErrNotLeader (the term ends, nothing is counted),
// and the next Recover says which rows the broker has.
func TestTxPublisherLostEndTxn(t *testing.T) {
	t.Parallel()
	e := newTxEnv(t)
	if e.b.Fake == nil {
		t.Skip("drops a response with kfake")
	}
	p, _ := e.publisher(t)
	e.b.Fake.ControlKey(int16(kmsg.EndTxn), func(kmsg.Request) (kmsg.Response, error, bool) {
		return nil, errors.New("connection lost"), true
	})
	// The producer may retry the EndTxn on a new connection (then the rows committed); if it
	// cannot tell, every row fails with relay.ErrNotLeader. Either way the next Recover names
	// exactly the rows a read_committed consumer sees.
	failed := 0
	for i, err := range publish(t, p, 5, 1, 3) {
		switch {
		case errors.Is(err, relay.ErrNotLeader):
			failed++
		case err != nil:
			t.Fatalf("row %d: %v, want nil or relay.ErrNotLeader", i+1, err)
		}
	}
	if failed != 0 && failed != 3 {
		t.Fatalf("%d of 3 rows failed: a transaction is all or none", failed)
	}
	_, ids := e.publisher(t)
	committed := readTopic(t, e, true, len(ids))
	if len(ids) != len(committed) || (failed == 0 && len(ids) != 3) {
		t.Fatalf("recover names %v but read_committed sees %v (%d rows failed)", ids, committed, failed)
	}
	t.Logf("after the lost EndTxn: %d rows failed, recovered %v, committed %v", failed, ids, committed)
}

func TestProgressEncoding(t *testing.T) {
	t.Parallel()
	for _, ids := range [][]int64{nil, {1}, {1, 2, 3}, {5, 7, 8, 9, 100, 101, 1 << 40}} {
		got, err := kafka.DecodeProgress(kafka.EncodeProgress(ids))
		if err != nil || !slices.Equal(got, ids) {
			t.Fatalf("round trip of %v: %v, %v", ids, got, err)
		}
	}
	if _, err := kafka.DecodeProgress([]byte{9}); err == nil {
		t.Fatal("decoded an unknown version")
	}
}

// TestTxPublisherProgressTopicOnAutoCreatingBroker: on a broker that creates topics on demand
// (auto.create.topics.enable), with the producer allowed to ask for it (kafka.auto_create_topics),
// the progress topic is created with one partition: looking it up first made the broker create it
// with its default count, and every term then failed. A progress topic of several partitions is
// refused with a clear error.
func TestTxPublisherProgressTopicOnAutoCreatingBroker(t *testing.T) {
	t.Parallel()
	if kafkatest.Real() {
		t.Skip("needs a broker that creates topics on demand (kfake)")
	}
	b := kafkatest.Start(t, kfake.AllowAutoTopicCreation(), kfake.DefaultNumPartitions(10))
	topic := b.Topic(t, "eos", 3)
	cfg := kafka.Config{Brokers: b.Addrs, TopicTemplate: topic, AutoCreateTopics: true}
	tx := kafka.TxConfig{TransactionalID: kafkatest.Name("txid"), ProgressTopic: kafkatest.Name("progress"),
		Identity: "db/public/" + topic, TransactionTimeout: 10 * time.Second}
	e := &txEnv{b: b, topic: topic, cfg: cfg, tx: tx}
	p, _ := e.publisher(t)
	if errs := publish(t, p, 7, 1, 3); slices.ContainsFunc(errs, func(err error) bool { return err != nil }) {
		t.Fatalf("publish: %v", errs)
	}
	wide := b.Topic(t, "progress-wide", 2)
	e.tx.ProgressTopic = wide
	p2, err := kafka.NewTxPublisher(e.cfg, e.tx, kafka.PublisherDeps{})
	if err != nil {
		t.Fatal(err)
	}
	defer p2.Close()
	if _, err := p2.Recover(context.Background()); err == nil || !strings.Contains(err.Error(), "has 2 partitions") {
		t.Fatalf("recover with a progress topic of 2 partitions: %v, want an error saying so", err)
	}
}

// TestTxPublisherRefusedRowAbortsItsHandOver: a row refused in a hand-over (an invalid topic
// name: Publish returns the error, the relay parks it) makes the transaction holding the rest of
// the hand-over abort instead of commit: its rows fail with relay.ErrSendAgain (sent again, no
// attempt counted), nothing of it is visible at read_committed, and the next hand-over commits.
func TestTxPublisherRefusedRowAbortsItsHandOver(t *testing.T) {
	t.Parallel()
	e := newTxEnv(t)
	p, _ := e.publisher(t)
	ch := make(chan error, 3)
	p.BeginBatch()
	for id := int64(1); id <= 2; id++ {
		m := &relay.Message{ID: id, EventID: domain.NewID(), AggregateType: "order", AggregateID: "k", EventType: "E",
			Payload: []byte(fmt.Sprint(id)), OccurredAt: time.Now(), TxID: 9}
		if err := p.Publish(context.Background(), m, func(err error) { ch <- err }); err != nil {
			t.Fatalf("publish %d: %v", id, err)
		}
	}
	bad := &relay.Message{ID: 3, EventID: domain.NewID(), AggregateType: "order", AggregateID: "k", EventType: "E",
		Payload: []byte("3"), Topic: "not a topic!", OccurredAt: time.Now(), TxID: 9}
	if err := p.Publish(context.Background(), bad, func(err error) { ch <- err }); !errors.Is(err, relay.ErrInvalidMessage) {
		t.Fatalf("publish of the refused row: %v, want ErrInvalidMessage", err)
	}
	p.EndBatch()
	for range 2 {
		select {
		case err := <-ch:
			if !errors.Is(err, relay.ErrSendAgain) {
				t.Fatalf("verdict of a row of the refused row's hand-over: %v, want ErrSendAgain", err)
			}
		case <-time.After(time.Minute):
			t.Fatal("no verdict within a minute")
		}
	}
	if errs := publish(t, p, 10, 4, 5); slices.ContainsFunc(errs, func(err error) bool { return err != nil }) {
		t.Fatalf("the next hand-over: %v, want it committed", errs)
	}
	if got := readTopic(t, e, true, 2); !slices.Equal(got, []string{"4/10", "5/10"}) { // payload/tx-id
		t.Fatalf("read_committed: %v, want only the next hand-over's rows 4 and 5", got)
	}
}
