package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"runtime"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5/pgxpool"
)

// results is everything one run measured; it is written as results.json.
type results struct {
	Scale      string `json:"scale"`
	Sizes      scale  `json:"sizes"`
	Partitions int    `json:"partitions"`
	// BrokerLog is where the broker kept its log: "memory", or the directory of its segment files.
	BrokerLog string `json:"broker_log,omitempty"`
	// DrainMark is how the relay and SQL-only marked rows in the drains (empty: delete, before
	// -drain-mark).
	DrainMark string `json:"drain_mark,omitempty"`
	// RelayMaxInFlightBytes is the relay's byte budget in the drains when not its default.
	RelayMaxInFlightBytes int            `json:"relay_max_in_flight_bytes,omitempty"`
	Started               time.Time      `json:"started"`
	Finished              time.Time      `json:"finished"`
	Machine               machine        `json:"machine"`
	Drain                 []drainResult  `json:"drain"`
	Steady                *steadyResults `json:"steady,omitempty"`
	// Sidecar is what a relay costs at 1,000 events/s beside the bare producer at its cadence,
	// and idle (issue 21).
	Sidecar *sidecarResults `json:"sidecar,omitempty"`
	// Peers is commit-to-ack latency and CPU at 1k events/s of the relay and its baselines (the
	// naive loop, SQL-only, Watermill's forwarder), each run in rounds of alternating order; Mode
	// names the variant.
	Peers []latencyResult `json:"peers,omitempty"`
	// Features is commit-to-ack latency at 1k events/s of the relay with each ecosystem feature on.
	Features []featureLatency `json:"features,omitempty"`
	Write    *writeResults    `json:"write_cost,omitempty"`
	Health   []healthResult   `json:"table_health,omitempty"`
	Memory   *memoryResult    `json:"memory,omitempty"`
	// Outboxes are the drains of one relay process serving 1, 4 and 16 outboxes.
	Outboxes []outboxesResult `json:"outboxes,omitempty"`
	// Live is the drain of a backlog written by one transaction, alone and under live writers.
	Live    *liveResults   `json:"live_backlog,omitempty"`
	Targets []targetResult `json:"targets"`
}

// machine describes where the numbers come from.
type machine struct {
	CPU       string            `json:"cpu"`
	Cores     int               `json:"cores"`
	MemoryMiB int64             `json:"memory_mib"`
	Kernel    string            `json:"kernel"`
	Go        string            `json:"go"`
	Postgres  string            `json:"postgres"`
	Settings  map[string]string `json:"postgres_settings"`
	LoadAvg   string            `json:"load_avg_at_start"`
}

func machineInfo(ctx context.Context, pool *pgxpool.Pool) machine {
	m := machine{Cores: runtime.NumCPU(), Go: runtime.Version(), Settings: map[string]string{}}
	if b, err := os.ReadFile("/proc/cpuinfo"); err == nil {
		for _, line := range strings.Split(string(b), "\n") {
			if v, ok := strings.CutPrefix(line, "model name"); ok {
				m.CPU = strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
				break
			}
		}
	}
	m.MemoryMiB = procKB("/proc/meminfo", "MemTotal") >> 20
	if b, err := os.ReadFile("/proc/sys/kernel/osrelease"); err == nil {
		m.Kernel = strings.TrimSpace(string(b))
	}
	if b, err := os.ReadFile("/proc/loadavg"); err == nil {
		m.LoadAvg = strings.Join(strings.Fields(string(b))[:3], " ")
	}
	_ = pool.QueryRow(ctx, `SELECT version()`).Scan(&m.Postgres)
	rows, err := pool.Query(ctx, `SELECT name, setting || coalesce(unit, '') FROM pg_settings WHERE name IN
		('shared_buffers', 'synchronous_commit', 'fsync', 'wal_level', 'autovacuum_naptime',
		 'autovacuum_vacuum_scale_factor', 'autovacuum_vacuum_threshold', 'max_wal_size', 'work_mem')`)
	if err == nil {
		for rows.Next() {
			var k, v string
			if rows.Scan(&k, &v) == nil {
				m.Settings[k] = v
			}
		}
		rows.Close()
	}
	return m
}

// targetResult is one target of the issue, met or missed.
type targetResult struct {
	Name   string `json:"name"`
	Target string `json:"target"`
	Got    string `json:"got"`
	Met    bool   `json:"met"`
}

// targets checks the measured numbers against the targets.
func (b *bench) targets() []targetResult {
	var out []targetResult
	add := func(name, target string, met bool, format string, args ...any) {
		out = append(out, targetResult{Name: name, Target: target, Got: fmt.Sprintf(format, args...), Met: met})
	}
	sums := b.drainSummaries()
	rate := map[string]map[string]float64{}
	for _, d := range sums {
		if d.Error != "" {
			continue
		}
		k := caseLabel(d.drainCase)
		if rate[k] == nil {
			rate[k] = map[string]float64{}
		}
		rate[k][d.Variant] = d.EventsPerSec
	}
	for _, dc := range b.opts.Scale.Matrix {
		k := caseLabel(dc)
		r := rate[k]
		if r[variantRelay] == 0 {
			continue
		}
		if r[variantNaive] > 0 {
			x := r[variantRelay] / r[variantNaive]
			add("drain vs naive "+k, ">= 1.5x", x >= 1.5, "%.2fx", x)
		}
		if r[variantSQLOnly] > 0 {
			x := r[variantRelay] / r[variantSQLOnly]
			add("drain vs SQL-only "+k, ">= 0.6x", x >= 0.6, "%.2fx", x)
		}
		if dc.Payload == 256 {
			add("drain rate "+k, ">= 50000 ev/s", r[variantRelay] >= 50000, "%.0f ev/s", r[variantRelay])
		}
	}
	if s := b.res.Steady; s != nil {
		for _, l := range s.Latency {
			if l.Mode == "notify" && l.OfferedPerSec == 1000 {
				add("p99 commit-to-ack at 1k ev/s, wake-up on", "<= 5 ms", l.P99 <= 5, "%.2f ms", l.P99)
			}
		}
	}
	if sc := b.res.Sidecar; sc != nil && len(sc.Runs) > 0 {
		var cpu, db, p99 []float64
		for _, r := range sc.Runs {
			cpu, db, p99 = append(cpu, r.CPUMsPer10k), append(db, r.DBCPUMsPer10k), append(p99, r.P99)
		}
		var floor []float64
		for _, f := range sc.Floor {
			floor = append(floor, f.CPUMsPer10k)
		}
		beside := ""
		if len(floor) > 0 {
			beside = fmt.Sprintf("; a bare producer at its cadence %.0f", median(floor))
		}
		n := len(sc.Runs)
		add(fmt.Sprintf("relay CPU at 1k ev/s, one per tx (median of %d)", n), "<= 1000 ms/10k", median(cpu) <= 1000,
			"%.0f [%.0f–%.0f]%s", median(cpu), slices.Min(cpu), slices.Max(cpu), beside)
		add(fmt.Sprintf("its database sessions' CPU at 1k ev/s (median of %d)", n), "<= 500 ms/10k", median(db) <= 500,
			"%.0f [%.0f–%.0f]", median(db), slices.Min(db), slices.Max(db))
		add(fmt.Sprintf("p99 commit-to-ack in those runs (median of %d)", n), "<= 5 ms", median(p99) <= 5,
			"%.2f [%.2f–%.2f] ms", median(p99), slices.Min(p99), slices.Max(p99))
	}
	if sc := b.res.Sidecar; sc != nil && sc.Idle != nil && sc.Idle.Error == "" {
		i := sc.Idle
		add(fmt.Sprintf("idle relay + its database sessions' CPU (%.0f s, an hour's worth)", i.Seconds), "<= 10 s/h",
			i.RelayCPUPerHour+i.DBCPUPerHour <= 10, "%.2f s/h (relay %.2f, database %.2f)", i.RelayCPUPerHour+i.DBCPUPerHour, i.RelayCPUPerHour, i.DBCPUPerHour)
	}
	if wc := b.res.Write; wc != nil && len(wc.Medians) > 0 {
		add("writers flat out, relay running: trigger on / off", ">= 0.95x", wc.NotifyFactor >= 0.95, "%.2fx", wc.NotifyFactor)
		add("writers flat out, no relay: trigger with the relay awake / no trigger", ">= 0.95x", wc.AwakeRatio >= 0.95, "%.2fx", wc.AwakeRatio)
	}
	var rss int64
	var cpu float64
	for _, d := range sums {
		if d.Variant == variantRelay && d.Error == "" && d.Payload <= 1<<10 {
			rss = max(rss, d.PeakRSS, d.HWM)
			cpu = max(cpu, d.CPUMsPer10k)
		}
	}
	if rss > 0 {
		add("relay RSS during the 256 B and 1 KB drains (highest of all runs)", "<= 64 MiB", rss <= 64<<20, "%.1f MiB", mib(rss))
		add("relay CPU per 10k events, 256 B and 1 KB drains (highest case median)", "<= 50 ms", cpu <= 50, "%.1f ms", cpu)
	}
	for _, h := range b.res.Health {
		add("table size flat ("+h.Mode+" mode): size at the end / after the half-way VACUUM", "<= 1.25", h.SizeGrowth > 0 && h.SizeGrowth <= 1.25,
			"%.2f", h.SizeGrowth)
	}
	return out
}

func caseLabel(dc drainCase) string {
	p := fmt.Sprintf("%d B", dc.Payload)
	if dc.Payload >= 1<<10 {
		p = fmt.Sprintf("%d KB", dc.Payload>>10)
	}
	return fmt.Sprintf("%s, %d keys", p, dc.Keys)
}

// summary prints the headline numbers.
func (b *bench) summary(w io.Writer) {
	fmt.Fprintf(w, "\nresults in %s (scale %s)\n", b.opts.Out, b.opts.ScaleName)
	if sums := b.drainSummaries(); len(sums) > 0 {
		fmt.Fprintf(w, "\n%-20s %-17s %10s %5s %12s %9s %9s\n", "drain", "variant", "events", "runs", "events/s", "ms/10k", "RSS MiB")
		for _, d := range sums {
			if d.Error != "" {
				fmt.Fprintf(w, "%-20s %-17s error: %s\n", caseLabel(d.drainCase), d.Variant, d.Error)
				continue
			}
			fmt.Fprintf(w, "%-20s %-17s %10d %5d %12.0f %9.1f %9.1f\n", caseLabel(d.drainCase), d.Variant, d.Events, d.Runs-d.Failed,
				d.EventsPerSec, d.CPUMsPer10k, mib(d.PeakRSS))
		}
	}
	if len(b.res.Targets) > 0 {
		fmt.Fprintf(w, "\n%-60s %-15s %-14s %s\n", "target", "want", "got", "met")
		for _, t := range b.res.Targets {
			fmt.Fprintf(w, "%-60s %-15s %-14s %t\n", t.Name, t.Target, t.Got, t.Met)
		}
	}
}
