package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
)

// outboxCounts are the numbers of outboxes one relay process serves in the outboxes section.
var outboxCounts = []int{1, 4, 16}

// outboxesResult is one drain of the outboxes section: the same total backlog (256 B events, 100
// keys) spread over n outbox tables, drained by one 'outbox-relay run' process serving them all
// (a configuration file listing n outboxes).
type outboxesResult struct {
	Outboxes     int     `json:"outboxes"`
	Events       int64   `json:"events"`
	StartSec     float64 `json:"start_sec"` // from the process's start until it led every outbox
	WallSec      float64 `json:"wall_sec"`  // from its first leadership until every table was empty
	EventsPerSec float64 `json:"events_per_sec"`
	CPUSec       float64 `json:"cpu_sec"` // user+system CPU of the relay process during the drain
	CPUMsPer10k  float64 `json:"cpu_ms_per_10k"`
	PeakRSS      int64   `json:"peak_rss_bytes"` // highest RSS sampled every 20ms from start to drained
	IdleRSS      int64   `json:"idle_rss_bytes"` // RSS at its first leadership: every outbox connected
	Error        string  `json:"error,omitempty"`
}

// outboxes drains the same backlog from 1, 4 and 16 outboxes served by one relay process: the
// built binary (-relay-bin), as deployed, with its metrics and probes.
func (b *bench) outboxes(ctx context.Context) error {
	bin, err := filepath.Abs(b.opts.RelayBin)
	if err != nil {
		return err
	}
	if _, err := os.Stat(bin); err != nil {
		return fmt.Errorf("-relay-bin: %w (make build writes bin/outbox-relay)", err)
	}
	for _, n := range outboxCounts {
		if ctx.Err() != nil {
			return ctx.Err()
		}
		r := b.outboxesRun(ctx, bin, n, b.opts.Scale.DrainSmall)
		b.res.Outboxes = append(b.res.Outboxes, r)
		if r.Error != "" {
			b.log.Printf("outboxes %2d: %s", n, r.Error)
			continue
		}
		b.log.Printf("outboxes %2d: %8d events in %.2fs: %8.0f ev/s  cpu ms/10k %6.1f  rss at start %5.1f MiB, peak %5.1f MiB (led all %.2fs after its start)",
			n, r.Events, r.WallSec, r.EventsPerSec, r.CPUMsPer10k, mib(r.IdleRSS), mib(r.PeakRSS), r.StartSec)
	}
	return nil
}

func (b *bench) outboxesRun(ctx context.Context, bin string, n int, events int64) (res outboxesResult) {
	res = outboxesResult{Outboxes: n, Events: events}
	fail := func(err error) outboxesResult { res.Error = err.Error(); return res }
	var schemas []string
	defer func() {
		for _, s := range schemas {
			b.dropSchema(s)
		}
	}()
	var yaml strings.Builder
	for i := range n {
		s, err := b.schema(ctx, fmt.Sprintf("ob%d_%d", n, i))
		if err != nil {
			return fail(err)
		}
		schemas = append(schemas, s)
		per := events / int64(n)
		if i < int(events%int64(n)) {
			per++
		}
		if err := b.preload(ctx, s, per, 256, 100); err != nil {
			return fail(err)
		}
		fmt.Fprintf(&yaml, "  - name: o%d\n    database: {schema: %s}\n", i, s)
	}
	br, err := b.startBroker(ctx)
	if err != nil {
		return fail(err)
	}
	defer br.close()
	dir, err := os.MkdirTemp("", "bench-outboxes-")
	if err != nil {
		return fail(err)
	}
	defer os.RemoveAll(dir)
	file := filepath.Join(dir, "relay.yaml")
	cfg := "kafka:\n  brokers: " + strings.Join(br.addrs, ",") + "\n  auto_create_topics: true\n" +
		"http:\n  addr: \"\"\nlog:\n  level: info\n  format: text\nrelay:\n  leader_retry_interval: 100ms\noutboxes:\n" + yaml.String()
	if err := os.WriteFile(file, []byte(cfg), 0o600); err != nil {
		return fail(err)
	}
	cmd := exec.CommandContext(ctx, bin, "run", "--config", file)
	cmd.Env = append(os.Environ(), "OUTBOX_DATABASE_URL="+b.opts.DatabaseURL)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return fail(err)
	}
	started := time.Now()
	if err := cmd.Start(); err != nil {
		return fail(err)
	}
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		done := make(chan struct{})
		go func() { _ = cmd.Wait(); close(done) }()
		select {
		case <-done:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-done
		}
	}()
	pid := cmd.Process.Pid
	// The relay's log says when each outbox's leadership is gained: the drain is timed from the
	// first (its claims follow it), so the outboxes led later count against the rate, and with
	// several outboxes the figure is a lower bound.
	firstLed := make(chan float64, 1)
	var allLed atomic.Int64 // unix nanoseconds
	go func() {
		sc := bufio.NewScanner(stderr)
		led := 0
		for sc.Scan() {
			if !strings.Contains(sc.Text(), `msg="leadership gained"`) {
				continue
			}
			if led++; led == 1 {
				firstLed <- procCPU(pid)
			}
			if led == n {
				allLed.Store(time.Now().UnixNano())
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
	}()
	var peak int64
	sample := func() {
		if r := procKB(fmt.Sprintf("/proc/%d/status", pid), "VmRSS"); r > peak {
			peak = r
		}
	}
	var cpu0 float64
	select {
	case cpu0 = <-firstLed:
	case <-time.After(60 * time.Second):
		return fail(fmt.Errorf("the relay led no outbox within 60s"))
	}
	led := time.Now()
	res.IdleRSS = procKB(fmt.Sprintf("/proc/%d/status", pid), "VmRSS")
	var counts []string
	for _, s := range schemas {
		counts = append(counts, `(SELECT count(*) FROM `+pgx.Identifier{s, "outbox"}.Sanitize()+`)`)
	}
	q := `SELECT ` + strings.Join(counts, " + ")
	deadline := time.Now().Add(time.Duration(events/500+120) * time.Second)
	for {
		sample()
		var left int64
		if err := b.pool.QueryRow(ctx, q).Scan(&left); err != nil {
			return fail(err)
		}
		if left == 0 {
			break
		}
		if time.Now().After(deadline) {
			return fail(fmt.Errorf("%d rows left after %s", left, time.Since(led).Round(time.Second)))
		}
		time.Sleep(20 * time.Millisecond)
	}
	res.WallSec = time.Since(led).Seconds()
	res.CPUSec = procCPU(pid) - cpu0
	res.EventsPerSec = float64(events) / res.WallSec
	res.CPUMsPer10k = res.CPUSec * 1000 / (float64(events) / 1e4)
	res.PeakRSS = peak
	if at := allLed.Load(); at != 0 {
		res.StartSec = time.Unix(0, at).Sub(started).Seconds()
	}
	return res
}
