#!/usr/bin/env bash
# Measures what an idle relay costs: the real `outbox-relay run` over an empty outbox, its CPU and
# that of its database sessions (their server backends, read from /proc: PostgreSQL must run on
# this host) over SECS seconds (default 180) after WARM seconds (default 20) of start-up,
# extrapolated to an hour. The broker is the bench's kfake, in a process of its own. Needs
# bin/outbox-relay (RELAY_BIN for another build) and bin/bench; RELAY_ENV adds environment to the
# relay (e.g. "OUTBOX_RELAY_POLL_INTERVAL=1s"). Several may run at once: each has its own schema
# and names its sessions after its own process id.
set -euo pipefail
cd "$(dirname "$0")/.."
db="${OUTBOX_BENCH_DATABASE_URL:-postgres://postgres@127.0.0.1:5432/postgres?sslmode=disable}"
secs="${SECS:-180}" warm="${WARM:-20}"
relay_bin="${RELAY_BIN:-bin/outbox-relay}"
schema=relay_idle_cost_$$
app=outbox-relay-idle-$$
case "$db" in *\?*) relay_db="$db&application_name=$app" ;; *) relay_db="$db?application_name=$app" ;; esac
work="$(mktemp -d)"
cleanup() {
	[ -n "${relay:-}" ] && kill "$relay" 2>/dev/null || true
	exec 3>&- 2>/dev/null || true # the broker runs until its stdin closes
	psql -q "$db" -c "DROP SCHEMA IF EXISTS $schema CASCADE" 2>/dev/null || true
	rm -rf "$work"
}
trap cleanup EXIT

psql -q "$db" -c "DROP SCHEMA IF EXISTS $schema CASCADE" -c "CREATE SCHEMA $schema"
OUTBOX_DATABASE_URL="$db" "$relay_bin" migrate --database-schema "$schema" >/dev/null

mkfifo "$work/broker.in"
OUTBOX_BENCH_CHILD='{"role":"kfake","partitions":6}' bin/bench <"$work/broker.in" >"$work/broker.out" 2>&1 &
exec 3>"$work/broker.in"
for _ in $(seq 1 100); do grep -q '^ready' "$work/broker.out" && break; sleep 0.1; done
brokers="$(awk '/^ready/ {print $2}' "$work/broker.out")"
[ -n "$brokers" ] || { echo "the broker did not start: $(cat "$work/broker.out")" >&2; exit 1; }

# shellcheck disable=SC2086 # RELAY_ENV is a list of assignments
env ${RELAY_ENV:-} OUTBOX_DATABASE_URL="$relay_db" OUTBOX_DATABASE_SCHEMA="$schema" OUTBOX_KAFKA_BROKERS="$brokers" \
	OUTBOX_HTTP_ADDR=127.0.0.1:0 "$relay_bin" run >"$work/relay.log" 2>&1 &
relay=$!
sleep "$warm"
kill -0 "$relay" 2>/dev/null || { echo "outbox-relay exited: $(tail -5 "$work/relay.log")" >&2; exit 1; }
# The relay's backends: the sessions named after it (its claims and its marks). The mark
# connection opens at the first heartbeat or mark: wait for it a moment, if it comes.
pids="$(psql -Atq "$db" -c "SELECT pid FROM pg_stat_activity WHERE application_name LIKE '$app%'")"
ticks=$(getconf CLK_TCK)
cpu() { # CPU ticks of the given processes (utime + stime)
	local t=0 p
	for p in "$@"; do
		[ -r "/proc/$p/stat" ] || continue # the session ended
		read -r u s < <(awk '{print $14, $15}' "/proc/$p/stat")
		t=$((t + u + s))
	done
	echo "$t"
}
r0=$(cpu "$relay") d0=$(cpu $pids)
sleep "$secs"
r1=$(cpu "$relay") d1=$(cpu $pids)
kill -0 "$relay" 2>/dev/null || { echo "outbox-relay exited: $(tail -5 "$work/relay.log")" >&2; exit 1; }
printf 'idle outbox-relay run over %d s (after %d s): relay CPU %.2f s per hour, its %d database sessions %.2f s per hour, together %.2f s per hour (load average %s)\n' \
	"$secs" "$warm" "$(echo "($r1 - $r0) / $ticks * 3600 / $secs" | bc -l)" "$(echo "$pids" | wc -w)" \
	"$(echo "($d1 - $d0) / $ticks * 3600 / $secs" | bc -l)" "$(echo "($r1 - $r0 + $d1 - $d0) / $ticks * 3600 / $secs" | bc -l)" \
	"$(cut -d' ' -f1 /proc/loadavg)"
