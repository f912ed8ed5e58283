package postgres_test

import (
	"context"
	"fmt"
	"os"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// lastSQL records the text of the last statement a connection sent.
type lastSQL struct {
	mu  sync.Mutex
	sql string
}

func (l *lastSQL) TraceQueryStart(ctx context.Context, _ *pgx.Conn, d pgx.TraceQueryStartData) context.Context {
	l.mu.Lock()
	l.sql = d.SQL
	l.mu.Unlock()
	return ctx
}

func (l *lastSQL) TraceQueryEnd(context.Context, *pgx.Conn, pgx.TraceQueryEndData) {}

func (l *lastSQL) get() string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return l.sql
}

// TestClaimFromOneRangePastTheRowsInFlight: a claim with no more than a few ids in flight past
// its start, once the start passed over the ids in flight it lies on, is the claim of one range,
// leaving the few out one by one; any other claim is the claim of two ranges around the run of
// ids in flight, leaving the others out one by one when they are few, by a hashed subplan when
// not. Each returns exactly the pending rows from its start that are not in flight, in id order:
// with nothing in flight, with the start inside the run, past it, below a short run and below a
// long one, with ids in flight past the run (a row committed late), and with more of them than
// one range leaves out.
func TestClaimFromOneRangePastTheRowsInFlight(t *testing.T) {
	t.Parallel()
	pool, table := dbtest.Schema(t)
	ctx := context.Background()
	ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
	const n = 120
	if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'one', (i % 7)::text, 'One', 'x' FROM generate_series(1, $1::int) AS i`, n); err != nil {
		t.Fatal(err)
	}
	tr := &lastSQL{}
	sess := tracedLeader(ctx, t, table, tr)
	ids := func(lo, hi int64) []int64 {
		var out []int64
		for id := lo; id <= hi; id++ {
			out = append(out, id)
		}
		return out
	}
	late := append(ids(10, 49), 53, 60)          // a run, and two rows past it
	many := append(ids(10, 49), ids(61, 100)...) // two runs of 40: 40 ids past the longest
	// How the claim left the ids in flight out: one range, or two around the run with the
	// others left out one by one or by a hashed subplan.
	const one, few, hashed = "one range", "two ranges, <> ALL", "two ranges, hashed"
	form := func(sql string) string {
		switch {
		case !strings.Contains(sql, "UNION ALL"):
			return one
		case strings.Contains(sql, "<> ALL($3::bigint[])"):
			return few
		case strings.Contains(sql, "NOT IN (SELECT unnest($3::bigint[]))"):
			return hashed
		}
		return "unknown"
	}
	for _, tc := range []struct {
		name string
		from int64
		skip []int64
		form string
	}{
		{"nothing in flight", 0, nil, one},
		{"from inside the run", 30, ids(10, 49), one},
		{"from the run's first id", 10, ids(10, 49), one},
		{"from past the run", 70, ids(10, 49), one},
		{"from below the run", 5, ids(10, 49), few},
		{"from below a short run", 5, ids(10, 19), one},
		{"from inside the run, rows in flight past it", 30, late, one},
		{"from the first row in flight past the run", 53, late, one},
		{"more in flight past the run than one range leaves out", 20, many, hashed},
		{"from below two long runs", 5, many, hashed},
		{"from the second run", 61, many, one},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const limit = 30
			rows, err := sess.Claim(ctx, tc.from, tc.skip, limit, 1<<30, nil)
			if err != nil {
				t.Fatal(err)
			}
			var want []int64
			for id := max(tc.from, 1); id <= n && len(want) < limit; id++ {
				if !slices.Contains(tc.skip, id) {
					want = append(want, id)
				}
			}
			got := make([]int64, len(rows))
			for i, r := range rows {
				got[i] = r.ID
			}
			if !slices.Equal(got, want) {
				t.Errorf("claim from %d: ids %v, want %v", tc.from, got, want)
			}
			if got := form(tr.get()); got != tc.form {
				t.Errorf("claim from %d: %s, want %s; sent:\n%s", tc.from, got, tc.form, tr.get())
			}
		})
	}
}

// BenchmarkClaimCaughtUp measures the claim of a relay that keeps up at a low rate: two new rows
// past a run of ids in flight (acknowledged, not yet marked) that lies past where the claim
// starts (the horizon trails it), as at 1,000 events a second. It reports the server backend's
// CPU per claim (backend-µs/op, from /proc: Linux, and a server on this host) beside ns/op, for
// the claim of one range that leaves the run out one by one, and for the claim of two ranges
// around the run, with the other ids in flight (none here) left out by a hashed subplan or by
// <> ALL.
//
//	go test -run '^$' -bench ClaimCaughtUp -benchtime 20000x -count 5 ./adapters/postgres/
func BenchmarkClaimCaughtUp(b *testing.B) {
	const (
		oneRange  = "one range"
		twoFew    = "two ranges, <> ALL"
		twoHashed = "two ranges, hashed"
	)
	for _, tc := range []struct {
		form     string
		inFlight int
	}{
		{twoHashed, 5}, {twoFew, 5}, {oneRange, 5},
		{twoHashed, 15}, {twoFew, 15}, {oneRange, 15},
		{twoHashed, 30}, {twoFew, 30}, {oneRange, 30},
		{twoHashed, 60}, {twoFew, 60}, // past aboveMax: two ranges
	} {
		b.Run(fmt.Sprintf("%s/%d in flight", tc.form, tc.inFlight), func(b *testing.B) {
			pool, table := dbtest.Schema(b)
			ctx := context.Background()
			ident := pgx.Identifier{table.Schema, table.Name}.Sanitize()
			// 100 rows marked (deleted) between the start and the run, the run, two new rows.
			const marked = 100
			total := marked + tc.inFlight + 2
			if _, err := pool.Exec(ctx, `INSERT INTO `+ident+` (aggregate_type, aggregate_id, event_type, payload)
				SELECT 'b', (i % 7)::text, 'B', convert_to(repeat('x', 200), 'UTF8') FROM generate_series(1, $1::int) AS i`, total); err != nil {
				b.Fatal(err)
			}
			if _, err := pool.Exec(ctx, `DELETE FROM `+ident+` WHERE id <= $1`, marked); err != nil {
				b.Fatal(err)
			}
			sess := dbtest.Session(b, table, dbtest.URL())
			if tc.form != oneRange {
				postgres.ClaimOfTwoRangesOnly(sess, tc.form == twoHashed)
			}
			var skip []int64
			for id := int64(marked + 1); id <= int64(marked+tc.inFlight); id++ {
				skip = append(skip, id)
			}
			claim := func() {
				rows, err := sess.Claim(ctx, 1, skip, 1000, 1<<20, nil)
				if err != nil || len(rows) != 2 {
					b.Fatalf("claim: %d rows, %v; want the 2 new ones", len(rows), err)
				}
			}
			for range 20 { // the generic plan, and the deleted rows' index entries killed
				claim()
			}
			cpu0, ok := backendCPU(postgres.BackendPID(sess))
			if !ok {
				b.Skip("the backend's CPU time cannot be read (/proc)")
			}
			b.ResetTimer()
			for b.Loop() {
				claim()
			}
			cpu1, _ := backendCPU(postgres.BackendPID(sess))
			b.ReportMetric(float64(cpu1-cpu0)/float64(time.Microsecond)/float64(b.N), "backend-µs/op")
		})
	}
}

// backendCPU returns the user and system CPU time of process pid, from /proc (ticks of 10 ms).
func backendCPU(pid int32) (time.Duration, bool) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, false
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64)
	st, err2 := strconv.ParseInt(f[12], 10, 64)
	if err1 != nil || err2 != nil {
		return 0, false
	}
	return time.Duration(ut+st) * 10 * time.Millisecond, true
}
