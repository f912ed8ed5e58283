package postgres_test

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"maps"
	"regexp"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgconn"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
	"github.com/outbox-relay/outbox-relay/domain"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

var uuidRE = regexp.MustCompile(`^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$`)

// countingTx counts the statements sent through it: Append must use one round trip.
type countingTx struct {
	tx    pgx.Tx
	execs int
}

func (c *countingTx) Exec(ctx context.Context, sql string, args ...any) (pgconn.CommandTag, error) {
	c.execs++
	return c.tx.Exec(ctx, sql, args...)
}

// outboxRow is every column of an outbox row.
type outboxRow struct {
	id                              int64
	eventID, aggType, aggID, evType string
	payload                         []byte
	topic, headers, lastError       *string
	occurredAt, createdAt           time.Time
	attempts                        int
	nextAttemptAt, dispatchedAt     *time.Time
}

func readOutbox(t *testing.T, ctx context.Context, q interface {
	Query(context.Context, string, ...any) (pgx.Rows, error)
}, table postgres.Table) []outboxRow {
	t.Helper()
	rows, err := q.Query(ctx, `SELECT id, event_id::text, aggregate_type, aggregate_id, event_type, payload, topic,
		headers::text, last_error, occurred_at, created_at, attempts, next_attempt_at, dispatched_at
		FROM `+pgx.Identifier{table.Schema, table.Name}.Sanitize()+` ORDER BY id`)
	if err != nil {
		t.Fatal(err)
	}
	var out []outboxRow
	var r outboxRow
	_, err = pgx.ForEachRow(rows, []any{&r.id, &r.eventID, &r.aggType, &r.aggID, &r.evType, &r.payload, &r.topic,
		&r.headers, &r.lastError, &r.occurredAt, &r.createdAt, &r.attempts, &r.nextAttemptAt, &r.dispatchedAt}, func() error {
		out = append(out, r)
		return nil
	})
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestWriterAppendRoundTripsEveryColumn appends many events in one call and reads them back from
// the table and through the relay's Store: every column the writer sets arrives as written, and
// the defaults (event_id, occurred_at) are filled in.
func TestWriterAppendRoundTripsEveryColumn(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}

	occurred := time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)
	const n = 500
	msgs := make([]postgres.Message, n)
	for i := range msgs {
		m := postgres.Message{
			AggregateType: "order",
			AggregateID:   fmt.Sprintf("o-%d", i%7),
			EventType:     fmt.Sprintf("OrderEvent%d", i),
			Payload:       []byte(fmt.Sprintf(`{"i":%d}`, i)),
		}
		if i%3 == 0 { // every optional column set
			m.Topic = "orders.special"
			m.Headers = map[string]string{"tenant": "acme", "trace-id": fmt.Sprintf("t-%d", i), "quote": `a "b" \ c`}
			m.EventID = domain.NewID()
			m.OccurredAt = occurred.Add(time.Duration(i) * time.Microsecond)
		}
		if i == 1 {
			m.Payload = []byte{0, 1, 2, 255, 0} // binary payloads are kept byte for byte
		}
		msgs[i] = m
	}

	tx, err := pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	var txNow time.Time
	if err := tx.QueryRow(ctx, `SELECT now()`).Scan(&txNow); err != nil {
		t.Fatal(err)
	}
	ct := &countingTx{tx: tx}
	if err := w.Append(ctx, ct, msgs...); err != nil {
		t.Fatalf("Append: %v", err)
	}
	if ct.execs != 1 {
		t.Errorf("Append of %d events used %d statements, want 1 round trip", n, ct.execs)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}

	got := readOutbox(t, ctx, pool, table)
	if len(got) != n {
		t.Fatalf("outbox holds %d rows, want %d", len(got), n)
	}
	seen := map[string]bool{}
	for i, r := range got {
		m := msgs[i] // rows keep the order of the call
		if r.aggType != m.AggregateType || r.aggID != m.AggregateID || r.evType != m.EventType {
			t.Fatalf("row %d = %s/%s/%s, want %s/%s/%s (order of the call kept?)", i, r.aggType, r.aggID, r.evType,
				m.AggregateType, m.AggregateID, m.EventType)
		}
		if string(r.payload) != string(m.Payload) {
			t.Errorf("row %d payload = %q, want %q", i, r.payload, m.Payload)
		}
		if !uuidRE.MatchString(r.eventID) {
			t.Errorf("row %d event_id = %q, not a UUID", i, r.eventID)
		}
		if seen[r.eventID] {
			t.Errorf("row %d event_id %s repeated", i, r.eventID)
		}
		seen[r.eventID] = true
		if r.attempts != 0 || r.nextAttemptAt != nil || r.dispatchedAt != nil || r.lastError != nil {
			t.Errorf("row %d relay columns not at their defaults: attempts=%d next=%v dispatched=%v err=%v",
				i, r.attempts, r.nextAttemptAt, r.dispatchedAt, r.lastError)
		}
		if i > 0 && r.id <= got[i-1].id {
			t.Errorf("row ids not increasing: %d after %d", r.id, got[i-1].id)
		}
		if m.EventID != "" {
			if r.eventID != m.EventID {
				t.Errorf("row %d event_id = %s, want the given %s", i, r.eventID, m.EventID)
			}
			if !r.occurredAt.Equal(m.OccurredAt) {
				t.Errorf("row %d occurred_at = %s, want the given %s", i, r.occurredAt, m.OccurredAt)
			}
			if r.topic == nil || *r.topic != m.Topic {
				t.Errorf("row %d topic = %v, want %q", i, r.topic, m.Topic)
			}
			var h map[string]string
			if r.headers == nil {
				t.Fatalf("row %d headers NULL, want %v", i, m.Headers)
			}
			if err := json.Unmarshal([]byte(*r.headers), &h); err != nil {
				t.Fatalf("row %d headers %s: %v", i, *r.headers, err)
			}
			if !maps.Equal(h, m.Headers) {
				t.Errorf("row %d headers = %v, want %v", i, h, m.Headers)
			}
		} else {
			if !r.occurredAt.Equal(txNow) {
				t.Errorf("row %d occurred_at = %s, want now() of the writing transaction %s", i, r.occurredAt, txNow)
			}
			if r.topic != nil || r.headers != nil {
				t.Errorf("row %d topic=%v headers=%v, want NULL when not set", i, r.topic, r.headers)
			}
		}
	}

	// The relay reads the same values back through its Store.
	sess := dbtest.Session(t, table, dbtest.URL())
	claimed, err := sess.Claim(ctx, 0, nil, n+10, 1<<30, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(claimed) != n {
		t.Fatalf("Claim returned %d rows, want %d", len(claimed), n)
	}
	for i, c := range claimed {
		r := got[i]
		if c.ID != r.id || c.EventID != r.eventID || c.AggregateType != r.aggType || c.AggregateID != r.aggID ||
			c.EventType != r.evType || string(c.Payload) != string(r.payload) || !c.OccurredAt.Equal(r.occurredAt) ||
			!c.CreatedAt.Equal(r.createdAt) || c.Attempts != 0 {
			t.Fatalf("claimed row %d = %+v, differs from the table's %+v", i, c, r)
		}
		if (r.topic == nil && c.Topic != "") || (r.topic != nil && c.Topic != *r.topic) {
			t.Errorf("claimed row %d topic = %q, table %v", i, c.Topic, r.topic)
		}
		if (r.headers == nil) != (c.Headers == nil) {
			t.Errorf("claimed row %d headers = %q, table %v", i, c.Headers, r.headers)
		}
	}
}

// TestWriterAppendRejectsIncompleteEvents checks the required fields and that nothing of a
// rejected call is written.
func TestWriterAppendRejectsIncompleteEvents(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	ok := postgres.Message{AggregateType: "order", AggregateID: "o-1", EventType: "OrderPlaced", Payload: []byte("{}")}
	for _, bad := range []postgres.Message{
		{AggregateID: "o-1", EventType: "OrderPlaced"},
		{AggregateType: "order", EventType: "OrderPlaced"},
		{AggregateType: "order", AggregateID: "o-1"},
	} {
		if err := w.Append(ctx, pool, ok, bad); err == nil {
			t.Errorf("Append(%+v) succeeded, want an error naming the missing field", bad)
		}
	}
	if err := w.Append(ctx, pool); err != nil {
		t.Errorf("Append of nothing: %v", err)
	}
	if rows := readOutbox(t, ctx, pool, table); len(rows) != 0 {
		t.Errorf("rejected calls wrote %d rows", len(rows))
	}
}

func countRows(t *testing.T, pool *pgxpool.Pool, table postgres.Table, name, where string, args ...any) int {
	t.Helper()
	var n int
	q := `SELECT count(*) FROM ` + pgx.Identifier{table.Schema, name}.Sanitize() + ` WHERE ` + where
	if err := pool.QueryRow(context.Background(), q, args...).Scan(&n); err != nil {
		t.Fatal(err)
	}
	return n
}

// TestUnitOfWorkRollbackLeavesNothing stores a user and publishes its event, then fails: neither
// the user nor the event may exist.
func TestUnitOfWorkRollbackLeavesNothing(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	u, err := domain.NewUser("Bob", "bob@example.com")
	if err != nil {
		t.Fatal(err)
	}
	boom := errors.New("boom after the action")
	err = uow.Do(ctx, func(ctx context.Context, r app.Repositories) error {
		if err := r.Users().Add(ctx, u); err != nil {
			return err
		}
		if err := r.Events().Publish(ctx, domain.NewUserCreated(u, time.Now())); err != nil {
			return err
		}
		// Both are visible inside the transaction before it fails.
		return boom
	})
	if !errors.Is(err, boom) {
		t.Fatalf("Do = %v, want the function's error", err)
	}
	if n := countRows(t, pool, table, "users", "id = $1", u.ID()); n != 0 {
		t.Errorf("rolled-back user stored (%d rows)", n)
	}
	if n := countRows(t, pool, table, table.Name, "true"); n != 0 {
		t.Errorf("rolled-back event in the outbox (%d rows)", n)
	}
}

// TestCreateUserAgainstPostgres runs the use case on the Postgres adapters: the user and exactly
// one UserCreated row, whose payload decodes to the same fact; a duplicate email is a conflict
// and writes no event.
func TestCreateUserAgainstPostgres(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	uow, err := postgres.NewUnitOfWork(pool, table)
	if err != nil {
		t.Fatal(err)
	}
	at := time.Date(2026, 7, 8, 9, 10, 11, 0, time.UTC)
	uc := app.NewCreateUser(uow, func() time.Time { return at })

	id, err := uc.Execute(ctx, app.CreateUserCommand{Name: "Ann", Email: "ann@example.com"})
	if err != nil {
		t.Fatalf("CreateUser: %v", err)
	}
	var name, email string
	if err := pool.QueryRow(ctx, `SELECT name, email FROM `+pgx.Identifier{table.Schema, "users"}.Sanitize()+
		` WHERE id = $1`, id).Scan(&name, &email); err != nil {
		t.Fatalf("user %s not stored: %v", id, err)
	}
	if name != "Ann" || email != "ann@example.com" {
		t.Errorf("stored user = %q <%s>", name, email)
	}
	rows := readOutbox(t, ctx, pool, table)
	if len(rows) != 1 {
		t.Fatalf("outbox holds %d rows after one CreateUser, want exactly 1", len(rows))
	}
	r := rows[0]
	if r.aggType != domain.UserAggregateType || r.aggID != id || r.evType != "UserCreated" {
		t.Errorf("event row = %s/%s/%s, want user/%s/UserCreated", r.aggType, r.aggID, r.evType, id)
	}
	if !r.occurredAt.Equal(at) {
		t.Errorf("occurred_at = %s, want the use case's clock %s", r.occurredAt, at)
	}
	ev, err := domain.UnmarshalUserCreated(r.payload)
	if err != nil {
		t.Fatalf("payload %q: %v", r.payload, err)
	}
	if ev.UserID() != id || ev.Email() != "ann@example.com" || !ev.OccurredAt().Equal(at) {
		t.Errorf("decoded event = %s %s %s", ev.UserID(), ev.Email(), ev.OccurredAt())
	}
	if r.headers == nil || !regexp.MustCompile(`"content-type":\s*"application/json"`).MatchString(*r.headers) {
		t.Errorf("headers = %v, want content-type application/json", r.headers)
	}

	_, err = uc.Execute(ctx, app.CreateUserCommand{Name: "Ann Again", Email: "ann@example.com"})
	if !errors.Is(err, app.ErrConflict) {
		t.Fatalf("duplicate email: err = %v, want app.ErrConflict", err)
	}
	if n := countRows(t, pool, table, table.Name, "true"); n != 1 {
		t.Errorf("outbox holds %d rows after a conflicting CreateUser, want still 1", n)
	}
	if n := countRows(t, pool, table, "users", "true"); n != 1 {
		t.Errorf("users holds %d rows, want 1", n)
	}
}
