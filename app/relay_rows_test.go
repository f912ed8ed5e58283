package app_test

import (
	"context"
	"fmt"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"
	"github.com/twmb/franz-go/pkg/kgo"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app"
)

// The rows of a new user's first hour: what the outbox contract refuses, and what it takes.

// timedRow is an outbox row with an occurred_at, as a writer could insert it; occurredAt is a
// timestamptz literal ("" for the column's default, now()).
type timedRow struct {
	key        *string
	occurredAt string
	headers    *string
}

// insertTimed writes rows in one transaction, in order, and returns their ids and event ids.
func (e *poisonEnv) insertTimed(t *testing.T, rows ...timedRow) (ids []int64, eventIDs []string) {
	t.Helper()
	ctx := context.Background()
	tx, err := e.pool.Begin(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer func() { _ = tx.Rollback(ctx) }()
	for i, r := range rows {
		var at *string
		if r.occurredAt != "" {
			at = &r.occurredAt
		}
		var id int64
		var eventID string
		err := tx.QueryRow(ctx, `INSERT INTO `+pgx.Identifier{e.table.Schema, e.table.Name}.Sanitize()+`
			(aggregate_type, aggregate_id, event_type, payload, headers, occurred_at)
			VALUES ('order', $1, 'OrderPlaced', 'x', $2::jsonb, coalesce($3::timestamptz, now()))
			RETURNING id, event_id::text`, r.key, r.headers, at).Scan(&id, &eventID)
		if err != nil {
			t.Fatalf("insert row %d: %v", i, err)
		}
		ids, eventIDs = append(ids, id), append(eventIDs, eventID)
	}
	if err := tx.Commit(ctx); err != nil {
		t.Fatal(err)
	}
	return ids, eventIDs
}

// recordsByKey reads want records of e's topic and returns them by key; a key published twice
// fails the test.
func (e *poisonEnv) recordsByKey(t *testing.T, want int) map[string]*kgo.Record {
	t.Helper()
	out := map[string]*kgo.Record{}
	for _, r := range e.broker.ReadAll(t, e.topic, want, 10*time.Second) {
		if out[string(r.Key)] != nil {
			t.Errorf("record with key %q published twice", r.Key)
		}
		out[string(r.Key)] = r
	}
	return out
}

// TestRelayParksWithLongNonASCIIReason: a reason longer than the stored limit is cut at a character
// boundary. Cut at a byte count, it split a multi-byte character, PostgreSQL refused the park
// (SQLSTATE 22021), the term was abandoned and the next one failed on the same row: a stall. The
// three rows put the cut at each offset within a three-byte character.
func TestRelayParksWithLongNonASCIIReason(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 3)
	var rows []timedRow
	for pad := range 3 {
		// A header whose value is not a string: the reason quotes its name, 3000 bytes of '€'.
		name := strings.Repeat("x", pad) + strings.Repeat("€", 1000)
		rows = append(rows, timedRow{key: str(fmt.Sprintf("k%d", pad)), headers: str(`{"` + name + `": 1}`)})
	}
	rows = append(rows, timedRow{key: str("good")})
	ids, _ := e.insertTimed(t, rows...)
	e.run(t, app.RelayConfig{}, kafka.Config{}, postgres.MarkDelete)

	parked := e.waitParked(t, 3)
	for pad, id := range ids[:3] {
		p, ok := parked[id]
		if !ok {
			t.Errorf("row %d not parked: %v", id, parked)
			continue
		}
		prefix := `invalid message: header "` + strings.Repeat("x", pad) + "€€€"
		if !strings.HasPrefix(p.reason, prefix) || !utf8.ValidString(p.reason) || len(p.reason) > 2000 || len(p.reason) < 1990 {
			t.Errorf("row %d parked with a reason of %d bytes starting %q, want at most 2000 bytes of the sink's reason, whole characters",
				id, len(p.reason), p.reason[:min(40, len(p.reason))])
		}
	}
	e.insertTimed(t, timedRow{key: str("sentinel")})
	if recs := e.recordsByKey(t, 2); recs["good"] == nil || recs["sentinel"] == nil {
		t.Errorf("published keys %v, want good and sentinel", recs)
	}
	if strings.Contains(e.logs.String(), "database session ended") {
		t.Errorf("the relay lost its database session: %s", e.logs.String())
	}
}
