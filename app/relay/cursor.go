package relay

// cursor is where the claims of one leadership term start, and how much each may read. It is
// plain arithmetic, owned by the term's loop; the I/O (the session's claims and horizon) stays
// in the loop, so every rule here is tested without a database (relay_cursor_test.go).
//
// from is where the next claim starts: every pending, due row below it is in flight or its key
// waits behind a failing head (whose id the claim then starts at, see start) or behind a parked
// row, and no row can still commit below it, as it never passes the session's Horizon. Claims
// from the oldest row (from = 0) once per poll interval, after the blocked keys are reloaded,
// find rows put back from the parked table and the rows of keys released.
type cursor struct {
	// The bounds of Config: BatchSize, MaxInFlight, MaxInFlightBytes.
	batchSize, maxInFlight, maxInFlightBytes int

	from int64
	// unsent is the lowest id the next advance must not pass: a row the read-ahead skips that
	// was not handed to the sink after all (its key began to wait meanwhile), or the head of a
	// key released (rewind); 0 for none.
	unsent int64
	// noHorizon: the session said it has none, so every claim reads from the oldest row.
	noHorizon bool
	// horizonSeen is the last horizon the session returned.
	horizonSeen int64
	// idle: the last claim returned no rows.
	idle bool
	// rowBytes is the average size of the rows of the last claim that returned any, to ask for
	// no more rows than the byte budget takes.
	rowBytes int
}

// newCursor returns the cursor of a term under cfg's bounds, starting at the oldest row.
func newCursor(cfg Config) cursor {
	return cursor{batchSize: cfg.BatchSize, maxInFlight: cfg.MaxInFlight, maxInFlightBytes: cfg.MaxInFlightBytes}
}

// start returns where the next claim starts: at from, or at lowestHead, the oldest failing head
// of a waiting key (keyGate.lowestHead, 0 for none), if it is lower (a head waiting for its
// retry is passed over by claims until it is due), or at the oldest row when fromOldest (the
// claim after a reload of the blocked keys) or when the session has no horizon.
func (c *cursor) start(fromOldest bool, lowestHead int64) int64 {
	if fromOldest || c.noHorizon {
		return 0
	}
	if lowestHead > 0 && lowestHead < c.from {
		return lowestHead
	}
	return c.from
}

// readsHorizon reports whether the next claim, from the oldest row when fromOldest, reads the
// session's horizon first. The claim from the oldest row that follows an empty claim does not:
// it needs no horizon to find every row, and the horizon seen before still bounds where later
// claims start (no row can appear below it later either), so advance only moves less far, over
// rows that were not there. An idle relay makes only such claims, one per poll interval, and the
// horizon (the sequence and pg_locks, read by the Postgres session) was a third of its queries.
// A claim woken by a commit is not from the oldest row (but once per poll interval) and reads it.
func (c *cursor) readsHorizon(fromOldest bool) bool {
	return !c.noHorizon && !(fromOldest && c.idle)
}

// advance moves where claims start after a claim from from, whose snapshot was taken after the
// session's horizon was horizon, returned rows (in id order). Below the first row returned,
// every pending, due row at or above from was in flight or held (claimReq.hold); below
// horizon+1, every row that will ever commit (but for parked rows put back) has. So the next
// claim may start at the lower of the two, and never goes back below from; nor past unsent,
// which it clears.
func (c *cursor) advance(from, horizon int64, rows []Message) {
	next := horizon + 1
	if len(rows) > 0 {
		next = min(next, rows[0].ID)
	}
	c.from = max(from, next)
	if c.unsent > 0 {
		c.from = min(c.from, c.unsent)
		c.unsent = 0
	}
}

// rewind makes the claims come back to id: the key of row id was released, and its later rows,
// which the claims passed over while it was held (claimReq.hold), may lie below from. A claim
// running now, or whose result waits to be handed to the sink, started before: its advance must
// not pass id either (unsent).
func (c *cursor) rewind(id int64) {
	c.from = min(c.from, id)
	c.passedOver(id)
}

// passedOver records that the claim running now skips row id (the read-ahead skips the rows of
// the claim before it) although id was not handed to the sink: the advance of that claim must
// not pass it.
func (c *cursor) passedOver(id int64) {
	if c.unsent == 0 || id < c.unsent {
		c.unsent = id
	}
}

// claimSize returns the most rows and bytes a claim may return with inflight rows of bytes in
// flight; both are 0 when the bounds leave no room.
func (c *cursor) claimSize(inflight, bytes int) (limit, budget int) {
	limit = min(c.batchSize, c.maxInFlight-inflight)
	if limit <= 0 {
		return 0, 0
	}
	budget = min(c.maxInFlightBytes-bytes, c.maxInFlightBytes/2)
	if budget <= 0 {
		return 0, 0
	}
	if c.rowBytes > 0 {
		// Rows past the byte budget would be read and sent by the database only to be dropped:
		// with a 10000-row batch and 1 MiB of 1 kB rows, nine rows in ten.
		limit = max(1, min(limit, budget/c.rowBytes+1))
	}
	return limit, budget
}

// read takes in the rows a claim from from, under horizon, with at most limit rows and about
// budget bytes, returned: it advances the cursor and learns the rows' average size. It returns
// their size, and whether more rows may be waiting right now (the claim stopped at its row or
// byte bound).
func (c *cursor) read(from, horizon int64, limit, budget int, rows []Message) (size int, more bool) {
	c.advance(from, horizon, rows)
	c.idle = len(rows) == 0
	for i := range rows {
		size += rows[i].Size()
	}
	if len(rows) > 0 {
		c.rowBytes = max(1, size/len(rows))
	}
	return size, len(rows) >= limit || (len(rows) > 0 && size >= budget)
}
