package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"math"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strings"
	"time"

	"github.com/jackc/pgx/v5"
)

// The sidecar section measures what a relay costs beside a service at a low rate (issue 21,
// items 2 and 3): 1,000 events a second, one event per transaction, in several runs, each
// followed by a bare franz-go producer that hands its records over at the cadence of the relay's
// own claims in that run. The producer is the same-run baseline: what publishing alone costs on
// this host at that cadence, which no way of reading the outbox can save. Then the real binary,
// idle over an empty outbox. The targets (relay CPU ≤ 1.0 s and its database sessions' ≤ 0.5 s
// per 10k events, p99 ≤ 5 ms, idle ≤ 10 s an hour) are absolute; the producer's figure beside
// them says how much of a miss is the host's.

// sidecarRate is the offered rate of the sidecar section's runs, events per second.
const sidecarRate = 1000

// sidecarResults is the sidecar section.
type sidecarResults struct {
	Runs  []latencyResult `json:"runs"`  // the relay at sidecarRate, one per run
	Floor []floorResult   `json:"floor"` // after each run, the bare producer at that run's cadence
	Idle  *idleResult     `json:"idle,omitempty"`
}

// idleResult is the real binary's cost over an empty outbox: the relay process and its database
// sessions (their server backends), over Seconds after it led the outbox and warmed up.
type idleResult struct {
	Seconds         float64 `json:"seconds"`
	RelayCPUPerHour float64 `json:"relay_cpu_s_per_hour"`
	DBCPUPerHour    float64 `json:"db_cpu_s_per_hour"`
	Sessions        int     `json:"sessions"` // the backends counted
	Error           string  `json:"error,omitempty"`
}

// sidecar runs the sidecar section.
func (b *bench) sidecar(ctx context.Context) error {
	schema, err := b.schema(ctx, "sidecar")
	if err != nil {
		return err
	}
	defer b.dropSchema(schema)
	br, err := b.startBroker(ctx)
	if err != nil {
		return err
	}
	defer br.close()
	relay, err := b.latencyRelay(ctx, schema, br, childConfig{})
	if err != nil {
		return err
	}
	defer func() { _ = relay.stop() }()
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return err
	}
	defer w.close()
	if err := b.setTrigger(ctx, schema, true); err != nil {
		return err
	}
	heard, stopListen, err := b.countNotifications(ctx, schema)
	if err != nil {
		return err
	}
	defer stopListen()
	res := &sidecarResults{}
	b.res.Sidecar = res
	for i := range b.opts.Scale.SidecarRuns {
		c0, h0 := w.committed.Load(), heard.Load()
		lr, err := b.latencyRun(ctx, w, relay, "notify", sidecarRate)
		if err != nil {
			return fmt.Errorf("run %d: %w", i, err)
		}
		if n := w.committed.Load() - c0; n > 0 {
			lr.NotifiesPerTx = round3(float64(heard.Load()-h0) / float64(n))
		}
		lr.Run, lr.LoadAvg = i, loadAvg()
		res.Runs = append(res.Runs, lr)
		every := claimCadence(lr.ClaimsPerEvent, sidecarRate)
		b.log.Printf("sidecar run %d at %d/s (written %.0f/s): p50 %.2f ms p99 %.2f ms; relay cpu %.1f ms/10k, its database sessions %.1f; %.2f claims per event (%.2f empty; one every %s); %.3f notifications per commit; load average %.1f",
			i, sidecarRate, lr.WrittenPerSec, lr.P50, lr.P99, lr.CPUMsPer10k, lr.DBCPUMsPer10k, lr.ClaimsPerEvent, lr.EmptyClaimsPerEvent, every, lr.NotifiesPerTx, lr.LoadAvg)
		if every == 0 {
			continue
		}
		fr, err := b.produceFloor(ctx, br, sidecarRate, every)
		if err != nil {
			return fmt.Errorf("run %d: produce floor every %s: %w", i, every, err)
		}
		fr.Run = i
		res.Floor = append(res.Floor, fr)
		b.log.Printf("sidecar run %d: a bare producer handing over every %s: cpu %.1f ms/10k (the relay %.2fx), produce-to-ack p99 %.2f ms",
			i, every, fr.CPUMsPer10k, lr.CPUMsPer10k/fr.CPUMsPer10k, fr.P99)
	}
	if err := relay.stop(); err != nil {
		return err
	}
	idle := b.idle(ctx, br)
	res.Idle = &idle
	if idle.Error != "" {
		return fmt.Errorf("idle: %s", idle.Error)
	}
	b.log.Printf("sidecar idle for %.0f s: relay %.2f s of CPU an hour, its %d database sessions %.2f",
		idle.Seconds, idle.RelayCPUPerHour, idle.Sessions, idle.DBCPUPerHour)
	return nil
}

// claimCadence is how often a relay that made claimsPerEvent claims per event at rate events/s
// claimed, rounded to 0.1 ms: the cadence its produce requests followed. Zero when it made none.
func claimCadence(claimsPerEvent, rate float64) time.Duration {
	if claimsPerEvent <= 0 || rate <= 0 {
		return 0
	}
	d := time.Duration(float64(time.Second) / (claimsPerEvent * rate))
	d = d.Round(100 * time.Microsecond)
	return min(max(d, time.Millisecond), time.Second) // the range -produce-floor accepts
}

// idle runs the real binary (-relay-bin) over an empty outbox of its own on br, with its default
// settings, and measures its CPU and its database sessions' over the scale's idle window, from
// IdleWarm after it led the outbox.
func (b *bench) idle(ctx context.Context, br *broker) (res idleResult) {
	fail := func(err error) idleResult { res.Error = err.Error(); return res }
	bin, err := filepath.Abs(b.opts.RelayBin)
	if err != nil {
		return fail(err)
	}
	if _, err := os.Stat(bin); err != nil {
		return fail(fmt.Errorf("-relay-bin: %w (make build writes bin/outbox-relay)", err))
	}
	schema, err := b.schema(ctx, "idle")
	if err != nil {
		return fail(err)
	}
	defer b.dropSchema(schema)
	app := fmt.Sprintf("outbox-relay-bench-idle-%d", os.Getpid())
	cmd := exec.CommandContext(ctx, bin, "run")
	// PGAPPNAME names its sessions (the driver reads it), whatever form the URL has.
	cmd.Env = append(os.Environ(), "PGAPPNAME="+app, "OUTBOX_DATABASE_URL="+b.opts.DatabaseURL, "OUTBOX_DATABASE_SCHEMA="+schema,
		"OUTBOX_KAFKA_BROKERS="+strings.Join(br.addrs, ","), "OUTBOX_HTTP_ADDR=127.0.0.1:0")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		return fail(err)
	}
	if err := cmd.Start(); err != nil {
		return fail(err)
	}
	exited := make(chan struct{}) // closed once the process was waited for, with waitErr
	var waitErr error
	defer func() {
		_ = cmd.Process.Signal(os.Interrupt)
		select {
		case <-exited:
		case <-time.After(30 * time.Second):
			_ = cmd.Process.Kill()
			<-exited
		}
	}()
	led := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			if !once && strings.Contains(sc.Text(), "leadership gained") {
				once = true
				close(led)
			}
		}
		_, _ = io.Copy(io.Discard, stderr)
		waitErr = cmd.Wait()
		close(exited)
	}()
	select {
	case <-led:
	case <-exited:
		return fail(fmt.Errorf("outbox-relay exited before it led the outbox: %v", waitErr))
	case <-time.After(60 * time.Second):
		return fail(fmt.Errorf("outbox-relay led no outbox within 60s"))
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	select {
	case <-time.After(b.opts.Scale.IdleWarm):
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	sessions := func() ([]int, error) {
		rows, err := b.pool.Query(ctx, `SELECT pid FROM pg_stat_activity WHERE application_name LIKE $1 || '%'`, app)
		if err != nil {
			return nil, err
		}
		pids, err := pgx.CollectRows(rows, pgx.RowTo[int32])
		out := make([]int, len(pids))
		for i, p := range pids {
			out[i] = int(p)
		}
		return out, err
	}
	pid := cmd.Process.Pid
	before, err := sessions()
	if err != nil {
		return fail(err)
	}
	start := time.Now()
	relay0 := procCPU(pid)
	db0 := make(map[int]float64, len(before))
	for _, p := range before {
		db0[p] = procCPU(p)
	}
	select {
	case <-time.After(b.opts.Scale.IdleRun):
	case <-exited:
		return fail(fmt.Errorf("outbox-relay exited while idle: %v", waitErr))
	case <-ctx.Done():
		return fail(ctx.Err())
	}
	relay1 := procCPU(pid)
	after, err := sessions()
	if err != nil {
		return fail(err)
	}
	res.Seconds = time.Since(start).Seconds()
	var db float64
	// A session opened during the window (the mark connection opens at the first heartbeat) counts
	// whole; one that closed in it is lost with its process, and is rare enough to ignore.
	for _, p := range after {
		db += procCPU(p) - db0[p]
	}
	res.Sessions = len(after)
	if len(after) == 0 || !slices.ContainsFunc(after, func(p int) bool { return slices.Contains(before, p) }) {
		return fail(fmt.Errorf("no database session of the relay (application_name %s) lasted the window", app))
	}
	res.RelayCPUPerHour = math.Round((relay1-relay0)*3600/res.Seconds*100) / 100
	res.DBCPUPerHour = math.Round(db*3600/res.Seconds*100) / 100
	return res
}
