#!/usr/bin/env bash
# Scrapes a running gateway and worker with a real Prometheus (Debian's package, installed when
# missing) and checks what it stored: both targets up, the key series present, every metric the
# alerting rules and the dashboard reference exported (a histogram by its _bucket series), and
# the alerting rules loaded and evaluated without error. It starts no gateway or worker itself.
#
#   GATEWAY_METRICS=127.0.0.1:19090 WORKER_METRICS=127.0.0.1:19091 \
#   [GATEWAY_URL=http://127.0.0.1:18080] deploy/check-prometheus-scrape.sh
#
# GATEWAY_METRICS and WORKER_METRICS are the internal (admin) addresses. With GATEWAY_URL, the
# gateway's public address, deploy/checks/ws_traffic.py first registers two users and drives a
# little WebSocket traffic, so labelled series exist and a message must reach Postgres through
# the worker. The worker's partition gauges appear after its first trim pass
# (worker_trim_interval_ms, 10 s by default); the check waits up to 45 s for them.
# Prometheus runs on a spare 127.0.0.1 port with a temporary storage directory, and is killed on
# exit. SCRAPE_STRICT=1 also requires the labelled counters that need a failure to appear.
#
# Sourced instead, it defines prometheus_scrape_check GATEWAY_METRICS WORKER_METRICS
# [GATEWAY_URL], which runs in a subshell and leaves the caller's traps alone.
set -euo pipefail

prometheus_scrape_check() (
  set -euo pipefail
  cd "$(dirname "${BASH_SOURCE[0]}")/.."
  local gateway=$1 worker=$2 url=${3:-} tmp port pid="" i traffic=()
  log() { printf 'check-prometheus-scrape: %s\n' "$*" >&2; }

  # shellcheck source=deploy/lib/prometheus.sh
  source deploy/lib/prometheus.sh
  ensure_prometheus

  tmp=$(mktemp -d /tmp/chat-prom-scrape.XXXXXX)
  cleanup() {
    if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
    rm -rf "$tmp"
  }
  trap cleanup EXIT
  trap 'exit 130' INT TERM

  if [ -n "$url" ]; then
    python3 deploy/checks/ws_traffic.py "$url"
    traffic=(--traffic)
  fi

  port=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
  cat >"$tmp/prometheus.yml" <<EOF
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
rule_files:
  - $PWD/deploy/prometheus/rules/chat-alerts.yaml
scrape_configs:
  - job_name: chat-gateway
    static_configs: [{targets: ["$gateway"]}]
  - job_name: chat-worker
    static_configs: [{targets: ["$worker"]}]
EOF
  prometheus --config.file="$tmp/prometheus.yml" --storage.tsdb.path="$tmp/data" \
    --web.listen-address="127.0.0.1:$port" --log.level=warn >"$tmp/prometheus.log" 2>&1 &
  pid=$!
  for i in $(seq 1 100); do
    curl -fs "http://127.0.0.1:$port/-/ready" >/dev/null 2>&1 && break
    kill -0 "$pid" 2>/dev/null || { log "prometheus exited:"; cat "$tmp/prometheus.log" >&2; return 1; }
    sleep 0.2
  done
  [ "$i" -lt 100 ] || { log "prometheus not ready after 20 s"; cat "$tmp/prometheus.log" >&2; return 1; }
  echo "ok    prometheus $(prometheus --version 2>&1 | awk 'NR==1{print $3}') on 127.0.0.1:$port scraping $gateway (gateway) and $worker (worker)"

  python3 deploy/checks/scrape_check.py "http://127.0.0.1:$port" "${traffic[@]}"
)

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  : "${GATEWAY_METRICS:?set GATEWAY_METRICS to the internal address of the gateway, e.g. 127.0.0.1:9090}"
  : "${WORKER_METRICS:?set WORKER_METRICS to the internal address of the worker, e.g. 127.0.0.1:9091}"
  prometheus_scrape_check "$GATEWAY_METRICS" "$WORKER_METRICS" "${GATEWAY_URL:-}"
fi
