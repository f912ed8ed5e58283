package main

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
	"github.com/outbox-relay/outbox-relay/app/relay"
)

// writeResult is the writers' rate, flat out, in one mode of the write-cost section.
type writeResult struct {
	// Mode is one of writeModes; empty in results written before the modes (Notify tells).
	Mode     string  `json:"mode,omitempty"`
	Notify   bool    `json:"notify"` // the trigger was enabled
	Round    int     `json:"round"`
	TxPerSec float64 `json:"tx_per_sec"`
	// NotifiesPerTx is how many notifications a listener received per commit: the share of
	// commits that paid for NOTIFY.
	NotifiesPerTx float64 `json:"notifies_per_tx"`
	LoadAvg       float64 `json:"load_avg_1m,omitempty"` // the host's 1-minute load average after the run
}

// loadAvg returns the host's 1-minute load average, 0 when unknown: on a shared machine, what
// else ran.
func loadAvg() float64 {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return 0
	}
	f := strings.Fields(string(b))
	if len(f) == 0 {
		return 0
	}
	v, _ := strconv.ParseFloat(f[0], 64)
	return v
}

// The write-cost section's modes.
const (
	writeOff       = "off"        // trigger disabled, no relay
	writeOffNoTx   = "off-no-tx"  // the same without the index of transactions (exactly-once delivery's, sql/migrations/005_tx_id.sql)
	writeAwake     = "awake"      // trigger enabled, the awake lock held as an awake relay holds it: no writer notifies
	writeNotifyAll = "notify-all" // trigger enabled, no relay: every commit notifies (an older relay, or none)
	writeRelayOff  = "relay-off"  // the relay runs (polling every 500 ms), trigger disabled
	writeRelayOn   = "relay-on"   // the relay runs, trigger enabled: the wake-up protocol as deployed
	writeRelayPoll = "relay-poll" // the relay runs polling every 10 ms, trigger disabled: busy as in relay-on, no wake-up
)

// writeModes describes each mode in the tables.
var writeModes = map[string]string{
	writeOff:       "no trigger, no relay",
	writeOffNoTx:   "no trigger, no relay, no index of transactions (tx, id)",
	writeAwake:     "trigger, relay awake (lock held by the bench)",
	writeNotifyAll: "trigger, no relay: every commit notifies (as before migration 003)",
	writeRelayOff:  "relay running, no trigger (polls every 500 ms)",
	writeRelayOn:   "relay running, trigger (wake-up protocol)",
	writeRelayPoll: "relay running, no trigger, polling every 10 ms",
}

// writeResults is the write-cost section.
type writeResults struct {
	Runs         []writeResult `json:"runs"`
	NotifyTxSec  float64       `json:"notify_tx_per_sec"`  // median with the trigger (relay running)
	PollTxSec    float64       `json:"polling_tx_per_sec"` // median without it (relay running)
	NotifyFactor float64       `json:"notify_factor"`      // NotifyTxSec / PollTxSec
	// Medians per mode, and the modes' ratios to their baselines.
	Medians    map[string]float64 `json:"medians,omitempty"`
	AwakeRatio float64            `json:"awake_ratio,omitempty"` // awake / off
	AllRatio   float64            `json:"notify_all_ratio,omitempty"`
	// NoTxIndexRatio is off-no-tx / off: what the writers gain without the index of
	// transactions, which every row enters (exactly-once delivery reads it).
	NoTxIndexRatio float64 `json:"no_tx_index_ratio,omitempty"`
}

// writeCost measures 8 writers flat out (one event per transaction) in each mode, alternating
// the order from round to round. Without a relay, one connection LISTENs and consumes the
// notifications, as the relay's session would; with one, the relay publishes everything.
func (b *bench) writeCost(ctx context.Context) error {
	schema, err := b.schema(ctx, "write")
	if err != nil {
		return err
	}
	defer b.dropSchema(schema)
	table := postgres.Table{Schema: schema}.WithDefaults()
	heard, stopListen, err := b.countNotifications(ctx, schema) // as the relay's session would
	if err != nil {
		return err
	}
	defer stopListen()
	// The awake lock, held on a connection of its own in the awake mode.
	awakeConn, err := pgx.Connect(ctx, b.opts.DatabaseURL)
	if err != nil {
		return err
	}
	defer awakeConn.Close(context.Background())
	awakeKey, _ := table.WakeKeys()
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return err
	}
	defer w.close()
	br, err := b.startBroker(ctx)
	if err != nil {
		return err
	}
	defer br.close()
	res := &writeResults{Medians: map[string]float64{}}
	b.res.Write = res
	byMode := map[string][]float64{}
	measure := func(mode string, round int) error {
		c0, h0 := w.committed.Load(), heard.Load()
		start := time.Now()
		wctx, cancel := context.WithTimeout(ctx, b.opts.Scale.WriteRun)
		w.run(wctx, 0)
		cancel()
		if err := w.failure(); err != nil {
			return err
		}
		secs := time.Since(start).Seconds()
		n := w.committed.Load() - c0
		r := writeResult{Mode: mode, Notify: mode != writeOff && mode != writeOffNoTx && mode != writeRelayOff, Round: round,
			TxPerSec: float64(n) / secs, LoadAvg: loadAvg()}
		if n > 0 {
			// Counted a moment after the run: the last commits' notifications are on their way.
			time.Sleep(100 * time.Millisecond)
			r.NotifiesPerTx = float64(heard.Load()-h0) / float64(n)
		}
		res.Runs = append(res.Runs, r)
		byMode[mode] = append(byMode[mode], r.TxPerSec)
		b.log.Printf("write cost %s round %d: %.0f tx/s, %.3f notifications per commit (load average %.1f)", mode, round, r.TxPerSec, r.NotifiesPerTx, r.LoadAvg)
		return nil
	}
	alone := []string{writeOff, writeOffNoTx, writeAwake, writeNotifyAll}
	// The index of transactions (sql/migrations/005_tx_id.sql), dropped for the off-no-tx runs.
	txIndex := pgx.Identifier{schema, "outbox_tx_id_idx"}.Sanitize()
	createTxIndex := `CREATE INDEX outbox_tx_id_idx ON ` + pgx.Identifier{schema, "outbox"}.Sanitize() + ` (tx, id) WHERE dispatched_at IS NULL`
	for round := range b.opts.Scale.WriteRepeats {
		order := slices.Clone(alone)
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, mode := range order {
			if err := b.setTrigger(ctx, schema, mode != writeOff && mode != writeOffNoTx); err != nil {
				return err
			}
			if mode == writeOffNoTx {
				if _, err := b.pool.Exec(ctx, `DROP INDEX `+txIndex); err != nil {
					return err
				}
			}
			if _, err := b.pool.Exec(ctx, `TRUNCATE `+pgx.Identifier{schema, "outbox"}.Sanitize()); err != nil {
				return err
			}
			if mode == writeAwake {
				if _, err := awakeConn.Exec(ctx, `SELECT pg_advisory_lock(hashtextextended($1, 0))`, awakeKey); err != nil {
					return err
				}
			}
			if err := measure(mode, round); err != nil {
				return err
			}
			if mode == writeAwake {
				if _, err := awakeConn.Exec(ctx, `SELECT pg_advisory_unlock(hashtextextended($1, 0))`, awakeKey); err != nil {
					return err
				}
			}
			if mode == writeOffNoTx {
				if _, err := b.pool.Exec(ctx, createTxIndex); err != nil {
					return err
				}
			}
		}
		order = []string{writeRelayOff, writeRelayOn, writeRelayPoll}
		if round%2 == 1 {
			slices.Reverse(order)
		}
		for _, mode := range order {
			if err := b.setTrigger(ctx, schema, mode == writeRelayOn); err != nil {
				return err
			}
			if err := b.writeWithRelay(ctx, w, br, schema, mode, func() error { return measure(mode, round) }); err != nil {
				return err
			}
		}
	}
	for mode, v := range byMode {
		res.Medians[mode] = median(v)
	}
	res.NotifyTxSec, res.PollTxSec = res.Medians[writeRelayOn], res.Medians[writeRelayOff]
	if res.PollTxSec > 0 {
		res.NotifyFactor = res.NotifyTxSec / res.PollTxSec
	}
	if off := res.Medians[writeOff]; off > 0 {
		res.AwakeRatio, res.AllRatio = res.Medians[writeAwake]/off, res.Medians[writeNotifyAll]/off
		res.NoTxIndexRatio = res.Medians[writeOffNoTx] / off
	}
	return b.setTrigger(ctx, schema, true)
}

// writeWithRelay runs measure while a relay publishes the outbox of schema (emptied first), and
// waits until it published everything.
func (b *bench) writeWithRelay(ctx context.Context, w *writers, br *broker, schema, mode string, measure func() error) error {
	if _, err := b.pool.Exec(ctx, `TRUNCATE `+pgx.Identifier{schema, "outbox"}.Sanitize()); err != nil {
		return err
	}
	var settings relaySettings
	if mode == writeRelayPoll {
		settings.PollInterval = 10 * time.Millisecond
	}
	relay, err := b.start(ctx, childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema,
		Brokers: br.addrs, Mark: postgres.MarkDelete, Relay: settings})
	if err != nil {
		return err
	}
	defer func() { _ = relay.stop() }()
	relay.offset = w.committed.Load() // it publishes only what is committed from here
	if err := relay.send("go"); err != nil {
		return err
	}
	if err := measure(); err != nil {
		return err
	}
	if err := waitCaughtUp(ctx, w, relay, time.Minute); err != nil {
		return err
	}
	return relay.stop()
}

func median(s []float64) float64 {
	if len(s) == 0 {
		return 0
	}
	s = slices.Clone(s)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

// healthSample is the outbox's state after some events went through the relay.
type healthSample struct {
	Events      int64   `json:"events"` // events written so far
	ElapsedSec  float64 `json:"elapsed_sec"`
	TableBytes  int64   `json:"table_bytes"` // heap and TOAST (pg_table_size)
	IndexBytes  int64   `json:"index_bytes"` // every index (pg_indexes_size)
	LiveTuples  int64   `json:"live_tuples"` // pg_stat_user_tables, approximate
	DeadTuples  int64   `json:"dead_tuples"`
	Vacuums     int64   `json:"autovacuums"` // autovacuum runs on the outbox so far
	Pending     int64   `json:"pending"`     // committed but not yet marked
	PollMs      float64 `json:"poll_ms"`     // execution time of the claim query from the head (EXPLAIN ANALYZE)
	PollBuffers int64   `json:"poll_buffers"`
	AfterVacuum bool    `json:"after_vacuum,omitempty"` // taken right after the half-way VACUUM
}

// healthResult is the table-health run of one mark mode.
type healthResult struct {
	Mode         string         `json:"mode"`
	Retention    string         `json:"retention,omitempty"`
	Events       int64          `json:"events"`
	OfferedRate  float64        `json:"offered_per_sec"`
	Samples      []healthSample `json:"samples"`
	ExplainStart string         `json:"explain_start"`
	ExplainEnd   string         `json:"explain_end"`
	SizeGrowth   float64        `json:"size_growth"` // table+index size at the end / right after the half-way VACUUM
}

// healthRate is the rate at which the table-health runs write: steady, well within what the
// relay sustains, so the table holds a short queue rather than a backlog.
const healthRate = 10000

// health sends HealthEvents events through the relay in delete mode and in retain mode (with a
// short retention and the daemon's purge loop), sampling the table as it goes.
func (b *bench) health(ctx context.Context) error {
	retention := 10 * time.Second
	if b.opts.ScaleName == "smoke" {
		retention = time.Second
	}
	for _, mode := range []string{postgres.MarkDelete, postgres.MarkRetain} {
		hr, err := b.healthRun(ctx, mode, retention)
		if err != nil {
			return fmt.Errorf("%s mode: %w", mode, err)
		}
		b.res.Health = append(b.res.Health, hr)
	}
	return nil
}

func (b *bench) healthRun(ctx context.Context, mode string, retention time.Duration) (healthResult, error) {
	hr := healthResult{Mode: mode, Events: b.opts.Scale.HealthEvents, OfferedRate: healthRate}
	cfg := childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Mark: mode}
	if mode == postgres.MarkRetain {
		cfg.Retention = retention
		hr.Retention = retention.String()
	}
	schema, err := b.schema(ctx, "health")
	if err != nil {
		return hr, err
	}
	defer b.dropSchema(schema)
	cfg.Schema = schema
	br, err := b.startBroker(ctx)
	if err != nil {
		return hr, err
	}
	defer br.close()
	cfg.Brokers = br.addrs
	relay, err := b.start(ctx, cfg)
	if err != nil {
		return hr, err
	}
	defer func() { _ = relay.stop() }()
	if err := relay.send("go"); err != nil {
		return hr, err
	}
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return hr, err
	}
	defer w.close()
	w.n, w.perTx = 4, 10
	table := pgx.Identifier{schema, "outbox"}.Sanitize()
	start := time.Now()
	sample := func() error {
		s, text, err := b.tableState(ctx, schema, table)
		if err != nil {
			return err
		}
		s.Events = w.committed.Load()
		s.Pending = s.Events - relay.progress.Load()
		s.ElapsedSec = time.Since(start).Seconds()
		hr.Samples = append(hr.Samples, s)
		if hr.ExplainStart == "" && s.Events > 0 {
			hr.ExplainStart = text
		}
		hr.ExplainEnd = text
		return nil
	}
	wctx, stop := context.WithCancel(ctx)
	defer stop()
	done := make(chan struct{})
	go func() { w.run(wctx, healthRate); close(done) }()
	total := b.opts.Scale.HealthEvents
	next := total / 20
	vacuumed := false
	for {
		select {
		case <-done:
		case <-time.After(10 * time.Millisecond):
		}
		if err := w.failure(); err != nil {
			return hr, err
		}
		n := w.committed.Load()
		if n >= next || n >= total {
			if err := sample(); err != nil {
				return hr, err
			}
			next += total / 10
		}
		if !vacuumed && n >= total/2 {
			// autovacuum_naptime (60 s by default) is longer than this run: do once, half-way,
			// what autovacuum would do, so the second half shows whether the space is reused.
			vacuumed = true
			if _, err := b.pool.Exec(ctx, `VACUUM `+table); err != nil {
				return hr, fmt.Errorf("vacuum: %w", err)
			}
			if err := sample(); err != nil {
				return hr, err
			}
			hr.Samples[len(hr.Samples)-1].AfterVacuum = true
		}
		if n >= total {
			stop()
			<-done
			break
		}
	}
	if err := waitCaughtUp(ctx, w, relay, 2*time.Minute); err != nil {
		return hr, err
	}
	if err := sample(); err != nil {
		return hr, err
	}
	var mid, end int64
	for _, s := range hr.Samples {
		if s.AfterVacuum {
			mid = s.TableBytes + s.IndexBytes
		}
		end = s.TableBytes + s.IndexBytes
	}
	if mid > 0 {
		hr.SizeGrowth = float64(end) / float64(mid)
	}
	last := hr.Samples[len(hr.Samples)-1]
	b.log.Printf("health %s: %d events, table %.1f MiB + index %.1f MiB, dead %d, autovacuums %d, poll %.2f ms (start %.2f ms), growth end/mid %.2f",
		mode, last.Events, mib(last.TableBytes), mib(last.IndexBytes), last.DeadTuples, last.Vacuums, last.PollMs,
		hr.Samples[0].PollMs, hr.SizeGrowth)
	return hr, nil
}

// claimSQL is the claim statement of postgres.Store, with the cursor at the head (a rescan, the
// most expensive case) and the default batch size.
func claimSQL(table string) string {
	return `SELECT id, event_id::text, aggregate_type, coalesce(aggregate_id, ''), event_type, payload,
		coalesce(topic, ''), headers::text, occurred_at, created_at, attempts
	FROM ` + table + `
	WHERE dispatched_at IS NULL AND id > 0 AND (next_attempt_at IS NULL OR next_attempt_at <= now())
	ORDER BY id LIMIT 1000`
}

// tableState reads the outbox's size and statistics and explains the claim query.
func (b *bench) tableState(ctx context.Context, schema, table string) (healthSample, string, error) {
	var s healthSample
	err := b.pool.QueryRow(ctx, `SELECT pg_table_size(c.oid), pg_indexes_size(c.oid),
			coalesce(st.n_live_tup, 0), coalesce(st.n_dead_tup, 0), coalesce(st.autovacuum_count, 0)
		FROM pg_class c LEFT JOIN pg_stat_user_tables st ON st.relid = c.oid
		WHERE c.oid = $1::regclass`, table).Scan(&s.TableBytes, &s.IndexBytes, &s.LiveTuples, &s.DeadTuples, &s.Vacuums)
	if err != nil {
		return s, "", fmt.Errorf("table state: %w", err)
	}
	var plan []struct {
		Plan struct {
			SharedHit  int64 `json:"Shared Hit Blocks"`
			SharedRead int64 `json:"Shared Read Blocks"`
		} `json:"Plan"`
		ExecutionTime float64 `json:"Execution Time"`
	}
	var raw []byte
	if err := b.pool.QueryRow(ctx, `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) `+claimSQL(table)).Scan(&raw); err != nil {
		return s, "", fmt.Errorf("explain claim: %w", err)
	}
	if err := json.Unmarshal(raw, &plan); err != nil || len(plan) == 0 {
		return s, "", fmt.Errorf("explain claim: unexpected output %s", raw)
	}
	s.PollMs = plan[0].ExecutionTime
	s.PollBuffers = plan[0].Plan.SharedHit + plan[0].Plan.SharedRead
	rows, err := b.pool.Query(ctx, `EXPLAIN (ANALYZE, BUFFERS) `+claimSQL(table))
	if err != nil {
		return s, "", err
	}
	var text string
	for rows.Next() {
		var line string
		if err := rows.Scan(&line); err != nil {
			return s, "", err
		}
		text += line + "\n"
	}
	return s, text, rows.Err()
}

// memoryResult is the relay's memory while it works through a large backlog.
type memoryResult struct {
	Backlog          int64   `json:"backlog_rows"`
	Payload          int     `json:"payload_bytes"`
	Drained          int64   `json:"drained_rows"` // rows the relay published during the measurement
	EventsPerSec     float64 `json:"events_per_sec"`
	PeakRSS          int64   `json:"peak_rss_bytes"`
	HWM              int64   `json:"vm_hwm_bytes"`
	MaxInFlight      int     `json:"max_in_flight"`
	MaxInFlightBytes int     `json:"max_in_flight_bytes"`
	PreloadSec       float64 `json:"preload_sec"`
}

// memory preloads Backlog rows and lets the relay, with its default limits, publish the first
// fifth of them (at least one drain's worth), watching its memory.
func (b *bench) memory(ctx context.Context) error {
	n := b.opts.Scale.Backlog
	drain := min(n, max(n/5, b.opts.Scale.DrainSmall))
	dc := drainCase{Payload: 256, Keys: 100, Events: drain}
	schema, err := b.schema(ctx, "memory")
	if err != nil {
		return err
	}
	defer b.dropSchema(schema)
	start := time.Now()
	if err := b.preload(ctx, schema, n, dc.Payload, dc.Keys); err != nil {
		return err
	}
	mr := memoryResult{Backlog: n, Payload: dc.Payload, PreloadSec: time.Since(start).Seconds(),
		MaxInFlight: relay.MaxInFlightDefault, MaxInFlightBytes: relay.MaxInFlightBytesDefault}
	br, err := b.startBroker(ctx)
	if err != nil {
		return err
	}
	defer br.close()
	p, err := b.start(ctx, childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema,
		Brokers: br.addrs, Mark: postgres.MarkDelete, Expect: drain})
	if err != nil {
		return err
	}
	defer func() { _ = p.stop() }()
	if err := p.send("go"); err != nil {
		return err
	}
	rep, err := p.report(ctx, time.Duration(drain/500+120)*time.Second)
	if err != nil {
		return err
	}
	mr.Drained, mr.EventsPerSec, mr.PeakRSS, mr.HWM = rep.Events, float64(rep.Events)/rep.WallSec, rep.PeakRSS, rep.HWM
	b.res.Memory = &mr
	b.log.Printf("memory: backlog %d rows, relay published %d at %.0f ev/s, peak RSS %.1f MiB (VmHWM %.1f MiB)",
		n, rep.Events, mr.EventsPerSec, mib(mr.PeakRSS), mib(mr.HWM))
	return nil
}
