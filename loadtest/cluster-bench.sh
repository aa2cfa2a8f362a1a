#!/usr/bin/env bash
# What the Redis Cluster and the ack durability cost, in one run on this machine: our stack (two
# gateways, one worker writing to Postgres) under the same chat load (`loadgen chat`, BENCH_PAIRS
# pairs across the two nodes, BENCH_RATES msg/s for BENCH_STEP_SECS each) on
#   single    one Redis (AOF, appendfsync everysec), ack_durability=leader
#   single-r1 the same Redis with a replica, ack_durability=replicas:1
#   cluster   a Redis Cluster of 3 masters + 3 replicas (deploy/redis-cluster.sh), leader
#   cluster-r1 the same cluster, replicas:1
# and prints delivered/s, ack and delivery latency, and the CPU of every Redis master (and the
# gateways) for each. Redis instances run on spare loopback ports of their own and are removed at
# exit. 6 partitions everywhere (2 per master on the cluster).
# Usage: loadtest/cluster-bench.sh [SETUPS ("single single-r1 cluster cluster-r1")]
# Env: BENCH_PAIRS (200), BENCH_RATES (2000,5000), BENCH_STEP_SECS (10).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
SETUPS=${*:-single single-r1 cluster cluster-r1}
PAIRS=${BENCH_PAIRS:-200}
RATES=${BENCH_RATES:-2000,5000}
STEP_SECS=${BENCH_STEP_SECS:-10}
OUT="$ROOT/loadtest/results/cluster-$(date -u +%Y%m%dT%H%M%SZ)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
WORK=$(mktemp -d /tmp/chat-cluster-bench.XXXXXX)
SINGLE_PORT=7301
REPLICA_PORT=7302
CLUSTER_BASE=7310

deploy/ensure-services.sh
STACK_DB=chat_cluster_bench
STACK_PREFIX="cbench$(date +%s)"
# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
export LOADGEN_JWT_SECRET="$STACK_SECRET"
stack_log "building (release)"
cargo build --release --locked -p gateway -p persistence-worker -p chat-loadgen
LOADGEN="$STACK_BIN/loadgen"

redis_one() { # port [master-port]
  mkdir -p "$WORK/$1"
  redis-server --port "$1" --bind 127.0.0.1 --daemonize yes --dir "$WORK/$1" --pidfile "$WORK/$1/pid" \
    --logfile "$WORK/$1/log" --appendonly yes --appendfsync everysec --save "" \
    --maxmemory-policy noeviction ${2:+--replicaof 127.0.0.1 "$2"}
  for _ in $(seq 1 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  return 1
}
cleanup() {
  for p in $SINGLE_PORT $REPLICA_PORT; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
  REDIS_CLUSTER_DIR="$WORK/cluster" deploy/redis-cluster.sh stop "$CLUSTER_BASE" >/dev/null 2>&1 || true
  stack_stop
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

run_setup() { # name
  local name=$1 watch=() p
  STACK_REDIS_URL=redis://127.0.0.1:$SINGLE_PORT
  STACK_REDIS_CLUSTER_URLS=
  STACK_EXTRA_ENV=(CHAT_REDIS_PARTITIONS=6 CHAT_ACK_DURABILITY=leader)
  case "$name" in
    single | single-r1)
      redis_one "$SINGLE_PORT"
      watch+=(--watch "redis-master-1=$(cat "$WORK/$SINGLE_PORT/pid")")
      if [ "$name" = single-r1 ]; then
        redis_one "$REPLICA_PORT" "$SINGLE_PORT"
        until redis-cli -p "$REPLICA_PORT" info replication | grep -q master_link_status:up; do sleep 0.1; done
        STACK_EXTRA_ENV=(CHAT_REDIS_PARTITIONS=6 CHAT_ACK_DURABILITY=replicas:1)
        watch+=(--watch "redis-replica-1=$(cat "$WORK/$REPLICA_PORT/pid")")
      fi ;;
    cluster | cluster-r1)
      STACK_REDIS_CLUSTER_URLS=$(REDIS_CLUSTER_DIR="$WORK/cluster" deploy/redis-cluster.sh start "$CLUSTER_BASE" |
        sed -n 's/^CHAT_REDIS_CLUSTER_URLS=//p')
      [ "$name" = cluster-r1 ] && STACK_EXTRA_ENV=(CHAT_REDIS_PARTITIONS=6 CHAT_ACK_DURABILITY=replicas:1)
      local i=1
      for p in $(seq "$CLUSTER_BASE" $((CLUSTER_BASE + 5))); do
        if redis-cli -p "$p" role | head -1 | grep -q master; then
          watch+=(--watch "redis-master-$i=$(cat "$WORK/cluster/$p/redis.pid")"); i=$((i + 1))
        fi
      done ;;
  esac
  # stack.sh reads these when it starts a process.
  stack_env=(CHAT_REDIS_URL="$STACK_REDIS_URL" CHAT_REDIS_CLUSTER_URLS="$STACK_REDIS_CLUSTER_URLS"
    CHAT_DATABASE_URL="$STACK_DB_URL" CHAT_REDIS_PREFIX="$STACK_PREFIX" CHAT_JWT_SECRET="$STACK_SECRET"
    CHAT_LOG_FORMAT=text CHAT_GATEWAY_SEND_RATE_PER_SEC=1000000 CHAT_GATEWAY_ACCOUNT_SEND_RATE_PER_SEC=1000000 CHAT_GATEWAY_HANDSHAKES_PER_IP_PER_SEC=1000000 CHAT_GATEWAY_REGISTRATIONS_PER_IP=1000000 CHAT_REDIS_REQUIRE_DURABILITY=false CHAT_GATEWAY_REGISTRATIONS_TOTAL=1000000
    "${STACK_EXTRA_ENV[@]}")
  stack_init
  trap cleanup EXIT INT TERM
  stack_gateway "gw-a-$name" 18480 19490
  stack_gateway "gw-b-$name" 18481 19492
  stack_worker "worker-$name" 19591
  stack_log "$name: $PAIRS pairs, rates $RATES"
  "$LOADGEN" chat --protocol chat --nodes ws://127.0.0.1:18480,ws://127.0.0.1:18481 --pairs "$PAIRS" \
    --rates "$RATES" --saturate-window 0 --step-secs "$STEP_SECS" --database-url "$STACK_DB_URL" \
    --watch "gateway-a=$(eval echo "\$PID_gw_a_${name//-/_}")" --watch "gateway-b=$(eval echo "\$PID_gw_b_${name//-/_}")" \
    "${watch[@]}" --label "$name" --out "$OUT/$name.json"
  stack_kill "gw-a-$name"; stack_kill "gw-b-$name"; stack_kill "worker-$name"
  case "$name" in
    single | single-r1)
      for p in $SINGLE_PORT $REPLICA_PORT; do redis-cli -p "$p" shutdown nosave >/dev/null 2>&1 || true; done
      rm -rf "${WORK:?}/$SINGLE_PORT" "${WORK:?}/$REPLICA_PORT" ;;
    *) REDIS_CLUSTER_DIR="$WORK/cluster" deploy/redis-cluster.sh stop "$CLUSTER_BASE" ;;
  esac
}

for setup in $SETUPS; do run_setup "$setup"; done
echo "cluster-bench: $(nproc) cores, $(git rev-parse --short HEAD), $(date -u +%FT%TZ); results in $OUT"
python3 - "$OUT" $SETUPS <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'setup':<11} {'offered':>8} {'delivered/s':>11} {'ack p50':>8} {'ack p99':>8} {'e2e p50':>8} {'e2e p99':>8}  redis CPU % per master (gateways)")
for setup in sys.argv[2:]:
    path = out / f"{setup}.json"
    if not path.exists():
        continue
    for step in json.load(open(path))["result"]["steps"]:
        cpu = step.get("cpu_percent", {})
        masters = " ".join(f"{cpu[k]:.0f}" for k in sorted(cpu) if k.startswith("redis-master"))
        replicas = " ".join(f"r{cpu[k]:.0f}" for k in sorted(cpu) if k.startswith("redis-replica"))
        gw = sum(v for k, v in cpu.items() if k.startswith("gateway"))
        ack, lat = step["ack_latency"], step["latency"]
        print(f"{setup:<11} {step['offered_per_sec']:>8} {step['delivered_per_sec']:>11.0f} {ack['p50_ms']:>8.2f} "
              f"{ack['p99_ms']:>8.2f} {lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f}  {masters} {replicas} ({gw:.0f})")
PY
