#!/usr/bin/env bash
# Browser tests of the web client (web/tests/e2e.mjs) in headless Chromium: two gateway nodes and
# a worker on spare ports with their own database and Redis prefix, then `node --test`. The
# reconnect test runs a third gateway node itself, from the same binary, to kill and restart it.
# Installs Debian's chromium and the npm packages of web/tests when they are missing. Assumes
# Redis and Postgres are up (deploy/ensure-services.sh) and the binaries are built: STACK_BIN
# names their directory (default: the release build). Screenshots land in web/tests/artifacts/.
# The gateways send password reset notices to a webhook receiver that the browser test runs on a
# port picked here (WEB_RESET_WEBHOOK_PORT).
# Usage: STACK_BIN=target/debug deploy/check-web.sh   (WEB_TEST_PATTERN=regex runs only the tests
# whose names match it)
set -euo pipefail
# A relative STACK_BIN is relative to where the script was started.
if [ -n "${STACK_BIN:-}" ]; then STACK_BIN=$(cd "$STACK_BIN" && pwd); fi
cd "$(dirname "$0")/.."
ROOT=$(pwd)
LOGS=$(mktemp -d /tmp/chat-check-web.XXXXXX)
STACK_DB="chat_web_$$"
STACK_PREFIX="checkweb$$"

if [ ! -x /usr/bin/chromium ]; then
  echo "check-web: installing chromium (apt)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null 2>&1 || {
    apt-get update -qq >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  }
fi
if [ ! -d web/tests/node_modules/playwright-core ]; then
  echo "check-web: installing web/tests npm packages (npm ci)" >&2
  (cd web/tests && npm ci --no-audit --no-fund --loglevel=error)
fi

# Eight free ports: public and admin ports of the two nodes, the worker's admin port, the public
# and admin ports of the node the reconnect test restarts, and the test's reset webhook receiver.
read -r P_A P_B ADM_A ADM_B ADM_W P_R ADM_R P_HOOK < <(python3 - <<'PY'
import socket
socks = []
for _ in range(8):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
PY
)

# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
stack_init
# Every gateway (the restarted one too: it inherits the test's environment) posts reset tokens to
# the test's receiver, which listens on 127.0.0.1:$P_HOOK while the tests run.
stack_env+=(CHAT_PASSWORD_RESET_WEBHOOK_URL="http://127.0.0.1:$P_HOOK/password-reset")
# The avatar tests point pictures at https://127.0.0.1:1 (the browser test serves them).
stack_env+=(CHAT_AVATAR_HOSTS="127.0.0.1:1")
# The two nodes show everyone's presence (the origin app's People view); the contacts test runs a
# node of its own with the default, contacts.
stack_env+=(CHAT_PRESENCE_VISIBILITY=everyone)
# The reconnect test's own nodes are its children; should the test die, stop them too.
RESTART_PID_FILE="$LOGS/restart-gateway.pids"
stop_all() {
  local pid
  if [ -s "$RESTART_PID_FILE" ]; then
    while read -r pid; do kill -KILL "$pid" 2>/dev/null || true; done <"$RESTART_PID_FILE"
  fi
  stack_stop
}
trap stop_all EXIT INT TERM
stack_gateway web-a "$P_A" "$ADM_A"
stack_gateway web-b "$P_B" "$ADM_B"
stack_worker web-worker "$ADM_W"

mkdir -p web/tests/artifacts
status=0
env "${stack_env[@]}" \
  WEB_GATEWAY_A="http://127.0.0.1:$P_A" WEB_NODE_A=web-a \
  WEB_GATEWAY_B="http://127.0.0.1:$P_B" WEB_NODE_B=web-b \
  WEB_GATEWAY_BIN="$STACK_BIN/gateway" WEB_RESTART_PORT="$P_R" WEB_RESTART_ADMIN_PORT="$ADM_R" \
  WEB_RESTART_PID_FILE="$RESTART_PID_FILE" WEB_RESET_WEBHOOK_PORT="$P_HOOK" \
  node --test --test-concurrency=1 --test-timeout=180000 ${WEB_TEST_PATTERN:+--test-name-pattern="$WEB_TEST_PATTERN"} \
  web/tests/chat-client.test.mjs web/tests/e2e.mjs || status=$?
if [ "$status" -ne 0 ]; then
  echo "check-web: failed; gateway and worker logs in $LOGS, screenshots in web/tests/artifacts/" >&2
  exit "$status"
fi
echo "check-web: passed; screenshots in web/tests/artifacts/"
rm -rf "$LOGS"
