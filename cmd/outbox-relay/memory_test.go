package main

import (
	"log/slog"
	"runtime/debug"
	"testing"
)

// TestMemoryLimitFollowsInFlightBytes: the soft memory limit is 24 MiB at the defaults, grows
// with every outbox's relay.max_in_flight_bytes, and has 32 MiB more with tracing on.
func TestMemoryLimitFollowsInFlightBytes(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	if got := memoryLimit(cfg, false); got != 24<<20 {
		t.Errorf("defaults: %d MiB, want 24", got>>20)
	}
	if got := memoryLimit(cfg, true); got != 56<<20 {
		t.Errorf("defaults, tracing on: %d MiB, want 56", got>>20)
	}
	cfg, err = loadFor(t, `
relay:
  max_in_flight_bytes: 8388608
outboxes:
  - name: orders
    database: {table: orders_outbox}
  - name: billing
    database: {table: billing_outbox}
    relay: {max_in_flight_bytes: 2097152}
`)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := memoryLimit(cfg, false), int64(16<<20+4*(8<<20+2<<20)); got != want {
		t.Errorf("two outboxes, 8 and 2 MiB in flight: %d MiB, want %d", got>>20, want>>20)
	}
}

// TestSetMemoryLimitLeavesGOMEMLIMIT: the relay sets its limit when GOMEMLIMIT is unset, and
// leaves the runtime's when it is set, "off" included.
func TestSetMemoryLimitLeavesGOMEMLIMIT(t *testing.T) {
	configEnv(t, validEnv)
	cfg, err := loadFor(t, "")
	if err != nil {
		t.Fatal(err)
	}
	before := debug.SetMemoryLimit(-1)
	t.Cleanup(func() { debug.SetMemoryLimit(before) })
	log := slog.New(slog.DiscardHandler)
	for _, v := range []string{"off", "100MiB"} {
		debug.SetMemoryLimit(1 << 40)
		setMemoryLimit(cfg, false, func(k string) string {
			if k == "GOMEMLIMIT" {
				return v
			}
			return ""
		}, log)
		if got := debug.SetMemoryLimit(-1); got != 1<<40 {
			t.Errorf("GOMEMLIMIT=%s: the limit became %d, want the runtime's left alone", v, got)
		}
	}
	setMemoryLimit(cfg, false, func(string) string { return "" }, log)
	if got := debug.SetMemoryLimit(-1); got != memoryLimit(cfg, false) {
		t.Errorf("GOMEMLIMIT unset: limit %d, want %d", got, memoryLimit(cfg, false))
	}
}
