package main

import (
	"context"
	"fmt"
	"io"
	"slices"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// featureRate is the offered rate of the features section's latency runs, events/s.
const featureRate = 1000

// featureLatency is one latency run of the features section: the relay of one variant (the
// default, or one feature on) at featureRate with the NOTIFY wake-up.
type featureLatency struct {
	latencyResult
	Variant string `json:"variant"`
	Run     int    `json:"run"` // 1 to -repeat
}

// features measures commit-to-ack latency with the default relay and with each feature variant
// beside it (CloudEvents, tracing with every span sampled, tracing with one in ten): -repeat
// rounds in alternating order, a fresh relay for each run, the same writers, table and broker.
func (b *bench) features(ctx context.Context) error {
	schema, err := b.schema(ctx, "features")
	if err != nil {
		return err
	}
	defer b.dropSchema(schema)
	br, err := b.startBroker(ctx)
	if err != nil {
		return err
	}
	defer br.close()
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return err
	}
	defer w.close()
	variants := append([]string{variantRelay}, featureVariants...)
	for run := 1; run <= max(1, b.opts.Repeat); run++ {
		order := slices.Clone(variants)
		if run%2 == 0 {
			slices.Reverse(order)
		}
		for _, v := range order {
			if ctx.Err() != nil {
				return ctx.Err()
			}
			lr, err := b.featureRun(ctx, w, br, schema, v)
			if err != nil {
				return err
			}
			b.res.Features = append(b.res.Features, featureLatency{latencyResult: lr, Variant: v, Run: run})
			spans := ""
			if st := lr.Spans; st != nil {
				spans = fmt.Sprintf("; spans sampled %d, exported %d, failed %d", st.Sampled, st.Exported, st.Failed)
			}
			b.log.Printf("features %-17s run %d at %d/s: p50 %.2f ms p99 %.2f ms p99.9 %.2f ms max %.2f ms; %d events, relay cpu %.1f ms/10k%s",
				v, run, featureRate, lr.P50, lr.P99, lr.P999, lr.Max, lr.Events, lr.CPUMsPer10k, spans)
		}
	}
	return nil
}

// featureRun starts a relay of variant on the section's table, measures one latency run, and
// stops it.
func (b *bench) featureRun(ctx context.Context, w *writers, br *broker, schema, variant string) (latencyResult, error) {
	cfg := childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema, Brokers: br.addrs,
		Mark: postgres.MarkDelete, Latency: true}
	if err := b.feature(&cfg, variant); err != nil {
		return latencyResult{}, err
	}
	relay, err := b.start(ctx, cfg)
	if err != nil {
		return latencyResult{}, err
	}
	defer func() { _ = relay.stop() }()
	// Every row committed so far was marked by the relays before this one.
	relay.offset = w.committed.Load()
	relay.progress.Store(relay.offset)
	if err := relay.send("go"); err != nil {
		return latencyResult{}, err
	}
	lr, err := b.latencyRun(ctx, w, relay, "notify", featureRate)
	if err != nil {
		return lr, err
	}
	return lr, relay.stop()
}

// featureTables writes the section "cost of the ecosystem features": the feature variants' drains
// beside the default relay's, and their latency runs.
func (b *bench) featureTables(w io.Writer) {
	sums := b.drainSummaries()
	has := func(v string) bool { return slices.Contains(featureVariants, v) }
	if !slices.ContainsFunc(sums, func(d drainSummary) bool { return has(d.Variant) }) && len(b.res.Features) == 0 {
		return
	}
	fmt.Fprintln(w, "### Cost of the ecosystem features")
	fmt.Fprintln(w)
	if slices.ContainsFunc(sums, func(d drainSummary) bool { return has(d.Variant) }) {
		fmt.Fprintln(w, "Drains with one feature on, beside the default relay of the same run (medians; the range is the lowest and highest events/s; spans / event: those the sampler kept, in the run of median rate).")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| payload, keys | variant | runs | events/s | range | vs relay | relay CPU ms / 10k | vs relay | all CPU ms / 10k | peak RSS MiB | spans / event |")
		fmt.Fprintln(w, "|---|---|---:|---:|---|---:|---:|---:|---:|---:|---:|")
		for _, dc := range b.opts.Scale.Matrix {
			var base *drainSummary
			for i := range sums {
				if sums[i].drainCase == dc && sums[i].Variant == variantRelay && sums[i].Error == "" {
					base = &sums[i]
				}
			}
			for _, d := range sums {
				if d.drainCase != dc || (d.Variant != variantRelay && !has(d.Variant)) {
					continue
				}
				if d.Error != "" {
					fmt.Fprintf(w, "| %s | %s | %d | error: %s | | | | | | | |\n", caseLabel(dc), d.Variant, d.Runs, d.Error)
					continue
				}
				vsRate, vsCPU := "", ""
				if base != nil && d.Variant != variantRelay {
					vsRate, vsCPU = ratio(d.EventsPerSec, base.EventsPerSec), ratio(d.CPUMsPer10k, base.CPUMsPer10k)
				}
				spread, spans := "", ""
				if d.Runs-d.Failed > 1 {
					spread = fmt.Sprintf("%.0f–%.0f", d.MinPerSec, d.MaxPerSec)
				}
				if d.Spans != nil && d.Events > 0 {
					spans = fmt.Sprintf("%.2f", float64(d.Spans.Sampled)/float64(d.Events))
				}
				fmt.Fprintf(w, "| %s | %s | %d | %.0f | %s | %s | %.1f | %s | %.1f | %.1f | %s |\n", caseLabel(dc), d.Variant, d.Runs-d.Failed,
					d.EventsPerSec, spread, vsRate, d.CPUMsPer10k, vsCPU, d.TotalCPUMsPer10k, mib(max(d.PeakRSS, d.HWM)), spans)
			}
		}
		fmt.Fprintln(w)
	}
	if len(b.res.Features) > 0 {
		fmt.Fprintf(w, "Commit-to-ack latency at %d ev/s (8 writers, 256 B, 100 keys, NOTIFY wake-up), a fresh relay per run, the variants alternating; medians of the runs, with the lowest and highest.\n\n", featureRate)
		fmt.Fprintln(w, "| variant | runs | p50 ms | range | p99 ms | range | p99.9 ms | relay CPU ms / 10k | range | spans / event |")
		fmt.Fprintln(w, "|---|---:|---:|---|---:|---|---:|---:|---|---:|")
		for _, v := range append([]string{variantRelay}, featureVariants...) {
			var runs []featureLatency
			for _, f := range b.res.Features {
				if f.Variant == v {
					runs = append(runs, f)
				}
			}
			if len(runs) == 0 {
				continue
			}
			stat := func(get func(f featureLatency) float64) (med, lo, hi float64) {
				vals := make([]float64, len(runs))
				for i, f := range runs {
					vals[i] = get(f)
				}
				slices.Sort(vals)
				return medianOf(vals), vals[0], vals[len(vals)-1]
			}
			p50, p50lo, p50hi := stat(func(f featureLatency) float64 { return f.P50 })
			p99, p99lo, p99hi := stat(func(f featureLatency) float64 { return f.P99 })
			p999, _, _ := stat(func(f featureLatency) float64 { return f.P999 })
			cpu, cpulo, cpuhi := stat(func(f featureLatency) float64 { return f.CPUMsPer10k })
			spans := ""
			if runs[0].Spans != nil {
				sp, _, _ := stat(func(f featureLatency) float64 { return float64(f.Spans.Sampled) / float64(max(f.Events, 1)) })
				spans = fmt.Sprintf("%.2f", sp)
			}
			fmt.Fprintf(w, "| %s | %d | %.2f | %.2f–%.2f | %.2f | %.2f–%.2f | %.2f | %.1f | %.1f–%.1f | %s |\n", v, len(runs),
				p50, p50lo, p50hi, p99, p99lo, p99hi, p999, cpu, cpulo, cpuhi, spans)
		}
		fmt.Fprintln(w)
	}
}

// medianOf returns the median of sorted vals (the mean of the middle pair for an even count).
func medianOf(vals []float64) float64 {
	n := len(vals)
	if n == 0 {
		return 0
	}
	if n%2 == 0 {
		return (vals[n/2-1] + vals[n/2]) / 2
	}
	return vals[n/2]
}
