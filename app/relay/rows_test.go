package relay_test

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
	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/kafkatest"
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

// wantParked checks that each of ids is parked at the first attempt with a reason containing the
// matching want.
func wantParked(t *testing.T, parked map[int64]parkedRow, ids []int64, want []string) {
	t.Helper()
	for i, id := range ids {
		p, ok := parked[id]
		switch {
		case !ok:
			t.Errorf("row %d (%s) not parked; parked: %v", id, want[i], parked)
		case p.attempts != 1:
			t.Errorf("row %d parked after %d attempts, want 1 (at once)", id, p.attempts)
		case !strings.Contains(p.reason, want[i]):
			t.Errorf("row %d parked with reason %q, want it to contain %q", id, p.reason, want[i])
		}
	}
}

// TestRelayParksReservedHeaders: a row whose headers set one of the relay's own headers, in any
// letter case, is parked with a reason naming it instead of being published with two event-id
// headers (a consumer reading the last would take the writer's). Other headers go through, and
// every record carries each of the relay's headers once.
func TestRelayParksReservedHeaders(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 3)
	var rows []timedRow
	var reasons []string
	for i, name := range []string{"event-id", "Event-ID", "EVENT-TYPE", "aggregate-type", "Aggregate-Id", "occurred-at"} {
		rows = append(rows, timedRow{key: str(fmt.Sprintf("spoof-%d", i)), headers: str(`{"trace-id": "t", "` + name + `": "spoofed"}`)})
		reasons = append(reasons, fmt.Sprintf("header %q is reserved", name))
	}
	rows = append(rows, timedRow{key: str("good"), headers: str(`{"trace-id": "t-1", "event-idx": "not reserved"}`)})
	ids, eventIDs := e.insertTimed(t, rows...)
	e.run(t, relay.Config{}, kafka.Config{}, postgres.MarkDelete)

	parked := e.waitParked(t, len(reasons))
	wantParked(t, parked, ids[:len(reasons)], reasons)
	if len(parked) != len(reasons) {
		t.Errorf("parked %d rows, want %d: %v", len(parked), len(reasons), parked)
	}
	e.insertTimed(t, timedRow{key: str("sentinel")}) // written last: proves the relay went past them
	recs := e.recordsByKey(t, 2)
	good := recs["good"]
	if good == nil || recs["sentinel"] == nil || len(recs) != 2 {
		t.Fatalf("published keys %v, want good and sentinel only", recs)
	}
	count := map[string]int{}
	for _, h := range good.Headers {
		count[strings.ToLower(h.Key)]++
	}
	for _, name := range []string{"event-id", "event-type", "aggregate-type", "occurred-at", "trace-id", "event-idx"} {
		if count[name] != 1 {
			t.Errorf("header %s appears %d times on the record, want once: %v", name, count[name], good.Headers)
		}
	}
	if got := kafkatest.Header(good, kafka.HeaderEventID); got != eventIDs[len(eventIDs)-1] {
		t.Errorf("event-id header %q, want the row's event_id %s", got, eventIDs[len(eventIDs)-1])
	}
}

// TestRelayParksEachInvalidKey: a NULL and an empty aggregate_id are both invalid, and neither is
// a key whose order is kept: every such row is parked with its own reason and none waits behind
// another (order_policy wait), whether that one was parked by this relay (held in memory) or
// before it started (the parked keys it loads from the database, where a NULL and an empty key looked the
// same), and the other keys flow.
func TestRelayParksEachInvalidKey(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 3)
	const null, empty = "aggregate_id is NULL", "aggregate_id is empty"
	// Parked before the relay starts: one row of each invalid key.
	_, err := e.pool.Exec(context.Background(), `INSERT INTO `+
		pgx.Identifier{e.table.Schema, e.table.Name + "_parked"}.Sanitize()+`
		(id, event_id, aggregate_type, aggregate_id, event_type, occurred_at, created_at, attempts, reason)
		VALUES (1000001, gen_random_uuid(), 'order', NULL, 'OrderPlaced', now(), now(), 1, 'old'),
			(1000002, gen_random_uuid(), 'order', '', 'OrderPlaced', now(), now(), 1, 'old')`)
	if err != nil {
		t.Fatal(err)
	}
	ids, _ := e.insertTimed(t,
		timedRow{}, // NULL key
		timedRow{key: str("")},
		timedRow{key: str("k1")},
		timedRow{},
		timedRow{key: str("")},
	)
	e.run(t, relay.Config{OrderPolicy: relay.OrderPolicyWait}, kafka.Config{}, postgres.MarkDelete)
	parked := e.waitParked(t, 2+4)
	wantParked(t, parked, []int64{ids[0], ids[1], ids[3], ids[4]}, []string{null, empty, null, empty})

	later, _ := e.insertTimed(t, timedRow{key: str("")}, timedRow{}, timedRow{key: str("k2")})
	parked = e.waitParked(t, 2+6)
	wantParked(t, parked, later[:2], []string{empty, null})
	if len(parked) != 2+6 {
		t.Errorf("parked %d rows, want 8: %v", len(parked), parked)
	}
	if recs := e.recordsByKey(t, 2); recs["k1"] == nil || recs["k2"] == nil || len(recs) != 2 {
		t.Errorf("published keys %v, want k1 and k2", recs)
	}
	if pending, _ := e.outboxEventually(t, "[]"); len(pending) != 0 {
		t.Errorf("rows %v still pending, want none", pending)
	}
}

// TestRelayOccurredAtRange: occurred_at is sent in RFC 3339, whose years are 0001 to 9999 (in
// UTC). A row outside them is parked saying so, instead of being published with a header no
// parser takes ('4000 BC' became -3999-01-01T00:00:00Z); 'infinity' and '-infinity' are parked
// as not finite; the first and last instants of the range are published as they are.
func TestRelayOccurredAtRange(t *testing.T) {
	t.Parallel()
	e := setupPoison(t, 3)
	bad := []struct{ at, reason string }{
		{"4000-01-01 00:00:00+00 BC", "occurred_at year -3999 (UTC) is outside 0001 to 9999"},
		{"0001-12-31 23:59:59.999999+00 BC", "occurred_at year 0 (UTC) is outside 0001 to 9999"},
		{"0001-01-01 00:30:00+01", "occurred_at year 0 (UTC) is outside 0001 to 9999"}, // 0000-12-31T23:30Z
		{"10000-01-01 00:00:00+00", "occurred_at year 10000 (UTC) is outside 0001 to 9999"},
		{"infinity", "occurred_at is not a finite time"},
		{"-infinity", "occurred_at is not a finite time"},
	}
	good := []struct{ at, header string }{
		{"0001-01-01 00:00:00+00", "0001-01-01T00:00:00Z"},
		{"0001-01-01 01:30:00+01", "0001-01-01T00:30:00Z"},
		{"9999-12-31 23:59:59.999999+00", "9999-12-31T23:59:59.999999Z"},
		{"2026-03-04 05:06:07.5+02", "2026-03-04T03:06:07.5Z"},
	}
	var rows []timedRow
	var reasons []string
	for i, b := range bad {
		rows = append(rows, timedRow{key: str(fmt.Sprintf("bad-%d", i)), occurredAt: b.at})
		reasons = append(reasons, b.reason)
	}
	for i, g := range good {
		rows = append(rows, timedRow{key: str(fmt.Sprintf("good-%d", i)), occurredAt: g.at})
	}
	ids, _ := e.insertTimed(t, rows...)
	e.run(t, relay.Config{}, kafka.Config{}, postgres.MarkDelete)

	parked := e.waitParked(t, len(bad))
	wantParked(t, parked, ids[:len(bad)], reasons)
	if len(parked) != len(bad) {
		t.Errorf("parked %d rows, want %d: %v", len(parked), len(bad), parked)
	}
	recs := e.recordsByKey(t, len(good))
	for i, g := range good {
		r := recs[fmt.Sprintf("good-%d", i)]
		if r == nil {
			t.Errorf("row with occurred_at %s not published (parked: %v)", g.at, parked[ids[len(bad)+i]])
			continue
		}
		if got := kafkatest.Header(r, kafka.HeaderOccurredAt); got != g.header {
			t.Errorf("occurred_at %s published with header occurred-at=%s, want %s", g.at, got, g.header)
		}
		if _, err := time.Parse(time.RFC3339, kafkatest.Header(r, kafka.HeaderOccurredAt)); err != nil {
			t.Errorf("occurred-at header is not RFC 3339: %v", err)
		}
	}
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
	e.run(t, relay.Config{}, kafka.Config{}, postgres.MarkDelete)

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
