#!/usr/bin/env bash
# Makes sure NATS (JetStream) on 127.0.0.1:4222 and RabbitMQ on 127.0.0.1:5672 are up, starting
# the local servers when they are installed and down. Exits non-zero, saying how to start them,
# when it cannot.
set -uo pipefail

up() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

wait_up() { # port seconds
  local i
  for ((i = 0; i < $2 * 4; i++)); do
    up "$1" && return 0
    sleep 0.25
  done
  return 1
}

ok=1
if ! up 4222; then
  echo "NATS is not listening on 127.0.0.1:4222; starting nats-server with JetStream" >&2
  if command -v start-stop-daemon >/dev/null && [ -x /usr/sbin/nats-server ]; then
    mkdir -p /var/lib/nats-server
    start-stop-daemon --start --oknodo --background --exec /usr/sbin/nats-server -- \
      -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server -l /var/log/nats-server.log
  elif command -v nats-server >/dev/null; then
    nohup nats-server -a 127.0.0.1 -p 4222 -js -sd "${TMPDIR:-/tmp}/conveyor-nats" >/dev/null 2>&1 &
  fi
  if ! wait_up 4222 30; then
    echo "error: NATS is still down. Start it with:" >&2
    echo "  nats-server -a 127.0.0.1 -p 4222 -js -sd /var/lib/nats-server" >&2
    ok=0
  fi
fi
if ! up 5672; then
  echo "RabbitMQ is not listening on 127.0.0.1:5672; starting rabbitmq-server" >&2
  if command -v rabbitmq-server >/dev/null; then
    rabbitmq-server -detached >/dev/null 2>&1 || true
  fi
  if ! wait_up 5672 90; then
    echo "error: RabbitMQ is still down. Start it with:" >&2
    echo "  rabbitmq-server -detached   (user guest/guest on 127.0.0.1:5672)" >&2
    ok=0
  fi
fi
# PostgreSQL, for the pg.insert kind's tests (database "test", trust authentication locally).
if ! up 5432; then
  echo "PostgreSQL is not listening on 127.0.0.1:5432; starting it" >&2
  if command -v pg_ctlcluster >/dev/null; then
    for c in /etc/postgresql/*/*; do
      [ -d "$c" ] && pg_ctlcluster "$(basename "$(dirname "$c")")" "$(basename "$c")" start >/dev/null 2>&1 || true
    done
  fi
  if ! wait_up 5432 30; then
    echo "error: PostgreSQL is still down. Start it with:" >&2
    echo "  pg_ctlcluster <version> main start   (database test, user postgres, trust auth on 127.0.0.1)" >&2
    ok=0
  fi
fi
[ "$ok" = 1 ] && echo "brokers up: NATS 127.0.0.1:4222, RabbitMQ 127.0.0.1:5672; PostgreSQL 127.0.0.1:5432" >&2
[ "$ok" = 1 ]
