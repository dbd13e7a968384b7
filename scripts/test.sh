#!/usr/bin/env bash
# The test command: brokers up, Python clients for the README examples, build, every test.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/ensure-brokers.sh
if ! python3 -c 'import nats, pika' 2>/dev/null; then
  python3 -m pip install --quiet --disable-pip-version-check nats-py pika
fi
cargo build --workspace --all-targets
cargo test --workspace
