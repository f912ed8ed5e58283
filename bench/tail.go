package main

import (
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"runtime"
	"slices"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// The tail runs (-tail N): commit-to-ack and commit-to-consume at the two rates of the target,
// each with the relay as deployed, pinned to one CPU, and with GOMAXPROCS=1, with the host's
// noise measured beside each run.

// tailCase is one offered load of the tail runs.
type tailCase struct {
	Rate  float64 // events a second
	PerTx int     // events per transaction
}

// tailCases are the loads of the target: 1,000 events/s one per transaction, 5,000 ten per
// transaction.
var tailCases = []tailCase{{1000, 1}, {5000, 10}}

// The relay's variants in the tail runs.
const (
	tailDefault    = "default"     // as deployed: every CPU, GOMAXPROCS governed by internal/procs
	tailPinned     = "pinned"      // every thread of the relay pinned to the last CPU (taskset)
	tailGoMaxProcs = "gomaxprocs1" // GOMAXPROCS=1
)

var tailVariants = []string{tailDefault, tailPinned, tailGoMaxProcs}

// tailResult is one tail run.
type tailResult struct {
	Variant       string  `json:"variant"`
	Repeat        int     `json:"repeat"`
	OfferedPerSec float64 `json:"offered_per_sec"`
	PerTx         int     `json:"events_per_tx"`
	WrittenPerSec float64 `json:"written_per_sec"`
	Events        int     `json:"events"`
	// Commit (the writer's COMMIT returned) to the broker's acknowledgement reaching the relay.
	AckP50 float64 `json:"commit_to_ack_p50_ms"`
	AckP99 float64 `json:"commit_to_ack_p99_ms"`
	AckMax float64 `json:"commit_to_ack_max_ms"`
	// What the relay's outbox_relay_commit_to_ack_seconds histogram measures: from the row's
	// created_at (the writer's transaction start) to the acknowledgement; Under5ms is the share
	// of events at or below 5 ms.
	HistP50      float64 `json:"histogram_p50_ms"`
	HistP99      float64 `json:"histogram_p99_ms"`
	HistUnder5ms float64 `json:"histogram_under_5ms"`
	// Commit to an external consumer (a process of its own, reading the topic from the broker
	// the relay writes to) receiving the record.
	ConsumeP50 float64 `json:"commit_to_consume_p50_ms"`
	ConsumeP99 float64 `json:"commit_to_consume_p99_ms"`
	ConsumeMax float64 `json:"commit_to_consume_max_ms"`
	Consumed   int     `json:"consumed"`
	// The host during the run: the CPU time of every process that is not part of it (total busy
	// CPU from /proc/stat minus the bench, the relay, the consumer, the broker and the run's
	// PostgreSQL sessions) and the run's own, each as a share of the machine (wall time × CPUs);
	// and the 1-minute load average after it.
	OtherCPUShare float64 `json:"other_cpu_share"`
	RunCPUShare   float64 `json:"run_cpu_share"`
	LoadAvg       float64 `json:"load_avg_1m"`
	RelayCPUMs10k float64 `json:"relay_cpu_ms_per_10k"`
}

// tailSummary is the median of one variant's runs at one load, with the range of the p99s.
type tailSummary struct {
	Variant                string
	Case                   tailCase
	Runs                   int
	AckP50, AckP99         float64
	AckP99Min, AckP99Max   float64
	HistP99, HistUnder5ms  float64
	HistP99Min, HistP99Max float64
	ConP50, ConP99         float64
	ConP99Min, ConP99Max   float64
	Other, OtherMin        float64
	OtherMax, Load         float64
	Written                float64 // events a second the writers committed
}

// tail runs the tail measurements b.opts.Tail times: every variant, in an order that turns from
// repeat to repeat, at every load of tailCases.
func (b *bench) tail(ctx context.Context, br *broker, schema string, res *steadyResults) error {
	if err := b.setTrigger(ctx, schema, true); err != nil {
		return err
	}
	appPrefix := fmt.Sprintf("bench-%d-", os.Getpid())
	w, err := b.tailWriters(ctx, schema, appPrefix+"writers")
	if err != nil {
		return err
	}
	defer w.close()
	var marked int64 // rows marked by the relays stopped so far
	for rep := range b.opts.Tail {
		order := slices.Clone(tailVariants)
		for range rep % len(order) {
			order = append(order[1:], order[0])
		}
		for _, variant := range order {
			cfg := childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema,
				Brokers: br.addrs, Mark: postgres.MarkDelete, Latency: true}
			if variant == tailGoMaxProcs {
				cfg.GoMaxProcs = 1
			}
			relay, err := b.start(ctx, cfg)
			if err != nil {
				return err
			}
			relay.offset = marked
			if variant == tailPinned {
				cpu := strconv.Itoa(runtime.NumCPU() - 1)
				if out, err := exec.CommandContext(ctx, "taskset", "-a", "-p", "-c", cpu, strconv.Itoa(relay.cmd.Process.Pid)).CombinedOutput(); err != nil {
					_ = relay.stop()
					return fmt.Errorf("taskset: %v: %s", err, out)
				}
			}
			if err := relay.send("go"); err != nil {
				return err
			}
			// The consumer starts at the topic's end once every earlier row is on it.
			if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
				return err
			}
			cons, err := b.start(ctx, childConfig{Role: roleConsume, Brokers: br.addrs})
			if err != nil {
				return err
			}
			cons.offset = w.committed.Load()
			if err := cons.send("go"); err != nil {
				return err
			}
			for _, tc := range tailCases {
				tr, err := b.tailRun(ctx, w, relay, cons, tc, appPrefix)
				if err != nil {
					_ = cons.stop()
					_ = relay.stop()
					return err
				}
				tr.Variant, tr.Repeat = variant, rep
				res.Tail = append(res.Tail, tr)
				b.log.Printf("tail %-11s %4.0f/s %2d per tx (written %.0f/s, %d events): commit-to-ack p50 %.2f p99 %.2f max %.2f ms; histogram p99 %.2f ms (%.1f%% <= 5 ms); commit-to-consume p50 %.2f p99 %.2f max %.2f ms (%d); other processes %.0f%% of the CPUs, the run %.0f%%, load %.1f; relay cpu %.0f ms/10k",
					variant, tc.Rate, tc.PerTx, tr.WrittenPerSec, tr.Events, tr.AckP50, tr.AckP99, tr.AckMax, tr.HistP99, 100*tr.HistUnder5ms,
					tr.ConsumeP50, tr.ConsumeP99, tr.ConsumeMax, tr.Consumed, 100*tr.OtherCPUShare, 100*tr.RunCPUShare, tr.LoadAvg, tr.RelayCPUMs10k)
			}
			if err := cons.stop(); err != nil {
				return err
			}
			if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
				return err
			}
			marked = relay.progress.Load()
			if err := relay.stop(); err != nil {
				return err
			}
		}
	}
	return nil
}

// tailWriters returns the steady section's writers on a pool whose sessions are named app, so
// the noise measurement can tell them from other sessions.
func (b *bench) tailWriters(ctx context.Context, schema, app string) (*writers, error) {
	cfg, err := pgxpool.ParseConfig(b.opts.DatabaseURL)
	if err != nil {
		return nil, fmt.Errorf("database url: invalid connection string")
	}
	cfg.MaxConns = writersN + 2
	cfg.ConnConfig.RuntimeParams["application_name"] = app
	pool, err := pgxpool.NewWithConfig(ctx, cfg)
	if err != nil {
		return nil, err
	}
	return writersOn(pool, schema)
}

// tailRun measures one load: the relay's latencies (latencyRun), the consumer's, and the noise.
func (b *bench) tailRun(ctx context.Context, w *writers, relay, cons *proc, tc tailCase, appPrefix string) (tailResult, error) {
	if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
		return tailResult{}, err
	}
	if err := waitCaughtUp(ctx, w, cons, 30*time.Second); err != nil {
		return tailResult{}, fmt.Errorf("consumer: %w", err)
	}
	if err := cons.send("reset"); err != nil {
		return tailResult{}, err
	}
	w.perTx = tc.PerTx
	defer func() { w.perTx = 1 }()
	run := []*proc{relay, cons}
	before := b.sampleCPU(ctx, run, appPrefix)
	lr, err := b.latencyRun(ctx, w, relay, "notify", tc.Rate)
	if err != nil {
		return tailResult{}, err
	}
	if err := waitCaughtUp(ctx, w, cons, 30*time.Second); err != nil {
		return tailResult{}, fmt.Errorf("consumer: %w", err)
	}
	after := b.sampleCPU(ctx, run, appPrefix)
	if err := cons.send("report"); err != nil {
		return tailResult{}, err
	}
	rep, err := cons.report(ctx, 30*time.Second)
	if err != nil {
		return tailResult{}, err
	}
	var s []float64
	for _, a := range rep.Acks {
		if c, ok := lr.commits[a.EventID]; ok {
			s = append(s, float64(a.At-c)/1e6)
		}
	}
	if len(s) < len(lr.commits) {
		return tailResult{}, fmt.Errorf("the consumer received %d of %d committed events", len(s), len(lr.commits))
	}
	sort.Float64s(s)
	tr := tailResult{OfferedPerSec: tc.Rate, PerTx: tc.PerTx, WrittenPerSec: lr.WrittenPerSec, Events: lr.Events,
		AckP50: lr.P50, AckP99: lr.P99, AckMax: lr.Max, HistP50: lr.InsertP50, HistP99: lr.InsertP99,
		ConsumeP50: quantile(s, .5), ConsumeP99: quantile(s, .99), ConsumeMax: quantile(s, 1), Consumed: len(s),
		LoadAvg: loadAvg(), RelayCPUMs10k: lr.CPUMsPer10k}
	tr.HistUnder5ms = round3(shareAtMost(lr.insertSamples, 5))
	tr.OtherCPUShare, tr.RunCPUShare = after.shares(before)
	return tr, nil
}

// shareAtMost returns the share of sorted s at or below v.
func shareAtMost(s []float64, v float64) float64 {
	if len(s) == 0 {
		return 0
	}
	return float64(sort.Search(len(s), func(i int) bool { return s[i] > v })) / float64(len(s))
}

// cpuSample is the host's CPU time at one moment, in clock ticks (USER_HZ), and the run's.
type cpuSample struct {
	total, busy float64         // every CPU's, from /proc/stat
	procs       float64         // the bench's and its children's (threads included)
	sessions    map[int]float64 // the run's PostgreSQL sessions, by pid
}

// sampleCPU reads the host's CPU time and the run's: this process, the children of run and the
// database sessions named with appPrefix (the children's and the writers').
func (b *bench) sampleCPU(ctx context.Context, run []*proc, appPrefix string) cpuSample {
	s := cpuSample{sessions: map[int]float64{}}
	s.total, s.busy = procStat()
	s.procs = procCPU(os.Getpid()) * 100
	for _, p := range run {
		s.procs += p.cpu() * 100
	}
	rows, err := b.pool.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1 || '%'`, appPrefix)
	if err == nil {
		pids, _ := pgx.CollectRows(rows, pgx.RowTo[int32])
		for _, pid := range pids {
			s.sessions[int(pid)] = procCPU(int(pid)) * 100
		}
	}
	return s
}

// shares returns, from an earlier sample, the CPU time of the processes that are not part of
// the run and the run's own, each as a share of the CPUs' time in between. The broker, a child
// the sample does not know, counts as another process: it is part of the deployment, not of
// the relay.
func (s cpuSample) shares(earlier cpuSample) (other, run float64) {
	total := s.total - earlier.total
	if total <= 0 {
		return 0, 0
	}
	r := s.procs - earlier.procs
	for pid, v := range s.sessions {
		r += v - earlier.sessions[pid] // a session opened during the run: all its time
	}
	busy := s.busy - earlier.busy
	return round3(max(busy-r, 0) / total), round3(r / total)
}

// procStat returns the total and busy (not idle, not waiting for I/O) CPU time of every CPU,
// in clock ticks, from the first line of /proc/stat.
func procStat() (total, busy float64) {
	f, err := os.Open("/proc/stat")
	if err != nil {
		return 0, 0
	}
	defer f.Close()
	b, _ := io.ReadAll(io.LimitReader(f, 4096))
	line, _, _ := strings.Cut(string(b), "\n")
	fields := strings.Fields(line)
	if len(fields) < 9 || fields[0] != "cpu" {
		return 0, 0
	}
	// user nice system idle iowait irq softirq steal (guest time is counted in user)
	for i, v := range fields[1:9] {
		x, _ := strconv.ParseFloat(v, 64)
		total += x
		if i != 3 && i != 4 {
			busy += x
		}
	}
	return total, busy
}

// tailSummaries returns the median of each variant's runs at each load.
func tailSummaries(runs []tailResult) []tailSummary {
	var out []tailSummary
	for _, tc := range tailCases {
		for _, v := range tailVariants {
			var ack, hist, under, c50, con, a50, other, load, written []float64
			for _, r := range runs {
				if r.Variant == v && r.OfferedPerSec == tc.Rate && r.PerTx == tc.PerTx {
					ack, a50, hist, under = append(ack, r.AckP99), append(a50, r.AckP50), append(hist, r.HistP99), append(under, r.HistUnder5ms)
					con, c50, other, load = append(con, r.ConsumeP99), append(c50, r.ConsumeP50), append(other, r.OtherCPUShare), append(load, r.LoadAvg)
					written = append(written, r.WrittenPerSec)
				}
			}
			if len(ack) == 0 {
				continue
			}
			out = append(out, tailSummary{Variant: v, Case: tc, Runs: len(ack),
				AckP50: median(a50), AckP99: median(ack), AckP99Min: slices.Min(ack), AckP99Max: slices.Max(ack),
				HistP99: median(hist), HistUnder5ms: median(under), HistP99Min: slices.Min(hist), HistP99Max: slices.Max(hist),
				ConP50: median(c50), ConP99: median(con), ConP99Min: slices.Min(con), ConP99Max: slices.Max(con),
				Other: median(other), OtherMin: slices.Min(other), OtherMax: slices.Max(other), Load: median(load), Written: median(written)})
		}
	}
	return out
}

// tailTable writes the tail runs' medians.
func tailTable(w io.Writer, runs []tailResult) {
	sums := tailSummaries(runs)
	if len(sums) == 0 {
		return
	}
	fmt.Fprintln(w, "### Tail latency (8 writers; medians of the runs, p99 range in brackets)")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "Commit-to-ack: the writer's COMMIT returned to the broker's acknowledgement reaching the relay. Histogram: what the relay's `outbox_relay_commit_to_ack_seconds` measures (from `created_at`, the writer's transaction start). Commit-to-consume: to a consumer in a process of its own receiving the record. Other processes: the CPU time of every process not part of the run, as a share of the machine's.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| load | relay | runs | written ev/s | commit-to-ack p50 ms | p99 ms | histogram p99 ms | ≤ 5 ms | commit-to-consume p50 ms | p99 ms | other processes' CPU | load avg |")
	fmt.Fprintln(w, "|---|---|---:|---:|---:|---|---|---:|---:|---|---|---:|")
	for _, s := range sums {
		fmt.Fprintf(w, "| %.0f ev/s, %d per tx | %s | %d | %.0f | %.2f | %.2f [%.2f–%.2f] | %.2f [%.2f–%.2f] | %.1f %% | %.2f | %.2f [%.2f–%.2f] | %.0f %% [%.0f–%.0f] | %.1f |\n",
			s.Case.Rate, s.Case.PerTx, s.Variant, s.Runs, s.Written, s.AckP50, s.AckP99, s.AckP99Min, s.AckP99Max, s.HistP99, s.HistP99Min, s.HistP99Max,
			100*s.HistUnder5ms, s.ConP50, s.ConP99, s.ConP99Min, s.ConP99Max, 100*s.Other, 100*s.OtherMin, 100*s.OtherMax, s.Load)
	}
	fmt.Fprintln(w)
}
