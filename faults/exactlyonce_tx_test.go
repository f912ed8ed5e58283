package faults_test

import (
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kerr"
	"github.com/twmb/franz-go/pkg/kfake"
	"github.com/twmb/franz-go/pkg/kgo"
	"github.com/twmb/franz-go/pkg/kmsg"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/oracle"
)

// TestFaultEO05PoisonInsideATransaction: under load of transactions spanning three keys (and
// partitions and topics), transactions that also hold a poison row are written: a row the relay
// refuses (an invalid topic name: parked at once) and a row the broker refuses (over the topic's
// max.message.bytes, which the relay may not read here: its Kafka transaction aborts, retried,
// then parked; against KAFKA_BROKERS the relay reads it and parks the row at once). The poison rows are
// parked and never published; every other row of their transactions is published, in one Kafka
// transaction, never split from the rest of its database transaction (the oracle's all-or-none
// check across partitions), with 0 duplicates.
func TestFaultEO05PoisonInsideATransaction(t *testing.T) {
	t.Parallel()
	e := setup(t, eoOptions())
	cl, err := kgo.NewClient(kgo.SeedBrokers(e.broker.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	small := fmt.Sprintf("faults-eo-small-%d", time.Now().UnixNano())
	if _, err := kadm.NewClient(cl).CreateTopic(e.ctx, 1, 1, map[string]*string{"max.message.bytes": ptr("4000")}, small); err != nil {
		t.Fatal(err)
	}
	if e.broker.Fake != nil {
		// The relay reads a topic's max.message.bytes and parks a larger row before it is sent.
		// Refused that read, it falls back to kafka.max_record_bytes (1 MB), sends the row, and
		// the broker refuses it inside the Kafka transaction: the path this test is about.
		e.broker.Fake.Fault(kfake.Fault{Keys: []kmsg.Key{kmsg.DescribeConfigs}, Resource: small,
			Err: kerr.TopicAuthorizationFailed, Count: -1})
	}
	p := e.startProcess("eo05", append(e.eoEnv(), "OUTBOX_RELAY_MAX_ATTEMPTS=3")...)
	stop := e.loader.Go(e.ctx)
	defer stop()
	const poisonTxs = 4
	for i := range poisonTxs {
		keys := []string{oracle.Key(3 * i), oracle.Key(3*i + 1), oracle.Key(3*i + 2)}
		tx, err := e.loader.BeginKeys(e.ctx, keys, 2)
		if err != nil {
			t.Fatal(err)
		}
		poison := postgres.Message{AggregateType: "order", AggregateID: fmt.Sprintf("poison-%d", i), EventType: "Poison", Payload: []byte(`{}`)}
		if i%2 == 0 {
			poison.Topic = "not a topic!" // refused by the relay
		} else {
			poison.Topic, poison.Payload = small, []byte(`{"pad":"`+strings.Repeat("x", 20000)+`"}`) // refused by the broker
		}
		if err := tx.AppendRaw(e.ctx, poison); err != nil {
			t.Fatal(err)
		}
		if err := tx.Commit(e.ctx); err != nil {
			t.Fatal(err)
		}
		n := e.records()
		e.eventually(60*time.Second, "the load goes on", func() (bool, string) { return e.records() > n+30, "records " + itoa(e.records()) })
	}
	e.eventually(120*time.Second, "the poison rows parked", func() (bool, string) {
		parked, err := postgres.ListParked(e.ctx, e.pool, e.table, postgres.ParkedFilter{All: true})
		return err == nil && len(parked) == poisonTxs, fmt.Sprintf("%d parked (%v)", len(parked), err)
	})
	stop()
	e.waitDrained(90 * time.Second)
	p.signal(t, syscall.SIGTERM)
	if code := p.wait(t, 60*time.Second); code != 0 {
		t.Errorf("relay exit code after SIGTERM: %d, want 0", code)
	}
	parked, err := postgres.ListParked(e.ctx, e.pool, e.table, postgres.ParkedFilter{All: true})
	if err != nil {
		t.Fatal(err)
	}
	for _, r := range parked {
		if !strings.HasPrefix(deref(r.AggregateID), "poison-") {
			t.Errorf("parked row %d of key %s: only the poison rows may be parked (%s)", r.ID, deref(r.AggregateID), r.Reason)
		}
	}
	if e.broker.Fake != nil {
		if p.logs.count("could not read the topic's max.message.bytes") != 1 || p.logs.count("MESSAGE_TOO_LARGE") == 0 {
			t.Errorf("the big row did not reach the broker with the topic's limit unread: want one 'could not read the topic's max.message.bytes' line and the broker's MESSAGE_TOO_LARGE in the logs")
		}
	}
	rep := e.checkEO()
	if rep.Committed < 300 {
		t.Errorf("only %d events committed: the load did not run", rep.Committed)
	}
	result(t, 105, rep, fmt.Sprintf("%d poison rows inside transactions of 3 keys", poisonTxs))
}
