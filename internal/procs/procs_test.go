package procs

import (
	"context"
	"log/slog"
	"runtime"
	"sync/atomic"
	"testing"
	"time"
)

// TestStateSwitches: the governor's rules, sample by sample: one P after lowSamples low samples
// in a row, the default back at once when a sample is above High or its goroutines were late,
// and the default, read every IdleInterval, when idle.
func TestStateSwitches(t *testing.T) {
	var s state
	steps := []struct {
		share float64
		late  bool
		one   bool
		after time.Duration
	}{
		{0.1, false, false, Interval}, {0.1, false, false, Interval}, {0.1, false, false, Interval}, // three low samples: not yet
		{0.6, false, false, Interval}, // one above Low starts the count again
		{0.2, false, false, Interval}, {0.2, false, false, Interval}, {0.2, false, false, Interval},
		{0.2, false, true, Interval},  // the fourth low sample in a row: one P
		{0.7, false, true, Interval},  // busier, under High: stays
		{0.79, false, true, Interval}, // still under High
		{0.9, false, false, Interval}, // above High: the default back at once
		{0.3, false, false, Interval},
		{0.3, false, false, Interval}, {0.3, false, false, Interval}, {0.3, false, true, Interval},
		{0.01, false, false, IdleInterval}, // idle: the default back, read seldom
		{0.01, false, false, IdleInterval},
		{0.3, false, false, Interval}, // working again: read often, one P only after a second
		{0.3, false, false, Interval}, {0.3, false, false, Interval}, {0.3, false, true, Interval},
		{0.4, true, false, Interval}, // goroutines queue for the one P: the default back
		{0.3, true, false, Interval}, // and kept while they would queue
		{0.3, false, false, Interval}, {0.3, false, false, Interval}, {0.3, false, false, Interval},
		{0.3, false, true, Interval},
	}
	for i, st := range steps {
		one, after := s.next(st.share, st.late)
		if one != st.one || after != st.after {
			t.Fatalf("step %d (share %.2f): one P = %v, next read after %v; want %v, %v", i, st.share, one, after, st.one, st.after)
		}
	}
}

// TestEnabledLeavesTheUsersChoice: GOMAXPROCS set in the environment, or a default of one P,
// leaves nothing to govern.
func TestEnabledLeavesTheUsersChoice(t *testing.T) {
	if Enabled(func(k string) string {
		if k == "GOMAXPROCS" {
			return "2"
		}
		return ""
	}) {
		t.Fatal("enabled with GOMAXPROCS set in the environment")
	}
	prev := runtime.GOMAXPROCS(1)
	defer runtime.SetDefaultGOMAXPROCS()
	if Enabled(func(string) string { return "" }) {
		t.Fatal("enabled with one P already")
	}
	runtime.GOMAXPROCS(prev)
}

// TestRunFollowsTheLoad runs the governor on this process: at a low load it goes to one P; made
// to spin on every CPU, it gets the default back; at rest it keeps the default; stopped, it
// leaves the default.
func TestRunFollowsTheLoad(t *testing.T) {
	runtime.SetDefaultGOMAXPROCS()
	def := runtime.GOMAXPROCS(0)
	if def < 2 || !Enabled(func(string) string { return "" }) {
		t.Skipf("one CPU here (GOMAXPROCS default %d): nothing to govern", def)
	}
	t.Setenv("GOMAXPROCS", "") // Start reads the environment
	stop := Start(context.Background(), slog.New(slog.DiscardHandler))
	stopped := false
	defer func() {
		if !stopped {
			stop()
		}
	}()

	// A low load: busy 5 ms of every 25 (about a fifth of a CPU, between Idle and Low).
	var low, spin atomic.Bool
	low.Store(true)
	lowDone := make(chan struct{})
	go func() {
		defer close(lowDone)
		for low.Load() {
			for end := time.Now().Add(5 * time.Millisecond); time.Now().Before(end); {
			}
			time.Sleep(20 * time.Millisecond)
		}
	}()
	waitFor(t, "one P at a low load", func() bool { return runtime.GOMAXPROCS(0) == 1 })

	// A high load, like a drain's: goroutines that work 200 µs at a time and hand the CPU on.
	spin.Store(true)
	for range 4 * def {
		go func() {
			for spin.Load() {
				for end := time.Now().Add(200 * time.Microsecond); time.Now().Before(end); {
				}
				runtime.Gosched()
			}
		}()
	}
	waitFor(t, "the default back under a high load", func() bool { return runtime.GOMAXPROCS(0) == def })
	spin.Store(false)
	waitFor(t, "one P again at the low load", func() bool { return runtime.GOMAXPROCS(0) == 1 })
	low.Store(false)
	<-lowDone
	waitFor(t, "the default back at rest", func() bool { return runtime.GOMAXPROCS(0) == def })

	stop()
	stopped = true
	if got := runtime.GOMAXPROCS(0); got != def {
		t.Fatalf("GOMAXPROCS after stop = %d, want the default %d", got, def)
	}
}

// waitFor polls cond until it holds, failing the test after a generous bound.
func waitFor(t *testing.T, what string, cond func() bool) {
	t.Helper()
	start := time.Now()
	deadline := start.Add(90 * time.Second) // a host busy with other work makes it slow
	for !cond() {
		if time.Now().After(deadline) {
			t.Fatalf("timed out waiting for %s (GOMAXPROCS %d)", what, runtime.GOMAXPROCS(0))
		}
		time.Sleep(10 * time.Millisecond)
	}
	t.Logf("%s after %v", what, time.Since(start).Round(time.Millisecond))
}
