package postgres_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestRetryAndParkStoreAnyReason: the reasons a sink or a broker gives are stored whatever they
// hold. A reason over the stored limit is cut at a character boundary: cut at a byte count, a
// multi-byte character was split, PostgreSQL refused the update (SQLSTATE 22021), and the relay
// failed on the same row at every attempt. Invalid UTF-8 and NUL bytes, which PostgreSQL refuses
// too, are replaced.
func TestRetryAndParkStoreAnyReason(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	outbox := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	parked := pgx.Identifier{table.Schema, table.Name + "_parked"}.Sanitize()
	sess := dbtest.Session(t, table, dbtest.URL())
	reasons := map[string]string{
		// 2000 bytes fall inside a character at one of these offsets at least.
		"long, 3-byte characters, offset 0": "broker says: " + strings.Repeat("€", 1000),
		"long, 3-byte characters, offset 1": "broker says:  " + strings.Repeat("€", 1000),
		"long, 3-byte characters, offset 2": "broker says:   " + strings.Repeat("€", 1000),
		"long, 4-byte characters":           "x" + strings.Repeat("🙂", 600),
		"invalid UTF-8 and NUL":             "bad \xff\xfe bytes and a \x00 NUL",
	}
	for name, reason := range reasons {
		var retryID, parkID int64
		if err := pool.QueryRow(ctx, `INSERT INTO `+outbox+` (aggregate_type, aggregate_id, event_type, payload)
			VALUES ('order', 'r', 'OrderPlaced', 'x'), ('order', 'p', 'OrderPlaced', 'x') RETURNING id`).Scan(&retryID); err != nil {
			t.Fatal(err)
		}
		parkID = retryID + 1
		if err := sess.Retry(ctx, retryID, reason, time.Second); err != nil {
			t.Errorf("%s: retry: %v", name, err)
			continue
		}
		if err := sess.Park(ctx, parkID, reason); err != nil {
			t.Errorf("%s: park: %v", name, err)
			continue
		}
		var lastError, parkedReason string
		if err := pool.QueryRow(ctx, `SELECT last_error FROM `+outbox+` WHERE id = $1`, retryID).Scan(&lastError); err != nil {
			t.Fatal(err)
		}
		if err := pool.QueryRow(ctx, `SELECT reason FROM `+parked+` WHERE id = $1`, parkID).Scan(&parkedReason); err != nil {
			t.Fatalf("%s: parked row: %v", name, err)
		}
		for what, got := range map[string]string{"last_error": lastError, "parked reason": parkedReason} {
			want := strings.ToValidUTF8(strings.ReplaceAll(reason, "\x00", "\uFFFD"), "\uFFFD")
			if len(want) > 2000 {
				// At most 2000 bytes of whole characters, and no fewer than a character less.
				if len(got) > 2000 || len(got) < 2000-utf8.UTFMax+1 || !strings.HasPrefix(want, got) {
					t.Errorf("%s: %s of %d bytes, want the first whole characters of the reason within 2000 bytes", name, what, len(got))
				}
			} else if got != want {
				t.Errorf("%s: %s %q, want %q", name, what, got, want)
			}
		}
	}
}

// TestWriterAppendRefusesWhatTheRelayWouldPark: a Go writer gets an error before its transaction
// commits, rather than a parked row later, for a header the relay sets itself (in any letter
// case) and an occurred_at outside the years 0001 to 9999; 0001-01-01 is written as it is.
func TestWriterAppendRefusesWhatTheRelayWouldPark(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	w, err := postgres.NewWriter(table)
	if err != nil {
		t.Fatal(err)
	}
	ok := postgres.Message{AggregateType: "order", AggregateID: "o-1", EventType: "OrderPlaced", Payload: []byte("{}")}
	withHeader := func(name string) postgres.Message {
		m := ok
		m.Headers = map[string]string{"trace-id": "t", name: "spoofed"}
		return m
	}
	withTime := func(at time.Time) postgres.Message {
		m := ok
		m.OccurredAt = at
		return m
	}
	for name, bad := range map[string]postgres.Message{
		"event-id":       withHeader("event-id"),
		"Event-Type":     withHeader("Event-Type"),
		"AGGREGATE-TYPE": withHeader("AGGREGATE-TYPE"),
		"aggregate-id":   withHeader("aggregate-id"),
		"occurred-at":    withHeader("occurred-at"),
		"year -3999":     withTime(time.Date(-3999, 1, 1, 0, 0, 0, 0, time.UTC)),
		"year 10000":     withTime(time.Date(10000, 1, 1, 0, 0, 0, 0, time.UTC)),
		"year 0 in UTC":  withTime(time.Date(1, 1, 1, 0, 30, 0, 0, time.FixedZone("+01", 3600))),
	} {
		err := w.Append(ctx, pool, ok, bad)
		if !errors.Is(err, relay.ErrInvalidMessage) {
			t.Errorf("Append with %s: %v, want an error wrapping relay.ErrInvalidMessage", name, err)
		}
	}
	if rows := readOutbox(t, ctx, pool, table); len(rows) != 0 {
		t.Fatalf("refused calls wrote %d rows", len(rows))
	}
	first := time.Date(1, 1, 1, 0, 0, 0, 1000, time.UTC)
	if err := w.Append(ctx, pool, withTime(first), withHeader("event-idx")); err != nil {
		t.Fatalf("Append of valid events: %v", err)
	}
	rows := readOutbox(t, ctx, pool, table)
	if len(rows) != 2 || !rows[0].occurredAt.Equal(first) {
		t.Fatalf("wrote %d rows, the first with occurred_at %v; want 2, the first at %v", len(rows), rows, first)
	}
}
