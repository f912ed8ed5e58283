//go:build !benchchild

package main

import (
	"fmt"
	"path/filepath"
	"slices"

	"gonum.org/v1/plot"
	"gonum.org/v1/plot/plotter"
	"gonum.org/v1/plot/plotutil"
	"gonum.org/v1/plot/vg"
)

// charts draws the PNG charts of the results into the output directory.
func (b *bench) charts() error {
	if len(b.res.Drain) > 0 {
		if err := b.drainChart(filepath.Join(b.opts.Out, "drain-throughput.png")); err != nil {
			return err
		}
		if err := b.ratioChart(filepath.Join(b.opts.Out, "drain-ratios.png")); err != nil {
			return err
		}
	}
	if b.res.Steady != nil && len(b.res.Steady.Latency) > 0 {
		if err := b.latencyChart(filepath.Join(b.opts.Out, "latency.png")); err != nil {
			return err
		}
	}
	if len(b.res.Health) > 0 {
		if err := b.healthChart(filepath.Join(b.opts.Out, "table-health.png")); err != nil {
			return err
		}
	}
	return nil
}

// drainChart: events/s of every variant, grouped by case.
func (b *bench) drainChart(path string) error {
	p := plot.New()
	p.Title.Text = "Drain of a preloaded backlog (median of the runs; higher is better)"
	p.Y.Label.Text = "events/s"
	var names []string
	for _, dc := range b.opts.Scale.Matrix {
		names = append(names, caseLabel(dc))
	}
	w := vg.Points(9)
	top := 0.0
	sums := b.drainSummaries()
	// The relay with a feature on is left out: its cost is in the tables, beside the relay's.
	shown := slices.DeleteFunc(slices.Clone(drainVariants), func(v string) bool { return slices.Contains(featureVariants, v) })
	for i, v := range shown {
		vals := make(plotter.Values, len(b.opts.Scale.Matrix))
		for j, dc := range b.opts.Scale.Matrix {
			for _, d := range sums {
				if d.drainCase == dc && d.Variant == v {
					vals[j] = d.EventsPerSec
					top = max(top, d.EventsPerSec)
				}
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i)
		bars.Offset = w * vg.Length(float64(i)-float64(len(shown)-1)/2)
		p.Add(bars)
		p.Legend.Add(v, bars)
	}
	return saveCaseChart(p, names, top*1.25, path)
}

// ratioChart: the relay's drain rate divided by each baseline's, per case, with the targets.
func (b *bench) ratioChart(path string) error {
	p := plot.New()
	p.Title.Text = "Relay drain rate / baseline drain rate (targets: 1.5x naive, 0.6x SQL-only)"
	p.Y.Label.Text = "ratio"
	var names []string
	for _, dc := range b.opts.Scale.Matrix {
		names = append(names, caseLabel(dc))
	}
	rate := func(dc drainCase, v string) float64 {
		if s, ok := summarize(b.res.Drain, dc, v); ok {
			return s.EventsPerSec
		}
		return 0
	}
	w := vg.Points(10)
	bases := []string{variantNaive, variantSQLOnly, variantProduce}
	top := 1.5
	for i, base := range bases {
		vals := make(plotter.Values, len(b.opts.Scale.Matrix))
		for j, dc := range b.opts.Scale.Matrix {
			if r := rate(dc, base); r > 0 {
				vals[j] = rate(dc, variantRelay) / r
				top = max(top, vals[j])
			}
		}
		bars, err := plotter.NewBarChart(vals, w)
		if err != nil {
			return err
		}
		bars.LineStyle.Width = 0
		bars.Color = plotutil.Color(i + 1)
		bars.Offset = w * vg.Length(float64(i)-float64(len(bases)-1)/2)
		p.Add(bars)
		p.Legend.Add("relay / "+base, bars)
	}
	for _, target := range []float64{1.5, 0.6, 1} {
		line, err := plotter.NewLine(plotter.XYs{{X: -0.5, Y: target}, {X: float64(len(names)) - 0.5, Y: target}})
		if err != nil {
			return err
		}
		line.Dashes = []vg.Length{vg.Points(4), vg.Points(3)}
		p.Add(line)
	}
	return saveCaseChart(p, names, top*1.3, path)
}

// latencyChart: commit-to-ack latency by percentile, one line per run, log scale.
func (b *bench) latencyChart(path string) error {
	p := plot.New()
	p.Title.Text = "Commit-to-ack latency (lower is better)"
	p.X.Label.Text = "percentile"
	p.Y.Label.Text = "ms (log scale)"
	p.Y.Scale = plot.LogScale{}
	p.Y.Tick.Marker = plot.LogTicks{Prec: -1}
	for i, l := range b.res.Steady.Latency {
		var pts plotter.XYs
		switch {
		case len(l.samples) > 0:
			for q := 0.0; q <= 99.9; q += 0.1 {
				pts = append(pts, plotter.XY{X: q, Y: max(quantile(l.samples, q/100), 0.01)})
			}
		case len(l.CDF) > 0: // redrawn from results.json: the percentiles only
			for q, v := range l.CDF {
				pts = append(pts, plotter.XY{X: float64(q + 1), Y: max(v, 0.01)})
			}
		default:
			continue
		}
		line, err := plotter.NewLine(pts)
		if err != nil {
			return err
		}
		line.Color = plotutil.Color(i)
		line.Dashes = plotutil.Dashes(i)
		line.Width = vg.Points(1.5)
		p.Add(line)
		p.Legend.Add(fmt.Sprintf("%s, %.0f ev/s", map[string]string{"notify": "NOTIFY wake-up", "poll": "polling every 500 ms",
			"poll-fast": "polling every 50 ms"}[l.Mode],
			l.OfferedPerSec), line)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	return p.Save(7*vg.Inch, 5*vg.Inch, path)
}

// healthChart: table and index size against events written, per mark mode.
func (b *bench) healthChart(path string) error {
	p := plot.New()
	p.Title.Text = "Outbox size while events flow through the relay"
	p.X.Label.Text = "events written"
	p.Y.Label.Text = "table + indexes, MiB"
	for i, h := range b.res.Health {
		var pts plotter.XYs
		for _, s := range h.Samples {
			pts = append(pts, plotter.XY{X: float64(s.Events), Y: mib(s.TableBytes + s.IndexBytes)})
		}
		line, points, err := plotter.NewLinePoints(pts)
		if err != nil {
			return err
		}
		line.Color, points.Color = plotutil.Color(i), plotutil.Color(i)
		points.Shape = plotutil.Shape(i)
		p.Add(line, points)
		label := h.Mode + " mode"
		if h.Retention != "" {
			label += ", retention " + h.Retention
		}
		p.Legend.Add(label, line, points)
	}
	p.Legend.Top = true
	p.Legend.Left = true
	p.Add(plotter.NewGrid())
	return p.Save(7*vg.Inch, 4.5*vg.Inch, path)
}

// saveCaseChart finishes a bar chart with one group per drain case (names) and saves it: the
// y axis up to yMax (room for the legend above the bars), slanted case names, a grid.
func saveCaseChart(p *plot.Plot, names []string, yMax float64, path string) error {
	p.Y.Min, p.Y.Max = 0, yMax
	p.Legend.Top = true
	p.NominalX(names...)
	p.X.Tick.Label.Rotation = 0.5
	p.X.Tick.Label.XAlign = -1
	p.X.Tick.Label.YAlign = -0.5
	p.Add(plotter.NewGrid())
	return p.Save(vg.Length(max(len(names), 3))*1.6*vg.Inch, 5*vg.Inch, path)
}
