#!/usr/bin/env bash
# Runs the benchmark suite (make bench). BENCH_SCALE=smoke for a run under a minute, 1 (the
# default) for the full size (1M-event drains, about 20 minutes on the development machine). Extra arguments go to the bench
# command (see `go run ./bench -h`). Results, charts and the relay's CPU profile land in
# bench/results/ (BENCH_OUT to change).
set -euo pipefail
cd "$(dirname "$0")/.."
scale="${BENCH_SCALE:-1}"
out="${BENCH_OUT:-bench/results}"
mkdir -p bin "$out"
go build -o bin/bench ./bench
bin/bench -scale "$scale" -out "$out" -profile "$@"
if [ -f "$out/relay-cpu.pprof" ]; then
	go tool pprof -top -nodecount=40 bin/bench "$out/relay-cpu.pprof" >"$out/relay-cpu-top.txt" 2>/dev/null || true
	echo "relay CPU profile: $out/relay-cpu.pprof (top: $out/relay-cpu-top.txt)"
fi
