# Sourced by the load-test scripts: starts our gateway and worker (and the Socket.IO reference)
# as background processes on 127.0.0.1 with the run's own database and Redis key prefix, and
# stops them and removes that data on exit.
# The caller sets ROOT, LOGS, STACK_DB (database name) and STACK_PREFIX before sourcing, and
# may set STACK_BIN, the directory of the gateway and worker binaries (default: release build).
# Functions set PID_<name> (dashes become underscores) for every process they start.

STACK_BIN=${STACK_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
# STACK_PG_PORT: a Postgres other than the machine's (loadtest/profile.sh runs its own).
STACK_PG_PORT=${STACK_PG_PORT:-5432}
STACK_PG="postgres://postgres:postgres@127.0.0.1:$STACK_PG_PORT"
STACK_DB_URL="$STACK_PG/$STACK_DB"
STACK_SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n=/+')
stack_pids=()

stack_log() { printf '%s: %s\n' "$(basename "$0")" "$*" >&2; }
stack_psql() { PGPASSWORD=postgres psql -q -h 127.0.0.1 -p "$STACK_PG_PORT" -U postgres -d "${STACK_PSQL_DB:-postgres}" "$@"; }

stack_stop() {
  trap - EXIT INT TERM
  local pid
  for pid in "${stack_pids[@]}"; do kill -CONT "$pid" 2>/dev/null || true; kill -TERM "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  # Our keys and the reference adapter's channels carry the run's prefix.
  if command -v redis-cli >/dev/null; then
    redis-cli --scan --pattern "$STACK_PREFIX*" 2>/dev/null | xargs -r -n 1000 redis-cli unlink >/dev/null 2>&1 || true
  fi
  stack_psql -c "DROP DATABASE IF EXISTS $STACK_DB" 2>/dev/null || true
}

stack_init() {
  stack_psql -c "DROP DATABASE IF EXISTS $STACK_DB" -c "CREATE DATABASE $STACK_DB" 2>/dev/null
  trap stack_stop EXIT INT TERM
}

stack_wait_ready() { # url
  local _
  for _ in $(seq 1 150); do curl -fs "$1" >/dev/null 2>&1 && return 0; sleep 0.2; done
  stack_log "$1 never became ready; logs in $LOGS"
  return 1
}

stack_env=(CHAT_REDIS_URL=redis://127.0.0.1:6379 CHAT_DATABASE_URL="$STACK_DB_URL" CHAT_REDIS_PREFIX="$STACK_PREFIX"
  CHAT_JWT_SECRET="$STACK_SECRET" CHAT_LOG_FORMAT=text
  # Load generators send far faster per connection than a person; measure the gateway, not the
  # per-connection send limit (50/s by default).
  CHAT_GATEWAY_SEND_RATE_PER_SEC=1000000 CHAT_GATEWAY_ACCOUNT_SEND_RATE_PER_SEC=1000000
  # Load generators open thousands of connections, and register thousands of users, from a few
  # loopback addresses.
  CHAT_GATEWAY_HANDSHAKES_PER_IP_PER_SEC=1000000
  CHAT_GATEWAY_REGISTRATIONS_PER_IP=1000000 CHAT_GATEWAY_REGISTRATIONS_TOTAL=1000000
  # The local Redis (deploy/ensure-services.sh) runs without AOF: a dev and test instance. A
  # deployment's Redis must have it, and the gateway refuses to start otherwise.
  CHAT_REDIS_REQUIRE_DURABILITY=false)

stack_gateway() { # name port admin-port
  env "${stack_env[@]}" CHAT_GATEWAY_NODE_ID="$1" CHAT_GATEWAY_LISTEN="127.0.0.1:$2" \
    CHAT_GATEWAY_INTERNAL_LISTEN="127.0.0.1:$3" "$STACK_BIN/gateway" >"$LOGS/$1.log" 2>&1 &
  stack_pids+=($!)
  eval "PID_${1//-/_}=$!"
  stack_wait_ready "http://127.0.0.1:$3/readyz"
}

stack_worker() { # name admin-port
  env "${stack_env[@]}" CHAT_WORKER_INTERNAL_LISTEN="127.0.0.1:$2" CHAT_WORKER_CONSUMER_NAME="$1" \
    "$STACK_BIN/persistence-worker" >"$LOGS/$1.log" 2>&1 &
  stack_pids+=($!)
  eval "PID_${1//-/_}=$!"
  stack_wait_ready "http://127.0.0.1:$2/readyz"
}

stack_reference() { # name port
  JWT_SECRET="$STACK_SECRET" PORT="$2" REDIS_KEY="$STACK_PREFIX-sio" \
    node "$ROOT/loadtest/reference/server.js" >"$LOGS/$1.log" 2>&1 &
  stack_pids+=($!)
  eval "PID_${1//-/_}=$!"
  stack_wait_ready "http://127.0.0.1:$2/healthz"
}

stack_kill() { # name
  local var="PID_${1//-/_}"
  kill -TERM "${!var}" 2>/dev/null || true
  wait "${!var}" 2>/dev/null || true
}

# Sockudo (Pusher protocol, Redis adapter), when SOCKUDO_BIN names its binary. It is built
# outside this repository (see loadtest/README.md). App key "bench"; the app secret is the run's
# secret, which loadgen uses to sign private-channel subscriptions.
STACK_PUSHER_KEY=bench
stack_sockudo() { # name port metrics-port
  env HOST=127.0.0.1 PORT="$2" METRICS_ENABLED=false METRICS_PORT="$3" DEBUG=false \
    ADAPTER_DRIVER=redis CACHE_DRIVER=redis QUEUE_DRIVER=memory RATE_LIMITER_ENABLED=false \
    REDIS_URL=redis://127.0.0.1:6379 \
    SOCKUDO_DEFAULT_APP_ID=bench SOCKUDO_DEFAULT_APP_KEY="$STACK_PUSHER_KEY" \
    SOCKUDO_DEFAULT_APP_SECRET="$STACK_SECRET" SOCKUDO_DEFAULT_APP_ENABLE_CLIENT_MESSAGES=true \
    SOCKUDO_ENABLE_CLIENT_MESSAGES=true SOCKUDO_DEFAULT_APP_MAX_CONNECTIONS=100000 \
    "$SOCKUDO_BIN" >"$LOGS/$1.log" 2>&1 &
  stack_pids+=($!)
  eval "PID_${1//-/_}=$!"
  stack_wait_ready "http://127.0.0.1:$2/up/bench"
}
