#!/usr/bin/env bash
# Peak gateway memory while many users register at once (argon2id: 19 MiB a hash).
# Usage: loadtest/password-hash-memory.sh THREADS   (CHAT_GATEWAY_PASSWORD_HASH_CONCURRENCY; 0 = one
# per HTTP worker). 200 registrations, 100 at a time, against one debug gateway with 2 workers.
# Needs Redis on 6379 and Postgres on 5432 (user postgres/postgres); prints the peak RSS.
set -euo pipefail
DB=chat_hashmem_$$; PORT=$((30000 + RANDOM % 5000))
PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres -c "CREATE DATABASE $DB"
CHAT_DATABASE_URL=postgres://postgres:postgres@127.0.0.1:5432/$DB CHAT_REDIS_PREFIX=hm$$ CHAT_JWT_SECRET=$(head -c 48 /dev/urandom | base64) \
CHAT_GATEWAY_LISTEN=127.0.0.1:$PORT CHAT_GATEWAY_INTERNAL_LISTEN=127.0.0.1:$((PORT+1)) CHAT_GATEWAY_WORKERS=2 \
CHAT_GATEWAY_PASSWORD_HASH_CONCURRENCY=$1 CHAT_GATEWAY_REGISTRATIONS_PER_IP=1000 CHAT_REDIS_REQUIRE_DURABILITY=false CHAT_LOG_FORMAT=text "${STACK_BIN:-target/debug}/gateway" >/dev/null 2>&1 &
GW=$!
for _ in $(seq 1 100); do curl -fs http://127.0.0.1:$((PORT+1))/readyz >/dev/null 2>&1 && break; sleep 0.2; done
start=$(date +%s.%N)
seq 1 200 | xargs -P 100 -I{} curl -s -o /dev/null -w '%{http_code}\n' -XPOST http://127.0.0.1:$PORT/api/v1/auth/register -H 'content-type: application/json' -d '{"name":"u{}","email":"u{}-'$$'@example.com","password":"password123"}' | sort | uniq -c | tr '\n' ' '
end=$(date +%s.%N)
echo "concurrency=$1 peak RSS: $(grep VmHWM /proc/$GW/status | awk '{print $2/1024 " MiB"}') time: $(awk -v a="$start" -v b="$end" 'BEGIN {printf "%.1f", b - a}') s"
kill $GW; wait $GW 2>/dev/null || true
PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres -c "DROP DATABASE $DB"
