#!/usr/bin/env bash
# Runs the benchmark workloads side by side against our stack and the Socket.IO reference on
# this machine, writes JSON results to loadtest/results/<stamp>/ and SVG plots to
# docs/benchmarks/. Everything it starts listens on 127.0.0.1 and is stopped at exit; it uses
# its own database (chat_bench) and Redis key prefix, and deletes them afterwards.
#
# Usage: loadtest/run-bench.sh [conns|chat|rooms|drain|ceiling|all]...   (default: all)
# Knobs (environment): BENCH_CONNS (19000), BENCH_CONN_PROCS (3), BENCH_PAIRS (500),
#   BENCH_RATES (1000,2000,5000,10000,15000), BENCH_STEP_SECS (10), BENCH_WINDOW (8),
#   BENCH_DRAIN_COUNT (100000), BENCH_ROOM_SIZES (100,1000,10000), BENCH_ROOM_MESSAGES (20),
#   BENCH_TARGETS ("ours socketio sockudo"), BENCH_PLOT (1; 0 skips the plots).
# Sockudo runs only when SOCKUDO_BIN names its binary (built outside this repository; see
# loadtest/README.md); otherwise it is skipped with a message.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
WORKLOADS=${*:-all}
OUT="$ROOT/loadtest/results/$(date -u +%Y%m%dT%H%M%SZ)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"

CONNS=${BENCH_CONNS:-19000}
CONN_PROCS=${BENCH_CONN_PROCS:-3}
PAIRS=${BENCH_PAIRS:-500}
RATES=${BENCH_RATES:-1000,2000,5000,10000,15000}
STEP_SECS=${BENCH_STEP_SECS:-10}
WINDOW=${BENCH_WINDOW:-8}
DRAIN_COUNT=${BENCH_DRAIN_COUNT:-100000}
ROOM_SIZES=${BENCH_ROOM_SIZES:-100,1000,10000}
ROOM_MESSAGES=${BENCH_ROOM_MESSAGES:-20}
TARGETS=${BENCH_TARGETS:-ours socketio sockudo}
STACK_DB=chat_bench
STACK_PREFIX="bench$(date +%s)"
want() { [[ " $WORKLOADS " == *" all "* || " $WORKLOADS " == *" $1 "* ]]; }
target() { [[ " $TARGETS " == *" $1 "* ]]; }
SOCKUDO_BIN=${SOCKUDO_BIN:-$(command -v sockudo || true)}
if target sockudo && [ ! -x "${SOCKUDO_BIN:-}" ]; then
  echo "run-bench: no Sockudo binary (set SOCKUDO_BIN); skipping the Sockudo reference" >&2
  TARGETS=${TARGETS//sockudo/}
fi

deploy/ensure-services.sh
# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
export LOADGEN_JWT_SECRET="$STACK_SECRET" LOADGEN_PUSHER_KEY="$STACK_PUSHER_KEY" LOADGEN_PUSHER_SECRET="$STACK_SECRET"
stack_log "building (release)"
cargo build --release --locked -p gateway -p persistence-worker -p chat-loadgen
LOADGEN="$STACK_BIN/loadgen"
if target socketio && [ ! -d loadtest/reference/node_modules ]; then
  (cd loadtest/reference && npm ci --no-audit --no-fund)
fi
stack_init

REDIS_PID=$(pgrep -x redis-server | head -1 || true)
redis_watch=()
[ -n "$REDIS_PID" ] && redis_watch=(--watch "redis=$REDIS_PID")
# Postgres is many processes (a backend per connection): count them all by name.
pg_watch=(--watch "postgres=comm:postgres")

# Connections first, on fresh processes, so memory is measured from a clean start.
hold_conns() { # label protocol port server-pid [extra loadgen args...]
  local label=$1 protocol=$2 port=$3 pid=$4
  shift 4
  stack_log "conns: $CONNS idle connections to $label"
  # CPU while connecting: the server, Redis, the generators (and, for ours, Postgres).
  "$LOADGEN" conns --protocol "$protocol" --url "ws://127.0.0.1:$port" --count "$CONNS" --procs "$CONN_PROCS" \
    --server-pid "$pid" --watch "server=$pid" "${redis_watch[@]}" --watch generators=comm:loadgen \
    "$@" --label "$label" --out "$OUT/conns-$label.json"
}
if want conns; then
  if target ours; then
    stack_gateway conns-gw 18090 19190
    # The gateway refuses tokens of users it does not know: they are seeded first.
    hold_conns ours chat 18090 "$PID_conns_gw" --database-url "$STACK_DB_URL" "${pg_watch[@]}"
    stack_kill conns-gw
  fi
  if target socketio; then
    stack_reference conns-sio 13090
    hold_conns socketio socketio 13090 "$PID_conns_sio"
    stack_kill conns-sio
  fi
  if target sockudo; then
    stack_sockudo conns-sockudo 16090 16190
    hold_conns sockudo pusher 16090 "$PID_conns_sockudo"
    stack_kill conns-sockudo
  fi
fi

if want chat; then
  if target ours; then
    stack_gateway gw-a 18080 19090
    stack_gateway gw-b 18081 19092
    stack_worker worker 19191
    stack_log "chat: ours, $PAIRS pairs across two nodes, rates $RATES"
    "$LOADGEN" chat --protocol chat --nodes ws://127.0.0.1:18080,ws://127.0.0.1:18081 --pairs "$PAIRS" \
      --rates "$RATES" --saturate-window "$WINDOW" --step-secs "$STEP_SECS" --database-url "$STACK_DB_URL" \
      --watch "gateway-a=$PID_gw_a" --watch "gateway-b=$PID_gw_b" --watch "worker=$PID_worker" \
      "${redis_watch[@]}" "${pg_watch[@]}" --label ours --out "$OUT/chat-ours.json"
    # The same with the worker paused: the gateway and Redis alone, as the reference works.
    kill -STOP "$PID_worker"
    stack_log "chat: ours without persistence running, $PAIRS pairs, rates $RATES"
    "$LOADGEN" chat --protocol chat --nodes ws://127.0.0.1:18080,ws://127.0.0.1:18081 --pairs "$PAIRS" \
      --rates "$RATES" --saturate-window "$WINDOW" --step-secs "$STEP_SECS" --database-url "$STACK_DB_URL" \
      --watch "gateway-a=$PID_gw_a" --watch "gateway-b=$PID_gw_b" "${redis_watch[@]}" \
      --label "ours, worker paused" --out "$OUT/chat-ours-no-worker.json"
    kill -CONT "$PID_worker"
  fi
  if target socketio; then
    stack_reference sio-a 13001
    stack_reference sio-b 13002
    stack_log "chat: socketio, $PAIRS pairs across two nodes, rates $RATES"
    "$LOADGEN" chat --protocol socketio --nodes ws://127.0.0.1:13001,ws://127.0.0.1:13002 --pairs "$PAIRS" \
      --rates "$RATES" --saturate-window "$WINDOW" --step-secs "$STEP_SECS" \
      --watch "node-a=$PID_sio_a" --watch "node-b=$PID_sio_b" "${redis_watch[@]}" \
      --label socketio --out "$OUT/chat-socketio.json"
    stack_kill sio-a
    stack_kill sio-b
  fi
  if target sockudo; then
    stack_sockudo sockudo-a 16001 16101
    stack_sockudo sockudo-b 16002 16102
    stack_log "chat: sockudo, $PAIRS pairs (a private channel each) across two nodes, rates $RATES"
    "$LOADGEN" chat --protocol pusher --nodes ws://127.0.0.1:16001,ws://127.0.0.1:16002 --pairs "$PAIRS" \
      --rates "$RATES" --step-secs "$STEP_SECS" \
      --watch "node-a=$PID_sockudo_a" --watch "node-b=$PID_sockudo_b" "${redis_watch[@]}" \
      --label sockudo --out "$OUT/chat-sockudo.json"
    stack_kill sockudo-a
    stack_kill sockudo-b
  fi
fi

if want rooms; then
  # One sender, members dealt over two nodes; a message every 500 ms per room size.
  rooms() { # label protocol node-a-port node-b-port [extra loadgen args...]
    local label=$1 protocol=$2 a=$3 b=$4
    shift 4
    stack_log "rooms: $label, rooms of $ROOM_SIZES members across two nodes"
    "$LOADGEN" rooms --protocol "$protocol" --nodes "ws://127.0.0.1:$a,ws://127.0.0.1:$b" \
      --sizes "$ROOM_SIZES" --messages "$ROOM_MESSAGES" --concurrency 200 "${redis_watch[@]}" "$@" \
      --label "$label" --out "$OUT/rooms-$label.json"
  }
  if target ours; then
    [ -n "${PID_gw_a:-}" ] || stack_gateway gw-a 18080 19090
    [ -n "${PID_gw_b:-}" ] || stack_gateway gw-b 18081 19092
    [ -n "${PID_worker:-}" ] || stack_worker worker 19191
    rooms ours chat 18080 18081 --database-url "$STACK_DB_URL" \
      --watch "gateway-a=$PID_gw_a" --watch "gateway-b=$PID_gw_b" --watch "worker=$PID_worker"
  fi
  if target socketio; then
    stack_reference rooms-sio-a 13001
    stack_reference rooms-sio-b 13002
    rooms socketio socketio 13001 13002 --watch "node-a=$PID_rooms_sio_a" --watch "node-b=$PID_rooms_sio_b"
    stack_kill rooms-sio-a
    stack_kill rooms-sio-b
  fi
  if target sockudo; then
    stack_sockudo rooms-sockudo-a 16001 16101
    stack_sockudo rooms-sockudo-b 16002 16102
    rooms sockudo pusher 16001 16002 --watch "node-a=$PID_rooms_sockudo_a" --watch "node-b=$PID_rooms_sockudo_b"
    stack_kill rooms-sockudo-a
    stack_kill rooms-sockudo-b
  fi
fi

if want drain; then
  [ -n "${PID_worker:-}" ] || stack_worker worker 19191
  # Let the worker catch up with anything earlier workloads left.
  sleep 5
  stack_log "drain: $DRAIN_COUNT messages with the worker paused, then timed"
  "$LOADGEN" drain --prefix "$STACK_PREFIX" --database-url "$STACK_DB_URL" --count "$DRAIN_COUNT" \
    --worker-pid "$PID_worker" --watch "worker=$PID_worker" "${redis_watch[@]}" "${pg_watch[@]}" \
    --label "backlog of $DRAIN_COUNT" --out "$OUT/drain-backlog.json"
  stack_log "drain: $DRAIN_COUNT messages with the worker running"
  "$LOADGEN" drain --prefix "$STACK_PREFIX" --database-url "$STACK_DB_URL" --count "$DRAIN_COUNT" \
    --watch "worker=$PID_worker" "${redis_watch[@]}" "${pg_watch[@]}" \
    --label "live burst of $DRAIN_COUNT" --out "$OUT/drain-live.json"
fi

if want ceiling; then
  stack_log "ceiling: the append script straight into Redis"
  "$LOADGEN" ceiling "${redis_watch[@]}" --label redis --out "$OUT/ceiling.json"
  if command -v redis-benchmark >/dev/null; then
    { redis-benchmark -q -n 200000 -P 16 -t ping,incr
      redis-benchmark -q -n 200000 -P 16 PUBLISH "$STACK_PREFIX-bench-channel" 0123456789abcdef0123456789abcdef
      redis-benchmark -q -n 200000 -P 16 XADD "$STACK_PREFIX-bench-stream" MAXLEN '~' 100000 '*' body 0123456789abcdef
    } 2>&1 | tr '\r' '\n' | grep 'requests per second' > "$OUT/redis-benchmark.txt" || true
  fi
  stack_log "ceiling: Redis CPU per append, and per part of the script (append-script-cost.sh)"
  ROUNDS=3 loadtest/append-script-cost.sh 50000 | tee "$OUT/append-script-cost.txt"
fi

# BENCH_PLOT=0 (loadtest/ab.sh) leaves the published plots alone.
[ "${BENCH_PLOT:-1}" = 0 ] || "$LOADGEN" plot --results "$OUT" --out "$ROOT/docs/benchmarks"
stack_log "results in $OUT"
# Issue 19's targets, each with its ratio against the reference it is set against.
python3 loadtest/targets.py "$OUT" "$OUT/append-script-cost.txt" | tee "$OUT/targets.md"
