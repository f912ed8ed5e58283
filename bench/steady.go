package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"math/rand/v2"
	"path/filepath"
	"sort"
	"strconv"
	"sync"
	"sync/atomic"
	"time"

	"github.com/jackc/pgx/v5"
	"github.com/jackc/pgx/v5/pgxpool"

	"github.com/outbox-relay/outbox-relay/adapters/postgres"
)

// writersN is the number of concurrent writers of the steady-state and write-cost sections.
const writersN = 8

// The steady writers' events: steadyPayload bytes each, over steadyKeys keys. The produce floor
// publishes the same records.
const (
	steadyPayload = 256
	steadyKeys    = 100
)

// stepResult is one offered rate of the search for the highest rate with flat lag.
type stepResult struct {
	Mode           string  `json:"mode"`             // "notify" or "poll"
	OfferedPerSec  float64 `json:"offered_per_sec"`  // 0: writers as fast as they can
	AchievedPerSec float64 `json:"achieved_per_sec"` // committed writer transactions per second
	RelayPerSec    float64 `json:"relay_per_sec"`    // rows marked per second
	LagStart       int64   `json:"lag_start"`        // committed but not yet marked, at the start
	LagEnd         int64   `json:"lag_end"`
	LagMax         int64   `json:"lag_max"`
	LagSlope       float64 `json:"lag_slope_per_sec"` // least-squares slope of lag over the second half
	Flat           bool    `json:"flat"`
	WriterLimited  bool    `json:"writer_limited"` // writers reached less than 90% of the offered rate
}

// latencyResult is commit-to-ack latency at one rate with or without the wake-up: from the
// moment the writer's COMMIT returned to the broker's acknowledgement reaching the relay.
type latencyResult struct {
	Mode          string    `json:"mode"` // "notify" or "poll"
	OfferedPerSec float64   `json:"offered_per_sec"`
	WrittenPerSec float64   `json:"written_per_sec"` // what the writers committed
	Events        int       `json:"events"`
	P50           float64   `json:"p50_ms"`
	P99           float64   `json:"p99_ms"`
	P999          float64   `json:"p999_ms"`
	Max           float64   `json:"max_ms"`
	CDF           []float64 `json:"cdf_ms"` // the 1st..100th percentiles
	// Insert-to-ack (created_at, set at INSERT, to the acknowledgement) adds the writer's own
	// commit time: it is what the relay's outbox_relay_commit_to_ack_seconds histogram sees.
	InsertP50 float64 `json:"insert_to_ack_p50_ms"`
	InsertP99 float64 `json:"insert_to_ack_p99_ms"`
	// Commit-to-ack split at the moment the relay handed the event to the producer: commit to
	// publish is the relay's wake-up and claim, publish to ack the producer and the broker.
	PublishP50  float64 `json:"commit_to_publish_p50_ms"`
	PublishP99  float64 `json:"commit_to_publish_p99_ms"`
	AckP50      float64 `json:"publish_to_ack_p50_ms"`
	AckP99      float64 `json:"publish_to_ack_p99_ms"`
	CPUMsPer10k float64 `json:"relay_cpu_ms_per_10k"` // relay CPU per 10k events, idle time included
	// The CPU of its PostgreSQL sessions per 10k events, idle time included.
	DBCPUMsPer10k float64 `json:"db_cpu_ms_per_10k,omitempty"`
	Run           int     `json:"run,omitempty"` // the round, in the peers section
	// Database round trips of the relay per event: claims (and those that found nothing), marks.
	ClaimsPerEvent      float64    `json:"claims_per_event"`
	EmptyClaimsPerEvent float64    `json:"empty_claims_per_event"`
	MarksPerEvent       float64    `json:"marks_per_event"`
	Spans               *spanStats `json:"spans,omitempty"` // the relay's spans, with tracing on
	// NotifiesPerTx is how many notifications a listener received per commit, and LoadAvg the
	// host's 1-minute load average after the run (-latency-only runs).
	NotifiesPerTx float64 `json:"notifies_per_tx,omitempty"`
	LoadAvg       float64 `json:"load_avg_1m,omitempty"`
	samples       []float64
	insertSamples []float64        // the sorted insert-to-ack latencies, ms
	commits       map[string]int64 // event id -> unix nanoseconds its COMMIT returned
}

// steadyResults is the steady-state section.
type steadyResults struct {
	Steps           []stepResult `json:"steps"`
	MaxFlatPerSec   float64      `json:"max_flat_per_sec"`
	WriterLimited   bool         `json:"writer_limited"` // the search ended because writers could not go faster
	WriterMaxPerSec float64      `json:"writer_max_per_sec,omitempty"`
	// The same with the NOTIFY trigger disabled (the relay polls every 500 ms).
	PollMaxFlatPerSec   float64         `json:"poll_max_flat_per_sec"`
	PollWriterLimited   bool            `json:"poll_writer_limited"`
	PollWriterMaxPerSec float64         `json:"poll_writer_max_per_sec,omitempty"`
	Latency             []latencyResult `json:"latency"`
	// ProduceFloor holds the produce-floor runs of the latency-only runs (-produce-floor).
	ProduceFloor []floorResult `json:"produce_floor,omitempty"`
	Tail         []tailResult  `json:"tail,omitempty"` // the -tail runs
}

// steady runs the search for the highest flat rate and the latency measurements.
func (b *bench) steady(ctx context.Context) error {
	schema, err := b.schema(ctx, "steady")
	if err != nil {
		return err
	}
	defer b.dropSchema(schema)
	br, err := b.startBroker(ctx)
	if err != nil {
		return err
	}
	defer br.close()
	if b.opts.Tail > 0 {
		res := &steadyResults{}
		b.res.Steady = res
		return b.tail(ctx, br, schema, res)
	}
	profile := ""
	if b.opts.Profile {
		profile, _ = filepath.Abs(filepath.Join(b.opts.Out, "relay-steady-cpu.pprof"))
	}
	relay, err := b.latencyRelay(ctx, schema, br, childConfig{Profile: profile})
	if err != nil {
		return err
	}
	defer func() { _ = relay.stop() }()
	w, err := b.newWriters(ctx, schema)
	if err != nil {
		return err
	}
	defer w.close()
	res := &steadyResults{}
	b.res.Steady = res
	if b.opts.LatencyOnly {
		return b.latencyOnly(ctx, w, relay, br, schema, res)
	}

	// The search, with the wake-up and with polling alone (NOTIFY serializes the writers'
	// commits, so their own ceiling differs): double the offered rate until lag grows or the
	// writers cannot keep up, then run the writers flat out.
	for _, mode := range []string{"notify", "poll"} {
		if err := b.setTrigger(ctx, schema, mode == "notify"); err != nil {
			return err
		}
		maxFlat, writerMax, limited := 0.0, 0.0, false
		for rate := 500.0; rate <= float64(b.opts.Scale.MaxRate) && ctx.Err() == nil; rate *= 2 {
			st, err := b.step(ctx, w, relay, rate)
			if err != nil {
				return err
			}
			st.Mode = mode
			res.Steps = append(res.Steps, st)
			b.log.Printf("steady %s offered %6.0f/s: writers %6.0f/s relay %6.0f/s lag %d..%d (max %d, slope %.0f/s) flat=%t",
				mode, st.OfferedPerSec, st.AchievedPerSec, st.RelayPerSec, st.LagStart, st.LagEnd, st.LagMax, st.LagSlope, st.Flat)
			if st.Flat && !st.WriterLimited {
				maxFlat = rate
			}
			if !st.Flat || st.WriterLimited {
				limited = st.WriterLimited
				break
			}
		}
		if last := res.Steps[len(res.Steps)-1]; limited || last.Flat {
			// The writers are the limit: how fast do they go flat out, and does the relay keep up?
			st, err := b.step(ctx, w, relay, 0)
			if err != nil {
				return err
			}
			st.Mode = mode
			res.Steps = append(res.Steps, st)
			writerMax = st.AchievedPerSec
			b.log.Printf("steady %s writers flat out: %6.0f/s relay %6.0f/s lag %d..%d (max %d) flat=%t",
				mode, st.AchievedPerSec, st.RelayPerSec, st.LagStart, st.LagEnd, st.LagMax, st.Flat)
			if st.Flat {
				maxFlat = max(maxFlat, st.AchievedPerSec)
			}
		}
		if mode == "notify" {
			res.MaxFlatPerSec, res.WriterLimited, res.WriterMaxPerSec = maxFlat, limited, writerMax
		} else {
			res.PollMaxFlatPerSec, res.PollWriterLimited, res.PollWriterMaxPerSec = maxFlat, limited, writerMax
		}
	}

	// Latency at 1k/s and at half the highest flat rate, with the wake-up and with polling alone.
	rates := []float64{1000}
	if half := math.Round(max(res.MaxFlatPerSec, res.PollMaxFlatPerSec)/2/100) * 100; half > 1000 {
		rates = append(rates, half)
	}
	for _, mode := range []string{"notify", "poll", "poll-fast"} {
		if err := b.setTrigger(ctx, schema, mode == "notify"); err != nil {
			return err
		}
		if mode == "poll-fast" {
			// Polling alone with a short interval: the alternative to the wake-up when NOTIFY
			// costs the writers too much (see the write-cost section).
			if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
				return err
			}
			if err := relay.stop(); err != nil {
				return err
			}
			base := relay.progress.Load()
			relay, err = b.start(ctx, childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema,
				Brokers: br.addrs, Mark: postgres.MarkDelete, Latency: true, Relay: relaySettings{PollInterval: fastPoll}})
			if err != nil {
				return err
			}
			defer func() { _ = relay.stop() }()
			relay.offset = base
			if err := relay.send("go"); err != nil {
				return err
			}
		}
		for _, rate := range rates {
			lr, err := b.latencyRun(ctx, w, relay, mode, rate)
			if err != nil {
				return err
			}
			res.Latency = append(res.Latency, lr)
			b.log.Printf("latency %-6s at %6.0f/s (written %.0f/s): p50 %.2f ms p99 %.2f ms p99.9 %.2f ms max %.2f ms (commit-to-publish p50 %.2f p99 %.2f, publish-to-ack p50 %.2f p99 %.2f; %d events, relay cpu %.1f ms/10k; per event %.2f claims (%.2f empty), %.2f marks)",
				mode, rate, lr.WrittenPerSec, lr.P50, lr.P99, lr.P999, lr.Max, lr.PublishP50, lr.PublishP99, lr.AckP50, lr.AckP99, lr.Events, lr.CPUMsPer10k,
				lr.ClaimsPerEvent, lr.EmptyClaimsPerEvent, lr.MarksPerEvent)
		}
	}
	if err := b.setTrigger(ctx, schema, true); err != nil {
		return err
	}
	// Exactly-once delivery at 1k/s, with the wake-up: commit to the Kafka commit, after which a
	// read_committed consumer sees the record (the relay's ack is the transaction's commit).
	if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
		return err
	}
	if err := relay.stop(); err != nil {
		return err
	}
	base := relay.progress.Load()
	relay, err = b.start(ctx, childConfig{Role: roleRelay, DatabaseURL: b.opts.DatabaseURL, Schema: schema,
		Brokers: br.addrs, Mark: postgres.MarkDelete, Latency: true, ExactlyOnce: true})
	if err != nil {
		return err
	}
	defer func() { _ = relay.stop() }()
	relay.offset = base
	if err := relay.send("go"); err != nil {
		return err
	}
	lr, err := b.latencyRun(ctx, w, relay, modeExactlyOnce, 1000)
	if err != nil {
		return err
	}
	res.Latency = append(res.Latency, lr)
	b.log.Printf("latency %-6s at %6.0f/s (written %.0f/s): p50 %.2f ms p99 %.2f ms p99.9 %.2f ms max %.2f ms (commit-to-publish p50 %.2f p99 %.2f, publish-to-commit p50 %.2f p99 %.2f; %d events, relay cpu %.1f ms/10k)",
		modeExactlyOnce, 1000.0, lr.WrittenPerSec, lr.P50, lr.P99, lr.P999, lr.Max, lr.PublishP50, lr.PublishP99, lr.AckP50, lr.AckP99, lr.Events, lr.CPUMsPer10k)
	return nil
}

// modeExactlyOnce names the latency run of exactly-once delivery (with the wake-up).
const modeExactlyOnce = "notify-exactly-once"

// latencyOnly measures the latency with the wake-up at each of b.opts.LatencyRates (1,000
// events/s unless told), b.opts.LatencyRepeats times, and counts the notifications a second
// listener receives per commit: how many commits paid for NOTIFY.
func (b *bench) latencyOnly(ctx context.Context, w *writers, relay *proc, br *broker, schema string, res *steadyResults) error {
	if err := b.setTrigger(ctx, schema, true); err != nil {
		return err
	}
	heard, stopListen, err := b.countNotifications(ctx, schema)
	if err != nil {
		return err
	}
	defer stopListen()
	rates := b.opts.LatencyRates
	if len(rates) == 0 {
		rates = []float64{1000}
	}
	for i := range b.opts.LatencyRepeats {
		for _, rate := range rates {
			if err := b.latencyOnlyRun(ctx, w, relay, heard, i, rate, res); err != nil {
				return err
			}
			for _, every := range b.opts.ProduceFloor {
				fr, err := b.produceFloor(ctx, br, rate, every)
				if err != nil {
					return fmt.Errorf("produce floor at %.0f/s every %s: %w", rate, every, err)
				}
				fr.Run = i
				res.ProduceFloor = append(res.ProduceFloor, fr)
				b.log.Printf("produce floor run %d at %.0f/s, handed over every %s: produce-to-ack p50 %.2f ms p99 %.2f ms; cpu %.1f ms/10k (%d events)",
					i, rate, every, fr.P50, fr.P99, fr.CPUMsPer10k, fr.Events)
			}
		}
	}
	return nil
}

// countNotifications listens on the outbox's wake-up channel in schema (beside the relay, or
// in its place) and counts the notifications it receives until stop is called: how many commits
// paid for NOTIFY.
func (b *bench) countNotifications(ctx context.Context, schema string) (heard *atomic.Int64, stop func(), err error) {
	conn, err := pgx.Connect(ctx, b.opts.DatabaseURL)
	if err != nil {
		return nil, nil, err
	}
	if _, err := conn.Exec(ctx, `LISTEN `+pgx.Identifier{postgres.Table{Schema: schema}.WithDefaults().Channel()}.Sanitize()); err != nil {
		_ = conn.Close(context.Background())
		return nil, nil, err
	}
	lctx, stopListen := context.WithCancel(ctx)
	listened := make(chan struct{})
	heard = new(atomic.Int64)
	go func() {
		defer close(listened)
		for lctx.Err() == nil {
			if _, err := conn.WaitForNotification(lctx); err != nil {
				if lctx.Err() == nil {
					return
				}
				continue
			}
			heard.Add(1)
		}
	}()
	return heard, func() {
		stopListen()
		<-listened
		_ = conn.Close(context.Background())
	}, nil
}

// latencyOnlyRun is one run of latencyOnly, at rate events/s; heard counts the notifications.
func (b *bench) latencyOnlyRun(ctx context.Context, w *writers, relay *proc, heard *atomic.Int64, i int, rate float64, res *steadyResults) error {
	c0, h0 := w.committed.Load(), heard.Load()
	lr, err := b.latencyRun(ctx, w, relay, "notify", rate)
	if err != nil {
		return err
	}
	if n := w.committed.Load() - c0; n > 0 {
		lr.NotifiesPerTx = round3(float64(heard.Load()-h0) / float64(n))
	}
	lr.LoadAvg = loadAvg()
	res.Latency = append(res.Latency, lr)
	b.log.Printf("latency-only run %d at %.0f/s (written %.0f/s): p50 %.2f ms p99 %.2f ms p99.9 %.2f ms (commit-to-publish p99 %.2f); relay cpu %.1f ms/10k, its database sessions %.1f; per event %.2f claims (%.2f empty), %.2f marks; %.3f notifications per commit; load average %.1f",
		i, rate, lr.WrittenPerSec, lr.P50, lr.P99, lr.P999, lr.PublishP99, lr.CPUMsPer10k, lr.DBCPUMsPer10k, lr.ClaimsPerEvent, lr.EmptyClaimsPerEvent, lr.MarksPerEvent, lr.NotifiesPerTx, lr.LoadAvg)
	return nil
}

// floorResult is one produce-floor run: a bare producer (no database) publishing the steady
// section's records at OfferedPerSec for a latency run's time, those due handed over together
// once every Every. Its CPU is what publishing alone costs at that rate: the part of the relay's
// CPU that no way of reading the outbox can save.
type floorResult struct {
	OfferedPerSec float64       `json:"offered_per_sec"`
	Every         time.Duration `json:"every_ns"`
	Run           int           `json:"run"`
	Events        int64         `json:"events"`
	Seconds       float64       `json:"seconds"` // from the first hand-over to the last ack
	P50           float64       `json:"produce_to_ack_p50_ms"`
	P99           float64       `json:"produce_to_ack_p99_ms"`
	CPUMsPer10k   float64       `json:"cpu_ms_per_10k"` // the producer's process, idle time included
}

// produceFloor runs one produce-floor run on br at rate events/s, handing over every every.
func (b *bench) produceFloor(ctx context.Context, br *broker, rate float64, every time.Duration) (floorResult, error) {
	fr := floorResult{OfferedPerSec: rate, Every: every}
	events := int64(math.Round(rate * b.opts.Scale.LatencyRun.Seconds()))
	p, err := b.start(ctx, childConfig{Role: roleProduce, Brokers: br.addrs, Events: events, PayloadSize: steadyPayload, Keys: steadyKeys, Rate: rate, Every: every})
	if err != nil {
		return fr, err
	}
	defer func() { _ = p.stop() }()
	if err := p.send("go"); err != nil {
		return fr, err
	}
	rep, err := p.report(ctx, b.opts.Scale.LatencyRun+2*time.Minute)
	if err != nil {
		return fr, err
	}
	if rep.Events != events || len(rep.LatenciesMS) == 0 {
		return fr, fmt.Errorf("%d of %d records acknowledged (%d latencies)", rep.Events, events, len(rep.LatenciesMS))
	}
	fr.Events, fr.Seconds = rep.Events, round3(rep.WallSec)
	fr.P50, fr.P99 = round3(quantile(rep.LatenciesMS, 0.50)), round3(quantile(rep.LatenciesMS, 0.99))
	fr.CPUMsPer10k = (rep.CPUUserSec + rep.CPUSysSec) * 1000 / (float64(rep.Events) / 10000)
	return fr, nil
}

// fastPoll is the poll interval of the "poll-fast" latency runs.
const fastPoll = 50 * time.Millisecond

// step offers rate events/s (0: flat out) for one step and watches the lag.
func (b *bench) step(ctx context.Context, w *writers, relay *proc, rate float64) (stepResult, error) {
	if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
		return stepResult{}, err
	}
	st := stepResult{OfferedPerSec: rate}
	lag := func() int64 { return w.committed.Load() - relay.progress.Load() }
	c0, m0 := w.committed.Load(), relay.progress.Load()
	st.LagStart = lag()
	start := time.Now()
	dur := b.opts.Scale.Step
	var ts, ls []float64
	wctx, stop := context.WithTimeout(ctx, dur)
	done := make(chan struct{})
	go func() { w.run(wctx, rate); close(done) }()
	tick := time.NewTicker(100 * time.Millisecond)
	for wctx.Err() == nil {
		select {
		case <-tick.C:
		case <-wctx.Done():
		}
		l := lag()
		st.LagMax = max(st.LagMax, l)
		ts = append(ts, time.Since(start).Seconds())
		ls = append(ls, float64(l))
	}
	tick.Stop()
	<-done
	stop()
	if err := w.failure(); err != nil {
		return st, err
	}
	el := time.Since(start).Seconds()
	st.LagEnd = lag()
	st.AchievedPerSec = float64(w.committed.Load()-c0) / el
	st.RelayPerSec = float64(relay.progress.Load()-m0) / el
	half := len(ts) / 2
	st.LagSlope = slope(ts[half:], ls[half:])
	st.WriterLimited = rate > 0 && st.AchievedPerSec < 0.9*rate
	// Flat: the mean lag of the last third is within a quarter second of events of the middle
	// third's, and the lag never exceeds 1.5 s of events in the second half. (Polling makes the
	// lag a saw-tooth of up to one poll interval of events; a slope over a few teeth is noise.)
	rateRef := max(rate, st.AchievedPerSec, 100)
	third := len(ls) / 3
	var maxSecond float64
	for _, l := range ls[half:] {
		maxSecond = max(maxSecond, l)
	}
	st.Flat = mean(ls[2*third:]) <= mean(ls[third:2*third])+0.25*rateRef && maxSecond < 1.5*rateRef
	return st, nil
}

// latencyRun offers rate events/s for one run and returns the relay's commit-to-ack latencies.
func (b *bench) latencyRun(ctx context.Context, w *writers, relay *proc, mode string, rate float64) (latencyResult, error) {
	if err := w.warm(ctx); err != nil {
		return latencyResult{}, err
	}
	if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
		return latencyResult{}, err
	}
	if err := relay.send("reset"); err != nil {
		return latencyResult{}, err
	}
	w.track()
	start := time.Now()
	wctx, cancel := context.WithTimeout(ctx, b.opts.Scale.LatencyRun)
	w.run(wctx, rate)
	cancel()
	commits := w.untrack()
	written := float64(len(commits)) / time.Since(start).Seconds()
	if err := w.failure(); err != nil {
		return latencyResult{}, err
	}
	if err := waitCaughtUp(ctx, w, relay, 30*time.Second); err != nil {
		return latencyResult{}, err
	}
	if err := relay.send("report"); err != nil {
		return latencyResult{}, err
	}
	rep, err := relay.report(ctx, 30*time.Second)
	if err != nil {
		return latencyResult{}, err
	}
	var s, toPub, toAck []float64
	for _, a := range rep.Acks {
		if c, ok := commits[a.EventID]; ok {
			s = append(s, float64(a.At-c)/1e6)
			if a.Published != 0 {
				toPub = append(toPub, float64(a.Published-c)/1e6)
				toAck = append(toAck, float64(a.At-a.Published)/1e6)
			}
		}
	}
	sort.Float64s(toPub)
	sort.Float64s(toAck)
	if len(s) < len(commits) {
		return latencyResult{}, fmt.Errorf("%d of %d committed events acknowledged", len(s), len(commits))
	}
	sort.Float64s(s)
	lr := latencyResult{Mode: mode, OfferedPerSec: rate, WrittenPerSec: written, Events: len(s), samples: s,
		P50: quantile(s, .5), P99: quantile(s, .99), P999: quantile(s, .999), Max: quantile(s, 1),
		InsertP50: quantile(rep.LatenciesMS, .5), InsertP99: quantile(rep.LatenciesMS, .99),
		PublishP50: quantile(toPub, .5), PublishP99: quantile(toPub, .99), AckP50: quantile(toAck, .5), AckP99: quantile(toAck, .99)}
	lr.Spans = rep.Spans
	lr.insertSamples, lr.commits = rep.LatenciesMS, commits
	// The relay counts what it acknowledged; the baselines do not, and their events are s.
	if n := max(len(rep.LatenciesMS), len(s)); n > 0 {
		lr.CPUMsPer10k = (rep.CPUUserSec + rep.CPUSysSec) * 1000 / (float64(n) / 10000)
		lr.DBCPUMsPer10k = rep.DBCPUSec * 1000 / (float64(n) / 10000)
	}
	if st := rep.Relay; st != nil && len(s) > 0 {
		n := float64(len(s))
		lr.ClaimsPerEvent, lr.EmptyClaimsPerEvent, lr.MarksPerEvent = round3(float64(st.Claims)/n), round3(float64(st.EmptyClaim)/n), round3(float64(st.Marks)/n)
	}
	for q := 1; q <= 100; q++ {
		lr.CDF = append(lr.CDF, round3(quantile(s, float64(q)/100)))
	}
	return lr, nil
}

// waitCaughtUp waits until the relay marked everything the writers committed.
func waitCaughtUp(ctx context.Context, w *writers, relay *proc, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	for relay.progress.Load() < w.committed.Load() {
		if time.Now().After(deadline) {
			return fmt.Errorf("relay did not catch up within %s: committed %d, marked %d", timeout,
				w.committed.Load(), relay.progress.Load())
		}
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-relay.exited:
			return fmt.Errorf("relay exited: %v: %s", relay.err, relay.stderrText())
		case <-time.After(20 * time.Millisecond):
		}
	}
	return nil
}

// writers append events to the outbox with postgres.Writer, one event per transaction, like an
// application's use cases do.
type writers struct {
	pool      *pgxpool.Pool
	w         *postgres.Writer
	committed atomic.Int64
	mu        sync.Mutex
	err       error
	appendFn  func(ctx context.Context, tx pgx.Tx, msgs []postgres.Message) error // writes msgs in tx
	perTx     int                                                                 // events per transaction (1 unless a section says otherwise)
	n         int                                                                 // concurrent writers
	commits   map[string]int64                                                    // when tracking: event id -> unix nanoseconds its COMMIT returned
}

// warm readies every writer's session before a measured run: each of w.n sessions commits
// one transaction of the run's kind (its events are not measured). pgxpool opens connections
// when first needed, and a new PostgreSQL backend's first insert loads its caches and compiles
// the outbox's trigger: without this, a run's writers spent its first 60-300 ms on that beside
// the relay on the same CPUs, then caught up on their schedule at two to three times the
// offered rate, and those events were 1-2 % of a 1,000 events/s run: its p99.
func (w *writers) warm(ctx context.Context) error {
	conns := make([]*pgxpool.Conn, 0, w.n)
	defer func() {
		for _, c := range conns {
			c.Release()
		}
	}()
	for range w.n {
		c, err := w.pool.Acquire(ctx)
		if err != nil {
			return fmt.Errorf("writers' sessions: %w", err)
		}
		conns = append(conns, c)
	}
	var wg sync.WaitGroup
	errs := make([]error, len(conns))
	for i, c := range conns {
		wg.Go(func() {
			msgs := make([]postgres.Message, w.perTx)
			for j := range msgs {
				msgs[j] = benchMessage(strconv.Itoa(i), slab()[:steadyPayload])
			}
			errs[i] = pgx.BeginFunc(ctx, c, func(tx pgx.Tx) error { return w.appendFn(ctx, tx, msgs) })
			if errs[i] == nil {
				w.committed.Add(int64(len(msgs)))
			}
		})
	}
	wg.Wait()
	if err := errors.Join(errs...); err != nil {
		return fmt.Errorf("writers' warm-up: %w", err)
	}
	return nil
}

// benchMessage is one event of the steady section's writers: of aggregate id, with payload.
func benchMessage(id string, payload []byte) postgres.Message {
	return postgres.Message{AggregateType: "bench", AggregateID: id, EventType: "bench.created", Payload: payload, EventID: newUUID()}
}

// track starts recording when each event's commit returned; untrack stops and returns them.
func (w *writers) track() {
	w.mu.Lock()
	w.commits = make(map[string]int64)
	w.mu.Unlock()
}

func (w *writers) untrack() map[string]int64 {
	w.mu.Lock()
	defer w.mu.Unlock()
	c := w.commits
	w.commits = nil
	return c
}

func (b *bench) newWriters(ctx context.Context, schema string) (*writers, error) {
	pool, err := newPool(ctx, b.opts.DatabaseURL, writersN+2)
	if err != nil {
		return nil, err
	}
	return writersOn(pool, schema)
}

// writersOn returns writersN writers of schema's outbox on pool, one event per transaction; they
// own the pool (closed with them, or here on an error).
func writersOn(pool *pgxpool.Pool, schema string) (*writers, error) {
	wr, err := postgres.NewWriter(postgres.Table{Schema: schema})
	if err != nil {
		pool.Close()
		return nil, err
	}
	w := &writers{pool: pool, w: wr, perTx: 1, n: writersN}
	w.appendFn = func(ctx context.Context, tx pgx.Tx, msgs []postgres.Message) error {
		return wr.Append(ctx, tx, msgs...)
	}
	return w, nil
}

func (w *writers) close() { w.pool.Close() }

func (w *writers) failure() error {
	w.mu.Lock()
	defer w.mu.Unlock()
	err := w.err
	w.err = nil
	return err
}

// run writes at rate events/s in total (0: as fast as the writers go) until ctx ends. Each writer
// keeps its own schedule, so a slow commit is caught up rather than lowering the offered rate.
func (w *writers) run(ctx context.Context, rate float64) {
	var wg sync.WaitGroup
	start := time.Now()
	for i := range w.n {
		wg.Go(func() {
			rng := rand.New(rand.NewPCG(uint64(i), uint64(start.UnixNano())))
			var interval time.Duration
			if rate > 0 {
				interval = time.Duration(float64(time.Second) * float64(w.n) * float64(w.perTx) / rate)
			}
			next := start.Add(time.Duration(rng.Int64N(int64(max(interval, 1)))))
			msgs := make([]postgres.Message, w.perTx)
			for k := 0; ctx.Err() == nil; k++ {
				if interval > 0 {
					if d := time.Until(next); d > 0 {
						select {
						case <-ctx.Done():
							return
						case <-time.After(d):
						}
					}
					next = next.Add(interval)
				}
				for j := range msgs {
					off := rng.Int64N(slabSize - steadyPayload)
					msgs[j] = benchMessage(strconv.Itoa(rng.IntN(steadyKeys)), slab()[off:off+steadyPayload])
				}
				// A started transaction is finished even when the run ends, so every commit is counted.
				txctx := context.WithoutCancel(ctx)
				err := pgx.BeginFunc(txctx, w.pool, func(tx pgx.Tx) error { return w.appendFn(txctx, tx, msgs) })
				if err != nil {
					w.mu.Lock()
					w.err = err
					w.mu.Unlock()
					return
				}
				now := time.Now().UnixNano()
				w.committed.Add(int64(len(msgs)))
				w.mu.Lock()
				if w.commits != nil {
					for _, m := range msgs {
						w.commits[m.EventID] = now
					}
				}
				w.mu.Unlock()
			}
		})
	}
	wg.Wait()
}

func mean(s []float64) float64 {
	if len(s) == 0 {
		return 0
	}
	var sum float64
	for _, v := range s {
		sum += v
	}
	return sum / float64(len(s))
}

// slope returns the least-squares slope of ys over xs.
func slope(xs, ys []float64) float64 {
	n := float64(len(xs))
	if n < 2 {
		return 0
	}
	var sx, sy, sxx, sxy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
		sxx += xs[i] * xs[i]
		sxy += xs[i] * ys[i]
	}
	d := n*sxx - sx*sx
	if d == 0 {
		return 0
	}
	return (n*sxy - sx*sy) / d
}

// quantile returns the q-quantile of sorted s (nearest rank), or 0 for an empty s.
func quantile(s []float64, q float64) float64 {
	if len(s) == 0 {
		return 0
	}
	i := int(math.Ceil(q*float64(len(s)))) - 1
	return s[min(max(i, 0), len(s)-1)]
}

func round3(f float64) float64 { return math.Round(f*1000) / 1000 }
