package e2e_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"maps"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/twmb/franz-go/pkg/kadm"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// kcatRecord is one line of `kcat -C -J`: headers come as a flat array of names and values.
type kcatRecord struct {
	Topic     string   `json:"topic"`
	Partition int32    `json:"partition"`
	Offset    int64    `json:"offset"`
	Key       *string  `json:"key"`
	Payload   *string  `json:"payload"`
	Headers   []string `json:"headers"`
}

// kcatRead reads topic from the beginning to its end with kcat (librdkafka), an independent
// client, with args added (such as -X isolation.level=read_committed). The JSON envelope (-J) is used rather than -f '%k|%h|%s\n' because %h prints
// headers as unescaped name=value CSV, which a header value holding a comma would make ambiguous.
func kcatRead(t *testing.T, brokers []string, topic string, args ...string) []kcatRecord {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	cmd := exec.CommandContext(ctx, "kcat", append([]string{"-C", "-b", strings.Join(brokers, ","), "-t", topic,
		"-o", "beginning", "-e", "-J", "-q"}, args...)...)
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		t.Fatalf("kcat -C -t %s: %v\n%s", topic, err, stderr.String())
	}
	var recs []kcatRecord
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(make([]byte, 0, 64<<10), 4<<20)
	for sc.Scan() {
		line := bytes.TrimSpace(sc.Bytes())
		if len(line) == 0 {
			continue
		}
		var r kcatRecord
		if err := json.Unmarshal(line, &r); err != nil {
			t.Fatalf("kcat output line %q: %v", line, err)
		}
		recs = append(recs, r)
	}
	return recs
}

// TestKcatSeesKeysAndHeaders runs the built binary against PostgreSQL and the broker, with rows
// inserted in plain SQL as any service would, and reads the topics with kcat: keys, values and
// every header (event-id, event-type, aggregate-type, occurred-at, and the row's own headers)
// are what the rows said, the topic column overrides the template, and a key keeps its order.
func TestKcatSeesKeysAndHeaders(t *testing.T) {
	testenv.LookPath(t, "kcat", "Debian package kcat; .ci/run installs it")
	relayBinary(t)
	f := newFixture(t, 1, 1)
	ctx := context.Background()
	// The template routes by aggregate type to <topic>.invoice; the override goes to f.topic.
	templated := f.topic + ".invoice"
	cl, err := kgo.NewClient(kgo.SeedBrokers(f.broker.Addrs...))
	if err != nil {
		t.Fatal(err)
	}
	resp, err := kadm.NewClient(cl).CreateTopic(ctx, 2, 1, nil, templated)
	cl.Close()
	if err == nil {
		err = resp.Err
	}
	if err != nil {
		t.Fatalf("create topic %s: %v", templated, err)
	}

	type row struct {
		aggID, evType, payload, topic, headers, eventID, occurredAt string
	}
	rows := []row{
		{aggID: "inv-1", evType: "InvoiceIssued", payload: "issued inv-1",
			headers: `{"tenant": "acme", "trace-id": "abc,def=1"}`, occurredAt: "2026-01-02T03:04:05.123456Z"},
		{aggID: "inv-1", evType: "InvoicePaid", payload: "paid inv-1"},
		{aggID: "inv-2", evType: "InvoiceIssued", payload: "issued inv-2", topic: f.topic,
			eventID: "6f1c2a3e-9b8d-4c7e-a1f2-0123456789ab", headers: `{"tenant": "globex"}`},
	}
	for i := range rows {
		r := &rows[i]
		var occurred time.Time
		err := f.pool.QueryRow(ctx, `INSERT INTO `+f.outbox()+`
			(aggregate_type, aggregate_id, event_type, payload, topic, headers, event_id, occurred_at)
			VALUES ('invoice', $1, $2, convert_to($3, 'UTF8'), nullif($4, ''), $5::jsonb,
				coalesce(nullif($6, '')::uuid, gen_random_uuid()), coalesce(nullif($7, '')::timestamptz, now()))
			RETURNING event_id::text, occurred_at`,
			r.aggID, r.evType, r.payload, r.topic, nilIfEmpty(r.headers), r.eventID, r.occurredAt).Scan(&r.eventID, &occurred)
		if err != nil {
			t.Fatalf("insert row %d: %v", i, err)
		}
		r.occurredAt = occurred.UTC().Format(time.RFC3339Nano)
	}

	p := startRelayProc(t, "relay", f.relayEnv("OUTBOX_KAFKA_TOPIC_TEMPLATE="+f.topic+".{aggregate_type}"))
	f.waitDrained(time.Minute)
	if code := p.terminate(t, time.Minute); code != 0 {
		t.Errorf("relay exited %d after SIGTERM, want 0", code)
	}

	got := map[string][]kcatRecord{}
	for _, topic := range []string{templated, f.topic} {
		for _, r := range kcatRead(t, f.broker.Addrs, topic) {
			if r.Topic != topic {
				t.Errorf("kcat record from topic %q while reading %q", r.Topic, topic)
			}
			got[topic] = append(got[topic], r)
		}
	}
	want := map[string][]row{templated: {rows[0], rows[1]}, f.topic: {rows[2]}}
	for topic, ws := range want {
		if len(got[topic]) != len(ws) {
			t.Fatalf("kcat read %d records from %s, want %d: %+v", len(got[topic]), topic, len(ws), got[topic])
		}
		for i, w := range ws {
			r := got[topic][i] // one key per topic here, so one partition: kcat's order is the key's order
			if r.Key == nil || *r.Key != w.aggID {
				t.Errorf("%s record %d: key %v, want %q", topic, i, r.Key, w.aggID)
			}
			if r.Payload == nil || *r.Payload != w.payload {
				t.Errorf("%s record %d: value %v, want %q", topic, i, r.Payload, w.payload)
			}
			if len(r.Headers)%2 != 0 {
				t.Fatalf("%s record %d: odd header array %v", topic, i, r.Headers)
			}
			h := map[string]string{}
			for j := 0; j < len(r.Headers); j += 2 {
				h[r.Headers[j]] = r.Headers[j+1]
			}
			wantH := map[string]string{
				"event-id":       w.eventID,
				"event-type":     w.evType,
				"aggregate-type": "invoice",
			}
			if w.headers != "" {
				var own map[string]string
				if err := json.Unmarshal([]byte(w.headers), &own); err != nil {
					t.Fatal(err)
				}
				maps.Copy(wantH, own)
			}
			occurred, err := time.Parse(time.RFC3339Nano, h["occurred-at"])
			if err != nil {
				t.Errorf("%s record %d: occurred-at %q is not RFC 3339: %v", topic, i, h["occurred-at"], err)
			} else if wantAt, _ := time.Parse(time.RFC3339Nano, w.occurredAt); !occurred.Equal(wantAt) {
				t.Errorf("%s record %d: occurred-at %s, want the row's %s", topic, i, occurred, wantAt)
			}
			delete(h, "occurred-at")
			if !maps.Equal(h, wantH) {
				t.Errorf("%s record %d: headers %v, want %v", topic, i, h, wantH)
			}
		}
	}
}

func nilIfEmpty(s string) any {
	if s == "" {
		return nil
	}
	return s
}
