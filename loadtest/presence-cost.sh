#!/usr/bin/env bash
# Measures what presence costs Redis: one gateway holds N idle connections (loadgen conns) while
# this script counts the commands Redis executes over whole heartbeat periods, on a Redis of its
# own (so nothing else is counted). Prints commands per second, per 10,000 connections.
# Usage: loadtest/presence-cost.sh [connections (10000)] [periods (3)]
# Env: STACK_BIN (binaries, default target/release), PRESENCE_HEARTBEAT_SECS (10).
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
COUNT=${1:-10000}
PERIODS=${2:-3}
HEARTBEAT=${PRESENCE_HEARTBEAT_SECS:-10}
BIN=${STACK_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/release}
PORT=$((20000 + RANDOM % 10000))
DB="chat_presence_cost_$$"
SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n=/+')
WORK=$(mktemp -d)
pids=()
psql_admin() { PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres "$@"; }
cleanup() {
  for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  redis-cli -p "$PORT" shutdown nosave >/dev/null 2>&1 || true
  psql_admin -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
  rm -rf "$WORK"
}
trap cleanup EXIT INT TERM

redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize yes \
  --logfile "$WORK/redis.log" >/dev/null
psql_admin -c "CREATE DATABASE $DB" >/dev/null
CHAT_REDIS_URL="redis://127.0.0.1:$PORT" CHAT_DATABASE_URL="postgres://postgres:postgres@127.0.0.1:5432/$DB" \
  CHAT_JWT_SECRET="$SECRET" CHAT_LOG_FORMAT=text CHAT_GATEWAY_LISTEN=127.0.0.1:$((PORT + 1)) \
  CHAT_GATEWAY_INTERNAL_LISTEN=127.0.0.1:$((PORT + 2)) CHAT_PRESENCE_HEARTBEAT_SECS="$HEARTBEAT" \
  CHAT_GATEWAY_HANDSHAKES_PER_IP_PER_SEC=1000000 CHAT_GATEWAY_REGISTRATIONS_PER_IP=1000000 CHAT_REDIS_REQUIRE_DURABILITY=false CHAT_GATEWAY_REGISTRATIONS_TOTAL=1000000 \
  "$BIN/gateway" >"$WORK/gateway.log" 2>&1 &
gateway=$!
pids+=("$gateway")
for _ in $(seq 1 150); do curl -fs "http://127.0.0.1:$((PORT + 2))/readyz" >/dev/null 2>&1 && break; sleep 0.2; done

hold=$((HEARTBEAT * (PERIODS + 2) + 10))
LOADGEN_JWT_SECRET="$SECRET" "$BIN/loadgen" conns --url "ws://127.0.0.1:$((PORT + 1))" --count "$COUNT" \
  --procs 2 --server-pid "$gateway" --settle-secs "$hold" --label presence --out "$WORK/conns.json" \
  >"$WORK/loadgen.log" 2>&1 &
pids+=($!)
# Wait until every connection is open and the burst of first announcements is over.
for _ in $(seq 1 300); do
  open=$(curl -fs "http://127.0.0.1:$((PORT + 2))/metrics" | awk '$1 == "chat_gateway_connections_open" {print $2}')
  [ "${open:-0}" -ge "$COUNT" ] && break
  sleep 0.2
done
sleep "$HEARTBEAT"
total() { redis-cli -p "$PORT" INFO commandstats | sed -n 's/^cmdstat_\([a-z|]*\):calls=\([0-9]*\).*/\1 \2/p'; }
total >"$WORK/before"
sleep $((HEARTBEAT * PERIODS))
total >"$WORK/after"
secs=$((HEARTBEAT * PERIODS))
echo "presence-cost: $COUNT connections, $PERIODS heartbeat periods of ${HEARTBEAT}s, $(nproc) cores, $(date -u +%FT%TZ)"
join -a 2 -e 0 -o 0,1.2,2.2 <(sort "$WORK/before") <(sort "$WORK/after") |
  awk -v secs="$secs" -v count="$COUNT" '
    { d = $3 - $2; if (d > 0) { printf "  %-16s %8.1f/s\n", $1, d / secs; sum += d } }
    END { printf "  total            %8.1f commands/s = %.1f per 10,000 connections\n", sum / secs, sum / secs * 10000 / count }'
curl -fs "http://127.0.0.1:$((PORT + 2))/metrics" | grep -E '^chat_gateway_presence_heartbeat_seconds_(sum|count)'
