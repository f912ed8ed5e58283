// Package procs runs the process on one processor (GOMAXPROCS=1) while it uses little CPU, and
// gives the Go runtime its own number back as soon as it uses more.
//
// A relay at a low rate wakes for every commit: a notification, a claim, a produce request and
// its acknowledgement, each handing work from one goroutine to another. With several processors
// (Ps), each hand-off to a parked goroutine may wake an idle thread to run it, which spins looking
// for work and parks again: at 1,000 events a second that was 15–25 % of the relay's CPU on two
// CPUs. On one P the readied goroutine runs next on the thread that readied it. An idle process
// keeps the default (work after a quiet spell finds every CPU) and is read seldom. A drain, on
// the other hand, needs every CPU: the governor watches the process's CPU time (user and system,
// from getrusage) and how long goroutines waited to run (the scheduler's latencies), and switches
// back within one sample when one P is not enough: the process uses most of a CPU, or its
// goroutines queue for the one P (which also tells it when the host's other processes leave it
// less than a CPU).
//
// The governor never runs where the user chose: GOMAXPROCS set in the environment, or a default
// of one already (a container limited to one CPU).
package procs

import (
	"context"
	"log/slog"
	"os"
	"runtime"
	"runtime/metrics"
	"time"
)

const (
	// Interval is how often the process's CPU time is read while it works.
	Interval = 250 * time.Millisecond
	// IdleInterval is how often it is read while the process is idle: a wake-up of an idle
	// process every 250 ms cost a relay 3.4 s of CPU an hour, more than half of what it costs
	// idle otherwise.
	IdleInterval = 2 * time.Second
	// Idle is the share of one CPU under which the process is idle: it keeps (or gets back) the
	// runtime's default, so that work that comes after a quiet spell finds every CPU, and the
	// governor reads its CPU time every IdleInterval.
	Idle = 0.02
	// Low is the share of one CPU under which a working process runs on one P, once it stayed
	// between Idle and Low for lowSamples samples in a row (one second).
	Low        = 0.5
	lowSamples = 4
	// High is the share of one CPU above which, in one sample, the process on one P gets the
	// runtime's default back: one P busy that much leaves a drain waiting for it.
	High = 0.8
	// LateWait is how long a goroutine waited to run to be late: when more than Late of the
	// goroutines that ran in one sample were, the process gets the runtime's default back (or
	// keeps it). At 1,000 events a second on one P, a relay's goroutines wait tens of
	// microseconds; busy goroutines (or a drain) on one P wait for each other, milliseconds.
	LateWait = time.Millisecond
	// Late is the share of late goroutine runs (LateWait) above which one P is not enough.
	Late = 0.05
	// lateMin is the fewest goroutine runs a sample needs for its share of late ones to count.
	lateMin = 20
)

// state decides, from the CPU each sample used, how many Ps the process runs on. Its zero value
// is the runtime's default (many Ps).
type state struct {
	one bool // running on one P
	low int  // samples in a row between Idle and Low while on the default
}

// next takes the share of one CPU the process used in the last sample and whether its goroutines
// queued to run (late); it reports whether the process should run on one P from now on, and when
// to read its CPU time again.
func (s *state) next(share float64, late bool) (one bool, after time.Duration) {
	switch {
	case share < Idle:
		s.one, s.low = false, 0
		return false, IdleInterval
	case s.one && (share > High || late):
		s.one, s.low = false, 0
	case !s.one && share < Low && !late:
		s.low++
		if s.low >= lowSamples {
			s.one, s.low = true, 0
		}
	case !s.one:
		s.low = 0
	}
	return s.one, Interval
}

// Enabled reports whether Start governs anything: GOMAXPROCS is not set in the environment and the
// runtime's default is more than one P.
func Enabled(getenv func(string) string) bool {
	return getenv("GOMAXPROCS") == "" && runtime.GOMAXPROCS(0) > 1
}

// Start governs GOMAXPROCS on a goroutine of its own (run) until stop is called; stop returns once
// the runtime has its default back.
func Start(ctx context.Context, log *slog.Logger) (stop func()) {
	ctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	go func() {
		defer close(done)
		run(ctx, log)
	}()
	return func() {
		cancel()
		<-done
	}
}

// run governs GOMAXPROCS until ctx ends, then gives the runtime its default back. It returns at
// once when not Enabled, or when the process's CPU time cannot be read.
func run(ctx context.Context, log *slog.Logger) {
	if !Enabled(os.Getenv) {
		log.Debug("GOMAXPROCS not governed", "GOMAXPROCS", os.Getenv("GOMAXPROCS"), "gomaxprocs", runtime.GOMAXPROCS(0))
		return
	}
	last, ok := cpuTime()
	if !ok {
		return
	}
	var waits schedWaits
	waits.late() // from now on
	defer runtime.SetDefaultGOMAXPROCS()
	var s state
	lastAt := time.Now()
	t := time.NewTimer(Interval)
	defer t.Stop()
	for {
		select {
		case <-ctx.Done():
			return
		case now := <-t.C:
			used, ok := cpuTime()
			if !ok {
				return
			}
			share := 0.0
			if wall := now.Sub(lastAt); wall > 0 {
				share = float64(used-last) / float64(wall)
			}
			last, lastAt = used, now
			was := s.one
			one, after := s.next(share, waits.late())
			if one != was {
				if one {
					runtime.GOMAXPROCS(1)
				} else {
					runtime.SetDefaultGOMAXPROCS()
				}
				log.Debug("GOMAXPROCS changed", "gomaxprocs", runtime.GOMAXPROCS(0), "cpu_share", share)
			}
			t.Reset(after)
		}
	}
}

// schedWaits reads the scheduler's latencies: how long goroutines waited to run.
type schedWaits struct {
	sample [1]metrics.Sample
	last   []uint64 // the histogram's counts at the last read
}

// late reports whether, since the last call, more than Late of at least lateMin goroutine runs
// came after a wait of LateWait or longer.
func (w *schedWaits) late() bool {
	if w.sample[0].Name == "" {
		w.sample[0].Name = "/sched/latencies:seconds"
	}
	metrics.Read(w.sample[:])
	if w.sample[0].Value.Kind() != metrics.KindFloat64Histogram {
		return false
	}
	h := w.sample[0].Value.Float64Histogram()
	var all, late uint64
	for i, c := range h.Counts {
		if i < len(w.last) {
			c -= w.last[i]
		}
		all += c
		if h.Buckets[i] >= LateWait.Seconds() { // the bucket's lower bound
			late += c
		}
	}
	w.last = append(w.last[:0], h.Counts...)
	return all >= lateMin && float64(late) > Late*float64(all)
}
