#!/usr/bin/env bash
# Runs Conveyor locally against the local broker: the aggregator and two workers, then a demo
# workload through them (echo, hash, retried and dead-lettered jobs, a batch of 20,000), the
# aggregator's counts, and the benchmark next to the raw broker. Stops everything at the end.
#   scripts/demo.sh            # NATS JetStream on 127.0.0.1:4222
#   scripts/demo.sh rabbitmq   # RabbitMQ on 127.0.0.1:5672
set -euo pipefail
cd "$(dirname "$0")/.."
case "${1:-nats}" in
  nats) broker="nats://127.0.0.1:4222" ;;
  rabbitmq | amqp) broker="amqp://guest:guest@127.0.0.1:5672/%2f" ;;
  *) echo "usage: $0 [nats|rabbitmq]" >&2; exit 2 ;;
esac
scripts/ensure-brokers.sh
cargo build --release --workspace --bins
bin=target/release
ns="demo$(date +%s)"
work=$(mktemp -d)
export CONVEYOR_BROKER="$broker" CONVEYOR_NAMESPACE="$ns"
port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
pids=()
cleanup() {
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  wait 2>/dev/null || true
  "$bin/conveyor-producer" delete-namespace --yes 2>/dev/null || true
  rm -rf "$work"
}
trap cleanup EXIT
"$bin/conveyor-aggregator" --store "$work/store" --http "127.0.0.1:$port" 2>"$work/aggregator.log" & pids+=($!)
"$bin/conveyor-worker" 2>"$work/worker-1.log" & pids+=($!)
"$bin/conveyor-worker" 2>"$work/worker-2.log" & pids+=($!)
sleep 1
p="$bin/conveyor-producer"
echo "== broker $broker, namespace $ns, aggregator http://127.0.0.1:$port"
echo "== one echo job, waited for"
"$p" publish echo --payload '{"hello":"conveyor"}' --wait
echo "== hash, 100000 rounds, bincode codec"
"$p" publish hash --payload '{"data":"conveyor","rounds":100000}' --codec bincode --wait
echo "== a job that fails twice, then succeeds on attempt 3"
"$p" publish fail --payload '{"times":2}' --wait
echo "== a job that always fails: dead-lettered after 3 attempts (exit code 1 is expected)"
"$p" publish fail --payload '{"times":-1}' --max-attempts 3 --wait || true
echo "== 20000 echo jobs over both workers"
start=$(date +%s.%N)
"$p" publish echo --payload '{"n":1}' --count 20000 --wait >/dev/null
end=$(date +%s.%N)
python3 -c "print(f'   20000 jobs in {$end-$start:.2f} s: {20000/($end-$start):.0f} jobs/s end to end')"
sleep 1
echo "== aggregator /stats"
python3 - "$port" <<'PY'
import json, sys, urllib.request
print("  ", json.load(urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/stats")))
PY
echo "== bench: Conveyor next to the raw broker"
"$p" bench --jobs 10000 --light-jobs 200 --rounds 3
