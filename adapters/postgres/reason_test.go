package postgres_test

import (
	"context"
	"strings"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/jackc/pgx/v5"

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
