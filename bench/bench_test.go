package main

import (
	"bytes"
	"context"
	"encoding/json"
	"log"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/outbox-relay/outbox-relay/internal/dbtest"
)

// TestMain lets the test binary serve as the benchmark's child processes, as the bench binary
// does: the smoke test below starts its broker, relay and baselines from os.Executable().
func TestMain(m *testing.M) {
	if cfg := os.Getenv(childEnv); cfg != "" {
		if err := runChild(cfg); err != nil {
			log.Printf("bench child: %v", err)
			os.Exit(1)
		}
		os.Exit(0)
	}
	os.Exit(m.Run())
}

// TestSmoke runs every section of the benchmark at its smallest size, so the suite cannot rot:
// it checks that each section completes and writes well-formed results and charts. It asserts no
// timing: numbers belong to 'make bench'.
func TestSmoke(t *testing.T) {
	pool := dbtest.Pool(t)   // fails with a clear message when PostgreSQL is unreachable
	brokerLog := t.TempDir() // the brokers' segment files, in a directory of their own each
	wm := buildWatermill(t)
	opts, res, _ := runBench(t, 20*time.Minute, "-scale", "smoke", "-repeat", "2", "-no-settle", "-broker-log", brokerLog, "-watermill-exe", wm)
	ctx := context.Background()
	variants := len(drainVariants)
	if _, err := os.Stat(wm); err != nil {
		variants-- // the build failed where it may (no OUTBOX_REQUIRE_TOOLS): the variant was skipped
	}

	if left, err := os.ReadDir(brokerLog); err != nil || len(left) != 0 {
		t.Errorf("the brokers left %d entries in -broker-log (%v): each removes its log when it stops", len(left), err)
	}
	data, err := os.ReadFile(filepath.Join(opts.Out, "results.json"))
	if err != nil {
		t.Fatal(err)
	}
	var got results
	if err := json.Unmarshal(data, &got); err != nil {
		t.Fatalf("results.json is not valid: %v", err)
	}
	// Every variant of a case in the first round, all but produce-only in the second; the
	// feature variants on the 256 B, 100-key case only.
	want := 0
	for _, dc := range opts.Scale.Matrix {
		n := variants
		if dc.Keys != 100 || dc.Payload > 1<<10 {
			n -= len(featureVariants)
		}
		want += 2*n - 1
	}
	if len(got.Drain) != want {
		t.Errorf("drain results: got %d, want %d", len(got.Drain), want)
	}
	for _, d := range got.Drain {
		if d.Error != "" || d.EventsPerSec <= 0 || d.CPUSec <= 0 || d.PeakRSS <= 0 {
			t.Errorf("drain %s %s: incomplete result %+v", caseLabel(d.drainCase), d.Variant, d)
		}
	}
	// Every variant with a database deletes its rows, which writes WAL; pg_stat_wal, which the
	// drains read it from, came with PostgreSQL 14.
	var walStats bool
	if err := pool.QueryRow(ctx, `SELECT current_setting('server_version_num')::int >= 140000`).Scan(&walStats); err != nil {
		t.Fatal(err)
	}
	if walStats {
		for _, d := range got.Drain {
			if d.Variant != variantProduce && (d.WALBytesPer10k <= 0 || d.WALFPIPer10k < 0) {
				t.Errorf("drain %s %s: WAL %.0f bytes and %.0f full-page images per 10k events, want some bytes",
					caseLabel(d.drainCase), d.Variant, d.WALBytesPer10k, d.WALFPIPer10k)
			}
		}
		if b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md")); err != nil || !bytes.Contains(b, []byte("| WAL MiB / 10k events |")) {
			t.Errorf("tables.md has no table of the drains' WAL (%v)", err)
		}
	}
	if got.Steady == nil || len(got.Steady.Steps) == 0 || len(got.Steady.Latency) < 3 {
		t.Fatalf("steady section incomplete: %+v", got.Steady)
	}
	modes := map[string]bool{}
	for _, l := range got.Steady.Latency {
		modes[l.Mode] = true
	}
	if !modes["notify"] || !modes["poll"] || !modes["poll-fast"] {
		t.Errorf("latency measured in modes %v, want notify, poll and poll-fast", modes)
	}
	for _, l := range got.Steady.Latency {
		if l.Events == 0 || len(l.CDF) != 100 || l.P50 > l.P99 || l.P99 > l.Max {
			t.Errorf("latency %s at %.0f/s: malformed %+v", l.Mode, l.OfferedPerSec, l)
		}
	}
	checkSidecar(t, got, opts.Scale.SidecarRuns)
	checkPeers(t, got.Peers, variants == len(drainVariants), 2)
	checkFeatures(t, got, 2)
	if b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md")); err != nil || !bytes.Contains(b, []byte("### Cost of the ecosystem features")) {
		t.Errorf("tables.md has no section on the cost of the ecosystem features (%v)", err)
	}
	if got.Write == nil || got.Write.NotifyTxSec <= 0 || got.Write.PollTxSec <= 0 {
		t.Errorf("write-cost section incomplete: %+v", got.Write)
	}
	if len(got.Health) != 2 {
		t.Fatalf("table health: got %d modes, want 2", len(got.Health))
	}
	for _, h := range got.Health {
		if len(h.Samples) < 2 || h.ExplainStart == "" || h.ExplainEnd == "" {
			t.Errorf("table health %s: incomplete: %d samples", h.Mode, len(h.Samples))
		}
		if last := h.Samples[len(h.Samples)-1]; last.Events < opts.Scale.HealthEvents || last.Pending != 0 {
			t.Errorf("table health %s: last sample %+v, want %d events and nothing pending", h.Mode, last, opts.Scale.HealthEvents)
		}
	}
	if got.Memory == nil || got.Memory.Drained == 0 || got.Memory.PeakRSS == 0 {
		t.Errorf("memory section incomplete: %+v", got.Memory)
	}
	if len(got.Outboxes) != len(outboxCounts) {
		t.Errorf("outboxes section: %d results, want %d", len(got.Outboxes), len(outboxCounts))
	}
	for _, o := range got.Outboxes {
		if o.Error != "" || o.EventsPerSec <= 0 || o.PeakRSS <= 0 || o.Events != opts.Scale.DrainSmall {
			t.Errorf("outboxes %d: incomplete result %+v", o.Outboxes, o)
		}
	}
	if len(got.Targets) == 0 || len(res.Targets) != len(got.Targets) {
		t.Errorf("targets: %d in results.json, %d returned", len(got.Targets), len(res.Targets))
	}
	if b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md")); err != nil || !bytes.Contains(b, []byte("### Targets")) {
		t.Errorf("tables.md missing or without the targets table: %v", err)
	} else if !bytes.Contains(b, []byte("| relay | 2 | ")) {
		t.Errorf("tables.md does not show the relay's two runs:\n%s", b)
	}
	for _, name := range []string{"drain-throughput.png", "latency.png", "table-health.png"} {
		b, err := os.ReadFile(filepath.Join(opts.Out, name))
		if err != nil {
			t.Errorf("chart %s: %v", name, err)
		} else if !bytes.HasPrefix(b, []byte("\x89PNG\r\n\x1a\n")) {
			t.Errorf("chart %s is not a PNG", name)
		}
	}
}

// TestSidecar runs the sidecar section with two runs: each run at 1,000 events/s is followed
// by a bare producer at that run's claim cadence, the real binary is measured idle, and the
// targets table judges all four of the section's figures.
func TestSidecar(t *testing.T) {
	dbtest.Pool(t)
	opts, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "sidecar", "-sidecar-runs", "2", "-no-settle", "-broker-log", t.TempDir())
	if res.Sidecar == nil {
		t.Fatalf("no sidecar results\n%s", logs)
	}
	checkSidecar(t, *res, 2)
	names := map[string]bool{}
	for _, tr := range res.Targets {
		names[strings.SplitN(tr.Name, " (", 2)[0]] = true
	}
	for _, want := range []string{"relay CPU at 1k ev/s, one per tx", "its database sessions' CPU at 1k ev/s",
		"p99 commit-to-ack in those runs", "idle relay + its database sessions' CPU"} {
		if !names[want] {
			t.Errorf("no target %q among %v", want, names)
		}
	}
	b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md"))
	if err != nil || !bytes.Contains(b, []byte("### A sidecar's cost at 1000 events/s and idle")) || !bytes.Contains(b, []byte("Idle (`outbox-relay run`")) ||
		!bytes.Contains(b, []byte("| notifications / commit |")) {
		t.Errorf("tables.md has no sidecar table with the idle line (%v):\n%s", err, b)
	}
}

// checkSidecar checks the sidecar section of got: runs runs at 1,000 events/s with their
// figures, a produce floor after each at the cadence of its claims, and the idle relay measured
// for the scale's window with its sessions found.
func checkSidecar(t *testing.T, got results, runs int) {
	t.Helper()
	sc := got.Sidecar
	if sc == nil || len(sc.Runs) != runs || len(sc.Floor) != runs {
		t.Fatalf("sidecar section: %+v, want %d runs and %d produce floors", sc, runs, runs)
	}
	for i, r := range sc.Runs {
		if r.Run != i || r.OfferedPerSec != sidecarRate || r.Events == 0 || r.CPUMsPer10k <= 0 || r.DBCPUMsPer10k <= 0 || r.ClaimsPerEvent <= 0 || r.P50 > r.P99 {
			t.Errorf("sidecar run %d: incomplete %+v", i, r)
			continue
		}
		f := sc.Floor[i]
		if want := claimCadence(r.ClaimsPerEvent, sidecarRate); f.Run != i || f.Every != want || f.OfferedPerSec != sidecarRate || f.Events == 0 || f.CPUMsPer10k <= 0 {
			t.Errorf("sidecar run %d's produce floor: %+v, want every %s (%.3f claims per event)", i, f, want, r.ClaimsPerEvent)
		}
	}
	// The relay waits asleep over the empty outbox before the first run, so that run's first
	// commit notifies it, and the second listener counts that notification.
	if sc.Runs[0].NotifiesPerTx <= 0 {
		t.Errorf("sidecar run 0: no notification counted: %+v", sc.Runs[0])
	}
	idle := got.Sidecar.Idle
	if idle == nil || idle.Error != "" || idle.Seconds < got.Sizes.IdleRun.Seconds() || idle.Sessions == 0 || idle.RelayCPUPerHour < 0 || idle.DBCPUPerHour < 0 {
		t.Errorf("sidecar idle: %+v, want %s measured with the relay's sessions", idle, got.Sizes.IdleRun)
	}
}

// TestClaimCadence: a relay's claims per event at a rate give the cadence of its claims,
// rounded to 0.1 ms and kept within what -produce-floor accepts; none without claims.
func TestClaimCadence(t *testing.T) {
	for _, tc := range []struct {
		perEvent, rate float64
		want           time.Duration
	}{
		{0.34, 1000, 2900 * time.Microsecond},
		{0.5, 1000, 2 * time.Millisecond},
		{1, 10, 100 * time.Millisecond},
		{2, 1000, time.Millisecond}, // more than one claim a millisecond: the floor's least cadence
		{1, 0.5, time.Second},       // one claim in two seconds: its greatest
		{0, 1000, 0},                // no claims: no cadence
	} {
		if got := claimCadence(tc.perEvent, tc.rate); got != tc.want {
			t.Errorf("claimCadence(%v, %v) = %s, want %s", tc.perEvent, tc.rate, got, tc.want)
		}
	}
}

// TestWatermill runs the Watermill baseline alone beside the relay, at the smallest size: its
// forwarder must drain what its own publisher preloaded, and forward every event the writers
// committed in Watermill's layout, or the run fails.
func TestWatermill(t *testing.T) {
	dbtest.Pool(t)
	wm := buildWatermill(t)
	if _, err := os.Stat(wm); err != nil {
		t.Skip("bench/watermill did not build (see the log above)")
	}
	opts, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "drain,peers", "-cases", "1024/10",
		"-variants", "relay,watermill", "-watermill-exe", wm, "-broker-log", t.TempDir())
	var drained bool
	for _, d := range res.Drain {
		if d.Error != "" || d.EventsPerSec <= 0 || d.CPUSec <= 0 || d.PeakRSS <= 0 {
			t.Errorf("drain %s: incomplete result %+v", d.Variant, d)
		}
		drained = drained || d.Variant == variantWatermill
	}
	if !drained {
		t.Errorf("no watermill drain among %d results\n%s", len(res.Drain), logs)
	}
	if b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md")); err != nil || !bytes.Contains(b, []byte("| watermill | 1 | ")) ||
		!bytes.Contains(b, []byte("### Beside its peers")) {
		t.Errorf("tables.md does not show the watermill drain and the peers table (%v):\n%s", err, b)
	}
	modes := map[string]int{}
	for _, l := range res.Peers {
		modes[l.Mode]++
		if l.Events == 0 || l.P50 > l.P99 || l.P99 > l.Max || l.CPUMsPer10k <= 0 {
			t.Errorf("peers %s: malformed %+v", l.Mode, l)
		}
	}
	if len(res.Peers) != 2 || modes[variantRelay] != 1 || modes[variantWatermill] != 1 {
		t.Errorf("peers: got runs %v, want one of the relay and one of watermill", modes)
	}
}

// buildWatermill builds the Watermill baseline (bench/watermill, a module of its own) into a
// temporary directory and returns its path. Where the build fails (its modules cannot be
// fetched), the test fails under OUTBOX_REQUIRE_TOOLS=1 (CI), and otherwise logs why and returns
// a path that does not exist, so the bench skips the variant.
func buildWatermill(t *testing.T) string {
	t.Helper()
	exe := filepath.Join(t.TempDir(), "bench-watermill")
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	out, err := exec.CommandContext(ctx, "go", "build", "-C", "watermill", "-o", exe, ".").CombinedOutput()
	if err != nil {
		if os.Getenv("OUTBOX_REQUIRE_TOOLS") == "1" {
			t.Fatalf("build bench/watermill: %v\n%s", err, out)
		}
		t.Logf("build bench/watermill: %v (its variant is skipped)\n%s", err, out)
	}
	return exe
}

// checkPeers checks the peers section: every variant measured runs times, with latencies in
// order and CPU counted.
func checkPeers(t *testing.T, peers []latencyResult, withWatermill bool, runs int) {
	t.Helper()
	count := map[string]int{}
	for _, l := range peers {
		count[l.Mode]++
		if l.Events == 0 || l.P50 > l.P99 || l.P99 > l.Max || l.CPUMsPer10k <= 0 {
			t.Errorf("peers %s run %d: malformed %+v", l.Mode, l.Run, l)
		}
	}
	for _, v := range peerVariants {
		want := runs
		if v == variantWatermill && !withWatermill {
			want = 0
		}
		if count[v] != want {
			t.Errorf("peers: %d runs of %s, want %d", count[v], v, want)
		}
	}
}

// TestSummarize checks the figures the tables and targets take from repeated runs: medians,
// the highest RSS, the range, failed runs left out, and the relay statistics of the median run.
func TestSummarize(t *testing.T) {
	dc := drainCase{Payload: 256, Keys: 100, Events: 1000}
	other := drainCase{Payload: 1024, Keys: 100, Events: 1000}
	run := func(n int, rate, cpu float64, rss int64, claims int64) drainResult {
		return drainResult{drainCase: dc, Variant: variantRelay, Run: n, EventsPerSec: rate, CPUMsPer10k: cpu,
			PeakRSS: rss, Relay: &relayStats{Claims: claims}}
	}
	all := []drainResult{
		run(1, 100, 40, 50<<20, 1),
		{drainCase: dc, Variant: variantNaive, Run: 1, EventsPerSec: 10},
		run(2, 300, 30, 40<<20, 2),
		{drainCase: dc, Variant: variantRelay, Run: 3, Error: "broker gone"},
		run(4, 200, 60, 45<<20, 3),
		{drainCase: other, Variant: variantRelay, Run: 1, EventsPerSec: 5000, PeakRSS: 90 << 20},
	}
	s, ok := summarize(all, dc, variantRelay)
	if !ok {
		t.Fatal("summarize found no successful run")
	}
	if s.Runs != 4 || s.Failed != 1 || s.Error != "" {
		t.Errorf("runs %d, failed %d, error %q; want 4, 1 and none", s.Runs, s.Failed, s.Error)
	}
	if s.EventsPerSec != 200 || s.CPUMsPer10k != 40 || s.MinPerSec != 100 || s.MaxPerSec != 300 {
		t.Errorf("events/s %v (range %v-%v), cpu %v; want the medians 200 and 40, range 100-300",
			s.EventsPerSec, s.MinPerSec, s.MaxPerSec, s.CPUMsPer10k)
	}
	if s.PeakRSS != 50<<20 {
		t.Errorf("RSS %d MiB, want the highest run's 50", s.PeakRSS>>20)
	}
	if s.Relay == nil || s.Relay.Claims != 3 || s.Run != 4 {
		t.Errorf("relay statistics %+v of run %d, want those of run 4 (the median rate)", s.Relay, s.Run)
	}
	two, _ := summarize(all[:3], dc, variantRelay)
	if two.EventsPerSec != 200 || two.CPUMsPer10k != 35 {
		t.Errorf("two runs: events/s %v, cpu %v; want the means of the middle pair, 200 and 35", two.EventsPerSec, two.CPUMsPer10k)
	}
	if _, ok := summarize([]drainResult{all[3]}, dc, variantRelay); ok {
		t.Error("a case whose only run failed has a summary")
	}
}

// TestBrokerLogFlag: -broker-log takes "memory" or an existing directory, and names itself when
// given anything else.
func TestBrokerLogFlag(t *testing.T) {
	dir := t.TempDir()
	for _, tc := range []struct {
		arg, want, err string
	}{
		{arg: "memory", want: "memory"},
		{arg: dir, want: dir},
		{arg: filepath.Join(dir, "missing"), err: "-broker-log"},
	} {
		o, err := parseFlags([]string{"-broker-log", tc.arg})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("-broker-log %s: error %v, want one naming %s", tc.arg, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("-broker-log %s: %v", tc.arg, err)
		case tc.err == "" && o.BrokerLog != tc.want:
			t.Errorf("-broker-log %s: BrokerLog %q, want %q", tc.arg, o.BrokerLog, tc.want)
		}
	}
	if o, err := parseFlags(nil); err != nil || o.BrokerLog == "" {
		t.Errorf("default -broker-log: %q, %v; want a directory or memory", o.BrokerLog, err)
	}
}

// TestDrainMarkFlag: -drain-mark takes delete or retain, defaults to delete, and names itself
// when given anything else.
func TestDrainMarkFlag(t *testing.T) {
	for _, tc := range []struct{ arg, want, err string }{
		{arg: "delete", want: "delete"},
		{arg: "retain", want: "retain"},
		{arg: "purge", err: "-drain-mark"},
	} {
		o, err := parseFlags([]string{"-drain-mark", tc.arg})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("-drain-mark %s: error %v, want one naming %s", tc.arg, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("-drain-mark %s: %v", tc.arg, err)
		case tc.err == "" && o.DrainMark != tc.want:
			t.Errorf("-drain-mark %s: DrainMark %q, want %q", tc.arg, o.DrainMark, tc.want)
		}
	}
	if o, err := parseFlags(nil); err != nil || o.DrainMark != "delete" {
		t.Errorf("default -drain-mark: %q, %v; want delete", o.DrainMark, err)
	}
}

// TestLatencyRatesFlag: -latency-rates takes rates in events/s, 1,000 by default, and names
// itself when a rate is not one.
func TestLatencyRatesFlag(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want []float64
		err  string
	}{
		{arg: "30,1000", want: []float64{30, 1000}},
		{arg: " 200 ", want: []float64{200}},
		{arg: "0", err: "-latency-rates"},
		{arg: "fast", err: "-latency-rates"},
		{arg: "100,", err: "-latency-rates"},
	} {
		o, err := parseFlags([]string{"-latency-rates", tc.arg})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("-latency-rates %q: error %v, want one naming %s", tc.arg, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("-latency-rates %q: %v", tc.arg, err)
		case tc.err == "" && !slices.Equal(o.LatencyRates, tc.want):
			t.Errorf("-latency-rates %q: LatencyRates %v, want %v", tc.arg, o.LatencyRates, tc.want)
		}
	}
	if o, err := parseFlags(nil); err != nil || !slices.Equal(o.LatencyRates, []float64{1000}) {
		t.Errorf("default -latency-rates: %v, %v; want [1000]", o.LatencyRates, err)
	}
}

// TestProduceFloorFlag: -produce-floor takes cadences between 1 ms and 1 s, none by default,
// and names itself in its errors.
func TestProduceFloorFlag(t *testing.T) {
	for _, tc := range []struct {
		arg  string
		want []time.Duration
		err  string
	}{
		{arg: "1ms,3ms", want: []time.Duration{time.Millisecond, 3 * time.Millisecond}},
		{arg: " 25ms ", want: []time.Duration{25 * time.Millisecond}},
		{arg: "500us", err: "-produce-floor"},
		{arg: "2s", err: "-produce-floor"},
		{arg: "3", err: "-produce-floor"},
		{arg: "1ms,", err: "-produce-floor"},
	} {
		o, err := parseFlags([]string{"-produce-floor", tc.arg})
		switch {
		case tc.err != "" && (err == nil || !strings.Contains(err.Error(), tc.err)):
			t.Errorf("-produce-floor %q: error %v, want one naming %s", tc.arg, err, tc.err)
		case tc.err == "" && err != nil:
			t.Errorf("-produce-floor %q: %v", tc.arg, err)
		case tc.err == "" && !slices.Equal(o.ProduceFloor, tc.want):
			t.Errorf("-produce-floor %q: ProduceFloor %v, want %v", tc.arg, o.ProduceFloor, tc.want)
		}
	}
	if o, err := parseFlags(nil); err != nil || len(o.ProduceFloor) != 0 {
		t.Errorf("default -produce-floor: %v, %v; want none", o.ProduceFloor, err)
	}
}

// TestProduceFloor runs one latency-only run with two produce-floor runs after it: each
// publishes every record of its rate and time, and times each one from produce to ack.
func TestProduceFloor(t *testing.T) {
	dbtest.Pool(t)
	opts, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "steady", "-latency-only", "1",
		"-latency-rates", "300", "-produce-floor", "1ms,20ms", "-no-settle", "-broker-log", t.TempDir())
	if res.Steady == nil || len(res.Steady.Latency) != 1 || len(res.Steady.ProduceFloor) != 2 {
		t.Fatalf("latency-only run and its produce floors: %+v, want 1 and 2\n%s", res.Steady, logs)
	}
	want := int64(300 * opts.Scale.LatencyRun.Seconds())
	for i, every := range []time.Duration{time.Millisecond, 20 * time.Millisecond} {
		fr := res.Steady.ProduceFloor[i]
		if fr.Every != every || fr.OfferedPerSec != 300 || fr.Events != want {
			t.Errorf("floor %d: every %s at %.0f/s, %d events; want every %s at 300/s, %d events", i, fr.Every, fr.OfferedPerSec, fr.Events, every, want)
		}
		if run := opts.Scale.LatencyRun.Seconds(); fr.Seconds < 0.9*run {
			t.Errorf("floor %d: published %d events in %.2f s, want them paced over %.0f s", i, fr.Events, fr.Seconds, run)
		}
		if fr.P50 <= 0 || fr.P99 < fr.P50 || fr.CPUMsPer10k <= 0 {
			t.Errorf("floor %d: produce-to-ack p50 %.3f ms, p99 %.3f ms, cpu %.1f ms/10k", i, fr.P50, fr.P99, fr.CPUMsPer10k)
		}
	}
	if !strings.Contains(logs, "produce floor run 0 at 300/s, handed over every 20ms") {
		t.Errorf("the log does not report the 20ms floor:\n%s", logs)
	}
}

// TestLatencyOnlyRates runs the latency-only runs at two low rates: one result per rate, in
// order, each with the events its writers committed at about that rate.
func TestLatencyOnlyRates(t *testing.T) {
	dbtest.Pool(t)
	_, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "steady", "-latency-only", "1",
		"-latency-rates", "50,200", "-no-settle", "-broker-log", t.TempDir())
	if res.Steady == nil || len(res.Steady.Latency) != 2 {
		t.Fatalf("latency-only runs: %+v, want 2\n%s", res.Steady, logs)
	}
	for i, rate := range []float64{50, 200} {
		lr := res.Steady.Latency[i]
		if lr.OfferedPerSec != rate || lr.Events == 0 || lr.WrittenPerSec < rate/2 || lr.WrittenPerSec > rate*1.5 || lr.CPUMsPer10k <= 0 {
			t.Errorf("run %d: offered %.0f (want %.0f), %d events written at %.1f/s, relay CPU %.1f ms/10k",
				i, lr.OfferedPerSec, rate, lr.Events, lr.WrittenPerSec, lr.CPUMsPer10k)
		}
	}
}

// TestDrainRetain runs the smallest drain with the relay and SQL-only in retain mode: both must
// publish or mark every row, and the tables must say how they marked.
func TestDrainRetain(t *testing.T) {
	dbtest.Pool(t)
	opts, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "drain", "-cases", "256/10",
		"-variants", "sql-only,relay", "-drain-mark", "retain", "-broker-log", t.TempDir())
	if len(res.Drain) != 2 {
		t.Fatalf("drain results: got %d, want 2 (sql-only and relay)\n%s", len(res.Drain), logs)
	}
	for _, d := range res.Drain {
		if d.Error != "" || d.EventsPerSec <= 0 {
			t.Errorf("drain %s in retain mode: %+v", d.Variant, d)
		}
	}
	if res.DrainMark != "retain" {
		t.Errorf("results.json drain_mark %q, want retain", res.DrainMark)
	}
	if b, err := os.ReadFile(filepath.Join(opts.Out, "tables.md")); err != nil || !bytes.Contains(b, []byte("ran in retain mode")) {
		t.Errorf("tables.md does not say the drains ran in retain mode (%v)", err)
	}
}

// runBench runs the bench with args, its database the test's and its output a temporary
// directory, within timeout (a guard against hangs, generous for a loaded machine); it returns
// the options, the results and the bench's log, and ends the test when the run fails.
func runBench(t *testing.T, timeout time.Duration, args ...string) (options, *results, string) {
	t.Helper()
	base := []string{"-db", dbtest.URL(), "-out", t.TempDir()}
	if only := slices.Index(args, "-only"); only < 0 || strings.Contains(args[only+1], "outboxes") || strings.Contains(args[only+1], "sidecar") {
		base = append(base, "-relay-bin", relayBin(t)) // the outboxes section runs the daemon, the sidecar section idle
	}
	opts, err := parseFlags(append(base, args...))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), timeout)
	defer cancel()
	var logs bytes.Buffer
	res, err := run(ctx, opts, log.New(&logs, "", 0))
	if err != nil {
		t.Fatalf("bench %s: %v\n%s", strings.Join(args, " "), err, logs.String())
	}
	return opts, res, logs.String()
}

// checkFeatures checks the features' results: the tracing drains sampled as their sampler says
// (every span, or some and not all), and each variant's latency was measured repeat times.
func checkFeatures(t *testing.T, got results, repeat int) {
	t.Helper()
	for _, d := range got.Drain {
		_, _, tracing := tracingSampler(d.Variant)
		switch {
		case !tracing && d.Spans != nil:
			t.Errorf("drain %s %s: spans %+v without tracing", caseLabel(d.drainCase), d.Variant, d.Spans)
		case !tracing:
		case d.Spans == nil:
			t.Errorf("drain %s %s: no span statistics", caseLabel(d.drainCase), d.Variant)
		case d.Variant == variantRelayTrace && d.Spans.Sampled < d.Events:
			t.Errorf("drain %s %s: %d spans sampled for %d events, want one at least per event (always_on)", caseLabel(d.drainCase), d.Variant, d.Spans.Sampled, d.Events)
		case d.Variant == variantRelayTraceRatio && (d.Spans.Sampled == 0 || d.Spans.Sampled >= d.Events):
			t.Errorf("drain %s %s: %d spans sampled for %d events, want some and not all (ratio 0.1)", caseLabel(d.drainCase), d.Variant, d.Spans.Sampled, d.Events)
		}
		if d.Spans != nil && d.Spans.Failed != 0 {
			t.Errorf("drain %s %s: %d spans failed to export to the bench's collector", caseLabel(d.drainCase), d.Variant, d.Spans.Failed)
		}
	}
	runs := map[string]int{}
	for _, f := range got.Features {
		runs[f.Variant]++
		if f.Events == 0 || len(f.CDF) != 100 || f.P50 > f.P99 {
			t.Errorf("features %s run %d: malformed %+v", f.Variant, f.Run, f.latencyResult)
		}
		if _, _, tracing := tracingSampler(f.Variant); tracing != (f.Spans != nil) {
			t.Errorf("features %s run %d: span statistics %+v, want them with tracing only", f.Variant, f.Run, f.Spans)
		}
	}
	for _, v := range append([]string{variantRelay}, featureVariants...) {
		if runs[v] != repeat {
			t.Errorf("features: %d latency runs of %s, want %d", runs[v], v, repeat)
		}
	}
}

// TestRunsVariant: without -variants the feature variants drain the 256 B and 1 KB cases over
// 100 keys only, the others every case; -variants runs what it names on every case.
func TestRunsVariant(t *testing.T) {
	all := &bench{}
	named := &bench{opts: options{Variants: []string{variantRelay, variantRelayTrace}}}
	for _, tc := range []struct {
		b       *bench
		dc      drainCase
		variant string
		want    bool
	}{
		{all, drainCase{Payload: 256, Keys: 100}, variantRelayTrace, true},
		{all, drainCase{Payload: 1024, Keys: 100}, variantRelayCE, true},
		{all, drainCase{Payload: 16384, Keys: 100}, variantRelayTraceRatio, false},
		{all, drainCase{Payload: 256, Keys: 1}, variantRelayTrace, false},
		{all, drainCase{Payload: 16384, Keys: 1}, variantNaive, true},
		{named, drainCase{Payload: 16384, Keys: 1}, variantRelayTrace, true},
		{named, drainCase{Payload: 256, Keys: 100}, variantNaive, false},
	} {
		if got := tc.b.runsVariant(tc.dc, tc.variant); got != tc.want {
			t.Errorf("variants %v, case %s, %s: runs %t, want %t", tc.b.opts.Variants, caseLabel(tc.dc), tc.variant, got, tc.want)
		}
	}
}

// relayBin returns the outbox-relay binary: $OUTBOX_RELAY_BIN, else one built for the test.
func relayBin(t *testing.T) string {
	t.Helper()
	if bin := os.Getenv("OUTBOX_RELAY_BIN"); bin != "" {
		return bin
	}
	bin := filepath.Join(t.TempDir(), "outbox-relay")
	cmd := exec.Command("go", "build", "-o", bin, "./cmd/outbox-relay")
	cmd.Dir = ".."
	if out, err := cmd.CombinedOutput(); err != nil {
		t.Fatalf("build outbox-relay: %v\n%s", err, out)
	}
	return bin
}

// TestTail runs the tail runs once at the smoke size: every variant at both loads, each event
// received by the consumer process, and the host's CPU shares measured.
func TestTail(t *testing.T) {
	dbtest.Pool(t)
	opts, res, logs := runBench(t, 10*time.Minute, "-scale", "smoke", "-only", "steady", "-tail", "1", "-no-settle", "-broker-log", t.TempDir())
	if res.Steady == nil || len(res.Steady.Tail) != len(tailVariants)*len(tailCases) {
		t.Fatalf("tail runs: %+v, want %d\n%s", res.Steady, len(tailVariants)*len(tailCases), logs)
	}
	for _, r := range res.Steady.Tail {
		if r.Events == 0 || r.Consumed != r.Events {
			t.Errorf("%s at %.0f/s: %d events acknowledged, %d consumed", r.Variant, r.OfferedPerSec, r.Events, r.Consumed)
		}
		if r.RunCPUShare <= 0 || r.RunCPUShare > 1 || r.OtherCPUShare < 0 || r.OtherCPUShare+r.RunCPUShare > 1.001 {
			t.Errorf("%s at %.0f/s: CPU shares run %.3f other %.3f", r.Variant, r.OfferedPerSec, r.RunCPUShare, r.OtherCPUShare)
		}
	}
	tables, err := os.ReadFile(filepath.Join(opts.Out, "tables.md"))
	if err != nil {
		t.Fatal(err)
	}
	if !strings.Contains(string(tables), "### Tail latency") {
		t.Errorf("tables.md has no tail table:\n%s", tables)
	}
}

// TestCPUShares: the other processes' share is the busy time the run's processes and sessions
// did not use; a session that opened during the run counts whole.
func TestCPUShares(t *testing.T) {
	before := cpuSample{total: 1000, busy: 400, procs: 100, sessions: map[int]float64{7: 50}}
	after := cpuSample{total: 2000, busy: 1300, procs: 300, sessions: map[int]float64{7: 150, 9: 100}}
	other, run := after.shares(before)
	if run != 0.4 || other != 0.5 {
		t.Errorf("shares: other %.3f run %.3f, want 0.5 and 0.4", other, run)
	}
	if total, busy := procStat(); total <= 0 || busy < 0 || busy > total {
		t.Errorf("procStat: total %.0f busy %.0f", total, busy)
	}
	s := []float64{1, 2, 5, 5, 6}
	if got := shareAtMost(s, 5); got != 0.8 {
		t.Errorf("shareAtMost 5: %.2f, want 0.8", got)
	}
}

// TestRSSReadsAgain: rss reads /proc/self/statm from its one open file anew each time, so it
// sees memory the process touched since the last read.
func TestRSSReadsAgain(t *testing.T) {
	before := rss()
	b := make([]byte, 64<<20)
	for i := 0; i < len(b); i += 4096 {
		b[i] = 1
	}
	after := rss()
	runtime.KeepAlive(b)
	if before <= 0 || after < before+32<<20 {
		t.Errorf("rss: %d bytes before touching 64 MiB, %d after; want at least 32 MiB more", before, after)
	}
}
