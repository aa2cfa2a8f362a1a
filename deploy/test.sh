#!/usr/bin/env bash
# Runs every test of the project against real Redis and Postgres (started or installed first if
# needed). Usage: deploy/test.sh   (what .ci/run calls)
set -euo pipefail
cd "$(dirname "$0")/.."

# The port overrides are for checking ensure-services.sh alone; this script uses the defaults.
unset CHAT_LOCAL_REDIS_PORT CHAT_LOCAL_PG_PORT

# Each stage's heading says when it started, and the end lists every stage's duration: CI's
# budget on a fresh machine is 25 minutes, and this is where it goes.
started=$SECONDS
stage_at=$SECONDS
stage_name=""
durations=""
stage() {
  if [ -n "$stage_name" ]; then
    durations+=$(printf '%6ds  %s' $((SECONDS - stage_at)) "$stage_name")$'\n'
  fi
  stage_at=$SECONDS
  stage_name=$1
  echo "== [+$((SECONDS - started))s] $1"
}
stage "services (deploy/ensure-services.sh: installs and starts Redis and Postgres if needed)"
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

stage "deploy checks (Dockerfiles, compose, Helm chart, kustomize manifests)"
deploy/check-deploy.sh
stage "observability (promtool check/test rules, dashboard, runbooks, metric names)"
deploy/check-observability.sh
stage "architecture (module graph without circles, redis only in the Redis backend, SQL only in the store)"
python3 deploy/checks/architecture.py --check
stage "cargo fmt --check"
cargo fmt --all -- --check
stage "cargo clippy"
cargo clippy --workspace --all-targets --locked -- -D warnings
stage "cargo test"
cargo test --workspace --locked
stage "the behaviour tests again, on a Redis Cluster (deploy/redis-cluster.sh: 3 masters, 3 replicas)"
# The integration tests built above; only the run differs (CHAT_TEST_REDIS_CLUSTER_URLS). With
# --workspace, as above: `-p gateway` alone unifies dependency features differently and rebuilt
# tokio, actix and the rest (about 3 minutes).
# Left out here, each shown as filtered: the one-process backend's cases (`::memory`), which no
# Redis touches; the two tests on a Redis of their own (the same in both passes); and three that
# look at one instance's internals (PUBSUB NUMSUB, the stream read directly, keys deleted
# through one connection). tests/redis_cluster.rs covers the cluster's side of those.
cluster_urls=$(deploy/redis-cluster.sh start 7100 | sed -n 's/^CHAT_REDIS_CLUSTER_URLS=//p')
trap 'deploy/redis-cluster.sh stop 7100; drop_test_databases' EXIT
CHAT_TEST_REDIS_CLUSTER_URLS="$cluster_urls" cargo test --locked --workspace \
  --test direct_messages --test conversations --test presence --test password_reset \
  --test handshake_and_input --test rolling_restart --test slow_reader --test attacks \
  -- --skip ::memory \
  --skip one_account_flooding_from_many_connections_is_held_to_its_budget \
  --skip a_revocation_lost_in_a_pubsub_gap_still_closes_the_old_session \
  --skip subscriptions_follow_local_connections \
  --skip history_never_skips_a_seq_pending_on_a_dead_worker \
  --skip lost_presence_entries_are_restored_by_the_next_heartbeat
deploy/redis-cluster.sh stop 7100
trap drop_test_databases EXIT
stage "fuzz the client-frame decoder and validator (deploy/checks/fuzz.sh, about a minute)"
deploy/checks/fuzz.sh
stage "k6 smoke (loadtest/k6/chat.js against two local gateway nodes)"
# The stages below run the gateway and worker binaries that `cargo test` built for the
# integration tests (target/debug). Building them again with `cargo build` would recompile tokio
# and everything above it without the test-only features: a minute of CI for nothing.
for bin in gateway persistence-worker; do
  [ -x "${CARGO_TARGET_DIR:-$PWD/target}/debug/$bin" ] || { echo "test.sh: no $bin binary after cargo test" >&2; exit 1; }
done
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" loadtest/k6-smoke.sh
stage "Autobahn WebSocket test cases against /debug/echo (deploy/checks/autobahn.sh)"
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/checks/autobahn.sh
stage "web client in headless Chromium (deploy/check-web.sh)"
STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/check-web.sh
stage "Prometheus scrapes a local gateway and worker"
SCRAPE_STRICT=1 STACK_BIN="${CARGO_TARGET_DIR:-$PWD/target}/debug" deploy/checks/scrape-local-stack.sh
stage "done"
printf 'stage durations (seconds):\n%s%6ds  total\n' "$durations" $((SECONDS - started))
