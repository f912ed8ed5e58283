#!/usr/bin/env bash
# Drains a preloaded backlog with the real `outbox-relay run` (not the bench's child) and prints
# its peak RSS (VmHWM), its file-backed pages and its CPU, start-up included. The broker is the
# bench's kfake, in a process of its own. Needs bin/outbox-relay and bin/bench (make build; go
# build -o bin/bench ./bench) and the local PostgreSQL. N, SIZE and KEYS set the backlog
# (default 1M rows of 1 KB over 10k keys); OUTBOX_BENCH_DATABASE_URL the database.
set -euo pipefail
cd "$(dirname "$0")/.."
db="${OUTBOX_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
n="${N:-1000000}" size="${SIZE:-1024}" keys="${KEYS:-10000}"
schema=relay_binary_rss
work="$(mktemp -d)"
cleanup() {
	[ -n "${relay:-}" ] && kill "$relay" 2>/dev/null || true
	exec 3>&- 2>/dev/null || true # the broker runs until its stdin closes
	psql -q "$db" -c "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

psql -q "$db" -c "DROP SCHEMA IF EXISTS $schema CASCADE" -c "CREATE SCHEMA $schema"
OUTBOX_DATABASE_URL="$db" bin/outbox-relay migrate --database-schema "$schema" >/dev/null
# Payloads from md5 digests: distinct per row, and below the TOAST threshold at 1 KB.
psql -q "$db" -c "INSERT INTO $schema.outbox (aggregate_type, aggregate_id, event_type, payload)
	SELECT 'bench', (i % $keys)::text, 'bench.created',
		substring(decode(repeat(md5(i::text), 2 * $size / 16 + 2), 'hex') from 1 for $size)
	FROM generate_series(1, $n) AS i ORDER BY i" -c "VACUUM ANALYZE $schema.outbox" -c "CHECKPOINT"

mkfifo "$work/broker.in"
OUTBOX_BENCH_CHILD='{"role":"kfake","partitions":6}' bin/bench <"$work/broker.in" >"$work/broker.out" 2>&1 &
exec 3>"$work/broker.in"
for _ in $(seq 1 100); do grep -q '^ready' "$work/broker.out" && break; sleep 0.1; done
brokers="$(awk '/^ready/ {print $2}' "$work/broker.out")"
[ -n "$brokers" ] || { echo "the broker did not start: $(cat "$work/broker.out")" >&2; exit 1; }

start=$(date +%s.%N)
OUTBOX_DATABASE_URL="$db" OUTBOX_DATABASE_SCHEMA="$schema" OUTBOX_KAFKA_BROKERS="$brokers" \
	OUTBOX_HTTP_ADDR=127.0.0.1:0 bin/outbox-relay run >"$work/relay.log" 2>&1 &
relay=$!
# Done when the row of the highest id is gone (the relay drains in id order; a count(*) of the
# table every 200 ms would cost more CPU than the relay).
until [ "$(psql -Atq "$db" -c "SELECT NOT EXISTS (SELECT 1 FROM $schema.outbox WHERE id = $n)")" = t ]; do
	kill -0 "$relay" 2>/dev/null || { echo "outbox-relay exited: $(tail -5 "$work/relay.log")" >&2; exit 1; }
	sleep 0.2
done
end=$(date +%s.%N)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$relay/stat")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$relay/status")
files=$(awk '/^Rss/ {r = $2} /^Anonymous/ {a = $2} END {print r - a}' "/proc/$relay/smaps_rollup")
ticks=$(getconf CLK_TCK)
printf 'outbox-relay run: %d events of %d B over %d keys in %.1f s; peak RSS (VmHWM) %.1f MiB, file pages %.1f MiB; CPU %.0f ms per 10k events, start-up included\n' \
	"$n" "$size" "$keys" "$(echo "$end - $start" | bc)" "$(echo "$hwm / 1024" | bc -l)" "$(echo "$files / 1024" | bc -l)" \
	"$(echo "($utime + $stime) * 1000 / $ticks / ($n / 10000)" | bc -l)"
