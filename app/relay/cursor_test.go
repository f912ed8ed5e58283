package relay

import (
	"testing"
)

// rowsOf returns messages with the ids, each of size bytes (Message.Size).
func rowsOf(size int, ids ...int64) []Message {
	out := make([]Message, len(ids))
	for i, id := range ids {
		out[i] = Message{ID: id, Payload: make([]byte, size-96)}
	}
	return out
}

func TestCursorStart(t *testing.T) {
	cases := []struct {
		name       string
		from       int64
		noHorizon  bool
		fromOldest bool
		lowestHead int64
		want       int64
	}{
		{name: "at the cursor", from: 11, want: 11},
		{name: "from the oldest row after a reload", from: 11, fromOldest: true, want: 0},
		{name: "from the oldest row without a horizon", from: 11, noHorizon: true, want: 0},
		{name: "a failing row below the cursor", from: 11, lowestHead: 4, want: 4},
		{name: "a failing row above the cursor", from: 11, lowestHead: 20, want: 11},
		{name: "a failing row at the cursor", from: 11, lowestHead: 11, want: 11},
		{name: "no failing row", from: 11, lowestHead: 0, want: 11},
		{name: "a failing row after a reload", from: 11, lowestHead: 4, fromOldest: true, want: 0},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := cursor{from: tc.from, noHorizon: tc.noHorizon}
			if got := c.start(tc.fromOldest, tc.lowestHead); got != tc.want {
				t.Fatalf("start(%v, %d) from %d = %d, want %d", tc.fromOldest, tc.lowestHead, tc.from, got, tc.want)
			}
		})
	}
}

func TestCursorAdvance(t *testing.T) {
	cases := []struct {
		name       string
		from       int64 // the cursor before the claim
		passedOver []int64
		rewind     []int64
		claimFrom  int64 // where the claim started
		horizon    int64
		rows       []int64
		want       int64
	}{
		{name: "nothing pending: up to the horizon", horizon: 10, want: 11},
		{name: "no horizon known yet", horizon: 0, want: 1},
		{name: "rows returned: at the first of them", horizon: 10, rows: []int64{5, 6}, want: 5},
		// A row committed late, with an id above the horizon: the claim did not see it, the next
		// one must, so the cursor stops at horizon+1 although the claim returned rows past it.
		{name: "a late row above the horizon is not passed", horizon: 10, rows: []int64{20, 21}, want: 11},
		// Below the horizon every row is committed: a row below it the claim did not return is
		// in flight or held, and passing it is safe.
		{name: "rows below the horizon the claim left out are passed", claimFrom: 3, horizon: 10, rows: []int64{8}, want: 8},
		{name: "never back below where the claim started", from: 15, claimFrom: 15, horizon: 10, want: 15},
		{name: "never back below where the claim started, rows", claimFrom: 15, horizon: 30, rows: []int64{16}, want: 16},
		// The read-ahead skipped a row that was not handed to the sink after all (its key began
		// to wait while the claim ran): the cursor comes back to it.
		{name: "a row the read-ahead passed over", claimFrom: 5, horizon: 30, rows: []int64{25}, passedOver: []int64{9, 7}, want: 7},
		{name: "a row passed over above where it would stop", claimFrom: 5, horizon: 10, passedOver: []int64{20}, want: 11},
		// A key was released while the claim ran: its later rows, which claims left out while it
		// was held, may lie below the cursor.
		{name: "a key released while the claim ran", from: 11, claimFrom: 11, horizon: 30, rows: []int64{25}, rewind: []int64{4}, want: 4},
		{name: "a key released above the cursor", from: 11, claimFrom: 11, horizon: 30, rewind: []int64{14}, want: 14},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := cursor{from: tc.from}
			for _, id := range tc.passedOver {
				c.passedOver(id)
			}
			for _, id := range tc.rewind {
				c.rewind(id)
			}
			c.advance(tc.claimFrom, tc.horizon, rowsOf(100, tc.rows...))
			if c.from != tc.want {
				t.Fatalf("from = %d, want %d", c.from, tc.want)
			}
			if c.unsent != 0 {
				t.Fatalf("unsent = %d after advance, want 0", c.unsent)
			}
		})
	}
}

func TestCursorRewind(t *testing.T) {
	c := cursor{from: 11}
	c.rewind(4)
	if got := c.start(false, 0); got != 4 {
		t.Fatalf("start after rewind(4) = %d, want 4", got)
	}
	c.rewind(8) // a later head released: the lower one still counts
	if c.from != 4 || c.unsent != 4 {
		t.Fatalf("from, unsent = %d, %d, want 4, 4", c.from, c.unsent)
	}
}

func TestCursorClaimSize(t *testing.T) {
	cases := []struct {
		name                 string
		rowBytes             int
		inflight, bytes      int
		wantLimit, wantBytes int
	}{
		{name: "empty", wantLimit: 100, wantBytes: 500},
		{name: "rows in flight leave less room", inflight: 350, wantLimit: 50, wantBytes: 500},
		{name: "rows in flight at the bound", inflight: 400},
		{name: "rows in flight past the bound", inflight: 401},
		{name: "bytes in flight leave less room", bytes: 900, wantLimit: 100, wantBytes: 100},
		{name: "bytes in flight at the bound", bytes: 1000},
		{name: "the average row fits the budget", rowBytes: 100, wantLimit: 6, wantBytes: 500},
		{name: "a row larger than the budget: one row", rowBytes: 5000, wantLimit: 1, wantBytes: 500},
		{name: "small rows: the batch bounds", rowBytes: 1, wantLimit: 100, wantBytes: 500},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCursor(Config{BatchSize: 100, MaxInFlight: 400, MaxInFlightBytes: 1000})
			c.rowBytes = tc.rowBytes
			limit, budget := c.claimSize(tc.inflight, tc.bytes)
			if limit != tc.wantLimit || budget != tc.wantBytes {
				t.Fatalf("claimSize(%d, %d) = %d, %d, want %d, %d", tc.inflight, tc.bytes, limit, budget, tc.wantLimit, tc.wantBytes)
			}
		})
	}
}

func TestCursorRead(t *testing.T) {
	cases := []struct {
		name          string
		rows          []int64
		limit, budget int
		wantMore      bool
	}{
		{name: "no rows", limit: 10, budget: 1000},
		{name: "fewer rows than the bounds", rows: []int64{1, 2}, limit: 10, budget: 1000},
		{name: "stopped at the row bound", rows: []int64{1, 2}, limit: 2, budget: 1000, wantMore: true},
		{name: "stopped at the byte bound", rows: []int64{1, 2}, limit: 10, budget: 400, wantMore: true},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := newCursor(Config{BatchSize: 100, MaxInFlight: 400, MaxInFlightBytes: 1000})
			c.rowBytes = 7
			size, more := c.read(0, 50, tc.limit, tc.budget, rowsOf(200, tc.rows...))
			if size != 200*len(tc.rows) || more != tc.wantMore {
				t.Fatalf("read = %d, %v, want %d, %v", size, more, 200*len(tc.rows), tc.wantMore)
			}
			wantRowBytes := 7 // unchanged by a claim without rows
			if len(tc.rows) > 0 {
				wantRowBytes = 200
			}
			if c.rowBytes != wantRowBytes {
				t.Fatalf("rowBytes = %d, want %d", c.rowBytes, wantRowBytes)
			}
			if wantFrom := min(51, append(tc.rows, 51)[0]); c.from != wantFrom {
				t.Fatalf("from = %d, want %d", c.from, wantFrom)
			}
		})
	}
}

// An idle relay claims from the oldest row once per poll interval; those claims read no
// horizon (a third of its queries), the others still do.
func TestCursorReadsHorizon(t *testing.T) {
	cases := []struct {
		name       string
		lastRows   []int64 // what the claim before returned; nil: no claim yet
		noClaim    bool
		noHorizon  bool
		fromOldest bool
		want       bool
	}{
		{name: "the first claim of a term", noClaim: true, fromOldest: true, want: true},
		{name: "a woken claim after an empty one", fromOldest: false, want: true},
		{name: "a poll from the oldest row after rows", lastRows: []int64{5}, fromOldest: true, want: true},
		{name: "a poll from the oldest row after an empty claim", fromOldest: true, want: false},
		{name: "no horizon", noHorizon: true, lastRows: []int64{5}, want: false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			c := cursor{batchSize: 100, maxInFlight: 100, maxInFlightBytes: 1 << 20, noHorizon: tc.noHorizon}
			if !tc.noClaim {
				c.read(0, 10, 100, 1<<20, rowsOf(200, tc.lastRows...))
			}
			if got := c.readsHorizon(tc.fromOldest); got != tc.want {
				t.Fatalf("readsHorizon(%v) = %v, want %v", tc.fromOldest, got, tc.want)
			}
		})
	}
}
