#!/usr/bin/env bash
# Runs every test of the project against real Redis and Postgres (started or installed first if
# needed). Usage: deploy/test.sh   (what .ci/run calls)
set -euo pipefail
cd "$(dirname "$0")/.."

# The port overrides are for checking ensure-services.sh alone; this script uses the defaults.
unset CHAT_LOCAL_REDIS_PORT CHAT_LOCAL_PG_PORT
deploy/ensure-services.sh

export CHAT_TEST_REDIS_URL="${CHAT_TEST_REDIS_URL:-redis://127.0.0.1:6379}"
export CHAT_TEST_PG="${CHAT_TEST_PG:-postgres://postgres:postgres@127.0.0.1:5432}"

# Each integration test makes its own database (chat_t_*): drop them before (leftovers of an
# interrupted run) and after this run.
drop_test_databases() {
  PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres -At \
    -c "SELECT 'DROP DATABASE IF EXISTS ' || quote_ident(datname) || ';' FROM pg_database WHERE datname LIKE 'chat\_t\_%'" \
    | PGPASSWORD=postgres psql -q -h 127.0.0.1 -U postgres -d postgres >/dev/null 2>&1 || true
}
drop_test_databases
trap drop_test_databases EXIT

echo "== deploy checks (Dockerfiles, compose, Helm chart, kustomize manifests)"
deploy/check-deploy.sh
echo "== observability (promtool check/test rules, dashboard, runbooks, metric names)"
deploy/check-observability.sh
echo "== architecture (module graph without circles, redis only in the Redis backend, SQL only in the store)"
python3 deploy/checks/architecture.py --check
echo "== cargo fmt --check"
cargo fmt --all -- --check
echo "== cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
echo "== cargo test"
cargo test --workspace --locked
echo "== the behaviour tests again, on a Redis Cluster (deploy/redis-cluster.sh: 3 masters, 3 replicas)"
# The integration tests built above; only the run differs (CHAT_TEST_REDIS_CLUSTER_URLS). With
# --workspace, as above: `-p gateway` alone unifies dependency features differently and rebuilt
# tokio, actix and the rest (about 3 minutes).
# Tests that restart or kill Redis start their own instance or cluster and ran above.
cluster_urls=$(deploy/redis-cluster.sh start 7100 | sed -n 's/^CHAT_REDIS_CLUSTER_URLS=//p')
trap 'deploy/redis-cluster.sh stop 7100; drop_test_databases' EXIT
CHAT_TEST_REDIS_CLUSTER_URLS="$cluster_urls" cargo test --locked --workspace \
  --test direct_messages --test conversations --test presence --test password_reset \
  --test handshake_and_input --test rolling_restart --test slow_reader --test attacks
deploy/redis-cluster.sh stop 7100
trap drop_test_databases EXIT
echo "== fuzz the client-frame decoder and validator (deploy/checks/fuzz.sh, about a minute)"
deploy/checks/fuzz.sh
echo "== k6 smoke (loadtest/k6/chat.js against two local gateway nodes)"
# The stages below run the gateway and worker binaries that `cargo test` built for the
# integration tests (target/debug). Building them again with `cargo build` would recompile tokio
# and everything above it without the test-only features: a minute of CI for nothing.
for bin in gateway persistence-worker; do
  [ -x "${CARGO_TARGET_DIR:-$PWD/target}/debug/$bin" ] || { echo "test.sh: no $bin binary after cargo test" >&2; exit 1; }
done
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" loadtest/k6-smoke.sh
echo "== Autobahn WebSocket test cases against /debug/echo (deploy/checks/autobahn.sh)"
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/checks/autobahn.sh
echo "== web client in headless Chromium (deploy/check-web.sh)"
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/check-web.sh
echo "== Prometheus scrapes a local gateway and worker"
SCRAPE_STRICT=1 STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/checks/scrape-local-stack.sh
