#!/usr/bin/env bash
# Where the CPU goes in our stack under one chat load: two gateways, the worker, Redis and a
# Postgres of its own, 500 pairs across the two nodes at one offered rate (PROFILE_RATE, 5,000
# msg/s) with the worker running. Over the same window of PROFILE_SECS (20) seconds it records:
#   - perf CPU profiles of gateway A and the worker (DWARF call graphs) and of Redis and every
#     Postgres process (frame pointers: the Debian builds keep no DWARF), as flame graphs;
#   - Redis's INFO commandstats, as the difference over the window (calls, CPU per call);
#   - Postgres's pg_stat_statements, reset at the start of the window.
# The Postgres is its own (initdb in /tmp, port PROFILE_PG_PORT, 15432) because
# pg_stat_statements must be preloaded, and restarting the machine's Postgres is not ours to do.
# It runs with Postgres's defaults, as the machine's does.
#
# Usage: loadtest/profile.sh        Knobs: PROFILE_RATE, PROFILE_SECS, PROFILE_PAIRS (500),
#                                          PROFILE_PG_PORT, PROFILE_FREQ (perf Hz, 499)
# Writes loadtest/results/profile-<stamp>/: the SVGs, commandstats.txt, pg_stat_statements.txt,
# chat.json (the load generator's result for the window: rate delivered, latency, CPU by process).
# Needs perf (apt-get install linux-perf) and inferno (cargo install inferno); installs them
# when missing.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
OUT="$ROOT/loadtest/results/profile-$(date -u +%Y%m%dT%H%M%SZ)"
LOGS="$OUT/logs"
mkdir -p "$LOGS"
RATE=${PROFILE_RATE:-5000}
SECS=${PROFILE_SECS:-20}
PAIRS=${PROFILE_PAIRS:-500}
FREQ=${PROFILE_FREQ:-499}
STACK_PG_PORT=${PROFILE_PG_PORT:-15432}
PG_DIR=/tmp/chat-profile-pg-$STACK_PG_PORT
STACK_DB=chat_profile
STACK_PREFIX="profile$(date +%s)"

command -v perf >/dev/null || { apt-get update -qq && apt-get install -y -qq linux-perf; }
command -v inferno-flamegraph >/dev/null || cargo install inferno --locked
deploy/ensure-services.sh

# The Postgres of this run.
PG_BIN=$(find /usr/lib/postgresql -maxdepth 2 -name bin -type d | sort -V | tail -1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }
rm -rf "$PG_DIR"
mkdir -p "$PG_DIR"
[ "$(id -u)" = 0 ] && chown postgres "$PG_DIR" "$LOGS"
as_pg "$PG_BIN/initdb" -D "$PG_DIR/data" -U postgres --auth=trust >"$LOGS/initdb.log"
as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -l "$LOGS/postgres.log" -w start -o \
  "-p $STACK_PG_PORT -k $PG_DIR -c listen_addresses=127.0.0.1 -c shared_preload_libraries=pg_stat_statements -c pg_stat_statements.track=top"
pg_stop() { as_pg "$PG_BIN/pg_ctl" -D "$PG_DIR/data" -m fast stop >/dev/null 2>&1 || true; rm -rf "$PG_DIR"; }
trap pg_stop EXIT

# shellcheck source=loadtest/lib/stack.sh
source loadtest/lib/stack.sh
export LOADGEN_JWT_SECRET="$STACK_SECRET"
stack_log "building (release)"
cargo build --release --locked -p gateway -p persistence-worker -p chat-loadgen
stack_init
trap 'stack_stop; pg_stop' EXIT INT TERM
STACK_PSQL_DB=$STACK_DB stack_psql -c "CREATE EXTENSION IF NOT EXISTS pg_stat_statements"
stack_gateway gw-a 18080 19090
stack_gateway gw-b 18081 19092
stack_worker worker 19191
REDIS_PID=$(pgrep -x redis-server | head -1)
PG_MAIN=$(head -1 "$PG_DIR/data/postmaster.pid")

stack_log "chat: $PAIRS pairs across two nodes at $RATE msg/s; profiling $SECS s of it"
"$STACK_BIN/loadgen" chat --protocol chat --nodes ws://127.0.0.1:18080,ws://127.0.0.1:18081 \
  --pairs "$PAIRS" --rates "$RATE" --step-secs $((SECS + 4)) --warmup-secs 5 \
  --database-url "$STACK_DB_URL" --watch "gateway-a=$PID_gw_a" --watch "gateway-b=$PID_gw_b" \
  --watch "worker=$PID_worker" --watch "redis=$REDIS_PID" --watch "postgres=comm:postgres" \
  --label "profile at $RATE msg/s" --out "$OUT/chat.json" >/dev/null 2>"$LOGS/loadgen.log" &
LOADGEN_PID=$!
for _ in $(seq 1 600); do
  grep -q "step 1:" "$LOGS/loadgen.log" 2>/dev/null && break
  kill -0 "$LOADGEN_PID" 2>/dev/null || { cat "$LOGS/loadgen.log" >&2; exit 1; }
  sleep 0.2
done
sleep 2

commandstats() { redis-cli INFO commandstats | tr -d '\r' | sed -n 's/^cmdstat_\([^:]*\):calls=\([0-9]*\),usec=\([0-9]*\),.*/\1 \2 \3/p'; }
commandstats >"$LOGS/commandstats-before.txt"
STACK_PSQL_DB=$STACK_DB stack_psql -c "SELECT pg_stat_statements_reset()" >/dev/null
pg_pids=$(pgrep -d, -P "$PG_MAIN")
perfs=()
record() { # name pids call-graph
  perf record -q -F "$FREQ" --call-graph "$3" -p "$2" -o "$OUT/$1.perf" -- sleep "$SECS" 2>>"$LOGS/perf.log" &
  perfs+=($!)
}
record gateway "$PID_gw_a" dwarf,16384
record worker "$PID_worker" dwarf,16384
record redis "$REDIS_PID" fp
record postgres "$pg_pids" fp
wait "${perfs[@]}"
commandstats >"$LOGS/commandstats-after.txt"
STACK_PSQL_DB=$STACK_DB stack_psql -c "SELECT calls, rows, round(total_exec_time::numeric, 1) AS total_ms,
    round((total_exec_time / calls * 1000)::numeric, 1) AS us_per_call,
    round((100 * total_exec_time / sum(total_exec_time) OVER ())::numeric, 1) AS pct,
    regexp_replace(left(query, 110), '\s+', ' ', 'g') AS query
  FROM pg_stat_statements WHERE dbid = (SELECT oid FROM pg_database WHERE datname = current_database())
  ORDER BY total_exec_time DESC LIMIT 15" >"$OUT/pg_stat_statements.txt"
wait "$LOADGEN_PID"

# Redis: calls and CPU over the window, by command (scripts' inner commands count too).
join -a 2 -e 0 -o 0,1.2,1.3,2.2,2.3 "$LOGS/commandstats-before.txt" "$LOGS/commandstats-after.txt" 2>/dev/null |
  awk -v secs="$SECS" '{ calls = $4 - $2; usec = $5 - $3; if (calls > 0) { c[$1] = calls; u[$1] = usec; total += usec } }
    END { for (k in c) printf "%-22s %12.0f %10.2f %12.1f %7.1f%%\n", k, c[k] / secs, u[k] / c[k], u[k] / secs / 1000, 100 * u[k] / total }' |
  sort -k4 -n -r >"$LOGS/commandstats-rows.txt"
{ printf '%-22s %12s %10s %12s %8s\n' command calls/s us/call "cpu ms/s" share; cat "$LOGS/commandstats-rows.txt"; } >"$OUT/commandstats.txt"

for part in gateway worker redis postgres; do
  perf script -i "$OUT/$part.perf" 2>/dev/null | inferno-collapse-perf >"$OUT/$part.folded" 2>/dev/null
  inferno-flamegraph --title "$part at $RATE msg/s, worker running ($SECS s, perf at $FREQ Hz)" \
    --width 1600 --minwidth 1.0 <"$OUT/$part.folded" >"$OUT/$part.svg"
  rm -f "$OUT/$part.perf"
done
stack_log "results in $OUT"
