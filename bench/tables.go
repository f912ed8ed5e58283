package main

import (
	"fmt"
	"io"
	"os"
	"path/filepath"
	"slices"
	"strings"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// writeTables writes the results as Markdown tables (tables.md), for BENCHMARKS.md.
func (b *bench) writeTables() error {
	var sb strings.Builder
	b.tables(&sb)
	return os.WriteFile(filepath.Join(b.opts.Out, "tables.md"), []byte(sb.String()), 0o644)
}

// repeated reports whether some variant ran more than once.
func repeated(sums []drainSummary) bool {
	for _, d := range sums {
		if d.Runs > 1 {
			return true
		}
	}
	return false
}

func (b *bench) tables(w io.Writer) {
	r := b.res
	m := r.Machine
	log := "in memory"
	if r.BrokerLog == "" {
		log = "in memory (before -broker-log)"
	} else if r.BrokerLog != brokerLogMemory {
		log = "in files under " + r.BrokerLog
	}
	fmt.Fprintf(w, "Run of %s to %s, scale %s, %d partitions, broker log %s. Machine: %s, %d cores, %d MiB; %s; %s; Go %s; load average at start %s.\n\n",
		r.Started.Format("2006-01-02 15:04Z"), r.Finished.Format("15:04Z"), r.Scale, r.Partitions, log, m.CPU, m.Cores,
		m.MemoryMiB, m.Kernel, firstWords(m.Postgres, 2), m.Go, m.LoadAvg)

	if sums := b.drainSummaries(); len(sums) > 0 {
		fmt.Fprintln(w, "### Drain")
		fmt.Fprintln(w)
		if r.RelayMaxInFlightBytes > 0 {
			fmt.Fprintf(w, "The relay ran with `relay.max_in_flight_bytes` = %d (not its default).\n\n", r.RelayMaxInFlightBytes)
		}
		if r.DrainMark == postgres.MarkRetain {
			fmt.Fprintln(w, "The relay and the SQL-only baseline ran in retain mode (`relay.mark: retain`): a mark sets `dispatched_at` and the rows stay, for a purge that did not run during the drains; the naive loop deletes, as always.")
			fmt.Fprintln(w)
		}
		if b.opts.Repeat > 1 || repeated(sums) {
			fmt.Fprintln(w, "Each figure is the median of the variant's runs (the RSS: the highest of them); the range is the lowest and highest events/s.")
			fmt.Fprintln(w)
		}
		fmt.Fprintln(w, "| payload, keys | events | variant | runs | events/s | range | CPU ms / 10k: own | database | broker | all | peak RSS MiB | relay vs naive | relay vs SQL-only | relay vs produce-only | relay vs Watermill |")
		fmt.Fprintln(w, "|---|---:|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, dc := range b.opts.Scale.Matrix {
			rates := map[string]float64{}
			for _, d := range sums {
				if d.drainCase == dc && d.Error == "" {
					rates[d.Variant] = d.EventsPerSec
				}
			}
			for _, d := range sums {
				if d.drainCase != dc {
					continue
				}
				runs := fmt.Sprint(d.Runs)
				if d.Failed > 0 {
					runs = fmt.Sprintf("%d (%d failed)", d.Runs, d.Failed)
				}
				if d.Error != "" {
					fmt.Fprintf(w, "| %s | %d | %s | %s | error: %s | | | | | | | | | | |\n", caseLabel(dc), d.Events, d.Variant, runs, d.Error)
					continue
				}
				ratios := "| | | |"
				if d.Variant == variantRelay {
					ratios = fmt.Sprintf("%s | %s | %s | %s |", ratio(d.EventsPerSec, rates[variantNaive]),
						ratio(d.EventsPerSec, rates[variantSQLOnly]), ratio(d.EventsPerSec, rates[variantProduce]),
						ratio(d.EventsPerSec, rates[variantWatermill]))
				}
				spread := ""
				if d.Runs-d.Failed > 1 {
					spread = fmt.Sprintf("%.0f–%.0f", d.MinPerSec, d.MaxPerSec)
				}
				fmt.Fprintf(w, "| %s | %d | %s | %s | %.0f | %s | %.1f | %.1f | %.1f | %.1f | %.1f | %s\n", caseLabel(dc), d.Events, d.Variant,
					runs, d.EventsPerSec, spread, d.CPUMsPer10k, d.DBCPUMsPer10k, d.BrokerCPUMsPer10k, d.TotalCPUMsPer10k,
					mib(max(d.PeakRSS, d.HWM)), ratios)
			}
		}
		fmt.Fprintln(w)
		fmt.Fprintln(w, "Relay database time (from its observer, in the relay run of median rate): claims and marks, and how many rows a claim returned on average.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| payload, keys | wall s | claims | rows / claim | claim s | marks | rows / mark | mark s (beside the claims) |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|")
		for _, d := range sums {
			if d.Variant != variantRelay || d.Relay == nil {
				continue
			}
			s := d.Relay
			fmt.Fprintf(w, "| %s | %.1f | %d | %.0f | %.1f | %d | %.0f | %.1f |\n", caseLabel(d.drainCase), d.WallSec, s.Claims,
				float64(s.ClaimRows)/float64(max(s.Claims, 1)), s.ClaimSec, s.Marks, float64(d.Events)/float64(max(s.Marks, 1)), s.MarkSec)
		}
		fmt.Fprintln(w)
		if slices.ContainsFunc(sums, func(d drainSummary) bool { return d.Variant == variantRelayEO && d.Error == "" }) {
			b.exactlyOnceTable(w, sums)
		}
		if slices.ContainsFunc(sums, func(d drainSummary) bool { return d.WALBytesPer10k > 0 }) {
			fmt.Fprintln(w, "What the database wrote to its WAL during each drain, per 10k events (every session of the server, from the start of the drain until the variant stopped; medians of the runs), and how many of those WAL records were full-page images (a page logged whole at its first change after a checkpoint).")
			fmt.Fprintln(w)
			fmt.Fprintln(w, "| payload, keys | variant | WAL MiB / 10k events | full-page images / 10k events |")
			fmt.Fprintln(w, "|---|---|---:|---:|")
			for _, d := range sums {
				if d.Variant == variantProduce || d.WALBytesPer10k == 0 {
					continue
				}
				fmt.Fprintf(w, "| %s | %s | %.1f | %.0f |\n", caseLabel(d.drainCase), d.Variant, d.WALBytesPer10k/(1<<20), d.WALFPIPer10k)
			}
			fmt.Fprintln(w)
		}
	}

	if s := r.Steady; s != nil {
		fmt.Fprintln(w, "### Steady state (8 writers, one event per transaction)")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| wake-up | offered ev/s | writers committed ev/s | relay marked ev/s | lag start | lag end | lag max | lag slope ev/s² | flat |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---|")
		for _, st := range s.Steps {
			offered := fmt.Sprintf("%.0f", st.OfferedPerSec)
			if st.OfferedPerSec == 0 {
				offered = "flat out"
			}
			flat := fmt.Sprint(st.Flat)
			if st.WriterLimited {
				flat += " (writers below 90% of offered)"
			}
			mode := map[string]string{"notify": "NOTIFY", "poll": "polling (500 ms)"}[st.Mode]
			fmt.Fprintf(w, "| %s | %s | %.0f | %.0f | %d | %d | %d | %.0f | %s |\n", mode, offered, st.AchievedPerSec, st.RelayPerSec,
				st.LagStart, st.LagEnd, st.LagMax, st.LagSlope, flat)
		}
		fmt.Fprintf(w, "\nHighest rate with flat lag: %.0f ev/s with the NOTIFY wake-up", s.MaxFlatPerSec)
		if s.WriterMaxPerSec > 0 {
			fmt.Fprintf(w, " (the 8 writers flat out reach %.0f ev/s)", s.WriterMaxPerSec)
		}
		fmt.Fprintf(w, "; %.0f ev/s with polling alone", s.PollMaxFlatPerSec)
		if s.PollWriterMaxPerSec > 0 {
			fmt.Fprintf(w, " (writers flat out: %.0f ev/s)", s.PollWriterMaxPerSec)
		}
		fmt.Fprintln(w, ".")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| wake-up | offered ev/s | written ev/s | events | commit-to-ack p50 ms | p99 ms | p99.9 ms | max ms | insert-to-ack p50 ms | p99 ms | relay CPU ms / 10k |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, l := range s.Latency {
			mode := latencyModes[l.Mode]
			fmt.Fprintf(w, "| %s | %.0f | %.0f | %d | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.1f |\n", mode, l.OfferedPerSec, l.WrittenPerSec, l.Events,
				l.P50, l.P99, l.P999, l.Max, l.InsertP50, l.InsertP99, l.CPUMsPer10k)
		}
		fmt.Fprintln(w)
		fmt.Fprintln(w, "Where the time goes: commit to the relay handing the event to the producer (wake-up and claim), then to the broker's acknowledgement; and the relay's database round trips per event.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| wake-up | offered ev/s | commit-to-publish p50 ms | p99 ms | publish-to-ack p50 ms | p99 ms | claims / event | empty claims / event | marks / event |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, l := range s.Latency {
			mode := latencyModes[l.Mode]
			fmt.Fprintf(w, "| %s | %.0f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f | %.2f |\n", mode, l.OfferedPerSec,
				l.PublishP50, l.PublishP99, l.AckP50, l.AckP99, l.ClaimsPerEvent, l.EmptyClaimsPerEvent, l.MarksPerEvent)
		}
		fmt.Fprintln(w)
		tailTable(w, s.Tail)
	}

	sidecarTable(w, r.Sidecar)

	if ps := peerSummaries(r.Peers); len(ps) > 0 {
		fmt.Fprintf(w, "### Beside its peers at %d events/s (8 writers, one event per transaction)\n\n", peerRate)
		fmt.Fprintln(w, "Commit to acknowledgement: the relay's broker acknowledgement; the naive loop's ProduceSync returning; SQL-only's mark (it has no broker); Watermill's Kafka publisher returning in its forwarder. CPU per 10k events includes the idle time between events. Each figure is the median of the variant's runs; the range is the lowest and highest p99.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| variant | runs | written ev/s | commit-to-ack p50 ms | p99 ms | p99 range | p99.9 ms | max ms | CPU ms / 10k: own | database |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---|---:|---:|---:|---:|")
		for _, p := range ps {
			fmt.Fprintf(w, "| %s | %d | %.0f | %.2f | %.2f | %.2f–%.2f | %.2f | %.2f | %.0f | %.0f |\n", p.Variant, p.Runs, p.Rate,
				p.P50, p.P99, p.MinP99, p.MaxP99, p.P999, p.Max, p.CPUMsPer10k, p.DBCPUMsPer10k)
		}
		fmt.Fprintln(w)
	}
	b.featureTables(w)

	if wc := r.Write; wc != nil {
		fmt.Fprintln(w, "### Write-side cost (8 writers flat out, one event per transaction)")
		fmt.Fprintln(w)
		if len(wc.Medians) == 0 { // results written before the modes
			fmt.Fprintln(w, "| NOTIFY trigger | round | tx/s |")
			fmt.Fprintln(w, "|---|---:|---:|")
			for _, run := range wc.Runs {
				fmt.Fprintf(w, "| %s | %d | %.0f |\n", onOff(run.Notify), run.Round, run.TxPerSec)
			}
			fmt.Fprintf(w, "\nMedian: %.0f tx/s with the trigger, %.0f without: %.2fx.\n\n", wc.NotifyTxSec, wc.PollTxSec, wc.NotifyFactor)
		} else {
			fmt.Fprintln(w, "| mode | runs (tx/s) | median tx/s | notifications per commit | load average after each run |")
			fmt.Fprintln(w, "|---|---|---:|---|---|")
			for _, mode := range []string{writeOff, writeOffNoTx, writeAwake, writeNotifyAll, writeRelayOff, writeRelayOn, writeRelayPoll} {
				if mode == writeOffNoTx && wc.Medians[mode] == 0 {
					continue // results written before the mode
				}
				var runs, notes, loads []string
				for _, run := range wc.Runs {
					if run.Mode == mode {
						runs = append(runs, fmt.Sprintf("%.0f", run.TxPerSec))
						notes = append(notes, fmt.Sprintf("%.3f", run.NotifiesPerTx))
						loads = append(loads, fmt.Sprintf("%.1f", run.LoadAvg))
					}
				}
				fmt.Fprintf(w, "| %s | %s | %.0f | %s | %s |\n", writeModes[mode], strings.Join(runs, ", "), wc.Medians[mode],
					strings.Join(notes, ", "), strings.Join(loads, ", "))
			}
			fmt.Fprintf(w, "\nMedians: relay running, %.0f tx/s with the trigger and %.0f without: %.2fx. No relay: trigger with the relay awake %.2fx of no trigger, every commit notifying %.2fx.\n\n",
				wc.NotifyTxSec, wc.PollTxSec, wc.NotifyFactor, wc.AwakeRatio, wc.AllRatio)
			if wc.NoTxIndexRatio > 0 {
				fmt.Fprintf(w, "Without the index of transactions (tx, id), no trigger, no relay: %.3fx of the same with it.\n\n", wc.NoTxIndexRatio)
			}
		}
	}

	if len(r.Health) > 0 {
		fmt.Fprintln(w, "### Table health")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| mode | events written | table MiB | index MiB | live tuples | dead tuples | autovacuums | pending | claim ms (EXPLAIN ANALYZE) | claim buffers |")
		fmt.Fprintln(w, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
		for _, h := range r.Health {
			mode := h.Mode
			if h.Retention != "" {
				mode += " (retention " + h.Retention + ")"
			}
			for _, s := range h.Samples {
				ev := fmt.Sprint(s.Events)
				if s.AfterVacuum {
					ev += " (after VACUUM)"
				}
				fmt.Fprintf(w, "| %s | %s | %.2f | %.2f | %d | %d | %d | %d | %.2f | %d |\n", mode, ev, mib(s.TableBytes),
					mib(s.IndexBytes), s.LiveTuples, s.DeadTuples, s.Vacuums, s.Pending, s.PollMs, s.PollBuffers)
			}
		}
		fmt.Fprintln(w)
		for _, h := range r.Health {
			fmt.Fprintf(w, "Claim query plan, %s mode, at the start:\n\n```\n%s```\n\nand at the end:\n\n```\n%s```\n\n",
				h.Mode, h.ExplainStart, h.ExplainEnd)
		}
	}

	if mr := r.Memory; mr != nil {
		fmt.Fprintln(w, "### Memory with a large backlog")
		fmt.Fprintln(w)
		fmt.Fprintf(w, "Backlog of %d rows of %d B; the relay (defaults: max_in_flight %d rows, max_in_flight_bytes %d MiB) published %d of them at %.0f ev/s with a peak RSS of %.1f MiB (VmHWM %.1f MiB).\n\n",
			mr.Backlog, mr.Payload, mr.MaxInFlight, mr.MaxInFlightBytes>>20, mr.Drained, mr.EventsPerSec, mib(mr.PeakRSS), mib(mr.HWM))
	}

	if len(r.Outboxes) > 0 {
		fmt.Fprintln(w, "### Many outboxes in one process")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "The same backlog of 256 B events (100 keys), spread evenly over n outbox tables, drained by one `outbox-relay run` process serving them all. Timed from its first leadership, so outboxes led later count against the rate.")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| outboxes | events | events/s | vs 1 outbox | CPU ms / 10k | RSS at start MiB | peak RSS MiB | all led after |")
		fmt.Fprintln(w, "|---|---|---|---|---|---|---|---|")
		one := 0.0
		for _, o := range r.Outboxes {
			if o.Outboxes == 1 && o.Error == "" {
				one = o.EventsPerSec
			}
		}
		for _, o := range r.Outboxes {
			if o.Error != "" {
				fmt.Fprintf(w, "| %d | %d | failed: %s | | | | | |\n", o.Outboxes, o.Events, o.Error)
				continue
			}
			fmt.Fprintf(w, "| %d | %d | %.0f | %s | %.1f | %.1f | %.1f | %.2f s |\n", o.Outboxes, o.Events, o.EventsPerSec,
				ratio(o.EventsPerSec, one), o.CPUMsPer10k, mib(o.IdleRSS), mib(o.PeakRSS), o.StartSec)
		}
		fmt.Fprintln(w)
	}

	if len(r.Targets) > 0 {
		fmt.Fprintln(w, "### Targets")
		fmt.Fprintln(w)
		fmt.Fprintln(w, "| target | want | got | met |")
		fmt.Fprintln(w, "|---|---|---|---|")
		for _, t := range r.Targets {
			met := "yes"
			if !t.Met {
				met = "**no**"
			}
			fmt.Fprintf(w, "| %s | %s | %s | %s |\n", t.Name, t.Target, t.Got, met)
		}
		fmt.Fprintln(w)
	}
}

func ratio(a, b float64) string {
	if b == 0 {
		return "-"
	}
	return fmt.Sprintf("%.2fx", a/b)
}

func onOff(b bool) string {
	if b {
		return "enabled"
	}
	return "disabled"
}

func firstWords(s string, n int) string {
	f := strings.Fields(s)
	return strings.Join(f[:min(n, len(f))], " ")
}

// latencyModes names the latency runs' wake-up modes in the tables.
var latencyModes = map[string]string{"notify": "NOTIFY", "poll": "polling alone (500 ms)", "poll-fast": "polling alone (50 ms)"}

// exactlyOnceTable writes the cost of exactly-once delivery beside the relay's default in the
// same run: the drain's ratio, the database's CPU per event, and the broker's side, Kafka
// transactions and the transaction markers counted in the broker's logs (countLog).
func (b *bench) exactlyOnceTable(w io.Writer, sums []drainSummary) {
	fmt.Fprintln(w, "Exactly-once delivery (`relay-exactly-once`) beside the relay's default (at-least-once), medians of the runs: the ratio of the drains, CPU per 10k events, Kafka transactions a second (the relay's count) and the transaction markers (control records) counted in the broker's logs of the outbox's topic and the progress topic after the drain, per second of the drain and per transaction.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| payload, keys | at-least-once ev/s | exactly-once ev/s | ratio | relay CPU ms / 10k (ALO → EO) | database CPU ms / 10k (ALO → EO) | Kafka transactions/s | markers | markers/s | markers / transaction |")
	fmt.Fprintln(w, "|---|---:|---:|---:|---|---|---:|---:|---:|---:|")
	for _, dc := range b.opts.Scale.Matrix {
		var alo, eo *drainSummary
		for i := range sums {
			if sums[i].drainCase != dc || sums[i].Error != "" {
				continue
			}
			switch sums[i].Variant {
			case variantRelay:
				alo = &sums[i]
			case variantRelayEO:
				eo = &sums[i]
			}
		}
		if eo == nil {
			continue
		}
		aloRate, aloCPU, aloDB, r := "", "–", "–", ""
		if alo != nil {
			aloRate, aloCPU, aloDB = fmt.Sprintf("%.0f", alo.EventsPerSec), fmt.Sprintf("%.1f", alo.CPUMsPer10k), fmt.Sprintf("%.1f", alo.DBCPUMsPer10k)
			r = ratio(eo.EventsPerSec, alo.EventsPerSec)
		}
		perTx := ""
		if eo.TxPerSec > 0 {
			perTx = fmt.Sprintf("%.1f", eo.MarkersPerSec/eo.TxPerSec)
		}
		fmt.Fprintf(w, "| %s | %s | %.0f | %s | %s → %.1f | %s → %.1f | %.0f | %d | %.0f | %s |\n", caseLabel(dc), aloRate, eo.EventsPerSec, r,
			aloCPU, eo.CPUMsPer10k, aloDB, eo.DBCPUMsPer10k, eo.TxPerSec, eo.Markers, eo.MarkersPerSec, perTx)
	}
	fmt.Fprintln(w)
}

// sidecarTable writes the sidecar section: each run at 1,000 events/s beside the bare producer
// at the relay's cadence in that run, then the idle relay.
func sidecarTable(w io.Writer, sc *sidecarResults) {
	if sc == nil || len(sc.Runs) == 0 {
		return
	}
	fmt.Fprintf(w, "### A sidecar's cost at %d events/s and idle\n\n", sidecarRate)
	fmt.Fprintln(w, "8 writers, one event per transaction, the relay at its defaults. After each run a bare franz-go producer (no database) publishes the same rate for as long, handing its records over once per the relay's claim cadence in that run: what publishing alone costs on this host, the floor of any relay on this producer. CPU per 10k events includes the idle time between events. Notifications per commit, counted by a second listener, are the commits that found the relay asleep.")
	fmt.Fprintln(w)
	fmt.Fprintln(w, "| run | written ev/s | p50 ms | p99 ms | relay CPU ms / 10k | database CPU ms / 10k | claims / event | notifications / commit | claim cadence | bare producer CPU ms / 10k | relay ÷ producer | load average |")
	fmt.Fprintln(w, "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
	for _, l := range sc.Runs {
		every, floor, x := "-", "-", "-"
		for _, f := range sc.Floor {
			if f.Run == l.Run {
				every, floor, x = f.Every.String(), fmt.Sprintf("%.0f", f.CPUMsPer10k), ratio(l.CPUMsPer10k, f.CPUMsPer10k)
			}
		}
		fmt.Fprintf(w, "| %d | %.0f | %.2f | %.2f | %.0f | %.0f | %.2f | %.3f | %s | %s | %s | %.1f |\n", l.Run, l.WrittenPerSec, l.P50, l.P99,
			l.CPUMsPer10k, l.DBCPUMsPer10k, l.ClaimsPerEvent, l.NotifiesPerTx, every, floor, x, l.LoadAvg)
	}
	fmt.Fprintln(w)
	if i := sc.Idle; i != nil {
		if i.Error != "" {
			fmt.Fprintf(w, "Idle: not measured: %s\n\n", i.Error)
		} else {
			fmt.Fprintf(w, "Idle (`outbox-relay run` over an empty outbox, %.0f s): relay %.2f s of CPU an hour, its %d database sessions %.2f, together %.2f.\n\n",
				i.Seconds, i.RelayCPUPerHour, i.Sessions, i.DBCPUPerHour, i.RelayCPUPerHour+i.DBCPUPerHour)
		}
	}
}
