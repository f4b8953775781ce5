#!/usr/bin/env bash
# Throughput of the default model on Ray Serve, 1 vs 2 replicas on this machine (README "Ray Serve"), with the
# load-test command; the single-process service as the reference. Run from the repository root on a quiet
# machine (`uptime`): each configuration starts `ultrafastbert serve --ray` on a fresh local Ray instance, runs
#   python -m loadtest http://127.0.0.1:$PORT --concurrency $C --duration $D --warmup $W
# and stops it with SIGTERM. Results: runs/ray-measure/<name>.{txt,json}.
set -euo pipefail
PY=${PY:-.venv/bin/python}
PORT=${PORT:-8011}
C=${C:-32}
D=${D:-20}
W=${W:-5}
OUT=${OUT:-runs/ray-measure}
mkdir -p "$OUT"

load() {  # name url
  "$PY" -m loadtest "$2" --concurrency "$C" --duration "$D" --warmup "$W" --json > "$OUT/$1.json"
  "$PY" - "$OUT/$1.json" "$1" <<'PY' | tee "$OUT/$1.txt"
import json, sys
r = json.load(open(sys.argv[1]))
lat = r["latency_ms"]
print(f"{sys.argv[2]}: {r['rps']:.1f} req/s, p50 {lat['p50']:.0f} ms, p99 {lat['p99']:.0f} ms, "
      f"{r['requests']} requests, errors {r['errors'] or 'none'}, load generator {r['client_cpu_cores']:.2f} cores")
PY
}

on_ray() {  # name, then serve flags
  local name=$1; shift
  "$PY" -m service serve --ray --ray-address local --port "$PORT" "$@" > "$OUT/$name.log" 2>&1 &
  local pid=$!
  until grep -q "serving on Ray" "$OUT/$name.log"; do  # logged once every replica is warm
    kill -0 "$pid" 2>/dev/null || { tail -20 "$OUT/$name.log"; exit 1; }
    sleep 1
  done
  load "$name" "http://127.0.0.1:$PORT"
  kill -TERM "$pid"
  wait "$pid"
}

load single-process models/ultrafastbert-minilm-l6          # loadtest starts and stops `ultrafastbert serve`
on_ray ray-1x1cpu --ray-replicas 1 --ray-cpus-per-replica 1
on_ray ray-2x1cpu --ray-replicas 2 --ray-cpus-per-replica 1
on_ray ray-1x2cpu --ray-replicas 1 --ray-cpus-per-replica 2
