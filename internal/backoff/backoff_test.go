package backoff

import (
	"context"
	"testing"
	"time"
)

func TestSleep(t *testing.T) {
	if !Sleep(context.Background(), time.Millisecond) {
		t.Fatal("Sleep reported its context ended; it did not")
	}
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if Sleep(ctx, time.Hour) {
		t.Fatal("Sleep reported an hour passed under an ended context")
	}
}

func TestJitter(t *testing.T) {
	const d = time.Second
	lo, hi := d, d
	for range 10000 {
		j := Jitter(d)
		lo, hi = min(lo, j), max(hi, j)
	}
	if lo < 800*time.Millisecond || hi > 1200*time.Millisecond {
		t.Fatalf("Jitter(1s) ranged over [%s, %s], want within ±20%%", lo, hi)
	}
	if lo > 900*time.Millisecond || hi < 1100*time.Millisecond {
		t.Fatalf("Jitter(1s) ranged over [%s, %s] in 10000 draws: not spread", lo, hi)
	}
}

func TestDouble(t *testing.T) {
	for _, tc := range []struct{ d, limit, want time.Duration }{
		{100 * time.Millisecond, time.Second, 200 * time.Millisecond},
		{600 * time.Millisecond, time.Second, time.Second},
		{time.Second, time.Second, time.Second},
	} {
		if got := Double(tc.d, tc.limit); got != tc.want {
			t.Errorf("Double(%s, %s) = %s, want %s", tc.d, tc.limit, got, tc.want)
		}
	}
}
