package e2e_test

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
	"github.com/outbox-relay/outbox-relay/internal/testenv"
)

// TestAdoptExistingTable runs the README's "Bring your own outbox table" steps through the built
// binary, for a Debezium outbox table and for a hand-made table with renamed columns: the team's
// table as it is, with rows in it, then 'migrate --adopt' (which prints and changes nothing),
// 'migrate --adopt --yes', more rows from the writers' unchanged INSERT, and 'run'. Every row
// reaches Kafka in order, with the key, value and headers the layout promises.
func TestAdoptExistingTable(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name   string
		create string // {{T}} is the table
		insert string // $1 event id, $2 aggregate type, $3 key, $4 payload
		env    []string
		// value is the record value of payload.
		value func(payload string) string
		// idHeader is the header holding the event id besides event-id, "" for none.
		idHeader string
	}{
		{
			name: "debezium",
			create: `CREATE TABLE {{T}} (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
				aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)`,
			insert:   `INSERT INTO {{T}} (id, aggregatetype, aggregateid, type, payload) VALUES ($1::uuid, $2, $3, 'OrderCreated', $4::jsonb)`,
			env:      []string{"OUTBOX_DATABASE_LAYOUT=debezium"},
			value:    func(p string) string { return strings.ReplaceAll(p, `":`, `": `) }, // jsonb's own text
			idHeader: "id",
		},
		{
			name: "renamed",
			create: `CREATE TABLE {{T}} (seq bigserial PRIMARY KEY, uid text NOT NULL, entity text NOT NULL,
				entity_id text NOT NULL, kind text NOT NULL, body bytea NOT NULL, created timestamptz NOT NULL DEFAULT now())`,
			insert: `INSERT INTO {{T}} (uid, entity, entity_id, kind, body) VALUES ($1, $2, $3, 'OrderCreated', convert_to($4, 'UTF8'))`,
			env: []string{"OUTBOX_DATABASE_COLUMNS_ID=seq", "OUTBOX_DATABASE_COLUMNS_EVENT_ID=uid",
				"OUTBOX_DATABASE_COLUMNS_AGGREGATE_TYPE=entity", "OUTBOX_DATABASE_COLUMNS_KEY=entity_id",
				"OUTBOX_DATABASE_COLUMNS_EVENT_TYPE=kind", "OUTBOX_DATABASE_COLUMNS_PAYLOAD=body",
				"OUTBOX_DATABASE_COLUMNS_TOPIC=none", "OUTBOX_DATABASE_COLUMNS_HEADERS=none",
				"OUTBOX_DATABASE_COLUMNS_OCCURRED_AT=created"},
			value: func(p string) string { return p },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			bin := relayBinary(t)
			pool := dbtest.Pool(t)
			ctx := context.Background()
			schema := fmt.Sprintf("t_adopt_e2e_%s_%d_%d", strings.ReplaceAll(tc.name, " ", "_"), os.Getpid(), time.Now().UnixNano()%1e9)
			t.Cleanup(func() {
				ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
				defer cancel()
				_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
			})
			table := schema + ".events_outbox"
			sql := func(s string) string { return strings.ReplaceAll(s, "{{T}}", table) }
			if _, err := pool.Exec(ctx, `CREATE SCHEMA `+schema+`; `+sql(tc.create)); err != nil {
				t.Fatal(err)
			}
			broker := kafkatest.Start(t)
			aggType := kafkatest.Name("order")
			topic := "outbox.event." + aggType // the default topic template, Debezium's default route
			broker.Create(t, topic, 1)

			const rows = 6
			ids := make([]string, rows)
			payload := func(i int) string { return fmt.Sprintf(`{"order":%d}`, i) }
			insert := func(i int) {
				t.Helper()
				ids[i] = fmt.Sprintf("0b5e1d7c-1111-4222-8333-%012d", i)
				if _, err := pool.Exec(ctx, sql(tc.insert), ids[i], aggType, fmt.Sprintf("order-%d", i%2), payload(i)); err != nil {
					t.Fatalf("writer's INSERT of row %d: %v", i, err)
				}
			}
			for i := range rows / 2 {
				insert(i)
			}

			env := []string{"OUTBOX_DATABASE_URL=" + dbtest.URL(), "OUTBOX_DATABASE_SCHEMA=" + schema,
				"OUTBOX_DATABASE_TABLE=events_outbox", "OUTBOX_KAFKA_BROKERS=" + strings.Join(broker.Addrs, ","),
				"OUTBOX_HTTP_ADDR=127.0.0.1:0", "OUTBOX_LOG_FORMAT=json", "OUTBOX_RELAY_POLL_INTERVAL=200ms"}
			for _, kv := range os.Environ() {
				if !strings.HasPrefix(kv, "OUTBOX_") {
					env = append(env, kv)
				}
			}
			env = append(env, tc.env...)
			migrate := func(args ...string) string {
				t.Helper()
				cmd := exec.Command(bin, append([]string{"migrate", "--adopt"}, args...)...)
				cmd.Env = env
				var out bytes.Buffer
				cmd.Stdout, cmd.Stderr = &out, &out
				if err := cmd.Run(); err != nil {
					t.Fatalf("migrate --adopt %v: %v\n%s", args, err, out.String())
				}
				return out.String()
			}
			columns := func() int {
				var n int
				if err := pool.QueryRow(ctx, `SELECT count(*) FROM pg_attribute WHERE attrelid = $1::regclass AND attnum > 0 AND NOT attisdropped`,
					table).Scan(&n); err != nil {
					t.Fatal(err)
				}
				return n
			}
			before := columns()
			out := migrate()
			for _, want := range []string{"ALTER TABLE", "CREATE TRIGGER", "lock", "--yes"} {
				if !strings.Contains(out, want) {
					t.Errorf("migrate --adopt output lacks %q:\n%s", want, out)
				}
			}
			if got := columns(); got != before {
				t.Fatalf("migrate --adopt without --yes changed the table: %d columns, was %d", got, before)
			}
			if out := migrate("--yes"); !strings.Contains(out, "adopted in") {
				t.Fatalf("migrate --adopt --yes did not say it adopted the table:\n%s", out)
			}
			if out := migrate("--yes"); !strings.Contains(out, "nothing to do") {
				t.Errorf("a second migrate --adopt --yes did not say there is nothing to do:\n%s", out)
			}
			for i := rows / 2; i < rows; i++ {
				insert(i)
			}

			relay := startRelayProc(t, "relay", env)
			deadline := time.Now().Add(60 * time.Second)
			for {
				var left int
				if err := pool.QueryRow(ctx, `SELECT count(*) FROM `+table).Scan(&left); err != nil {
					t.Fatal(err)
				}
				if left == 0 {
					break
				}
				if time.Now().After(deadline) || !relay.running() {
					t.Fatalf("%d rows still in %s after 60s (relay running: %t)", left, table, relay.running())
				}
				time.Sleep(100 * time.Millisecond)
			}
			records := readTopic(t, broker.Addrs, topic)
			if len(records) != rows {
				t.Fatalf("read %d records from %s, want %d", len(records), topic, rows)
			}
			for i, r := range records {
				if string(r.Key) != fmt.Sprintf("order-%d", i%2) || string(r.Value) != tc.value(payload(i)) ||
					kafkatest.Header(r, "event-id") != ids[i] || kafkatest.Header(r, "event-type") != "OrderCreated" {
					t.Errorf("record %d: key %q value %q event-id %q event-type %q; want key order-%d value %q event-id %s",
						i, r.Key, r.Value, kafkatest.Header(r, "event-id"), kafkatest.Header(r, "event-type"), i%2, tc.value(payload(i)), ids[i])
				}
				if tc.idHeader != "" && kafkatest.Header(r, tc.idHeader) != ids[i] {
					t.Errorf("record %d: header %s is %q, want the event id %s", i, tc.idHeader, kafkatest.Header(r, tc.idHeader), ids[i])
				}
				if tc.idHeader == "" && kafkatest.Header(r, "id") != "" {
					t.Errorf("record %d: has an id header without the Debezium layout", i)
				}
			}
			// An independent client sees the same: kcat, as the README reads the topic.
			t.Run("kcat", func(t *testing.T) {
				testenv.LookPath(t, "kcat", "Debian package kcat")
				recs := kcatRead(t, broker.Addrs, topic)
				if len(recs) != rows {
					t.Fatalf("kcat read %d records, want %d", len(recs), rows)
				}
				for i, r := range recs {
					if r.Key == nil || *r.Key != fmt.Sprintf("order-%d", i%2) || r.Payload == nil || *r.Payload != tc.value(payload(i)) {
						t.Errorf("kcat record %d: key %v payload %v", i, r.Key, r.Payload)
					}
					if tc.idHeader != "" && !slices.Contains(kcatHeaderPairs(r.Headers), tc.idHeader+"="+ids[i]) {
						t.Errorf("kcat record %d: headers %v lack %s=%s", i, r.Headers, tc.idHeader, ids[i])
					}
				}
			})
			relay.terminate(t, 30*time.Second)
		})
	}
}

// kcatHeaderPairs returns kcat's JSON headers, a flat list of names and values, as name=value.
func kcatHeaderPairs(h []string) []string {
	var out []string
	for i := 0; i+1 < len(h); i += 2 {
		out = append(out, h[i]+"="+h[i+1])
	}
	return out
}
