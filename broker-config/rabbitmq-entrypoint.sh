#!/bin/sh
# Starts RabbitMQ through the image's own entrypoint, then sets each Conveyor role's password
# from the environment (CONVEYOR_<ROLE>_PASSWORD) or from a file (CONVEYOR_<ROLE>_PASSWORD_FILE,
# for Docker secrets), and only then marks the node ready for the health check. The users come
# from definitions.json without passwords, so no one can log in before this has run.
set -eu

ready=${CONVEYOR_READY_FILE:-/tmp/conveyor-users-ready}
rm -f "$ready"

docker-entrypoint.sh rabbitmq-server &
server=$!
trap 'kill -TERM "$server" 2>/dev/null; wait "$server"; exit $?' TERM INT

until rabbitmqctl -q await_startup >/dev/null 2>&1; do
    if ! kill -0 "$server" 2>/dev/null; then
        echo "rabbitmq-entrypoint: rabbitmq-server exited during start-up" >&2
        exit 1
    fi
    sleep 1
done

for role in producer worker aggregator admin; do
    var="CONVEYOR_$(echo "$role" | tr '[:lower:]' '[:upper:]')_PASSWORD"
    eval "password=\${$var:-}"
    eval "file=\${${var}_FILE:-}"
    if [ -n "$file" ]; then
        password=$(cat "$file")
    fi
    if [ -z "$password" ]; then
        echo "rabbitmq-entrypoint: set $var or ${var}_FILE (the password of user $role)" >&2
        kill -TERM "$server"
        wait "$server" || true
        exit 1
    fi
    rabbitmqctl -q change_password "$role" "$password" >/dev/null
done

touch "$ready"
echo "rabbitmq-entrypoint: passwords of the Conveyor roles are set"
wait "$server"
