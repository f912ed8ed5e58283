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
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
)

// TestReplayCommand: events the relay published with relay.mark=retain are sent again by
// 'outbox-relay replay' byte for byte (key, value, headers in the same order, partition), plus
// a replayed-at header, in id order per key; --key, --aggregate-type, --event-type, --since and
// --until select, --to-topic redirects, --dry-run counts and sends nothing, --rate paces.
func TestReplayCommand(t *testing.T) {
	t.Parallel()
	broker := kafkatest.Start(t)
	topic, other := broker.Topic(t, "replay", 3), broker.Topic(t, "replay-to", 3)
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	type row struct{ aggType, key, eventType string }
	rows := []row{
		{"order", "k1", "OrderPlaced"}, {"invoice", "i1", "InvoiceSent"}, {"order", "k1", "OrderPaid"},
		{"order", "k2", "OrderPlaced"}, {"order", "k1", "OrderShipped"}, {"invoice", "i1", "InvoicePaid"},
	}
	for i, r := range rows {
		if _, err := pool.Exec(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload, topic, headers)
			VALUES ($1, $2, $3, $4, $5, $6)`, r.aggType, r.key, r.eventType, []byte(fmt.Sprintf(`{"n":%d}`, i)), topic,
			fmt.Sprintf(`{"trace-id":"t-%d","content-type":"application/json","a":"first","zz":"last"}`, i)); err != nil {
			t.Fatal(err)
		}
	}
	env := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + table.Schema,
		"OUTBOX_DATABASE_TABLE=" + table.Name, "OUTBOX_KAFKA_BROKERS=" + strings.Join(broker.Addrs, ","),
		"OUTBOX_RELAY_MARK=retain", "OUTBOX_HTTP_ADDR=", "OUTBOX_RELAY_POLL_INTERVAL=100ms", "OUTBOX_LOG_LEVEL=warn"}

	// Publish them with the relay, retained.
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
	if err := relay.cmd.Process.Signal(syscall.SIGTERM); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-relay.done:
		if err != nil {
			t.Fatalf("relay after SIGTERM: %v\n%s", err, relay.stderr.String())
		}
	case <-time.After(60 * time.Second):
		t.Fatal("relay did not exit within 60s of SIGTERM")
	}
	originals := map[string]*kgo.Record{} // by event-id
	// The relay marked every row, so the broker acknowledged them all: the end offsets hold them,
	// and ReadToEnd reads up to there however long a loaded machine takes (an idle bound on a
	// fresh consumer's first poll once read nothing, CI 2026-12-07).
	for _, r := range broker.ReadToEnd(t, topic, time.Minute) {
		originals[kafkatest.Header(r, "event-id")] = r
	}
	if len(originals) != len(rows) {
		t.Fatalf("relay published %d events, want %d", len(originals), len(rows))
	}
	// i1's events were published three hours ago, as far as --since and --until can tell.
	if _, err := pool.Exec(ctx, `UPDATE `+outbox+` SET dispatched_at = dispatched_at - interval '3 hours' WHERE aggregate_id = 'i1'`); err != nil {
		t.Fatal(err)
	}

	replay := func(args ...string) (string, string) {
		t.Helper()
		out, errOut, code := runBin(t, 90*time.Second, env, append([]string{"replay"}, args...)...)
		if code != 0 {
			t.Fatalf("replay %v: exit %d\nstdout: %s\nstderr: %s", args, code, out, errOut)
		}
		return out, errOut
	}
	for _, c := range []struct {
		args []string
		want int
	}{
		{[]string{"--key", "k1"}, 3},
		{[]string{"--aggregate-type", "invoice"}, 2},
		{[]string{"--event-type", "OrderPlaced"}, 2},
		{[]string{"--since", "1h"}, 4},
		{[]string{"--until", "1h"}, 2},
		{[]string{"--since", time.Now().Add(-4 * time.Hour).UTC().Format(time.RFC3339), "--until", "2h", "--event-type", "InvoicePaid"}, 1},
		{nil, 6},
	} {
		out, _ := replay(append(c.args, "--dry-run")...)
		if want := fmt.Sprintf("dry run: %d retained event(s)", c.want); !strings.Contains(out, want) {
			t.Errorf("replay %v --dry-run: %q, want %q", c.args, out, want)
		}
	}
	// The reads below follow acknowledged produce requests too.
	if got := len(broker.ReadToEnd(t, topic, time.Minute)); got != len(rows) {
		t.Fatalf("after dry runs, %s holds %d records, want the %d originals", topic, got, len(rows))
	}

	// check compares a replayed record with its original, byte for byte.
	check := func(r *kgo.Record, sameTopic bool) {
		t.Helper()
		o := originals[kafkatest.Header(r, "event-id")]
		if o == nil {
			t.Fatalf("replayed record with event-id %q matches no original", kafkatest.Header(r, "event-id"))
		}
		if !bytes.Equal(r.Key, o.Key) || !bytes.Equal(r.Value, o.Value) {
			t.Errorf("replayed key %q value %q, want %q %q", r.Key, r.Value, o.Key, o.Value)
		}
		if sameTopic && r.Partition != o.Partition {
			t.Errorf("key %s replayed to partition %d, original in %d", r.Key, r.Partition, o.Partition)
		}
		n := len(r.Headers) - 1
		if n != len(o.Headers) || r.Headers[n].Key != "replayed-at" {
			t.Fatalf("replayed headers %v, want the original's %v and replayed-at", r.Headers, o.Headers)
		}
		for i, h := range o.Headers {
			if r.Headers[i].Key != h.Key || !bytes.Equal(r.Headers[i].Value, h.Value) {
				t.Errorf("replayed header %d %s=%q, original %s=%q", i, r.Headers[i].Key, r.Headers[i].Value, h.Key, h.Value)
			}
		}
		if at, err := time.Parse(time.RFC3339Nano, string(r.Headers[n].Value)); err != nil || time.Since(at) > 5*time.Minute {
			t.Errorf("replayed-at %q: want a recent RFC 3339 time (%v)", r.Headers[n].Value, err)
		}
	}
	// inOrder checks that the records of each key come in the order of the originals.
	inOrder := func(recs []*kgo.Record) {
		t.Helper()
		last := map[string]int64{}
		for _, r := range recs {
			o := originals[kafkatest.Header(r, "event-id")]
			if prev, ok := last[string(r.Key)]; ok && o.Offset < prev {
				t.Errorf("key %s: event at original offset %d replayed after the one at %d", r.Key, o.Offset, prev)
			}
			last[string(r.Key)] = o.Offset
		}
	}

	out, errOut := replay("--key", "k1", "--rate", "20", "--progress", "1ms")
	if !strings.Contains(out, "replayed 3 event(s)") || !strings.Contains(errOut, "replay: 3/3 event(s) acknowledged") {
		t.Errorf("replay --key k1: stdout %q stderr %q, want 3 replayed and the progress on stderr", out, errOut)
	}
	all := broker.ReadToEnd(t, topic, time.Minute)
	var replayed []*kgo.Record
	for _, r := range all {
		if kafkatest.Header(r, "replayed-at") != "" {
			replayed = append(replayed, r)
			check(r, true)
			if string(r.Key) != "k1" {
				t.Errorf("replay --key k1 sent key %s", r.Key)
			}
		}
	}
	if len(replayed) != 3 {
		t.Fatalf("%s holds %d replayed records, want 3", topic, len(replayed))
	}
	inOrder(replayed)

	out, _ = replay("--until", "1h", "--to-topic", other)
	if !strings.Contains(out, "replayed 2 event(s)") {
		t.Errorf("replay --until 1h --to-topic: %q, want 2 replayed", out)
	}
	moved := broker.ReadToEnd(t, other, time.Minute)
	if len(moved) != 2 {
		t.Fatalf("%s holds %d records, want i1's 2", other, len(moved))
	}
	for _, r := range moved {
		check(r, false)
		if string(r.Key) != "i1" {
			t.Errorf("replay --until 1h sent key %s, want only i1 (published 3h ago)", r.Key)
		}
	}
	inOrder(moved)
}
