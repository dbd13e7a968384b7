#!/usr/bin/env bash
# The test command: brokers up, Python clients for the README examples, build, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-brokers.sh
if ! python3 -c 'import nats, pika' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check nats-py pika
fi
# docker-compose (Debian's package) renders deploy/compose.yaml without a Docker engine.
if ! command -v docker-compose >/dev/null 2>&1; then
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null \
      || { apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q docker-compose >/dev/null; }
  else
    echo "docker-compose is needed for tests/deploy.rs: install it (Debian: apt-get install docker-compose)" >&2
  fi
fi
cargo build --workspace --all-targets
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
cargo test --workspace 2>&1 | tee "$log" || status=$?
# One closing line with the totals of every test binary.
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($i ~ /^passed;?$/) p += $(i-1); if ($i ~ /^failed;?$/) f += $(i-1) } }
     END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$status"
