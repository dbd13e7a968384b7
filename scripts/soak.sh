#!/usr/bin/env bash
# Soak: JOBS echo jobs through one worker and the aggregator on BROKER_URL, published in four
# equal parts; prints the worker's and the aggregator's resident memory (VmRSS) at the start and
# once each part is recorded. Memory that keeps growing with the jobs is a leak.
#
#   scripts/soak.sh BROKER_URL [JOBS]     (default 1,000,000; binaries from $BIN, default
#                                          target/release: cargo build --release first;
#                                          extra aggregator flags in $AGGREGATOR_ARGS)
set -euo pipefail
url=${1:?usage: scripts/soak.sh BROKER_URL [JOBS]}
jobs=${2:-1000000}
bin=${BIN:-target/release}
for b in conveyor-worker conveyor-aggregator conveyor-producer; do
  [ -x "$bin/$b" ] || { echo "no $bin/$b: run cargo build --release (or set BIN)" >&2; exit 2; }
done
ns="soak$(date +%s)"
dir=$(mktemp -d)
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
stats() { python3 - "$port" <<'EOF'
import json, sys, urllib.request
print(json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/stats", timeout=5))["results"])
EOF
}
rss() { awk '/^VmRSS/ { printf "%.1f", $2 / 1024 }' "/proc/$1/status"; }
"$bin/conveyor-aggregator" --broker "$url" --namespace "$ns" --http "127.0.0.1:$port" \
  --store "$dir/store" ${AGGREGATOR_ARGS:-} >"$dir/aggregator.log" 2>&1 &
agg=$!
"$bin/conveyor-worker" --broker "$url" --namespace "$ns" --kinds echo >"$dir/worker.log" 2>&1 &
worker=$!
cleanup() {
  kill "$worker" "$agg" 2>/dev/null || true
  wait "$worker" "$agg" 2>/dev/null || true
  "$bin/conveyor-producer" --broker "$url" --namespace "$ns" delete-namespace --kinds echo --yes \
    >/dev/null 2>&1 || true
  rm -rf "$dir"
}
trap cleanup EXIT
for _ in $(seq 1 100); do stats >/dev/null 2>&1 && break; sleep 0.2; done
sleep 2
part=$((jobs / 4))
start=$(date +%s)
printf '%-10s %10s %14s %18s\n' "results" "seconds" "worker MiB" "aggregator MiB"
printf '%-10s %10s %14s %18s\n' 0 0 "$(rss "$worker")" "$(rss "$agg")"
for q in 1 2 3 4; do
  "$bin/conveyor-producer" --broker "$url" --namespace "$ns" publish echo \
    --payload '{"soak":true}' --count "$part" >/dev/null
  want=$((q * part))
  deadline=$(($(date +%s) + 3600))
  until [ "$(stats)" -ge "$want" ]; do
    [ "$(date +%s)" -lt "$deadline" ] || { echo "results stopped at $(stats) of $want" >&2; exit 1; }
    sleep 1
  done
  printf '%-10s %10s %14s %18s\n' "$want" "$(($(date +%s) - start))" "$(rss "$worker")" "$(rss "$agg")"
done
