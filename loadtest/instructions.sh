#!/usr/bin/env bash
# Instructions one gateway spends on a fixed chat load, counted by callgrind: the same for the
# same binary and load on every run, whatever else the machine does, so a change can be priced
# more exactly than CPU time on a shared VM allows. The gateway (Redis backend, one worker
# thread) runs under valgrind against the local Redis and a database of its own;
# `loadgen chat --pairs 10 --rates 100 --step-secs 10 --warmup-secs 2` (1,200 messages, both
# sides of each pair on this node) goes through it, then SIGTERM. Prints the total and the
# heaviest functions of the message path (inclusive), and leaves the callgrind file for callgrind_annotate.
# The total includes start-up, about 116M of it the argon2id dummy hash.
# Usage: loadtest/instructions.sh [BIN_DIR (target/release)] [OUT (/tmp/chat-instructions.out)]
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${1:-$ROOT/target/release}
OUT=${2:-/tmp/chat-instructions.out}
command -v valgrind >/dev/null || { echo "instructions.sh: needs valgrind (apt-get install valgrind)" >&2; exit 2; }
DB="chat_instr_$$"; PREFIX="instr$$"
SECRET=$(head -c 48 /dev/urandom | base64 | tr -d '\n=/+')
PG="postgres://postgres:postgres@127.0.0.1:5432"
psql_admin() { PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres "$@"; }
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
P=$(port); A=$(port); GW=
cleanup() {
  [ -n "$GW" ] && kill -TERM "$GW" 2>/dev/null && wait "$GW" 2>/dev/null
  psql_admin -c "DROP DATABASE IF EXISTS $DB" >/dev/null 2>&1 || true
}
trap cleanup EXIT
psql_admin -c "CREATE DATABASE $DB" >/dev/null
CHAT_DATABASE_URL="$PG/$DB" CHAT_REDIS_PREFIX=$PREFIX CHAT_JWT_SECRET=$SECRET \
CHAT_GATEWAY_LISTEN=127.0.0.1:$P CHAT_GATEWAY_INTERNAL_LISTEN=127.0.0.1:$A CHAT_GATEWAY_WORKERS=1 \
CHAT_LOG_FORMAT=text RUST_LOG=warn CHAT_GATEWAY_SEND_RATE_PER_SEC=100000 CHAT_GATEWAY_ACCOUNT_SEND_RATE_PER_SEC=1000000 \
CHAT_GATEWAY_HANDSHAKES_PER_IP_PER_SEC=100000 CHAT_GATEWAY_REGISTRATIONS_PER_IP=1000000 CHAT_REDIS_REQUIRE_DURABILITY=false CHAT_GATEWAY_REGISTRATIONS_TOTAL=1000000 \
  valgrind --tool=callgrind --callgrind-out-file="$OUT" "$BIN/gateway" >"$OUT.log" 2>&1 &
GW=$!
for _ in $(seq 1 300); do curl -fs "http://127.0.0.1:$A/readyz" >/dev/null 2>&1 && break; sleep 0.5; done
curl -fs "http://127.0.0.1:$A/readyz" >/dev/null || { echo "instructions.sh: gateway not ready; see $OUT.log" >&2; exit 1; }
LOADGEN_JWT_SECRET=$SECRET "$BIN/loadgen" chat --protocol chat \
  --nodes "ws://127.0.0.1:$P,ws://127.0.0.1:$P" --pairs 10 --rates 100 --step-secs 10 --warmup-secs 2 \
  --database-url "$PG/$DB" --jwt-secret "$SECRET" --label instructions --out "$OUT.json" >/dev/null 2>&1
kill -TERM "$GW"; wait "$GW" 2>/dev/null || true; GW=
callgrind_annotate "$OUT" 2>/dev/null | grep "PROGRAM TOTALS"
callgrind_annotate --inclusive=yes --threshold=100 "$OUT" 2>/dev/null |
  grep -E "gateway::ws::|gateway::hub::|gateway::delivery::|chat_core::pubsub::|chat_core::log::|chat_protocol::" | head -15 | sed -E 's#^( *[0-9,]+ \([ 0-9.]+%\)) +[^:]*:#\1 #' | cut -c1-140
