#!/usr/bin/env bash
# Runs the benchmark suite (make bench). BENCH_SCALE=smoke for a run under a minute, 1 (the
# default) for the full size (1M-event drains, 33–47 minutes on the development machines).
# BENCH_REPEAT is how many times each drain's sql-only, naive and relay variants run (default 3
# at full size, 1 for smoke; the tables take the medians). Extra arguments go to the bench
# command (see `go run ./bench -h`). Results, charts and the relay's CPU profile land in
# bench/results/ (BENCH_OUT to change), and binary-rss.txt the peak RSS of the real
# `outbox-relay run` draining 1 KB rows (bench/binary-rss.sh: 1M rows, 20k for smoke).
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${BENCH_SCALE:-1}"
out="${BENCH_OUT:-bench/results}"
repeat="${BENCH_REPEAT:-3}"
if [ "$scale" = smoke ]; then repeat="${BENCH_REPEAT:-1}"; fi
mkdir -p bin "$out"
go build -o bin/bench ./bench
# The measured processes (the relay and the baselines) run from a build without the chart
# library and the broker: pages of code a process never runs would count in its RSS otherwise.
go build -tags benchchild -o bin/bench-child ./bench
# The Watermill baseline is a module of its own (bench/watermill/go.mod), so the relay's go.mod
# never lists Watermill. Without it (no network for its modules, say) the bench skips that variant.
if ! go build -C bench/watermill -o "$PWD/bin/bench-watermill" .; then
  echo "bench: could not build bench/watermill: the watermill variant will be skipped" >&2
  rm -f bin/bench-watermill
fi
bin/bench -scale "$scale" -repeat "$repeat" -child-exe bin/bench-child -watermill-exe bin/bench-watermill -out "$out" -profile "$@"
# The real binary's peak RSS in a 1 KB drain (issue 21, item 4), beside the child's figures:
# `outbox-relay run` as deployed, with its default memory limit, which the bench's child does not set.
binary_rows=1000000
if [ "$scale" = smoke ]; then binary_rows=20000; fi
if N="$binary_rows" bench/binary-rss.sh >"$out/binary-rss.txt" 2>&1; then
	cat "$out/binary-rss.txt"
else
	echo "bench: bench/binary-rss.sh failed: $(tail -3 "$out/binary-rss.txt")" >&2
fi
if [ -f "$out/relay-cpu.pprof" ]; then
	go tool pprof -top -nodecount=40 bin/bench-child "$out/relay-cpu.pprof" >"$out/relay-cpu-top.txt" 2>/dev/null || true
	echo "relay CPU profile: $out/relay-cpu.pprof (top: $out/relay-cpu-top.txt)"
fi
if [ -f "$out/relay-allocs.pprof" ]; then
	go tool pprof -sample_index=alloc_space -top -nodecount=25 bin/bench-child "$out/relay-allocs.pprof" >"$out/relay-allocs-top.txt" 2>/dev/null || true
fi
