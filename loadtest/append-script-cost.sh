#!/usr/bin/env bash
# Redis CPU per run of our append script, and of variants with one part taken out, so that a
# change to the script can be priced. Starts its own redis-server on a spare port (nothing is
# shared or flushed elsewhere), loads each variant, pipes N appends over 500 conversations into
# it with `redis-cli --pipe`, and reads Redis's own CPU time (INFO cpu) before and after.
# Usage: loadtest/append-script-cost.sh [N]   (default 100000)
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
variants = {
    "1 as the gateway runs it": full,
    "2 without the tail's PEXPIRE": full.replace(expire, ""),
    "2b without the tail's byte count and trim": full.replace(tail_bound, ""),
    "3 without the tail (XADD, PEXPIRE)": full.replace(tail, "").replace(expire, ""),
    "4 without the idempotency record (GET, SET PX)": full.replace(dedup_check, "").replace(dedup_record, ""),
    "5 without PUBLISH": full.replace(publish, ""),
    "6 without tail and record (the script before both)": full.replace(dedup_check, "").replace(dedup_record, "").replace(tail, "").replace(expire, ""),
    "7 without the epoch and backlog checks": full.replace(guards, ""),
}
for i, (name, text) in enumerate(variants.items()):
    open(f"{work}/v{i}.lua", "w").write(text)
    open(f"{work}/v{i}.name", "w").write(name)
PY
cpu() { cli info cpu | awk -F: '/used_cpu_(sys|user):/{s+=$2} END{printf "%.6f", s}'; }
printf '%-52s %14s %10s\n' "variant ($N appends, 500 conversations)" "Redis µs/append" "wall s"
for lua in "$WORK"/v*.lua; do
  sha=$(cli script load "$(cat "$lua")")
  python3 loadtest/lib/append_cost_gen.py "$N" "$sha" >"$WORK/in.resp"
  cli flushall >/dev/null
  python3 loadtest/lib/append_cost_gen.py setup | cli --pipe >/dev/null
  before=$(cpu); t0=$(date +%s.%N)
  cli --pipe <"$WORK/in.resp" >"$WORK/out" 2>&1
  t1=$(date +%s.%N); after=$(cpu)
  grep -q "errors: 0," "$WORK/out" || { cat "$WORK/out"; exit 1; }
  python3 -c 'import sys; n, b, a, t0, t1, N = sys.argv[1:]; print("%-52s %14.1f %10.2f" % (n, (float(a) - float(b)) / int(N) * 1e6, float(t1) - float(t0)))' \
    "$(cat "${lua%.lua}.name")" "$before" "$after" "$t0" "$t1" "$N"
done
