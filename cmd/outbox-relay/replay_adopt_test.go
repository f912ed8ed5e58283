package main_test

import (
	"bytes"
	"context"
	"fmt"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// TestReplayAdoptedDebeziumTable: on a Debezium outbox table adopted with 'migrate --adopt' and
// relayed with relay.mark=retain, 'outbox-relay replay' sends each event again byte for byte (key,
// value, every header, the Debezium id header among them, in the same order) plus replayed-at, in
// order per key, and --aggregate-type selects on the table's own column (aggregatetype).
func TestReplayAdoptedDebeziumTable(t *testing.T) {
	t.Parallel()
	broker := kafkatest.Start(t)
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, "dbz_outbox"}.Sanitize()
	if _, err := pool.Exec(ctx, `CREATE TABLE `+outbox+` (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
		aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)`); err != nil {
		t.Fatal(err)
	}
	aggType := kafkatest.Name("order")
	topic := "outbox.event." + aggType
	broker.Create(t, topic, 3)
	env := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_DATABASE_TABLE=dbz_outbox", "OUTBOX_DATABASE_LAYOUT=debezium",
		"OUTBOX_KAFKA_BROKERS=" + strings.Join(broker.Addrs, ","),
		"OUTBOX_RELAY_MARK=retain", "OUTBOX_HTTP_ADDR=", "OUTBOX_RELAY_POLL_INTERVAL=100ms", "OUTBOX_LOG_LEVEL=warn"}
	if out, errOut, code := runBin(t, 60*time.Second, env, "migrate", "--adopt", "--yes"); code != 0 {
		t.Fatalf("migrate --adopt --yes: exit %d\n%s\n%s", code, out, errOut)
	}
	const rows = 6
	for i := range rows {
		if _, err := pool.Exec(ctx, `INSERT INTO `+outbox+` (id, aggregatetype, aggregateid, type, payload)
			VALUES ($1::uuid, $2, $3, 'OrderCreated', $4::jsonb)`, fmt.Sprintf("0b5e1d7c-2222-4222-8333-%012d", i),
			aggType, fmt.Sprintf("order-%d", i%2), fmt.Sprintf(`{"order": %d}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	relay := startSubcommand(t, env, "run")
	deadline := time.Now().Add(60 * time.Second)
	for {
		var pending int
		if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+outbox+` WHERE dispatched_at IS NULL`).Scan(&pending); err != nil {
			t.Fatal(err)
		}
		if pending == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("%d rows still pending after 60s\n%s", pending, relay.stderr.String())
		}
		time.Sleep(100 * time.Millisecond)
	}
	_ = relay.cmd.Process.Signal(syscall.SIGTERM)
	if err := <-relay.done; err != nil {
		t.Fatalf("relay after SIGTERM: %v\n%s", err, relay.stderr.String())
	}
	originals := broker.ReadAll(t, topic, rows, 10*time.Second)
	if len(originals) != rows {
		t.Fatalf("relay published %d events, want %d", len(originals), rows)
	}
	byID := map[string]int{}
	for i, r := range originals {
		byID[kafkatest.Header(r, "event-id")] = i
		if kafkatest.Header(r, "id") != kafkatest.Header(r, "event-id") {
			t.Errorf("original %d: id header %q, want the event id", i, kafkatest.Header(r, "id"))
		}
	}

	out, errOut, code := runBin(t, 60*time.Second, env, "replay", "--aggregate-type", aggType, "--dry-run")
	if code != 0 || !strings.Contains(out, fmt.Sprintf("dry run: %d retained event(s)", rows)) {
		t.Fatalf("replay --dry-run: exit %d, %q %q", code, out, errOut)
	}
	if out, errOut, code := runBin(t, 60*time.Second, env, "replay", "--aggregate-type", "no-such-type", "--dry-run"); code != 0 ||
		!strings.Contains(out, "no retained event") {
		t.Fatalf("replay --aggregate-type no-such-type --dry-run: exit %d, %q %q", code, out, errOut)
	}
	if out, errOut, code := runBin(t, 60*time.Second, env, "replay", "--key", "order-1"); code != 0 || !strings.Contains(out, "replayed 3 event(s)") {
		t.Fatalf("replay --key order-1: exit %d, %q %q", code, out, errOut)
	}
	all := broker.ReadAll(t, topic, rows+3, 10*time.Second)
	last := -1
	var n int
	for _, r := range all {
		if kafkatest.Header(r, "replayed-at") == "" {
			continue
		}
		n++
		i, ok := byID[kafkatest.Header(r, "event-id")]
		if !ok {
			t.Fatalf("replayed event-id %q matches no original", kafkatest.Header(r, "event-id"))
		}
		o := originals[i]
		if string(r.Key) != "order-1" || !bytes.Equal(r.Key, o.Key) || !bytes.Equal(r.Value, o.Value) || r.Partition != o.Partition {
			t.Errorf("replayed key %q value %q partition %d, want %q %q %d", r.Key, r.Value, r.Partition, o.Key, o.Value, o.Partition)
		}
		if len(r.Headers) != len(o.Headers)+1 || r.Headers[len(o.Headers)].Key != "replayed-at" {
			t.Fatalf("replayed headers %v, want the original's %v and replayed-at", r.Headers, o.Headers)
		}
		for j, h := range o.Headers {
			if r.Headers[j].Key != h.Key || !bytes.Equal(r.Headers[j].Value, h.Value) {
				t.Errorf("replayed header %d %s=%q, original %s=%q", j, r.Headers[j].Key, r.Headers[j].Value, h.Key, h.Value)
			}
		}
		if o.Offset < int64(last) {
			t.Errorf("key order-1 replayed out of order: original offset %d after %d", o.Offset, last)
		}
		last = int(o.Offset)
	}
	if n != 3 {
		t.Errorf("%d replayed records, want order-1's 3", n)
	}
}
