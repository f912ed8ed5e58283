#!/usr/bin/env bash
# usage: ab.sh tag rounds exeA exeB ...
cd /work/wt/h21cpu
tag=$1; rounds=$2; shift 2
for r in $(seq 1 $rounds); do
  for exe in "$@"; do
    n=$(basename $exe)
    bin/bench -scale 0.5 -no-settle -only steady -latency-only 2 -child-exe $exe -out /tmp/h21cpu/$tag-$n-$r > /tmp/h21cpu/$tag-$n-$r.log 2>&1
    python3 - "$tag-$n-$r" <<'PY'
import json,sys
t=sys.argv[1]
d=json.load(open('/tmp/h21cpu/%s/results.json'%t))
for l in d['steady']['latency']:
    print("%-28s written %5.0f/s p50 %.2f p99 %.2f relay %6.0f db %6.0f ms/10k claims %.2f marks %.3f load %.1f"%(t,l.get('written_per_sec',0),l['p50_ms'],l['p99_ms'],l['relay_cpu_ms_per_10k'],l['db_cpu_ms_per_10k'],l.get('claims_per_event',0),l.get('marks_per_event',0),l.get('load_avg_1m',0)))
PY
  done
done
