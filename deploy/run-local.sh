#!/usr/bin/env bash
# Runs the whole stack on this machine: Redis and Postgres (started or installed if needed), two
# gateway nodes (8080 and 8081) and one persistence worker. Ctrl-C stops everything.
# With `one-process`: one gateway (8080) on the in-memory backend and Postgres alone, no Redis
# and no worker (CHAT_BACKEND=memory, docs/operations.md), on its own database `chat_one`.
# Usage: deploy/run-local.sh [one-process]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
RUN="$ROOT/.run"
mkdir -p "$RUN"

# The port overrides are for checking ensure-services.sh alone; this script uses the defaults.
unset CHAT_LOCAL_REDIS_PORT CHAT_LOCAL_PG_PORT
deploy/ensure-services.sh

MODE=${1:-stack}
case "$MODE" in
  stack) DB=chat ;;
  one-process) DB=chat_one ;;
  *) echo "usage: deploy/run-local.sh [one-process]" >&2; exit 2 ;;
esac
PG="postgres://postgres:postgres@127.0.0.1:5432"
if ! PGPASSWORD=postgres psql -h 127.0.0.1 -U postgres -d postgres -Atc "SELECT 1 FROM pg_database WHERE datname = '$DB'" | grep -q 1; then
  echo "run-local: creating database $DB"
  PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB"
fi

echo "run-local: building (release)"
cargo build --release --locked -p gateway -p persistence-worker

# One secret for both nodes, kept across runs so tokens stay valid.
if [ -z "${CHAT_JWT_SECRET:-}" ]; then
  [ -s "$RUN/jwt_secret" ] || head -c 48 /dev/urandom | base64 | tr -d '\n=/+' > "$RUN/jwt_secret"
  CHAT_JWT_SECRET=$(cat "$RUN/jwt_secret")
fi
export CHAT_JWT_SECRET
export CHAT_DATABASE_URL="${CHAT_DATABASE_URL:-$PG/$DB}"
export CHAT_REDIS_URL="${CHAT_REDIS_URL:-redis://127.0.0.1:6379}"
# The local Redis runs without AOF (a development instance); a deployment's must have it.
export CHAT_REDIS_REQUIRE_DURABILITY="${CHAT_REDIS_REQUIRE_DURABILITY:-false}"
export CHAT_LOG_FORMAT="${CHAT_LOG_FORMAT:-text}"
# Dev mode: with no reset webhook configured, password reset tokens are written to the gateway
# logs so "forgot password" can be tried locally. Never in production.
export CHAT_DEV_MODE="${CHAT_DEV_MODE:-true}"

pids=()
stop() {
  trap - EXIT INT TERM
  echo; echo "run-local: stopping"
  for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
}
trap stop EXIT INT TERM

start_gateway() { # node-id public-port internal-port
  CHAT_GATEWAY_NODE_ID=$1 CHAT_GATEWAY_LISTEN=127.0.0.1:$2 CHAT_GATEWAY_INTERNAL_LISTEN=127.0.0.1:$3 \
    "$ROOT/target/release/gateway" >"$RUN/$1.log" 2>&1 &
  pids+=($!)
}
wait_ready() { # internal ports...
  local port
  for port in "$@"; do
    for _ in $(seq 1 100); do
      curl -fs "http://127.0.0.1:$port/readyz" >/dev/null 2>&1 && break
      sleep 0.2
    done
    curl -fs "http://127.0.0.1:$port/readyz" >/dev/null || { echo "run-local: 127.0.0.1:$port not ready; see $RUN/*.log"; exit 1; }
  done
}

if [ "$MODE" = one-process ]; then
  CHAT_BACKEND=memory start_gateway solo 8080 9090
  wait_ready 9090
  cat <<MSG

One gateway is up, on the in-memory backend (no Redis, no worker: an ack means the message is
in Postgres). Open http://localhost:8080/ in a browser (two people: two browser profiles, or a
private window).
  gateway solo  http://127.0.0.1:8080  (ws://127.0.0.1:8080/ws)   admin http://127.0.0.1:9090/metrics
  log           $RUN/solo.log
  database      $CHAT_DATABASE_URL

Ctrl-C stops it.
MSG
  wait
  exit 0
fi

start_gateway node-a 8080 9090
start_gateway node-b 8081 9092
CHAT_WORKER_INTERNAL_LISTEN=127.0.0.1:9091 CHAT_WORKER_CONSUMER_NAME=worker-1 \
  "$ROOT/target/release/persistence-worker" >"$RUN/worker-1.log" 2>&1 &
pids+=($!)

wait_ready 9090 9092 9091

cat <<MSG

The stack is up. Open http://localhost:8080/ (and http://localhost:8081/) in a browser.
  gateway node-a  http://127.0.0.1:8080  (ws://127.0.0.1:8080/ws)   admin http://127.0.0.1:9090/metrics
  gateway node-b  http://127.0.0.1:8081  (ws://127.0.0.1:8081/ws)   admin http://127.0.0.1:9092/metrics
  worker          admin http://127.0.0.1:9091/metrics
  logs            $RUN/*.log
  database        $CHAT_DATABASE_URL
  password resets dev mode: reset tokens are logged in $RUN/node-*.log ("password reset token")

Try it (see README.md for the full walk-through):
  curl -s -XPOST localhost:8080/api/v1/auth/register -H 'content-type: application/json' \\
       -d '{"name":"Alice","email":"alice@example.com","password":"password123"}'

Ctrl-C stops everything.
MSG
wait
