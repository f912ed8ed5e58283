package hrtimer

import (
	"context"
	"errors"
	"os"
	"runtime"
	"sync"
	"testing"
	"time"
)

// sleepFor runs t.Sleep(ctx, d) and returns how long it took and its error.
func sleepFor(ctx context.Context, t *Timer, d time.Duration) (time.Duration, error) {
	start := time.Now()
	err := t.Sleep(ctx, d)
	return time.Since(start), err
}

func TestSleepWaitsItsDuration(t *testing.T) {
	tm := New()
	defer tm.Close()
	if runtime.GOOS == "linux" && (!tm.Precise() || !Enabled()) {
		t.Fatalf("no timerfd on Linux (Enabled %v)", Enabled())
	}
	for _, d := range []time.Duration{time.Millisecond, 2 * time.Millisecond, 2500 * time.Microsecond, 20 * time.Millisecond} {
		for range 5 {
			took, err := sleepFor(context.Background(), tm, d)
			if err != nil {
				t.Fatalf("Sleep(%v): %v", d, err)
			}
			if took < d {
				t.Fatalf("Sleep(%v) returned after %v", d, took)
			}
		}
	}
}

func TestSleepWithoutDuration(t *testing.T) {
	tm := New()
	defer tm.Close()
	if err := tm.Sleep(context.Background(), 0); err != nil {
		t.Fatalf("Sleep(0): %v", err)
	}
	if err := tm.Sleep(context.Background(), -time.Second); err != nil {
		t.Fatalf("Sleep(-1s): %v", err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := tm.Sleep(ctx, 0); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep(0) with an ended context: %v, want context.Canceled", err)
	}
	if took, err := sleepFor(ctx, tm, time.Hour); !errors.Is(err, context.Canceled) || took > time.Minute {
		t.Fatalf("Sleep(1h) with an ended context: %v after %v, want context.Canceled at once", err, took)
	}
}

// A sleep ends when its context does, and leaves nothing behind: the next sleep waits its whole
// duration (no deadline left set, no expiry left unread).
func TestSleepEndsWithItsContext(t *testing.T) {
	tm := New()
	defer tm.Close()
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- tm.Sleep(ctx, time.Hour) }()
	cancel()
	select {
	case err := <-done:
		if !errors.Is(err, context.Canceled) {
			t.Fatalf("Sleep: %v, want context.Canceled", err)
		}
	case <-time.After(time.Minute):
		t.Fatal("Sleep(1h) did not end with its context")
	}
	const d = 30 * time.Millisecond
	if took, err := sleepFor(context.Background(), tm, d); err != nil || took < d {
		t.Fatalf("Sleep(%v) after a cancelled one: %v after %v", d, err, took)
	}
	// A deadline, too.
	dctx, dcancel := context.WithTimeout(context.Background(), 5*time.Millisecond)
	defer dcancel()
	if took, err := sleepFor(dctx, tm, time.Hour); !errors.Is(err, context.DeadlineExceeded) || took > time.Minute {
		t.Fatalf("Sleep(1h) under a 5 ms deadline: %v after %v", err, took)
	}
	if took, err := sleepFor(context.Background(), tm, d); err != nil || took < d {
		t.Fatalf("Sleep(%v) after a deadline: %v after %v", d, err, took)
	}
}

// Cancellations that race the expiry: whichever comes first, Sleep returns, and the sleep after
// it waits its whole duration.
func TestSleepCancelRacesExpiry(t *testing.T) {
	tm := New()
	defer tm.Close()
	for i := range 200 {
		d := time.Duration(i%7+1) * 100 * time.Microsecond
		ctx, cancel := context.WithCancel(context.Background())
		var wg sync.WaitGroup
		wg.Go(func() {
			time.Sleep(d) // the race itself: a cancel near the expiry
			cancel()
		})
		if err := tm.Sleep(ctx, d); err != nil && !errors.Is(err, context.Canceled) {
			t.Fatalf("Sleep(%v): %v", d, err)
		}
		wg.Wait()
		const whole = 2 * time.Millisecond
		if took, err := sleepFor(context.Background(), tm, whole); err != nil || took < whole {
			t.Fatalf("round %d: Sleep(%v) after a raced cancel: %v after %v", i, whole, err, took)
		}
	}
}

// Sleeps shorter than the time it takes to start waiting (1 ns to 20 µs), while other goroutines
// keep the poller busy on the other processors: every one ends. An expiry that came before the
// wait began, and that another thread's poll took, must not be lost.
func TestSleepShorterThanItsSetUp(t *testing.T) {
	tm := New()
	defer tm.Close()
	stop := make(chan struct{})
	var wg sync.WaitGroup
	for range runtime.GOMAXPROCS(0) {
		wg.Go(func() { // timers and channel wake-ups: the poller runs on every processor
			tk := time.NewTicker(50 * time.Microsecond)
			defer tk.Stop()
			for {
				select {
				case <-stop:
					return
				case <-tk.C:
				}
			}
		})
	}
	defer func() { close(stop); wg.Wait() }()
	done := make(chan int, 1)
	go func() {
		for i := range 20000 {
			d := time.Duration(1 + i%20000) // 1 ns to 20 µs
			if err := tm.Sleep(context.Background(), d); err != nil {
				t.Errorf("Sleep(%v): %v", d, err)
				break
			}
		}
		done <- 0
	}()
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		t.Fatal("20,000 sleeps of at most 20 µs did not end within two minutes: a wake-up was lost")
	}
}

func TestCloseReleasesTheTimerfd(t *testing.T) {
	if runtime.GOOS != "linux" {
		t.Skip("timerfd is Linux's")
	}
	before := openFDs(t)
	for range 50 {
		tm := New()
		if err := tm.Sleep(context.Background(), 100*time.Microsecond); err != nil {
			t.Fatal(err)
		}
		tm.Close()
		tm.Close() // twice is harmless
	}
	if after := openFDs(t); after > before {
		t.Fatalf("open files: %d before, %d after 50 timers closed", before, after)
	}
}

func TestDisable(t *testing.T) {
	t.Cleanup(func() { off.Store(false) })
	Disable()
	if Enabled() {
		t.Fatal("Enabled after Disable")
	}
	tm := New()
	defer tm.Close()
	if tm.Precise() {
		t.Fatal("a timer made after Disable uses a timerfd")
	}
	const d = 3 * time.Millisecond
	if took, err := sleepFor(context.Background(), tm, d); err != nil || took < d {
		t.Fatalf("Sleep(%v) on Go's timers: %v after %v", d, err, took)
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if err := tm.Sleep(ctx, time.Hour); !errors.Is(err, context.Canceled) {
		t.Fatalf("Sleep(1h) on Go's timers with an ended context: %v", err)
	}
}

func openFDs(t *testing.T) int {
	t.Helper()
	es, err := os.ReadDir("/proc/self/fd")
	if err != nil {
		t.Fatal(err)
	}
	return len(es)
}

// BenchmarkSleep2ms sleeps 2 ms on a timerfd and on Go's timers and reports how late each
// returns (late-µs/op): Go's poller rounds its sleep down to whole milliseconds, so a 2 ms timer
// costs it two sleeps and fires late (package comment).
func BenchmarkSleep2ms(b *testing.B) {
	for _, tc := range []struct {
		name string
		off  bool
	}{{"timerfd", false}, {"go-timer", true}} {
		b.Run(tc.name, func(b *testing.B) {
			off.Store(tc.off)
			defer off.Store(false)
			tm := New()
			defer tm.Close()
			const d = 2 * time.Millisecond
			var late time.Duration
			for b.Loop() {
				took, err := sleepFor(context.Background(), tm, d)
				if err != nil {
					b.Fatal(err)
				}
				late += took - d
			}
			b.ReportMetric(float64(late.Microseconds())/float64(b.N), "late-µs/op")
		})
	}
}
