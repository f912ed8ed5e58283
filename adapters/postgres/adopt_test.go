package postgres_test

import (
	"context"
	"fmt"
	"os"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

var adoptSeq atomic.Int64

// adoptSchema creates an empty schema, dropped when t ends.
func adoptSchema(t *testing.T) (*pgxpool.Pool, string) {
	t.Helper()
	pool := dbtest.Pool(t)
	schema := fmt.Sprintf("t_adopt_%d_%d", os.Getpid(), adoptSeq.Add(1))
	if _, err := pool.Exec(context.Background(), `CREATE SCHEMA `+schema); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
		defer cancel()
		_, _ = pool.Exec(ctx, `DROP SCHEMA IF EXISTS `+schema+` CASCADE`)
	})
	return pool, schema
}

// TestAdoptExistingTables adopts a Debezium outbox table and a hand-made one with renamed
// columns, each holding rows already, and checks that the relay's session reads, retries, parks,
// replays and marks their rows, and that the writers' INSERTs work unchanged afterwards.
func TestAdoptExistingTables(t *testing.T) {
	t.Parallel()
	cases := []struct {
		name    string
		create  string // {{T}} is the table
		insert  string // one row: $1 event id, $2 key, $3 payload text
		columns postgres.Columns
		// wantPayload turns the inserted payload into the published one.
		wantPayload func(string) string
		occurred    bool // the table has an occurred_at column
	}{
		{
			name: "debezium",
			create: `CREATE TABLE {{T}} (id uuid NOT NULL PRIMARY KEY, aggregatetype varchar(255) NOT NULL,
				aggregateid varchar(255) NOT NULL, type varchar(255) NOT NULL, payload jsonb)`,
			insert:      `INSERT INTO {{T}} (id, aggregatetype, aggregateid, type, payload) VALUES ($1::uuid, 'order', $2, 'OrderCreated', $3::jsonb)`,
			columns:     postgres.DebeziumColumns,
			wantPayload: func(p string) string { return strings.Replace(p, ":", ": ", 1) }, // jsonb prints its own text
		},
		{
			name: "renamed",
			create: `CREATE TABLE {{T}} (seq bigserial PRIMARY KEY, uid text NOT NULL, entity text NOT NULL,
				entity_id text, kind text NOT NULL, body text, dest text, meta jsonb,
				happened timestamptz NOT NULL DEFAULT '2020-01-02T03:04:05Z')`,
			insert: `INSERT INTO {{T}} (uid, entity, entity_id, kind, body, meta) VALUES ($1, 'order', $2, 'OrderCreated', $3, '{"h":"v"}')`,
			columns: postgres.Columns{ID: "seq", EventID: "uid", Key: "entity_id", EventType: "kind", AggregateType: "entity",
				Payload: "body", Topic: "dest", Headers: "meta", OccurredAt: "happened"},
			wantPayload: func(p string) string { return p },
			occurred:    true,
		},
		{
			name:        "json payload",
			create:      `CREATE TABLE {{T}} (eid uuid NOT NULL, at text NOT NULL, k text, et text NOT NULL, doc json)`,
			insert:      `INSERT INTO {{T}} (eid, at, k, et, doc) VALUES ($1::uuid, 'order', $2, 'OrderCreated', $3::json)`,
			columns:     postgres.Columns{ID: "rid", EventID: "eid", Key: "k", EventType: "et", AggregateType: "at", Payload: "doc", Topic: postgres.Absent, Headers: postgres.Absent, OccurredAt: postgres.Absent},
			wantPayload: func(p string) string { return p },
		},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			ctx := context.Background()
			pool, schema := adoptSchema(t)
			table := postgres.Table{Schema: schema, Name: "outbox", Columns: tc.columns}
			sql := func(s string) string { return strings.ReplaceAll(s, "{{T}}", schema+".outbox") }
			if _, err := pool.Exec(ctx, sql(tc.create)); err != nil {
				t.Fatal(err)
			}
			ids := []string{"6f1c2d4e-0000-4000-8000-000000000001", "6f1c2d4e-0000-4000-8000-000000000002",
				"6f1c2d4e-0000-4000-8000-000000000003", "6f1c2d4e-0000-4000-8000-000000000004"}
			payload := func(i int) string { return fmt.Sprintf(`{"n":%d}`, i) }
			insert := func(i int) {
				t.Helper()
				if _, err := pool.Exec(ctx, sql(tc.insert), ids[i], fmt.Sprintf("k%d", i%2), payload(i)); err != nil {
					t.Fatalf("writer's INSERT of row %d: %v", i, err)
				}
			}
			insert(0)
			insert(1)

			if err := postgres.CheckOutbox(ctx, pool, table); err == nil {
				t.Fatal("CheckOutbox accepted a table not adopted yet")
			}
			if _, err := postgres.NewWriter(table); err == nil {
				t.Error("NewWriter accepted a table with its own columns: it would insert the relay's")
			}
			if _, err := postgres.Migrate(ctx, pool, table, nil); err == nil || !strings.Contains(err.Error(), "--adopt") {
				t.Fatalf("Migrate on a mapped table: got %v, want a refusal naming --adopt", err)
			}
			plan, err := postgres.PlanAdopt(ctx, pool, table)
			if err != nil {
				t.Fatalf("PlanAdopt: %v", err)
			}
			if len(plan.Statements) == 0 || len(plan.Locks) == 0 {
				t.Fatalf("plan has %d statements and %d lock notes", len(plan.Statements), len(plan.Locks))
			}
			for _, s := range plan.Statements {
				for _, c := range []string{tc.columns.EventID, tc.columns.Key, tc.columns.Payload} {
					if strings.Contains(s, "DROP COLUMN") || strings.Contains(s, "ALTER COLUMN "+c) {
						t.Errorf("plan touches a writer's column: %s", s)
					}
				}
			}
			if err := postgres.Adopt(ctx, pool, plan, "5s"); err != nil {
				t.Fatalf("Adopt: %v", err)
			}
			again, err := postgres.PlanAdopt(ctx, pool, table)
			if err != nil || len(again.Statements) != 0 {
				t.Fatalf("second PlanAdopt: %d statements, err %v; want none", len(again.Statements), err)
			}
			if err := postgres.CheckOutbox(ctx, pool, table); err != nil {
				t.Fatalf("CheckOutbox after Adopt: %v", err)
			}
			insert(2)
			insert(3)

			sess := dbtest.Session(t, table, dbtest.URL())
			if ok, err := sess.TryLead(ctx); err != nil || !ok {
				t.Fatalf("TryLead: %v %v", ok, err)
			}
			msgs, err := sess.Claim(ctx, 0, nil, 100, 1<<20, nil)
			if err != nil {
				t.Fatalf("Claim: %v", err)
			}
			if len(msgs) != 4 {
				t.Fatalf("claimed %d rows, want 4", len(msgs))
			}
			for i, m := range msgs {
				if m.EventID != ids[i] || m.AggregateType != "order" || m.AggregateID != fmt.Sprintf("k%d", i%2) ||
					m.EventType != "OrderCreated" || string(m.Payload) != tc.wantPayload(payload(i)) {
					t.Errorf("row %d: got id %s type %s key %s event %s payload %q", i, m.EventID, m.AggregateType,
						m.AggregateID, m.EventType, m.Payload)
				}
				if i > 0 && m.ID <= msgs[i-1].ID {
					t.Errorf("row %d: ordering id %d not above %d", i, m.ID, msgs[i-1].ID)
				}
				want := time.Date(2020, 1, 2, 3, 4, 5, 0, time.UTC)
				if tc.occurred && !m.OccurredAt.Equal(want) {
					t.Errorf("row %d: occurred_at %s, want %s", i, m.OccurredAt, want)
				}
				if !tc.occurred && !m.OccurredAt.Equal(m.CreatedAt) {
					t.Errorf("row %d: occurred_at %s, want created_at %s", i, m.OccurredAt, m.CreatedAt)
				}
				if tc.columns.Headers != postgres.Absent && tc.columns.Headers != "" && string(m.Headers) != `{"h": "v"}` {
					t.Errorf("row %d: headers %q", i, m.Headers)
				}
			}
			if err := sess.Retry(ctx, msgs[0].ID, "broker said no", 0); err != nil {
				t.Fatalf("Retry: %v", err)
			}
			if err := sess.Park(ctx, msgs[1].ID, "too large"); err != nil {
				t.Fatalf("Park: %v", err)
			}
			if err := sess.Mark(ctx, []int64{msgs[2].ID, msgs[3].ID}); err != nil {
				t.Fatalf("Mark: %v", err)
			}
			// The operator's reads (status, metrics, /readyz) on the mapped columns: one pending
			// row (the retried one) waits for its retry, one row of key k1 is parked.
			backlog, err := postgres.BacklogOf(ctx, pool, table, "outbox.event.{aggregate_type}", 100, true)
			if err != nil {
				t.Fatalf("BacklogOf: %v", err)
			}
			if len(backlog.Topics) != 1 || backlog.Topics[0].Topic != "outbox.event.order" || backlog.Topics[0].Pending != 1 {
				t.Errorf("BacklogOf: %+v, want 1 pending row of outbox.event.order", backlog)
			}
			if _, err := postgres.Stalled(ctx, pool, table, time.Hour, true, 100); err != nil {
				t.Errorf("Stalled: %v", err)
			}
			if _, err := postgres.HeldKeys(ctx, pool, table, 100, 10); err != nil {
				t.Errorf("HeldKeys: %v", err)
			}
			parked, err := postgres.ListParked(ctx, pool, table, postgres.ParkedFilter{})
			if err != nil || len(parked) != 1 || parked[0].ID != msgs[1].ID || parked[0].EventID != ids[1] {
				t.Fatalf("ListParked: %+v %v; want row %d", parked, err, msgs[1].ID)
			}
			if _, err := postgres.RetryParked(ctx, pool, table, postgres.ParkedFilter{IDs: []int64{msgs[1].ID}}); err != nil {
				t.Fatalf("RetryParked: %v", err)
			}
			left, err := sess.Claim(ctx, 0, nil, 100, 1<<20, nil)
			if err != nil {
				t.Fatalf("second Claim: %v", err)
			}
			got := func(ms []relay.Message) (out []string) {
				for _, m := range ms {
					out = append(out, fmt.Sprintf("%s:%d:%s", m.EventID, m.Attempts, m.Payload))
				}
				return out
			}(left)
			want := []string{ids[0] + ":1:" + tc.wantPayload(payload(0)), ids[1] + ":0:" + tc.wantPayload(payload(1))}
			if strings.Join(got, " ") != strings.Join(want, " ") {
				t.Fatalf("after retry, park, replay and mark the outbox holds %v, want %v", got, want)
			}
		})
	}
}

// TestPlanAdoptRefusesUnreadableColumns checks that a missing column and a payload of a type the
// relay cannot read are refused with the key that names them, before anything is changed.
func TestPlanAdoptRefusesUnreadableColumns(t *testing.T) {
	t.Parallel()
	ctx := context.Background()
	pool, schema := adoptSchema(t)
	if _, err := pool.Exec(ctx, `CREATE TABLE `+schema+`.outbox (id uuid, aggregatetype text, aggregateid text, payload integer)`); err != nil {
		t.Fatal(err)
	}
	_, err := postgres.PlanAdopt(ctx, pool, postgres.Table{Schema: schema, Name: "outbox", Columns: postgres.DebeziumColumns})
	if err == nil {
		t.Fatal("PlanAdopt accepted a table without a type column and with an integer payload")
	}
	for _, want := range []string{"database.columns.event_type", `"type"`, "database.columns.payload", "integer"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not name %s", err, want)
		}
	}
}
