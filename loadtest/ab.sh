#!/usr/bin/env bash
# Before and after, minutes apart on one machine: runs one `run-bench.sh` workload for our stack
# alternately from two checkouts, ROUNDS times each (A B A B ...), and prints each run's numbers:
#   chat (default): delivered/s and latency at the offered rate and in the closed loop, worker
#     running then paused, with the CPU of the gateways and Redis;
#   conns: handshakes/s, handshake p50/p99, RSS per connection, and the CPU of the gateway,
#     Postgres, Redis and the generators while connecting.
# Each checkout builds (or reuses) its release binaries in its own target directory; both sides
# are measured with the same load generator only if their loadtest/harness agree.
# Usage: [AB_WORKLOAD=chat|conns] loadtest/ab.sh BEFORE_TREE AFTER_TREE [ROUNDS (2)]
# Env: BEFORE_TARGET, AFTER_TARGET (default <tree>/target), BENCH_RATES (5000), BENCH_PAIRS,
#   BENCH_STEP_SECS, BENCH_WINDOW, BENCH_CONNS, BENCH_CONN_PROCS (passed to run-bench.sh).
set -euo pipefail
BEFORE=$(cd "$1" && pwd)
AFTER=$(cd "$2" && pwd)
ROUNDS=${3:-2}
WORKLOAD=${AB_WORKLOAD:-chat}
case $WORKLOAD in chat | conns) ;; *) echo "ab: AB_WORKLOAD is chat or conns" >&2; exit 2 ;; esac
export BENCH_TARGETS=ours BENCH_RATES=${BENCH_RATES:-5000} BENCH_PLOT=0
declare -A TARGET=([before]="${BEFORE_TARGET:-$BEFORE/target}" [after]="${AFTER_TARGET:-$AFTER/target}")
declare -A TREE=([before]="$BEFORE" [after]="$AFTER")
LOGS=$(mktemp -d /tmp/ab.XXXXXX)
runs=()
for round in $(seq 1 "$ROUNDS"); do
  for side in before after; do
    log="$LOGS/$round-$side.log"
    echo "ab: round $round, $side (${TREE[$side]}), log $log" >&2
    (cd "${TREE[$side]}" && CARGO_TARGET_DIR="${TARGET[$side]}" loadtest/run-bench.sh "$WORKLOAD") >"$log" 2>&1 ||
      { echo "ab: run-bench.sh failed; see $log" >&2; exit 1; }
    out=$(sed -n 's/.*results in \(.*\)$/\1/p' "$log" | tail -1)
    echo "ab: results in $out" >&2
    runs+=("$side=$round=$out")
  done
done
python3 - "$WORKLOAD" "${runs[@]}" <<'PY'
import json, sys
from pathlib import Path
if sys.argv[1] == "conns":
    print(f"{'run':<12} {'opened':>7} {'secs':>6} {'hs/s':>6} {'p50 ms':>7} {'p99 ms':>7} {'KiB/conn':>8}  CPU % while connecting")
    for arg in sys.argv[2:]:
        side, rnd, out = arg.split("=", 2)
        r = json.load(open(Path(out) / "conns-ours.json"))["result"]
        cpu = " ".join(f"{k} {v:.0f}" for k, v in r.get("cpu_percent_connecting", {}).items())
        print(f"{side + ' ' + rnd:<12} {r['opened']:>7} {r['connect_secs']:>6.1f} {r.get('handshakes_per_sec', 0):>6.0f} "
              f"{r['handshake']['p50_ms']:>7.0f} {r['handshake']['p99_ms']:>7.0f} {r['rss_per_conn_bytes'] / 1024:>8.1f}  {cpu}")
    sys.exit(0)
print(f"{'run':<12} {'worker':<8} {'step':<12} {'delivered/s':>11} {'p50 ms':>8} {'p99 ms':>8} {'gw CPU %':>9} {'redis %':>8}")
for arg in sys.argv[2:]:
    side, rnd, out = arg.split("=", 2)
    for name, worker in (("chat-ours.json", "running"), ("chat-ours-no-worker.json", "paused")):
        path = Path(out) / name
        if not path.exists():
            continue
        for step in json.load(open(path))["result"]["steps"]:
            label = f"{step['offered_per_sec']}/s" if step["kind"] == "rate" else f"closed w{step['window']}"
            cpu = step.get("cpu_percent", {})
            gw = sum(v for k, v in cpu.items() if k.startswith("gateway"))
            lat = step["latency"]
            print(f"{side + ' ' + rnd:<12} {worker:<8} {label:<12} {step['delivered_per_sec']:>11.0f} "
                  f"{lat['p50_ms']:>8.2f} {lat['p99_ms']:>8.2f} {gw:>9.0f} {cpu.get('redis', 0):>8.0f}")
PY
