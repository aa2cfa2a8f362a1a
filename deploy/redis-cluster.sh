#!/usr/bin/env bash
# A local Redis Cluster for tests and benchmarks: 3 masters and 3 replicas on loopback ports
# BASE..BASE+5, AOF with appendfsync everysec, a short cluster-node-timeout (2 s) so a replica
# takes over quickly, and cluster-require-full-coverage off so the other shards keep serving
# while one fails over. Data and logs live in $REDIS_CLUSTER_DIR (default
# /tmp/chat-redis-cluster-BASE). No systemd, no Docker: redis-server processes it starts and
# stops itself.
#
# Usage: deploy/redis-cluster.sh start [BASE (7100)]   starts it; prints CHAT_REDIS_CLUSTER_URLS=...
#        deploy/redis-cluster.sh stop  [BASE]          stops every node and removes the data
#        deploy/redis-cluster.sh urls  [BASE]          prints the seed URLs, comma-separated
#        deploy/redis-cluster.sh node PORT [BASE]      starts one node again (after it was killed:
#                                                      it rejoins from its nodes.conf and AOF)
set -euo pipefail
CMD=${1:-start}
BASE=${2:-7100}
DIR=${REDIS_CLUSTER_DIR:-/tmp/chat-redis-cluster-$BASE}
PORTS=$(seq "$BASE" $((BASE + 5)))
log() { printf 'redis-cluster: %s\n' "$*" >&2; }
urls() { local p out=""; for p in $PORTS; do out+="${out:+,}redis://127.0.0.1:$p"; done; echo "$out"; }

stop() {
  local p
  for p in $PORTS; do
    redis-cli -p "$p" shutdown nosave now >/dev/null 2>&1 || true
  done
  for p in $PORTS; do
    [ -f "$DIR/$p/redis.pid" ] && kill -9 "$(cat "$DIR/$p/redis.pid")" 2>/dev/null || true
  done
  rm -rf "$DIR"
}

node() { # port
  mkdir -p "$DIR/$1"
  redis-server --port "$1" --bind 127.0.0.1 --daemonize yes --dir "$DIR/$1" \
    --pidfile "$DIR/$1/redis.pid" --logfile "$DIR/$1/redis.log" \
    --cluster-enabled yes --cluster-config-file nodes.conf --cluster-node-timeout 2000 \
    --cluster-require-full-coverage no --appendonly yes --appendfsync everysec --save "" \
    --maxmemory-policy noeviction
  for _ in $(seq 1 50); do redis-cli -p "$1" ping >/dev/null 2>&1 && return 0; sleep 0.1; done
  log "node $1 did not answer"; return 1
}

start() {
  command -v redis-server >/dev/null && command -v redis-cli >/dev/null || {
    log "redis-server and redis-cli are needed (apt-get install redis-server)"; exit 1; }
  stop
  local p
  for p in $PORTS; do node "$p"; done
  local nodes=()
  for p in $PORTS; do nodes+=("127.0.0.1:$p"); done
  redis-cli --cluster create "${nodes[@]}" --cluster-replicas 1 --cluster-yes >"$DIR/create.log" 2>&1 || {
    log "cluster create failed; see $DIR/create.log"; cat "$DIR/create.log" >&2; exit 1; }
  for _ in $(seq 1 100); do
    local ok=0
    for p in $PORTS; do
      redis-cli -p "$p" cluster info 2>/dev/null | grep -q 'cluster_state:ok' && ok=$((ok + 1))
    done
    # Every replica linked to its master and synced: one that never was cannot take over.
    local linked=0
    for p in $PORTS; do
      redis-cli -p "$p" info replication 2>/dev/null | grep -q 'master_link_status:up' && linked=$((linked + 1))
    done
    if [ "$ok" -eq 6 ] && [ "$linked" -eq 3 ]; then
      log "3 masters, 3 replicas on 127.0.0.1:$BASE-$((BASE + 5)) ($DIR)"
      echo "CHAT_REDIS_CLUSTER_URLS=$(urls)"
      return 0
    fi
    sleep 0.2
  done
  log "the cluster did not converge"; redis-cli -p "$BASE" cluster nodes >&2 || true; exit 1
}

case "$CMD" in
  start) start ;;
  stop) stop ;;
  urls) urls ;;
  node)
    PORT=${2:?port}; BASE=${3:-7100}; DIR=${REDIS_CLUSTER_DIR:-/tmp/chat-redis-cluster-$BASE}
    node "$PORT" ;;
  *) log "usage: $0 start|stop|urls [BASE] | node PORT [BASE]"; exit 2 ;;
esac
