#!/usr/bin/env bash
# Checks the alerting rules, their unit tests, the Grafana dashboard and the runbooks, without
# any running service:
#   - promtool check rules / promtool test rules on deploy/prometheus/;
#   - the dashboard's panel queries parse (promtool, as recording rules);
#   - deploy/checks/observability_check.py: every alert has severity, summary, description and
#     runbook_url; alerts and docs/runbooks/*.md match one to one, each runbook has its five
#     sections; every metric the rules, the dashboard and the runbooks name is defined in
#     gateway/src/metrics.rs or persistence-worker/src/metrics.rs.
# Installs promtool (Debian's prometheus package) and PyYAML when they are missing.
# Prints one line per check; exits 1 if any fails. Usage: deploy/check-observability.sh
set -euo pipefail
cd "$(dirname "$0")/.."

log() { printf 'check-observability: %s\n' "$*" >&2; }

# shellcheck source=deploy/lib/prometheus.sh
source deploy/lib/prometheus.sh
ensure_prometheus || { log "could not install prometheus"; exit 1; }

if ! python3 -c 'import yaml' 2>/dev/null; then
  log "installing PyYAML (pip)"
  python3 -m pip --version >/dev/null 2>&1 ||
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3-pip >/dev/null
  # Debian's own Python refuses system-wide installs without --break-system-packages.
  python3 -m pip install -q pyyaml 2>/dev/null || python3 -m pip install -q --break-system-packages pyyaml
fi

TMP=$(mktemp -d /tmp/chat-check-observability.XXXXXX)
trap 'rm -rf "$TMP"' EXIT
failed=0

run() { # label command...: one line; the command's output only when it fails
  if "${@:2}" >"$TMP/out" 2>&1; then
    printf 'ok    %s\n' "$1"
  else
    printf 'FAIL  %s\n' "$1"
    sed 's/^/        /' "$TMP/out"
    failed=1
  fi
}

run "promtool check rules deploy/prometheus/rules/chat-alerts.yaml" \
  promtool check rules deploy/prometheus/rules/chat-alerts.yaml
run "promtool test rules deploy/prometheus/tests/chat-alerts.test.yaml" \
  promtool test rules deploy/prometheus/tests/chat-alerts.test.yaml
run "dashboard panel queries parse" \
  sh -c "python3 deploy/checks/observability_check.py --dashboard-rules '$TMP/dashboard-rules.yaml' &&
         promtool check rules '$TMP/dashboard-rules.yaml'"
python3 deploy/checks/observability_check.py || failed=1

if [ "$failed" -ne 0 ]; then
  log "failed"
  exit 1
fi
log "all checks passed"
