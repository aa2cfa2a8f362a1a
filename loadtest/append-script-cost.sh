#!/usr/bin/env bash
# Redis CPU per run of our append script, and of variants with one part taken out, so that a
# change to the script can be priced. Starts its own redis-server on a spare port (nothing is
# shared or flushed elsewhere), loads each variant, pipes N appends over 500 conversations into
# it with `redis-cli --pipe`, and reads Redis's own CPU time (INFO cpu) before and after.
# Usage: [ROUNDS=3] [VARIANTS="0 10"] [RUNS_OUT=dir] loadtest/append-script-cost.sh [N]
#   N appends per run (default 100000); each variant runs ROUNDS times; VARIANTS picks variants by
#   number (all by default; with two, it also prints their paired ratio); RUNS_OUT keeps each run.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-100000}
WORK=$(mktemp -d /tmp/chat-append-cost.XXXXXX)
PORT=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')
redis-server --port "$PORT" --bind 127.0.0.1 --save '' --appendonly no --daemonize no >"$WORK/redis.log" 2>&1 &
REDIS=$!
trap 'kill $REDIS 2>/dev/null || true; wait $REDIS 2>/dev/null || true; rm -rf "$WORK"' EXIT
cli() { redis-cli -p "$PORT" "$@"; }
for _ in $(seq 1 50); do cli ping >/dev/null 2>&1 && break; sleep 0.1; done

# The script exactly as the gateway runs it, then the variants.
sed -n '/^const APPEND_LUA: &str = r#"/,/^"#;/p' chat-core/src/log/redis.rs | sed '1d;$d' >"$WORK/full.lua"
python3 - "$WORK" <<'PY'
import sys
work = sys.argv[1]
full = open(f"{work}/full.lua").read()
dedup_check = """local prior = redis.call('GET', KEYS[5])
if prior then
  -- A write, so that a WAIT after this script also covers the original append.
  redis.call('PEXPIRE', KEYS[5], ARGV[13])
  local seq, msg_id, ts = string.match(prior, '^(%d+):([^:]+):(%d+)$')
  return {tonumber(seq), msg_id, tonumber(ts)}
end
"""
guards = """local epoch = redis.call('GET', KEYS[6])
if not epoch then return {-1} end
if redis.call('HGET', KEYS[1], 'e') ~= epoch then return {-2} end
if redis.call('XLEN', KEYS[2]) >= tonumber(ARGV[16]) then return {-3} end
"""
dedup_record = "redis.call('SET', KEYS[5], seq .. ':' .. ARGV[1] .. ':' .. ARGV[6], 'PX', ARGV[13])\n"
# The tail: its XADD and the byte count and trim after it (up to the tail's PEXPIRE).
tail = full[full.index("local added = redis.pcall('XADD', KEYS[3]"):full.index(expire_line := "redis.call('PEXPIRE', KEYS[3], ARGV[12])\n")]
tail_bound = tail[tail.index("  local len = redis.call('XLEN', KEYS[3])"):tail.rindex("end\n")]
expire = "redis.call('PEXPIRE', KEYS[3], ARGV[12])\n"
publish = "for i = 18, #ARGV do redis.call('PUBLISH', ARGV[i], payload) end\n"
for part in (dedup_check, guards, dedup_record, tail, expire, publish):
    assert part in full, f"the append script changed; update append-script-cost.sh: {part!r}"
xadd_only = "redis.call('XADD', KEYS[2], '*', 'msg_id', ARGV[1], 'conv', ARGV[2], 'seq', 1, 'from', ARGV[3], 'to', ARGV[4], 'body', ARGV[5], 'ts', ARGV[6])\nreturn {1}\n"
variants = {
    "0 as the gateway runs it": full,
    "1 without the tail's PEXPIRE": full.replace(expire, ""),
    "2 without the tail's byte count and trim": full.replace(tail_bound, ""),
    "3 without the tail (XADD, PEXPIRE)": full.replace(tail, "").replace(expire, ""),
    "4 without the idempotency record (GET, SET PX)": full.replace(dedup_check, "").replace(dedup_record, ""),
    "5 without PUBLISH": full.replace(publish, ""),
    "6 without tail and record (the script before both)": full.replace(dedup_check, "").replace(dedup_record, "").replace(tail, "").replace(expire, ""),
    "7 without the epoch and backlog checks": full.replace(guards, ""),
    # Floors: what any script costs that is called with the same keys and arguments.
    "8 floor: the same call answering {1}, no Redis call": "return {1}\n",
    "9 floor: only the partition stream's XADD": xadd_only,
    # Tried after run 5 and not adopted: 10 calls instead of 13, no cheaper (docs/benchmarks.md).
    "10 ten calls (loadtest/lib/append-ten-calls.lua)": open("loadtest/lib/append-ten-calls.lua").read(),
}
for i, (name, text) in enumerate(variants.items()):
    open(f"{work}/v{i}.lua", "w").write(text)
    open(f"{work}/v{i}.name", "w").write(name)
PY
cpu() { cli info cpu | awk -F: '/used_cpu_(sys|user):/{s+=$2} END{printf "%.6f", s}'; }
# Each variant runs ROUNDS times, the variants taking turns, so that a slow spell of the machine
# falls on all of them; the table gives each one's median and its range.
ROUNDS=${ROUNDS:-3}
for round in $(seq 1 "$ROUNDS"); do
  for lua in "$WORK"/v*.lua; do
    v=$(basename "$lua" .lua); v=${v#v}
    [ -z "${VARIANTS:-}" ] || [[ " $VARIANTS " == *" $v "* ]] || continue
    sha=$(cli script load "$(cat "$lua")")
    python3 loadtest/lib/append_cost_gen.py "$N" "$sha" >"$WORK/in.resp"
    cli flushall >/dev/null
    python3 loadtest/lib/append_cost_gen.py setup | cli --pipe >/dev/null
    before=$(cpu); t0=$(date +%s.%N)
    cli --pipe <"$WORK/in.resp" >"$WORK/out" 2>&1
    t1=$(date +%s.%N); after=$(cpu)
    grep -q "errors: 0," "$WORK/out" || { cat "$WORK/out"; exit 1; }
    python3 -c 'import sys; b, a, t0, t1, N = sys.argv[1:]; print((float(a) - float(b)) / int(N) * 1e6, float(t1) - float(t0))' \
      "$before" "$after" "$t0" "$t1" "$N" >>"${lua%.lua}.runs"
  done
done
[ -z "${RUNS_OUT:-}" ] || { mkdir -p "$RUNS_OUT"; cp "$WORK"/v*.runs "$WORK"/v*.name "$RUNS_OUT"/; }
python3 - "$WORK" "$N" "$ROUNDS" <<'PY'
import glob, re, statistics, sys
work, n, rounds = sys.argv[1:]
print("%-52s %16s %14s %8s" % (f"variant ({n} appends, 500 conversations)", "Redis µs/append", f"range ({rounds} runs)", "wall s"))
files = sorted(glob.glob(f"{work}/v*.runs"), key=lambda f: int(re.search(r"v(\d+)\.runs$", f).group(1)))
cpus = []
for runs in files:
    rows = [tuple(map(float, line.split())) for line in open(runs)]
    cpu = [r[0] for r in rows]
    cpus.append(cpu)
    wall = [r[1] for r in rows]
    name = open(runs[:-len(".runs")] + ".name").read()
    print("%-52s %16.1f %14s %8.2f" % (name, statistics.median(cpu), f"{min(cpu):.1f}-{max(cpu):.1f}", statistics.median(wall)))
if len(cpus) == 2:
    # Two variants: the rounds pair up (each round ran both, one after the other).
    ratios = [b / a for a, b in zip(*cpus)]
    print("paired, second / first: median %.3f (%.3f-%.3f), the second cheaper in %d of %d rounds"
          % (statistics.median(ratios), min(ratios), max(ratios), sum(r < 1 for r in ratios), len(ratios)))
PY
