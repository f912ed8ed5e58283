package e2e_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// header returns the value of the header name of r ("" if none).
func (r kcatRecord) header(name string) string {
	for i := 0; i+1 < len(r.Headers); i += 2 {
		if r.Headers[i] == name {
			return r.Headers[i+1]
		}
	}
	return ""
}

// TestKcatExactlyOnce runs the built binary with kafka.delivery=exactly_once on transactions of
// several keys written in plain SQL, one of which also holds a row the broker refuses (over its
// topic's max.message.bytes, lowered after the relay read it at the topic's first record: a row
// over the limit it knows is parked before it is sent): its Kafka transaction aborts, is
// retried, and the row is parked after relay.max_attempts; the rest of its database transaction
// is then published whole. kcat
// at isolation.level=read_committed reads exactly the events written but the parked one, each
// once, with the tx-id header shared by each transaction's records. kcat at read_uncommitted
// (librdkafka's default is read_committed) also sees the records of the aborted transactions:
// the README's warning.
func TestKcatExactlyOnce(t *testing.T) {
	testenv.LookPath(t, "kcat", "Debian package kcat; .ci/run installs it")
	relayBinary(t)
	f := newFixture(t, 1, 3)
	ctx := context.Background()
	small := f.topic + ".small"
	cl, err := kgo.NewClient(kgo.SeedBrokers(f.broker.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	defer cl.Close()
	resp, err := kadm.NewClient(cl).CreateTopic(ctx, 1, 1, nil, small)
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		t.Fatalf("create topic %s: %v", small, err)
	}
	p := startRelayProc(t, "relay", f.relayEnv("OUTBOX_KAFKA_DELIVERY=exactly_once",
		"OUTBOX_KAFKA_PROGRESS_TOPIC="+f.topic+".progress", "OUTBOX_RELAY_MAX_ATTEMPTS=3",
		"OUTBOX_RELAY_RETRY_BACKOFF_MIN=20ms", "OUTBOX_RELAY_RETRY_BACKOFF_MAX=100ms"))
	// A first row to the small topic makes the relay read its limit (the brokers' default); the
	// limit is lowered once that row is published, so the poison row below reaches the broker.
	if _, err := f.pool.Exec(ctx, `INSERT INTO `+f.outbox()+` (aggregate_type, aggregate_id, event_type, payload, topic)
		VALUES ('order', 'first', 'E', convert_to('first', 'UTF8'), $1)`, small); err != nil {
		t.Fatal(err)
	}
	for deadline := time.Now().Add(time.Minute); ; {
		n, _, err := f.pending(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the first row to the small topic was not published within a minute")
		}
		time.Sleep(20 * time.Millisecond) // polling interval
	}
	maxBytes := "2000"
	alt, err := kadm.NewClient(cl).AlterTopicConfigs(ctx, []kadm.AlterConfig{{Name: "max.message.bytes", Value: &maxBytes}}, small)
	if err == nil {
		var r kadm.AlterConfigsResponse
		if r, err = alt.On(small, nil); err == nil {
			err = r.Err
		}
	}
	if err != nil {
		t.Fatalf("lower max.message.bytes of %s: %v", small, err)
	}
	const txs, keysPerTx, perKey = 30, 3, 2
	want := map[string]string{} // event id -> the transaction that wrote it (its number)
	for i := range txs {
		tx, err := f.pool.Begin(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for n := range perKey {
			for k := range keysPerTx {
				var id string
				if err := tx.QueryRow(ctx, `INSERT INTO `+f.outbox()+` (aggregate_type, aggregate_id, event_type, payload, topic)
					VALUES ('order', $1, 'E', convert_to($2, 'UTF8'), $3) RETURNING event_id::text`,
					fmt.Sprintf("k%d", (i+k)%7), fmt.Sprintf("tx %d key %d event %d", i, k, n), f.topic).Scan(&id); err != nil {
					t.Fatal(err)
				}
				want[id] = fmt.Sprint(i)
			}
		}
		if i == txs/2 { // the poison: too big for its topic
			if _, err := tx.Exec(ctx, `INSERT INTO `+f.outbox()+` (aggregate_type, aggregate_id, event_type, payload, topic)
				VALUES ('order', 'poison', 'E', convert_to(repeat('x', 5000), 'UTF8'), $1)`, small); err != nil {
				t.Fatal(err)
			}
		}
		if err := tx.Commit(ctx); err != nil {
			t.Fatal(err)
		}
	}
	for deadline := time.Now().Add(time.Minute); ; { // drained, the poison row parked
		n, parked, err := f.pending(ctx)
		if err != nil {
			t.Fatal(err)
		}
		if n == 0 && parked == 1 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("after a minute: %d rows pending, %d parked; want 0 and the poison row", n, parked)
		}
		time.Sleep(50 * time.Millisecond) // polling interval
	}
	if code := p.terminate(t, time.Minute); code != 0 {
		t.Errorf("relay exited %d after SIGTERM, want 0", code)
	}
	var parked int
	if err := f.pool.QueryRow(ctx, `SELECT count(*) FROM `+pgx.Identifier{f.table.Schema, f.table.Name + "_parked"}.Sanitize()+` WHERE aggregate_id = 'poison'`).Scan(&parked); err != nil {
		t.Fatal(err)
	}
	if parked != 1 {
		t.Fatalf("%d poison rows parked, want 1", parked)
	}

	committed := kcatRead(t, f.broker.Addrs, f.topic, "-X", "isolation.level=read_committed")
	seen := map[string]int{}
	txHeader := map[string]string{} // transaction number -> its tx-id header
	for _, r := range committed {
		id := r.header("event-id")
		seen[id]++
		tx, ok := want[id]
		if !ok {
			t.Errorf("read_committed: record %s[%d]@%d with event id %q that was not written", r.Topic, r.Partition, r.Offset, id)
			continue
		}
		h := r.header("tx-id")
		if prev, ok := txHeader[tx]; h == "" || ok && prev != h {
			t.Errorf("read_committed: event %s of transaction %s has tx-id %q, its transaction's other records %q", id, tx, h, prev)
		}
		txHeader[tx] = h
	}
	for id := range want {
		if seen[id] != 1 {
			t.Errorf("read_committed: event %s seen %d times, want once", id, seen[id])
		}
	}
	if len(committed) != len(want) {
		t.Errorf("read_committed: %d records, want the %d events written", len(committed), len(want))
	}
	if n := len(kcatRead(t, f.broker.Addrs, small, "-X", "isolation.level=read_committed")); n != 1 {
		t.Errorf("read_committed: %d records on %s, want the first row only (the poison row was parked)", n, small)
	}

	// read_uncommitted: every committed record, and the records of the aborted transactions.
	uncommitted := kcatRead(t, f.broker.Addrs, f.topic, "-X", "isolation.level=read_uncommitted")
	dups := 0
	seenU := map[string]int{}
	for _, r := range uncommitted {
		if seenU[r.header("event-id")]++; seenU[r.header("event-id")] > 1 {
			dups++
		}
	}
	for id := range want {
		if seenU[id] == 0 {
			t.Errorf("read_uncommitted: event %s missing", id)
		}
	}
	if dups == 0 {
		t.Errorf("read_uncommitted: no record seen twice, want the records of the aborted transactions (%d records, %d events)", len(uncommitted), len(want))
	}
	t.Logf("read_committed: %d records, each event once; read_uncommitted: %d records, %d of them repeats from aborted transactions",
		len(committed), len(uncommitted), dups)
	if !strings.Contains(p.logs.String(), "row parked") {
		t.Errorf("the relay did not log the parked row")
	}
}
