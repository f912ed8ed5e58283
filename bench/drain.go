package main

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strconv"
	"time"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// Drain variants, in the order they run for each case.
const (
	variantProduce = "produce-only"
	variantSQLOnly = "sql-only"
	variantNaive   = "naive"
	variantRelay   = "relay"
)

var drainVariants = []string{variantProduce, variantSQLOnly, variantNaive, variantRelay}

// drainResult is one drain of a preloaded backlog.
type drainResult struct {
	drainCase
	Variant      string  `json:"variant"`
	WallSec      float64 `json:"wall_sec"`
	EventsPerSec float64 `json:"events_per_sec"`
	CPUSec       float64 `json:"cpu_sec"`        // user+system CPU of the measured process during the drain
	CPUMsPer10k  float64 `json:"cpu_ms_per_10k"` // CPUSec per 10k events, in milliseconds
	// The CPU of the other parties: the variant's PostgreSQL backends and the broker process.
	DBCPUMsPer10k     float64     `json:"db_cpu_ms_per_10k"`
	BrokerCPUMsPer10k float64     `json:"broker_cpu_ms_per_10k"`
	TotalCPUMsPer10k  float64     `json:"total_cpu_ms_per_10k"`
	PeakRSS           int64       `json:"peak_rss_bytes"` // highest RSS sampled every 20ms during the drain
	HWM               int64       `json:"vm_hwm_bytes"`   // the process's lifetime RSS peak (VmHWM)
	PreloadSec        float64     `json:"preload_sec,omitempty"`
	Error             string      `json:"error,omitempty"`
	Relay             *relayStats `json:"relay_stats,omitempty"` // the relay's claims and marks
}

// drain measures every case of the matrix with every variant.
func (b *bench) drain(ctx context.Context) error {
	for _, dc := range b.opts.Scale.Matrix {
		for _, v := range drainVariants {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			profile := ""
			if b.opts.Profile && v == variantRelay && dc.Payload == b.profilePayload() && dc.Keys == 100 {
				profile, _ = filepath.Abs(filepath.Join(b.opts.Out, "relay-cpu.pprof"))
			}
			r := b.drainOne(ctx, dc, v, childConfig{Mark: postgres.MarkDelete, Profile: profile})
			b.res.Drain = append(b.res.Drain, r)
			if r.Error != "" {
				b.log.Printf("drain %s %dB %d keys: %s", v, dc.Payload, dc.Keys, r.Error)
			} else {
				b.log.Printf("drain %-12s %5dB %5d keys %8d events: %8.0f ev/s  cpu ms/10k: own %6.1f db %6.1f broker %6.1f  rss %5.1f MiB",
					v, dc.Payload, dc.Keys, dc.Events, r.EventsPerSec, r.CPUMsPer10k, r.DBCPUMsPer10k, r.BrokerCPUMsPer10k, mib(r.PeakRSS))
			}
		}
	}
	return nil
}

// drainOne runs one variant on a fresh broker and a freshly preloaded outbox. cfg carries the
// variant's extra settings.
func (b *bench) drainOne(ctx context.Context, dc drainCase, variant string, cfg childConfig) drainResult {
	r := drainResult{drainCase: dc, Variant: variant}
	rep, broker, preload, err := b.drainRun(ctx, dc, variant, cfg)
	if err != nil {
		r.Error = err.Error()
		return r
	}
	r.PreloadSec = preload.Seconds()
	r.WallSec = rep.WallSec
	r.EventsPerSec = float64(rep.Events) / rep.WallSec
	r.CPUSec = rep.CPUUserSec + rep.CPUSysSec
	per10k := func(sec float64) float64 { return sec * 1000 / (float64(rep.Events) / 10000) }
	r.CPUMsPer10k = per10k(r.CPUSec)
	r.DBCPUMsPer10k = per10k(rep.DBCPUSec)
	r.BrokerCPUMsPer10k = per10k(broker)
	r.TotalCPUMsPer10k = r.CPUMsPer10k + r.DBCPUMsPer10k + r.BrokerCPUMsPer10k
	r.PeakRSS = rep.PeakRSS
	r.HWM = rep.HWM
	r.Relay = rep.Relay
	return r
}

func (b *bench) drainRun(ctx context.Context, dc drainCase, variant string, cfg childConfig) (childReport, float64, time.Duration, error) {
	cfg.Expect = dc.Events
	cfg.DatabaseURL = b.opts.DatabaseURL
	var preload time.Duration
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
	default:
		return childReport{}, 0, 0, fmt.Errorf("unknown variant %q", variant)
	}
	if variant != variantProduce {
		schema, err := b.schema(ctx, "drain")
		if err != nil {
			return childReport{}, 0, 0, err
		}
		defer b.dropSchema(schema)
		start := time.Now()
		if err := b.preload(ctx, schema, dc.Events, dc.Payload, dc.Keys); err != nil {
			return childReport{}, 0, 0, err
		}
		preload = time.Since(start)
		cfg.Schema = schema
	}
	var br *broker
	if variant != variantSQLOnly {
		var err error
		br, err = b.startBroker(ctx)
		if err != nil {
			return childReport{}, 0, 0, err
		}
		defer br.close()
		cfg.Brokers = br.addrs
	}
	p, err := b.start(ctx, cfg)
	if err != nil {
		return childReport{}, 0, 0, err
	}
	defer func() { _ = p.stop() }()
	var broker0 float64
	if br != nil {
		broker0 = br.p.cpu()
	}
	if err := p.send("go"); err != nil {
		return childReport{}, 0, 0, err
	}
	// Generous: a drain slower than 500 events/s is broken, not slow.
	rep, err := p.report(ctx, time.Duration(dc.Events/500+120)*time.Second)
	if err != nil {
		return childReport{}, 0, 0, err
	}
	var brokerCPU float64
	if br != nil {
		brokerCPU = br.p.cpu() - broker0
	}
	if rep.Events < dc.Events {
		return rep, 0, 0, fmt.Errorf("%s reported %d events, want %d", variant, rep.Events, dc.Events)
	}
	return rep, brokerCPU, preload, nil
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
