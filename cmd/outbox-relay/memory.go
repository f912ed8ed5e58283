package main

import (
	"log/slog"
	"runtime/debug"
)

// The soft memory limit `run` gives the Go runtime when GOMEMLIMIT is unset:
// memoryLimitBase plus memoryLimitPerInFlight times the outboxes' relay.max_in_flight_bytes,
// 24 MiB at the defaults. A drain holds its in-flight bytes live (the claimed rows), one or two
// produce requests of at most a batch each (franz-go encodes a request whole, a copy of its
// payloads), the records in flight, and 2–6 MiB of everything else; left to GOGC=100 alone the
// heap doubles that, and the pages the collector freed go back to the kernel only slowly. Under
// the limit the runtime returns them sooner. It leaves the live heap room enough that the
// collector never runs flat out to stay under it: with 4 MiB in flight and a 24 MiB limit it
// ran six to eight times as often as under 32 MiB (BENCHMARKS.md, "Memory, third pass"; the second
// pass found the same at 24 and 28 MiB before the produce requests were capped).
// Tracing adds memoryLimitTracing: the span processor's queue and export buffers took 27–30 MiB
// more with every span sampled (BENCHMARKS.md, "Cost of the ecosystem features").
const (
	memoryLimitBase        = 16 << 20
	memoryLimitPerInFlight = 4
	memoryLimitTracing     = 32 << 20
)

// memoryLimit returns the soft memory limit for cfg's outboxes (cfg itself when it lists none),
// with room for the spans when tracing is on.
func memoryLimit(cfg *Config, tracing bool) int64 {
	outboxes := cfg.Outboxes
	if len(outboxes) == 0 {
		outboxes = []*Config{cfg}
	}
	var inFlight int64
	for _, o := range outboxes {
		inFlight += int64(o.Relay.WithDefaults().MaxInFlightBytes)
	}
	limit := memoryLimitBase + memoryLimitPerInFlight*inFlight
	if tracing {
		limit += memoryLimitTracing
	}
	return limit
}

// setMemoryLimit sets the Go runtime's soft memory limit to memoryLimit(cfg, tracing), unless
// the environment variable GOMEMLIMIT is set (any value, "off" included): then the runtime
// keeps the limit GOMEMLIMIT gave it.
func setMemoryLimit(cfg *Config, tracing bool, getenv func(string) string, log *slog.Logger) {
	if v := getenv("GOMEMLIMIT"); v != "" {
		log.Debug("memory limit from GOMEMLIMIT", "GOMEMLIMIT", v)
		return
	}
	limit := memoryLimit(cfg, tracing)
	debug.SetMemoryLimit(limit)
	log.Debug("memory limit set", "bytes", limit)
}
