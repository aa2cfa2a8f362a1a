#!/usr/bin/env bash
# Starts one gateway and one worker from built binaries on spare 127.0.0.1 ports, with their own
# database and Redis prefix (loadtest/lib/stack.sh, which stops them and removes that data at
# exit), and runs deploy/check-prometheus-scrape.sh against them with WebSocket traffic.
# STACK_BIN names the binaries' directory (default: the debug build). Assumes Redis on
# 127.0.0.1:6379 and Postgres on 127.0.0.1:5432 (deploy/ensure-services.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
LOGS=$(mktemp -d /tmp/chat-scrape-stack.XXXXXX)
STACK_DB="chat_scrape_$$"
STACK_PREFIX="scrape$$"
STACK_BIN=${STACK_BIN:-${CARGO_TARGET_DIR:-$ROOT/target}/debug}
# The worker's partition gauges appear after its first trim pass: make that 1 s, not 10 s.
export CHAT_WORKER_TRIM_INTERVAL_MS=1000

# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
# shellcheck source=deploy/check-prometheus-scrape.sh
source deploy/check-prometheus-scrape.sh

read -r public admin worker < <(python3 -c '
import socket
socks = [socket.socket() for _ in range(3)]
for s in socks: s.bind(("127.0.0.1", 0))
print(*(s.getsockname()[1] for s in socks))')
stack_init
stack_gateway scrape-gateway "$public" "$admin"
stack_worker scrape-worker "$worker"

status=0
prometheus_scrape_check "127.0.0.1:$admin" "127.0.0.1:$worker" "http://127.0.0.1:$public" || status=$?
if [ "$status" -ne 0 ]; then
  stack_log "failed; gateway and worker logs in $LOGS"
  exit "$status"
fi
rm -rf "$LOGS"
