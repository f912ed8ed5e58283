package main

import (
	"context"
	"fmt"
	"sort"
	"strings"
	"sync"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// The live-backlog section's modes.
const (
	liveAlone   = "alone"   // the relay drains the backlog, nothing else writes
	liveWriters = "writers" // the same while liveWritersN writers commit liveRate transactions/s
)

// liveWritersN and liveRate are the live writers of the section: 4 writers, 190 transactions/s
// in all, one event per transaction (issue 21's measurement).
const (
	liveWritersN = 4
	liveRate     = 190
)

// liveRun is one drain of the live-backlog section.
type liveRun struct {
	Mode    string `json:"mode"`
	Round   int    `json:"round"`
	Backlog int64  `json:"backlog_rows"`
	// DrainSec is from the backlog's commit to its rows all marked.
	DrainSec float64 `json:"drain_sec"`
	// InsertSec is how long the backlog's INSERT took (the relay running meanwhile).
	InsertSec float64 `json:"insert_sec"`
	// WriterTxPerSec is what the live writers committed meanwhile (0 alone).
	WriterTxPerSec float64 `json:"writer_tx_per_sec"`
	Marks          int     `json:"marks"`
	MarkP50        float64 `json:"mark_p50_ms"`
	MarkP99        float64 `json:"mark_p99_ms"`
	MarkMax        float64 `json:"mark_max_ms"`
	ClaimP50       float64 `json:"claim_p50_ms"`
	ClaimP99       float64 `json:"claim_p99_ms"`
	// MarkBackend counts pg_stat_activity samples (every 20 ms) of the relay's mark connection:
	// "state wait_event_type:wait_event" ("CPU" when active without a wait event).
	MarkBackend map[string]int `json:"mark_backend"`
	// IdxTupRead is the index entries each of the outbox's indexes returned during the drain
	// (pg_stat_user_indexes.idx_tup_read), IdxScans the scans; InsertIdxTupRead the same
	// while the backlog's transaction was open.
	IdxTupRead map[string]int64 `json:"idx_tup_read"`
	IdxScans   map[string]int64 `json:"idx_scans"`
	// InsertIdxTupRead is IdxTupRead while the backlog's INSERT ran.
	InsertIdxTupRead map[string]int64 `json:"insert_idx_tup_read"`
	// HeapFetched is pg_stat_user_tables.idx_tup_fetch during the drain: heap tuples the index
	// scans visited.
	HeapFetched int64   `json:"heap_fetched"`
	LoadAvg     float64 `json:"load_avg_1m"`
	// Half-way through the drain: EXPLAIN (ANALYZE, BUFFERS) of a claim from the oldest row
	// (its time, buffers and plan), and the table's dead tuples.
	MidClaimMs      float64 `json:"mid_claim_ms"`
	MidClaimBuffers int64   `json:"mid_claim_buffers"`
	MidClaimPlan    string  `json:"mid_claim_plan"`
	MidDeadTuples   int64   `json:"mid_dead_tuples"`
}

// liveResults is the live-backlog section: the medians of each mode and their ratio.
type liveResults struct {
	Runs []liveRun `json:"runs"`
	// AloneSec and WritersSec are the medians of DrainSec; Ratio is AloneSec / WritersSec: how
	// fast the drain is with writers, as a share of the drain without (the target is >= 0.5).
	AloneSec   float64 `json:"alone_sec"`
	WritersSec float64 `json:"writers_sec"`
	Ratio      float64 `json:"ratio"`
}

// live drains a backlog written by one transaction, alone and under live writers, alternating
// the order from round to round (issue 21, item 5).
func (b *bench) live(ctx context.Context) error {
	res := &liveResults{}
	b.res.Live = res
	byMode := map[string][]float64{}
	for round := range b.opts.Scale.LiveRepeats {
		order := []string{liveAlone, liveWriters}
		if round%2 == 1 {
			order = []string{liveWriters, liveAlone}
		}
		for _, mode := range order {
			r, err := b.liveRun(ctx, mode, round)
			if err != nil {
				return fmt.Errorf("%s round %d: %w", mode, round, err)
			}
			res.Runs = append(res.Runs, r)
			byMode[mode] = append(byMode[mode], r.DrainSec)
			b.log.Printf("live backlog %s round %d: %d rows in %.2f s, %d marks p50 %.1f ms p99 %.1f ms, claims p50 %.1f ms p99 %.1f ms, writers %.0f tx/s, claim from the oldest row half-way %.1f ms %d buffers, mark backend %v (load average %.1f)",
				mode, round, r.Backlog, r.DrainSec, r.Marks, r.MarkP50, r.MarkP99, r.ClaimP50, r.ClaimP99, r.WriterTxPerSec, r.MidClaimMs, r.MidClaimBuffers, r.MarkBackend, r.LoadAvg)
		}
	}
	res.AloneSec, res.WritersSec = median(byMode[liveAlone]), median(byMode[liveWriters])
	if res.WritersSec > 0 {
		res.Ratio = res.AloneSec / res.WritersSec
	}
	b.log.Printf("live backlog: alone %.2f s, with writers %.2f s: %.2fx as fast", res.AloneSec, res.WritersSec, res.Ratio)
	return nil
}

func (b *bench) liveRun(ctx context.Context, mode string, round int) (liveRun, error) {
	n := b.opts.Scale.LiveBacklog
	r := liveRun{Mode: mode, Round: round, Backlog: n}
	schema, err := b.schema(ctx, "live")
	if err != nil {
		return r, err
	}
	defer b.dropSchema(schema)
	table := pgx.Identifier{schema, "outbox"}.Sanitize()
	br, err := b.startBroker(ctx)
	if err != nil {
		return r, err
	}
	defer br.close()
	cfg := childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema, Brokers: br.addrs,
		Mark: postgres.MarkDelete, Timings: true}
	relay, err := b.start(ctx, cfg)
	if err != nil {
		return r, err
	}
	defer func() { _ = relay.stop() }()
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return r, err
	}
	defer w.close()
	w.n = liveWritersN
	// The relay runs, caught up (with the writers, if any, for a second), when the backlog
	// commits.
	if err := relay.send("go"); err != nil {
		return r, err
	}
	wctx, stopWriters := context.WithCancel(ctx)
	defer stopWriters()
	var wg sync.WaitGroup
	if mode == liveWriters {
		wg.Go(func() { w.run(wctx, liveRate) })
	}
	time.Sleep(time.Second)
	before, err := b.liveStats(ctx, schema, true)
	if err != nil {
		return r, err
	}
	sctx, stopSampling := context.WithCancel(ctx)
	defer stopSampling()
	samples := make(chan map[string]int, 1)
	go func() { samples <- b.sampleBackend(sctx, relay.appName+" marks") }()
	if err := relay.send("reset"); err != nil {
		return r, err
	}
	// One transaction writes the whole backlog, as an application's bulk job would: every row
	// has the same tx, and nothing vacuums the table before the relay reads it.
	insert := time.Now()
	if _, err := b.pool.Exec(ctx, `INSERT INTO `+table+` (aggregate_type, aggregate_id, event_type, payload)
		SELECT 'bench', (i % 100)::text, 'bench.created', substring($2::bytea from ((i * 7919) % ($3::bigint - 256))::int + 1 for 256)
		FROM generate_series(1, $1::bigint) AS i ORDER BY i`, n, slab(), slabSize); err != nil {
		return r, fmt.Errorf("backlog: %w", err)
	}
	start := time.Now()
	r.InsertSec = start.Sub(insert).Seconds()
	// Taken without waiting for the backends' statistics (sent at most once a second): the
	// split between the two phases is approximate.
	mid, err := b.liveStats(ctx, schema, false)
	if err != nil {
		return r, err
	}
	// Every row committed before the backlog, and the backlog, are marked when the relay's count
	// reaches want (it publishes in id order: the rows committed later come after).
	want := w.committed.Load() + n
	c0 := w.committed.Load()
	timeout := time.Duration(n/1000+120) * time.Second
	explained := false
	for relay.progress.Load() < want {
		if !explained && relay.progress.Load() >= want-n/2 {
			// Half-way: the claim from the oldest row (made once per poll interval), as the
			// relay's session runs it.
			explained = true
			hs, text, err := b.tableState(ctx, schema, table)
			if err != nil {
				return r, err
			}
			r.MidClaimMs, r.MidClaimBuffers, r.MidClaimPlan = hs.PollMs, hs.PollBuffers, text
			r.MidDeadTuples = hs.DeadTuples
		}
		if time.Since(start) > timeout {
			return r, fmt.Errorf("backlog not drained within %s: marked %d of %d", timeout, relay.progress.Load(), want)
		}
		select {
		case <-ctx.Done():
			return r, ctx.Err()
		case <-relay.exited:
			return r, fmt.Errorf("relay exited: %v: %s", relay.err, relay.stderrText())
		case <-time.After(5 * time.Millisecond):
		}
	}
	r.DrainSec = time.Since(start).Seconds()
	if mode == liveWriters {
		r.WriterTxPerSec = float64(w.committed.Load()-c0) / time.Since(start).Seconds()
	}
	stopSampling()
	r.MarkBackend = <-samples
	if err := relay.send("report"); err != nil {
		return r, err
	}
	rep, err := relay.report(ctx, time.Minute)
	if err != nil {
		return r, err
	}
	after, err := b.liveStats(ctx, schema, true)
	if err != nil {
		return r, err
	}
	r.IdxTupRead, r.IdxScans, r.InsertIdxTupRead = map[string]int64{}, map[string]int64{}, map[string]int64{}
	for k, v := range after.tupRead {
		r.IdxTupRead[k] = v - mid.tupRead[k]
		r.IdxScans[k] = after.scans[k] - mid.scans[k]
		r.InsertIdxTupRead[k] = mid.tupRead[k] - before.tupRead[k]
	}
	r.HeapFetched = after.fetched - mid.fetched
	stopWriters()
	wg.Wait()
	if err := w.failure(); err != nil {
		return r, err
	}
	if rep.Relay != nil {
		r.Marks = len(rep.Relay.MarkMS)
		r.MarkP50, r.MarkP99, r.MarkMax = quantiles(rep.Relay.MarkMS)
		r.ClaimP50, r.ClaimP99, _ = quantiles(rep.Relay.ClaimMS)
	}
	r.LoadAvg = loadAvg()
	return r, nil
}

// quantiles returns the p50, p99 and maximum of s, rounded to 0.001.
func quantiles(s []float64) (p50, p99, top float64) {
	if len(s) == 0 {
		return 0, 0, 0
	}
	s = append([]float64(nil), s...)
	sort.Float64s(s)
	return round3(quantile(s, 0.5)), round3(quantile(s, 0.99)), round3(s[len(s)-1])
}

// liveCounters are the outbox's index statistics at one moment.
type liveCounters struct {
	tupRead, scans map[string]int64
	fetched        int64
}

// liveStats reads the statistics of the outbox's indexes. The statistics are sent by each
// backend at the end of its transactions (and at most every 500 ms while idle): a moment's delay
// is taken first.
func (b *bench) liveStats(ctx context.Context, schema string, wait bool) (liveCounters, error) {
	c := liveCounters{tupRead: map[string]int64{}, scans: map[string]int64{}}
	if wait {
		time.Sleep(time.Second)
	}
	rows, err := b.pool.Query(ctx, `SELECT indexrelname, idx_tup_read, idx_scan FROM pg_stat_user_indexes
		WHERE schemaname = $1 AND relname = 'outbox'`, schema)
	if err != nil {
		return c, err
	}
	for rows.Next() {
		var name string
		var read, scans int64
		if err := rows.Scan(&name, &read, &scans); err != nil {
			return c, err
		}
		name = strings.TrimPrefix(name, "outbox_")
		c.tupRead[name], c.scans[name] = read, scans
	}
	if err := rows.Err(); err != nil {
		return c, err
	}
	err = b.pool.QueryRow(ctx, `SELECT coalesce(idx_tup_fetch, 0) FROM pg_stat_user_tables WHERE schemaname = $1 AND relname = 'outbox'`,
		schema).Scan(&c.fetched)
	return c, err
}

// sampleBackend counts, every 20 ms until ctx ends, the state of the backends named app in
// pg_stat_activity.
func (b *bench) sampleBackend(ctx context.Context, app string) map[string]int {
	counts := map[string]int{}
	conn, err := pgx.Connect(ctx, b.opts.DatabaseURL)
	if err != nil {
		return counts
	}
	defer conn.Close(context.Background())
	t := time.NewTicker(20 * time.Millisecond)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return counts
		case <-t.C:
		}
		rows, err := conn.Query(ctx, `SELECT coalesce(state, ''), coalesce(wait_event_type || ':' || wait_event, 'CPU'),
				coalesce(split_part(ltrim(query), ' ', 1), '')
			FROM pg_stat_activity WHERE application_name = $1`, app)
		if err != nil {
			b.log.Printf("sample pg_stat_activity: %v", err)
			return counts
		}
		for rows.Next() {
			var state, wait, verb string
			if rows.Scan(&state, &wait, &verb) == nil {
				if state == "active" {
					counts[state+" "+strings.ToUpper(verb)+" "+wait]++
				} else {
					counts[state]++
				}
			}
		}
		rows.Close()
	}
}
