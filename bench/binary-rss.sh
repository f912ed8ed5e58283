#!/usr/bin/env bash
# Drains a preloaded backlog with the real `outbox-relay run` (not the bench's child) and prints
# its peak RSS (VmHWM), its file-backed pages and its CPU, start-up included, and what the RSS
# was made of at its highest sample (every 0.2 s: RssAnon, RssFile from /proc/<pid>/status). The
# broker is the bench's kfake, in a process of its own. Needs bin/outbox-relay (RELAY_BIN for
# another build) and bin/bench (make build; go build -o bin/bench ./bench) and the local
# PostgreSQL. N, SIZE and KEYS set the backlog (default 1M rows of 1 KB over 10k keys);
# RELAY_ENV adds environment to the relay (e.g. "GOGC=50"); OUTBOX_BENCH_DATABASE_URL the
# database. METRICS=1 also reads the relay's Go runtime metrics (/metrics) at each sample and
# prints those of the highest one. Several may run at once (a schema per run).
set -euo pipefail
cd "$(dirname "$0")/.."
db="${OUTBOX_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
n="${N:-1000000}" size="${SIZE:-1024}" keys="${KEYS:-10000}"
relay_bin="${RELAY_BIN:-bin/outbox-relay}"
schema=relay_binary_rss_$$
work="$(mktemp -d)"
cleanup() {
	[ -n "${relay:-}" ] && kill "$relay" 2>/dev/null || true
	exec 3>&- 2>/dev/null || true # the broker runs until its stdin closes
	psql -q "$db" -c "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

psql -q "$db" -c "CREATE SCHEMA $schema"
OUTBOX_DATABASE_URL="$db" "$relay_bin" migrate --database-schema "$schema" >/dev/null
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
# shellcheck disable=SC2086 # RELAY_ENV is a list of assignments
env ${RELAY_ENV:-} OUTBOX_DATABASE_URL="$db" OUTBOX_DATABASE_SCHEMA="$schema" OUTBOX_KAFKA_BROKERS="$brokers" \
	OUTBOX_HTTP_ADDR=127.0.0.1:0 OUTBOX_LOG_LEVEL=info "$relay_bin" run >"$work/relay.log" 2>&1 &
relay=$!
addr=""
peak=0 peak_sample="" peak_metrics=""
# Done when the row of the highest id is gone (the relay drains in id order; a count(*) of the
# table every 200 ms would cost more CPU than the relay).
until [ "$(psql -Atq "$db" -c "SELECT NOT EXISTS (SELECT 1 FROM $schema.outbox WHERE id = $n)")" = t ]; do
	kill -0 "$relay" 2>/dev/null || { echo "outbox-relay exited: $(tail -5 "$work/relay.log")" >&2; exit 1; }
	sample="$(awk '/^(VmRSS|RssAnon|RssFile|RssShmem)/ {printf "%s %s ", $1, $2}' "/proc/$relay/status")"
	rss=$(echo "$sample" | awk '{print $2}')
	if [ "${rss:-0}" -gt "$peak" ]; then
		peak=$rss peak_sample=$sample
		if [ "${METRICS:-}" = 1 ]; then
			[ -n "$addr" ] || addr="$(sed -n 's/.*http listening.*"addr":"\([0-9.:]*\)".*/\1/p' "$work/relay.log")"
			[ -z "$addr" ] || peak_metrics="$(curl -s "http://$addr/metrics" | grep -E '^go_(memstats_(heap_(inuse|alloc|idle|released)|stack_inuse|sys|next_gc|mspan_inuse|other_sys|gc_sys|buck_hash_sys)_bytes|goroutines|gc_gogc_percent|gc_gomemlimit_bytes|sched_gomaxprocs_threads)' | tr '\n' ' ')"
		fi
	fi
	sleep 0.2
done
end=$(date +%s.%N)
read -r utime stime < <(awk '{print $14, $15}' "/proc/$relay/stat")
hwm=$(awk '/^VmHWM/ {print $2}' "/proc/$relay/status")
files=$(awk '/^Rss/ {r = $2} /^Anonymous/ {a = $2} END {print r - a}' "/proc/$relay/smaps_rollup")
ticks=$(getconf CLK_TCK)
printf 'outbox-relay run: %d events of %d B over %d keys in %.1f s (%.0f ev/s); peak RSS (VmHWM) %.1f MiB, file pages %.1f MiB; CPU %.0f ms per 10k events, start-up included\n' \
	"$n" "$size" "$keys" "$(echo "$end - $start" | bc)" "$(echo "$n / ($end - $start)" | bc -l)" "$(echo "$hwm / 1024" | bc -l)" "$(echo "$files / 1024" | bc -l)" \
	"$(echo "($utime + $stime) * 1000 / $ticks / ($n / 10000)" | bc -l)"
echo "$peak_sample" | awk '{printf "highest sample (kB): RSS %s, anonymous %s, file %s, shmem %s\n", $2, $4, $6, $8}'
[ -z "$peak_metrics" ] || echo "its Go metrics: $peak_metrics"
