package postgres_test

import (
	"bytes"
	"context"
	"crypto/md5"
	"fmt"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/app/relay"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestClaimDecodesEveryColumn checks the claim's own decoding of binary rows against the same rows
// read with pgx's Scan (a session in the simple protocol, which returns text and takes the Scan
// path): every column, NULLs, odd values, payloads across and above the shared chunks, rows cut
// by the byte budget, and messages of earlier claims left intact by later ones.
func TestClaimDecodesEveryColumn(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	// Rows of every shape, then 3000 ordinary rows whose payloads fill several chunks.
	_, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload, topic, headers, occurred_at) VALUES
		('order', 'o-1', 'OrderPlaced', '\x00ff00', NULL, NULL, '2026-03-04 05:06:07.123456+00'),
		('order', NULL, 'OrderPlaced', 'x', 'orders.special', '{"tenant": "acme", "q": "a \"b\""}', now()),
		('order', '', 'OrderPlaced', NULL, NULL, '{}', '1970-01-01 00:00:00+00'),
		('ördér', 'ключ-☃', 'Événement', '', NULL, NULL, '1999-12-31 23:59:59.999999+00'),
		('order', 'o-2', 'OrderPlaced', 'y', NULL, NULL, 'infinity'),
		('order', 'o-3', 'OrderPlaced', 'z', NULL, NULL, '-infinity'),
		('order', 'o-4', 'OrderPlaced', decode(repeat('ab', 100000), 'hex'), NULL, NULL, '1900-06-01 12:00:00+00'),
		('order', 'o-5', 'OrderPlaced', 'a', NULL, NULL, '0001-01-01 00:00:00+00'),
		('order', 'o-6', 'OrderPlaced', 'b', NULL, NULL, '4000-01-01 00:00:00+00 BC'),
		('order', 'o-7', 'OrderPlaced', 'c', NULL, NULL, '10000-01-01 00:00:00.000001+00')`)
	if err != nil {
		t.Fatal(err)
	}
	_, err = pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'bulk', 'k-' || (i % 97), 'Bulk' || (i % 3), convert_to(repeat(md5(i::text), 1 + i % 40), 'UTF8')
		FROM generate_series(1, 3000) AS i`)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := pool.Exec(ctx, `UPDATE `+ident+` SET attempts = 3 WHERE aggregate_id = 'o-1'`); err != nil {
		t.Fatal(err)
	}

	claimAll := func(url string, batch int) [][]relay.Message {
		t.Helper()
		sess := dbtest.Session(t, table, url)
		var claims [][]relay.Message
		var skip []int64 // every row claimed so far: the next claim reads past them
		for {
			rows, err := sess.Claim(ctx, 0, skip, batch, 1<<30, nil)
			if err != nil {
				t.Fatalf("claim skipping %d rows: %v", len(skip), err)
			}
			if len(rows) == 0 {
				return claims
			}
			claims = append(claims, rows)
			for _, r := range rows {
				if slices.Contains(skip, r.ID) {
					t.Fatalf("claim returned row %d, which it was told to skip", r.ID)
				}
				skip = append(skip, r.ID)
			}
		}
	}
	sep := "?"
	if strings.Contains(dbtest.URL(), "?") {
		sep = "&"
	}
	binary := claimAll(dbtest.URL(), 500)
	scanned := claimAll(dbtest.URL()+sep+"default_query_exec_mode=simple_protocol", 3010)
	var got, want []relay.Message
	for _, c := range binary {
		got = append(got, c...)
	}
	for _, c := range scanned {
		want = append(want, c...)
	}
	if len(got) != 3010 || len(want) != 3010 {
		t.Fatalf("claimed %d rows decoded, %d scanned; want 3010 each", len(got), len(want))
	}
	for i := range got {
		g, w := got[i], want[i]
		if g.ID != w.ID || g.EventID != w.EventID || g.AggregateType != w.AggregateType ||
			g.AggregateID != w.AggregateID || g.EventType != w.EventType || g.Topic != w.Topic ||
			g.Attempts != w.Attempts || !g.OccurredAt.Equal(w.OccurredAt) || !g.CreatedAt.Equal(w.CreatedAt) ||
			g.AggregateIDNull != w.AggregateIDNull || g.OccurredAtInfinite != w.OccurredAtInfinite ||
			!bytes.Equal(g.Payload, w.Payload) || (g.Payload == nil) != (w.Payload == nil) ||
			!bytes.Equal(g.Headers, w.Headers) || (g.Headers == nil) != (w.Headers == nil) {
			t.Fatalf("row %d decoded differs from scanned:\n got %s\nwant %s", i, show(g), show(w))
		}
	}
	// Spot checks against the values written, so both paths are not wrong the same way.
	if got[0].Attempts != 3 || !bytes.Equal(got[0].Payload, []byte{0, 0xff, 0}) ||
		!got[0].OccurredAt.Equal(time.Date(2026, 3, 4, 5, 6, 7, 123456000, time.UTC)) || got[0].Headers != nil {
		t.Errorf("row 0 = %s", show(got[0]))
	}
	if got[1].AggregateID != "" || got[1].Topic != "orders.special" || !strings.Contains(string(got[1].Headers), `"tenant": "acme"`) {
		t.Errorf("row 1 = %s", show(got[1]))
	}
	if got[2].Payload != nil || string(got[2].Headers) != "{}" {
		t.Errorf("row 2 = %s, want a NULL payload and {} headers", show(got[2]))
	}
	if got[3].AggregateType != "ördér" || got[3].AggregateID != "ключ-☃" || got[3].Payload == nil || len(got[3].Payload) != 0 {
		t.Errorf("row 3 = %s, want the text as written and an empty, non-NULL payload", show(got[3]))
	}
	if !got[4].OccurredAtInfinite || !got[5].OccurredAtInfinite || got[0].OccurredAtInfinite {
		t.Errorf("occurred_at 'infinity' and '-infinity' decoded as infinite %v and %v (a finite one as %v), want true, true, false",
			got[4].OccurredAtInfinite, got[5].OccurredAtInfinite, got[0].OccurredAtInfinite)
	}
	if !got[1].AggregateIDNull || got[2].AggregateIDNull || got[0].AggregateIDNull {
		t.Errorf("aggregate_id NULL, '' and 'o-1' decoded as NULL %v, %v and %v, want true, false, false",
			got[1].AggregateIDNull, got[2].AggregateIDNull, got[0].AggregateIDNull)
	}
	for i, want := range []string{"0001-01-01T00:00:00Z", "-3999-01-01T00:00:00Z", "10000-01-01T00:00:00.000001Z"} {
		if at := got[7+i].OccurredAt.UTC().Format(time.RFC3339Nano); at != want || got[7+i].OccurredAtInfinite {
			t.Errorf("row %d occurred_at decoded as %s (infinite %v), want %s", 7+i, at, got[7+i].OccurredAtInfinite, want)
		}
	}
	if len(got[6].Payload) != 100000 || got[6].Payload[0] != 0xab {
		t.Errorf("large payload: %d bytes", len(got[6].Payload))
	}
	for i := 10; i < len(got); i++ {
		n := i - 9
		wantPayload := strings.Repeat(fmt.Sprintf("%x", md5sum(n)), 1+n%40)
		if string(got[i].Payload) != wantPayload || got[i].AggregateID != fmt.Sprintf("k-%d", n%97) {
			t.Fatalf("bulk row %d (claimed in batch %d) = %s", n, i/500, show(got[i]))
		}
	}

	// Rows in flight in several runs and alone: the claim leaves out exactly them.
	{
		sess := dbtest.Session(t, table, dbtest.URL())
		skipped := map[int64]bool{}
		var skip []int64
		for i, m := range got[:100] {
			if i != 10 && i != 50 {
				skip = append(skip, m.ID)
				skipped[m.ID] = true
			}
		}
		for _, i := range []int{200, 300, 3006} {
			skip = append(skip, got[i].ID)
			skipped[got[i].ID] = true
		}
		slices.Reverse(skip) // the order of the ids does not matter
		rows, err := sess.Claim(ctx, 0, skip, 5000, 1<<30, nil)
		if err != nil {
			t.Fatal(err)
		}
		var want []int64
		for _, m := range got {
			if !skipped[m.ID] {
				want = append(want, m.ID)
			}
		}
		var gotIDs []int64
		for _, r := range rows {
			gotIDs = append(gotIDs, r.ID)
		}
		if !slices.Equal(gotIDs, want) {
			t.Fatalf("claim skipping %d ids in runs returned %d rows, want %d (first %v, want first %v)",
				len(skip), len(gotIDs), len(want), gotIDs[:min(5, len(gotIDs))], want[:5])
		}
	}

	// The byte budget: a claim stops at the first row that reaches it.
	sess := dbtest.Session(t, table, dbtest.URL())
	// An empty payload as the first value of a fresh session: still empty, not NULL.
	rows, err := sess.Claim(ctx, 0, []int64{got[0].ID, got[1].ID, got[2].ID}, 1, 1<<30, nil)
	if err != nil {
		t.Fatal(err)
	}
	if len(rows) != 1 || rows[0].Payload == nil || len(rows[0].Payload) != 0 {
		t.Fatalf("first claim of a session: %d rows, payload %v; want one row with an empty payload", len(rows), rows)
	}
	var special []int64 // the rows of every shape, above: the bulk rows are what the budget cuts
	for _, m := range got[:10] {
		special = append(special, m.ID)
	}
	rows, err = sess.Claim(ctx, 0, special, 1000, 10_000, nil)
	if err != nil {
		t.Fatal(err)
	}
	size := 0
	for i := range rows {
		size += rows[i].Size()
	}
	if len(rows) == 0 || len(rows) == 1000 || size < 10_000 || size-rows[len(rows)-1].Size() >= 10_000 {
		t.Errorf("claim with a 10000-byte budget returned %d rows of %d bytes", len(rows), size)
	}
}

func show(m relay.Message) string {
	p := m.Payload
	if len(p) > 40 {
		p = p[:40]
	}
	return fmt.Sprintf("{id %d event %q agg %q/%q type %q topic %q attempts %d occurred %s created %s payload %d:%q headers %q}",
		m.ID, m.EventID, m.AggregateType, m.AggregateID, m.EventType, m.Topic, m.Attempts, m.OccurredAt, m.CreatedAt,
		len(m.Payload), p, m.Headers)
}

func md5sum(n int) [16]byte { return md5.Sum([]byte(fmt.Sprint(n))) }

// TestClaimLeavesHeldKeysOut: a claim leaves out every row of a held key but the head it names
// (none for 0), in both ranges around the ids it skips; a NULL key is the empty key, as in
// Blocked; the other keys' rows keep their order.
func TestClaimLeavesHeldKeysOut(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	var ids []int64
	for _, key := range []*string{ptr("a"), ptr("b"), ptr("c"), nil, ptr("a"), ptr("b"), ptr("c"), ptr(""), ptr("d"), ptr("a")} {
		var id int64
		if err := pool.QueryRow(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
			VALUES ('order', $1, 'E', 'x') RETURNING id`, key).Scan(&id); err != nil {
			t.Fatal(err)
		}
		ids = append(ids, id)
	}
	sess := dbtest.Session(t, table, dbtest.URL())
	claim := func(skip []int64, hold relay.Blocked) []int64 {
		t.Helper()
		rows, err := sess.Claim(ctx, 0, skip, 100, 1<<30, hold)
		if err != nil {
			t.Fatal(err)
		}
		var got []int64
		for _, r := range rows {
			got = append(got, r.ID)
		}
		return got
	}
	hold := relay.Blocked{
		relay.BlockKey("order", "a"): ids[4], // its second row may go, not its first nor its third
		relay.BlockKey("order", "b"): 0,
		relay.BlockKey("order", ""):  0, // the NULL and the empty key
	}
	want := []int64{ids[2], ids[4], ids[6], ids[8]}
	if got := claim(nil, hold); !slices.Equal(got, want) {
		t.Errorf("claim holding a (head %d), b and the empty key: %v, want %v", ids[4], got, want)
	}
	// Skipping ids 3 and 4 splits the claim in two ranges: both leave the held keys out.
	want = []int64{ids[2], ids[6], ids[8]}
	if got := claim([]int64{ids[3], ids[4]}, hold); !slices.Equal(got, want) {
		t.Errorf("claim skipping %d and %d: %v, want %v", ids[3], ids[4], got, want)
	}
	if got := claim(nil, nil); !slices.Equal(got, ids) {
		t.Errorf("claim holding nothing: %v, want every row %v", got, ids)
	}
}

func ptr(s string) *string { return &s }
