package main

import (
	"context"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/kafka"
)

// Drain variants, in the order they run for each case.
const (
	variantProduce = "produce-only"
	variantSQLOnly = "sql-only"
	variantNaive   = "naive"
	variantRelay   = "relay"
	// variantRelayCE is the relay with kafka.format=cloudevents and
	// kafka.record_timestamp=occurred_at: the cost of both beside the default.
	variantRelayCE = "relay-cloudevents"
	// variantRelayTrace is the relay with tracing on, every span sampled
	// (OTEL_TRACES_SAMPLER=always_on), exported over OTLP/HTTP to a collector that discards them.
	variantRelayTrace = "relay-tracing"
	// variantRelayTraceRatio is the same with OTEL_TRACES_SAMPLER=parentbased_traceidratio and
	// an argument of 0.1: the bench's rows carry no traceparent, so one span in ten is sampled, as
	// when a tenth of the rows come from sampled requests.
	variantRelayTraceRatio = "relay-tracing-0.1"
	// variantWatermill is Watermill's SQL outbox drained to Kafka by its forwarder (bench/watermill,
	// a binary of its own module): the peer users compare the relay with.
	variantWatermill = "watermill"
	// variantRelayEO is the relay with kafka.delivery=exactly_once: Kafka transactions, a
	// progress record each, whole database transactions (the preload's are of txSize rows).
	variantRelayEO = "relay-exactly-once"
)

var drainVariants = []string{variantProduce, variantSQLOnly, variantNaive, variantRelay, variantRelayCE, variantRelayTrace, variantRelayTraceRatio, variantRelayEO, variantWatermill}

// featureVariants are the relay with one of the ecosystem features on: their cost is measured
// beside the default relay, in the drains and in the features section's latency runs.
var featureVariants = []string{variantRelayCE, variantRelayTrace, variantRelayTraceRatio}

// runsVariant reports whether variant v drains case dc: the variants -variants names, on every
// case; without -variants, every variant, but the feature variants only on the 256 B and 1 KB
// cases over 100 keys (what a feature costs per record shows there; on every case they would
// add half again to a full run).
func (b *bench) runsVariant(dc drainCase, v string) bool {
	if len(b.opts.Variants) > 0 {
		return slices.Contains(b.opts.Variants, v)
	}
	return !slices.Contains(featureVariants, v) || (dc.Keys == 100 && dc.Payload <= 1<<10)
}

// tracingSampler is the sampler (OTEL_TRACES_SAMPLER, _ARG) of a tracing variant; ok is false for
// the others.
func tracingSampler(variant string) (sampler, arg string, ok bool) {
	switch variant {
	case variantRelayTrace:
		return "always_on", "", true
	case variantRelayTraceRatio:
		return "parentbased_traceidratio", "0.1", true
	}
	return "", "", false
}

// drainResult is one drain of a preloaded backlog.
type drainResult struct {
	drainCase
	Variant      string  `json:"variant"`
	Run          int     `json:"run,omitempty"` // 1 to -repeat
	WallSec      float64 `json:"wall_sec"`
	EventsPerSec float64 `json:"events_per_sec"`
	CPUSec       float64 `json:"cpu_sec"`        // user+system CPU of the measured process during the drain
	CPUMsPer10k  float64 `json:"cpu_ms_per_10k"` // CPUSec per 10k events, in milliseconds
	// The CPU of the other parties: the variant's PostgreSQL backends and the broker process.
	DBCPUMsPer10k     float64 `json:"db_cpu_ms_per_10k"`
	BrokerCPUMsPer10k float64 `json:"broker_cpu_ms_per_10k"`
	TotalCPUMsPer10k  float64 `json:"total_cpu_ms_per_10k"`
	PeakRSS           int64   `json:"peak_rss_bytes"` // highest RSS sampled every 20ms during the drain
	HWM               int64   `json:"vm_hwm_bytes"`   // the process's lifetime RSS peak (VmHWM)
	PreloadSec        float64 `json:"preload_sec,omitempty"`
	// What the database wrote to its WAL from the start of the drain until the child stopped,
	// per 10k events (every session of the server counts: the bench runs nothing else then),
	// and how many of its records were full-page images. Zero where it could not be read.
	WALBytesPer10k float64     `json:"wal_bytes_per_10k,omitempty"`
	WALFPIPer10k   float64     `json:"wal_fpi_per_10k,omitempty"`
	Error          string      `json:"error,omitempty"`
	Relay          *relayStats `json:"relay_stats,omitempty"` // the relay's claims and marks
	// The broker's logs after an exactly-once drain (the outbox's topic and the progress topic):
	// transaction markers (control records) counted there, and per second of the drain.
	Markers       int64      `json:"markers,omitempty"`
	MarkersPerSec float64    `json:"markers_per_sec,omitempty"`
	LogRecords    int64      `json:"log_data_records,omitempty"` // data records there (progress records included)
	TxPerSec      float64    `json:"kafka_tx_per_sec,omitempty"` // Kafka transactions committed per second (the relay's count)
	Spans         *spanStats `json:"spans,omitempty"`            // the relay's spans, with tracing on
}

// drain measures every case of the matrix with every variant: the produce-only reference once,
// the others -repeat times, in rounds whose order alternates, so a slow spell of the machine
// does not fall on one variant only.
func (b *bench) drain(ctx context.Context) error {
	for _, dc := range b.opts.Scale.Matrix {
		for run := 1; run <= max(1, b.opts.Repeat); run++ {
			for _, v := range b.roundVariants(dc, run) {
				if ctx.Err() != nil {
					return ctx.Err()
				}
				cfg := childConfig{Mark: b.opts.DrainMark}
				if b.opts.Profile && run == 1 && v == variantRelay && dc.Payload == b.profilePayload() && dc.Keys == 100 {
					cfg.Profile, _ = filepath.Abs(filepath.Join(b.opts.Out, "relay-cpu.pprof"))
					cfg.Allocs, _ = filepath.Abs(filepath.Join(b.opts.Out, "relay-allocs.pprof"))
				}
				r := b.drainOne(ctx, dc, v, cfg)
				r.Run = run
				b.res.Drain = append(b.res.Drain, r)
				if r.Error != "" {
					b.log.Printf("drain %s %dB %d keys: %s", v, dc.Payload, dc.Keys, r.Error)
				} else {
					txs := ""
					if r.Relay != nil && r.Relay.Transactions > 0 {
						txs = fmt.Sprintf("  kafka txs %d (%.0f/s)", r.Relay.Transactions, float64(r.Relay.Transactions)/r.WallSec)
					}
					if r.Markers > 0 {
						txs += fmt.Sprintf("  markers %d (%.0f/s)", r.Markers, r.MarkersPerSec)
					}
					b.log.Printf("drain %-17s %5dB %5d keys %8d events, run %d: %8.0f ev/s  cpu ms/10k: own %6.1f db %6.1f broker %6.1f  rss %5.1f MiB%s",
						v, dc.Payload, dc.Keys, dc.Events, run, r.EventsPerSec, r.CPUMsPer10k, r.DBCPUMsPer10k, r.BrokerCPUMsPer10k, mib(r.PeakRSS), txs)
				}
			}
		}
	}
	return nil
}

// roundVariants returns the variants of round run (from 1) of case dc, of those runsVariant keeps.
func (b *bench) roundVariants(dc drainCase, run int) []string {
	var out []string
	for _, v := range drainVariants {
		if v == variantWatermill && !b.watermillReady() {
			continue
		}
		if (run == 1 || v != variantProduce) && b.runsVariant(dc, v) {
			out = append(out, v)
		}
	}
	if run%2 == 0 {
		slices.Reverse(out)
	}
	return out
}

// drainSummary is one variant of one case over its runs: each figure is the median of the
// successful runs, but the RSS, which is the highest; Relay comes from the run of median rate.
type drainSummary struct {
	drainResult
	Runs, Failed         int
	MinPerSec, MaxPerSec float64
}

// drainSummaries returns the summary of every variant run for every case, in the matrix's order.
func (b *bench) drainSummaries() []drainSummary {
	var out []drainSummary
	for _, dc := range b.opts.Scale.Matrix {
		for _, v := range drainVariants {
			if s, _ := summarize(b.res.Drain, dc, v); s.Runs > 0 {
				out = append(out, s)
			}
		}
	}
	return out
}

// summarize returns the summary of variant's runs of dc; ok is false when none succeeded.
func summarize(all []drainResult, dc drainCase, variant string) (s drainSummary, ok bool) {
	var runs []drainResult
	for _, d := range all {
		if d.drainCase != dc || d.Variant != variant {
			continue
		}
		s.Runs++
		if d.Error != "" {
			s.Failed++
			s.Error = d.Error
			continue
		}
		runs = append(runs, d)
	}
	s.drainCase, s.Variant = dc, variant
	if len(runs) == 0 {
		return s, false
	}
	s.Error = ""
	median := func(f func(d drainResult) float64) float64 {
		v := make([]float64, len(runs))
		for i, d := range runs {
			v[i] = f(d)
		}
		slices.Sort(v)
		if n := len(v); n%2 == 0 {
			return (v[n/2-1] + v[n/2]) / 2
		}
		return v[len(v)/2]
	}
	s.EventsPerSec = median(func(d drainResult) float64 { return d.EventsPerSec })
	s.WallSec = median(func(d drainResult) float64 { return d.WallSec })
	s.CPUSec = median(func(d drainResult) float64 { return d.CPUSec })
	s.CPUMsPer10k = median(func(d drainResult) float64 { return d.CPUMsPer10k })
	s.DBCPUMsPer10k = median(func(d drainResult) float64 { return d.DBCPUMsPer10k })
	s.BrokerCPUMsPer10k = median(func(d drainResult) float64 { return d.BrokerCPUMsPer10k })
	s.TotalCPUMsPer10k = median(func(d drainResult) float64 { return d.TotalCPUMsPer10k })
	s.WALBytesPer10k = median(func(d drainResult) float64 { return d.WALBytesPer10k })
	s.WALFPIPer10k = median(func(d drainResult) float64 { return d.WALFPIPer10k })
	s.MarkersPerSec = median(func(d drainResult) float64 { return d.MarkersPerSec })
	s.TxPerSec = median(func(d drainResult) float64 { return d.TxPerSec })
	s.Markers = int64(median(func(d drainResult) float64 { return float64(d.Markers) }))
	s.MinPerSec, s.MaxPerSec = runs[0].EventsPerSec, runs[0].EventsPerSec
	mid := runs[0]
	for _, d := range runs {
		s.MinPerSec, s.MaxPerSec = min(s.MinPerSec, d.EventsPerSec), max(s.MaxPerSec, d.EventsPerSec)
		s.PeakRSS, s.HWM = max(s.PeakRSS, d.PeakRSS), max(s.HWM, d.HWM)
		if math.Abs(d.EventsPerSec-s.EventsPerSec) < math.Abs(mid.EventsPerSec-s.EventsPerSec) {
			mid = d
		}
	}
	s.Relay = mid.Relay
	s.Spans = mid.Spans
	s.Run = mid.Run
	return s, true
}

// drainOne runs one variant on a fresh broker and a freshly preloaded outbox. cfg carries the
// variant's extra settings.
func (b *bench) drainOne(ctx context.Context, dc drainCase, variant string, cfg childConfig) drainResult {
	r := drainResult{drainCase: dc, Variant: variant}
	rep, side, err := b.drainRun(ctx, dc, variant, cfg)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.PreloadSec = side.preload.Seconds()
	r.WallSec = rep.WallSec
	r.EventsPerSec = float64(rep.Events) / rep.WallSec
	r.CPUSec = rep.CPUUserSec + rep.CPUSysSec
	per10k := func(sec float64) float64 { return sec * 1000 / (float64(rep.Events) / 10000) }
	r.CPUMsPer10k = per10k(r.CPUSec)
	r.DBCPUMsPer10k = per10k(rep.DBCPUSec)
	r.BrokerCPUMsPer10k = per10k(side.brokerCPU)
	if side.wal.ok {
		r.WALBytesPer10k = float64(side.wal.bytes) / (float64(rep.Events) / 10000)
		r.WALFPIPer10k = float64(side.wal.fpi) / (float64(rep.Events) / 10000)
	}
	r.TotalCPUMsPer10k = r.CPUMsPer10k + r.DBCPUMsPer10k + r.BrokerCPUMsPer10k
	r.PeakRSS = rep.PeakRSS
	r.HWM = rep.HWM
	r.Relay = rep.Relay
	r.Spans = rep.Spans
	if side.log != nil {
		r.Markers, r.LogRecords = side.log.Markers, side.log.Data
		r.MarkersPerSec = float64(r.Markers) / r.WallSec
	}
	if r.Relay != nil && r.Relay.Transactions > 0 {
		r.TxPerSec = float64(r.Relay.Transactions) / r.WallSec
	}
	return r
}

// drainSide is what drainRun measured beside the child's own report.
type drainSide struct {
	brokerCPU float64       // CPU seconds of the broker process during the drain
	preload   time.Duration // the preload of the outbox, before the drain
	wal       walPosition   // WAL written from the drain's start until the child stopped
	log       *logCount     // the broker's logs after an exactly-once drain
}

func (b *bench) drainRun(ctx context.Context, dc drainCase, variant string, cfg childConfig) (rep childReport, side drainSide, err error) {
	cfg.Expect = dc.Events
	cfg.DatabaseURL = b.opts.DatabaseURL
	switch variant {
	case variantProduce:
		cfg.Role = roleProduce
		cfg.Events, cfg.PayloadSize, cfg.Keys = dc.Events, dc.Payload, dc.Keys
	case variantSQLOnly:
		cfg.Role = roleSQLOnly
	case variantNaive:
		cfg.Role = roleNaive
	case variantRelay:
		cfg.Role = roleRelay
		cfg.Relay.MaxInFlightBytes = b.opts.MaxInFlightBytes
	case variantRelayCE, variantRelayTrace, variantRelayTraceRatio:
		cfg.Role = roleRelay
		cfg.Relay.MaxInFlightBytes = b.opts.MaxInFlightBytes
		if err := b.feature(&cfg, variant); err != nil {
			return rep, side, err
		}
	case variantWatermill:
		// The child preloads its own table through Watermill's publisher before it is ready.
		cfg.Role = roleWatermill
		cfg.Events, cfg.PayloadSize, cfg.Keys = dc.Events, dc.Payload, dc.Keys
	case variantRelayEO:
		cfg.Role = roleRelay
		cfg.Relay.MaxInFlightBytes = b.opts.MaxInFlightBytes
		cfg.ExactlyOnce = true
	default:
		return rep, side, fmt.Errorf("unknown variant %q", variant)
	}
	if variant != variantProduce {
		schema, err := b.schema(ctx, "drain")
		if err != nil {
			return rep, side, err
		}
		defer b.dropSchema(schema)
		if variant != variantWatermill {
			start := time.Now()
			if err := b.preload(ctx, schema, dc.Events, dc.Payload, dc.Keys); err != nil {
				return rep, side, err
			}
			side.preload = time.Since(start)
		}
		cfg.Schema = schema
	}
	var br *broker
	if variant != variantSQLOnly {
		br, err = b.startBroker(ctx)
		if err != nil {
			return rep, side, err
		}
		defer br.close()
		cfg.Brokers = br.addrs
	}
	start := time.Now()
	p, err := b.start(ctx, cfg)
	if err != nil {
		return rep, side, err
	}
	defer func() { _ = p.stop() }()
	if variant == variantWatermill {
		side.preload = time.Since(start)
	}
	var broker0 float64
	if br != nil {
		broker0 = br.p.cpu()
	}
	wal0 := b.walNow(ctx)
	if err := p.send("go"); err != nil {
		return rep, side, err
	}
	// Generous: a drain slower than 500 events/s is broken, not slow.
	rep, err = p.report(ctx, time.Duration(dc.Events/500+120)*time.Second)
	if err != nil {
		return rep, side, err
	}
	if br != nil {
		side.brokerCPU = br.p.cpu() - broker0
	}
	if rep.Events < dc.Events {
		return rep, side, fmt.Errorf("%s reported %d events, want %d", variant, rep.Events, dc.Events)
	}
	if cfg.ExactlyOnce {
		// The relay's last transaction is committed (its rows are marked only after): every
		// marker of the drain is in the log.
		lctx, cancel := context.WithTimeout(ctx, 2*time.Minute)
		n, err := countLog(lctx, br.addrs, topic, progressTopic(cfg.Schema))
		cancel()
		if err != nil {
			return rep, side, fmt.Errorf("count the transaction markers: %w", err)
		}
		side.log = &n
	}
	// The child's backends report their WAL statistics as they exit: stop it first, and give
	// them a moment.
	_ = p.stop()
	time.Sleep(200 * time.Millisecond)
	side.wal = b.walNow(ctx).since(wal0)
	return rep, side, nil
}

// walPosition is how much WAL the database server had written at one moment (its insert
// position, in bytes) and how many full-page images (pg_stat_wal, PostgreSQL 14 and later); or,
// from since, the difference between two such moments. ok is false when it could not be read.
type walPosition struct {
	bytes, fpi int64
	ok         bool
}

// walNow reads the server's WAL position. A server that cannot say (a standby, PostgreSQL
// before 14) gives a position that is not ok, and the drain's WAL columns stay empty.
func (b *bench) walNow(ctx context.Context) walPosition {
	var w walPosition
	err := b.pool.QueryRow(ctx, `SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint, wal_fpi FROM pg_stat_wal`).Scan(&w.bytes, &w.fpi)
	w.ok = err == nil
	return w
}

// since returns what was written from w0 to w.
func (w walPosition) since(w0 walPosition) walPosition {
	return walPosition{bytes: w.bytes - w0.bytes, fpi: w.fpi - w0.fpi, ok: w.ok && w0.ok}
}

func mib(n int64) float64 { return float64(n) / (1 << 20) }

// profilePayload is the payload size of the drain whose relay is profiled: 256 B, or
// BENCH_PROFILE_PAYLOAD.
func (b *bench) profilePayload() int {
	if n, err := strconv.Atoi(os.Getenv("BENCH_PROFILE_PAYLOAD")); err == nil {
		return n
	}
	return 256
}

// feature sets what a feature variant turns on in a relay child's cfg: the CloudEvents format
// and the event time as the record timestamp, or tracing to the bench's collector.
func (b *bench) feature(cfg *childConfig, variant string) error {
	if variant == variantRelayCE {
		cfg.KafkaFormat, cfg.RecordTimestamp = kafka.FormatCloudEvents, kafka.TimestampOccurredAt
		return nil
	}
	sampler, arg, ok := tracingSampler(variant)
	if !ok {
		return nil
	}
	if b.coll == nil {
		c, err := startCollector()
		if err != nil {
			return err
		}
		b.coll = c
	}
	cfg.Tracing = &tracingSettings{Endpoint: b.coll.url, Sampler: sampler, SamplerArg: arg}
	return nil
}
