package main

import (
	"bytes"
	"context"
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// runStatus runs 'outbox-relay status' on schema with extra arguments and returns its output.
func runStatus(t *testing.T, schema string, args ...string) string {
	t.Helper()
	urlFile := filepath.Join(t.TempDir(), "url")
	if err := os.WriteFile(urlFile, []byte(dbtest.URL()), 0o600); err != nil {
		t.Fatal(err)
	}
	var stdout, stderr bytes.Buffer
	args = append([]string{"status", "--database-url-file", urlFile, "--database-schema", schema}, args...)
	if code := dispatch(context.Background(), args, &stdout, &stderr); code != 0 {
		t.Fatalf("status exited %d: %s", code, stderr.String())
	}
	return stdout.String()
}

// TestStatusJSONAgreesWithDatabase fills an outbox with rows of several topics (a topic column,
// and the template), parked rows, and a session holding the leadership, then compares
// 'status --json' with what the database says.
func TestStatusJSONAgreesWithDatabase(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	parked := pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()
	exec := func(sql string, args ...any) {
		t.Helper()
		if _, err := pool.Exec(ctx, sql, args...); err != nil {
			t.Fatalf("%s: %v", sql, err)
		}
	}

	// Empty outbox, nobody leads.
	var empty statusReport
	if err := json.Unmarshal([]byte(runStatus(t, table.Schema, "--json")), &empty); err != nil {
		t.Fatal(err)
	}
	if empty.Pending != 0 || empty.Parked != 0 || len(empty.Topics) != 0 || empty.Leader != nil || empty.Outbox != table.String() {
		t.Fatalf("status of an empty outbox: %+v", empty)
	}

	exec(`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload, topic, created_at)
		SELECT 'order', 'o' || g, 'OrderPlaced', '{}', 'orders', now() - interval '90 seconds' + g * interval '1 second'
		FROM generate_series(1, 7) g`)
	exec(`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'user', 'u' || g, 'UserCreated', '{}' FROM generate_series(1, 4) g`)
	exec(`INSERT INTO ` + outbox + ` (aggregate_type, aggregate_id, event_type, payload, topic, dispatched_at)
		VALUES ('order', 'done', 'OrderPlaced', '{}', 'orders', now())`) // published, retained: not pending
	exec(`INSERT INTO ` + parked + ` (id, event_id, aggregate_type, aggregate_id, event_type, payload, topic,
			occurred_at, created_at, attempts, reason)
		SELECT -g, gen_random_uuid(), 'order', 'p' || g, 'OrderPlaced', '{}', 'orders', now(), now(), 3, 'test'
		FROM generate_series(1, 2) g`)
	exec(`INSERT INTO ` + parked + ` (id, event_id, aggregate_type, aggregate_id, event_type, payload, topic,
			occurred_at, created_at, attempts, reason)
		VALUES (-10, gen_random_uuid(), 'invoice', 'i1', 'InvoiceSent', '{}', NULL, now(), now(), 1, 'test')`)

	// A relay-like session holds the leadership lock.
	lcfg, err := pgx.ParseConfig(dbtest.URL())
	if err != nil {
		t.Fatal(err)
	}
	lcfg.RuntimeParams["application_name"] = "outbox-relay status-test"
	lead, err := pgx.ConnectConfig(ctx, lcfg)
	if err != nil {
		t.Fatal(err)
	}
	defer lead.Close(ctx)
	if _, err := lead.Exec(ctx, `SELECT pg_advisory_lock(hashtextextended($1, 0))`, "outbox-relay:"+table.String()); err != nil {
		t.Fatal(err)
	}
	leaderPID := lead.PgConn().PID()

	type dbTopic struct {
		pending, parked int64
		age             float64
	}
	// What the database says, read just before: ages can only have grown since.
	want := map[string]*dbTopic{}
	rows, _ := pool.Query(ctx, `SELECT coalesce(topic, 'outbox.event.' || aggregate_type), count(*),
			extract(epoch FROM now() - min(created_at))::float8
		FROM `+outbox+` WHERE dispatched_at IS NULL GROUP BY 1`)
	var name string
	var n int64
	var age float64
	if _, err := pgx.ForEachRow(rows, []any{&name, &n, &age}, func() error {
		want[name] = &dbTopic{pending: n, age: age}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	rows, _ = pool.Query(ctx, `SELECT coalesce(topic, 'outbox.event.' || aggregate_type), count(*) FROM `+parked+` GROUP BY 1`)
	if _, err := pgx.ForEachRow(rows, []any{&name, &n}, func() error {
		if want[name] == nil {
			want[name] = &dbTopic{}
		}
		want[name].parked = n
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	before := time.Now()

	var got statusReport
	out := runStatus(t, table.Schema, "--json")
	if err := json.Unmarshal([]byte(out), &got); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	slack := time.Since(before).Seconds() + 1
	if got.Pending != 11 || got.Parked != 3 || got.PendingEstimated || got.ParkedEstimated {
		t.Errorf("totals: pending %d parked %d (estimated %v %v), want 11 and 3, exact", got.Pending, got.Parked,
			got.PendingEstimated, got.ParkedEstimated)
	}
	if len(got.Topics) != len(want) {
		t.Errorf("topics %+v, want %d topics", got.Topics, len(want))
	}
	for _, tp := range got.Topics {
		w := want[tp.Topic]
		if w == nil {
			t.Errorf("topic %q is not in the database", tp.Topic)
			continue
		}
		if tp.Pending != w.pending || tp.Parked != w.parked {
			t.Errorf("topic %s: pending %d parked %d, database says %d and %d", tp.Topic, tp.Pending, tp.Parked, w.pending, w.parked)
		}
		if tp.OldestAgeSeconds < w.age || tp.OldestAgeSeconds > w.age+slack {
			t.Errorf("topic %s: oldest age %.3fs, database says %.3fs", tp.Topic, tp.OldestAgeSeconds, w.age)
		}
	}
	if want["orders"] == nil || want["orders"].age < 80 || got.OldestAgeSeconds < want["orders"].age {
		t.Errorf("oldest age %.1fs, want that of the oldest row of orders (%v)", got.OldestAgeSeconds, want["orders"])
	}
	if got.Leader == nil || got.Leader.PID != int(leaderPID) || got.Leader.ApplicationName != "outbox-relay status-test" ||
		got.Leader.BackendStart == nil {
		t.Errorf("leader %+v, want pid %d application 'outbox-relay status-test'", got.Leader, leaderPID)
	}

	// The table says the same for people.
	text := runStatus(t, table.Schema)
	for _, s := range []string{table.String(), "pending  11 (oldest 1m", "parked   3", "outbox.event.user", "orders",
		`application "outbox-relay status-test"`} {
		if !strings.Contains(text, s) {
			t.Errorf("status table lacks %q:\n%s", s, text)
		}
	}

	// The leadership ends with the session.
	_ = lead.Close(ctx)
	var after statusReport
	if err := json.Unmarshal([]byte(runStatus(t, table.Schema, "--json")), &after); err != nil {
		t.Fatal(err)
	}
	if after.Leader != nil {
		t.Errorf("leader %+v after the session ended, want none", after.Leader)
	}
}

// TestEveryCommandHelpListsEnv checks that --help of every command exits 0 and names the
// environment variable of each flag it lists that maps to a configuration key.
func TestEveryCommandHelpListsEnv(t *testing.T) {
	t.Parallel()
	for _, c := range commands() {
		var stdout, stderr bytes.Buffer
		if code := dispatch(context.Background(), []string{c.name, "--help"}, &stdout, &stderr); code != 0 {
			t.Errorf("%s --help exited %d: %s", c.name, code, stderr.String())
			continue
		}
		help := stderr.String() + stdout.String()
		if !strings.Contains(help, "Usage: outbox-relay "+c.name) {
			t.Errorf("%s --help: no usage line:\n%s", c.name, help)
		}
		for _, s := range settings {
			flag := "--" + flagName(s.key) + " "
			if i := strings.Index(help, flag); i >= 0 {
				line, _, _ := strings.Cut(help[i:], "\n")
				if !strings.Contains(line, envName(s.key)) {
					t.Errorf("%s --help: %s does not name %s: %q", c.name, flag, envName(s.key), line)
				}
			}
		}
	}
}
