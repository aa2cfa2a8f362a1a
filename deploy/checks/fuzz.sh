#!/usr/bin/env bash
# A bounded libFuzzer run of the client-frame decoder and validator (fuzz/, cargo-fuzz with
# AddressSanitizer) over the committed corpus, failing on any panic, crash or leak. New inputs
# go to a temporary directory, so the committed corpus stays as it is; to grow it, see
# docs/conformance.md#fuzzing. FUZZ_SECONDS (default 60) bounds the run.
#
# cargo-fuzz needs nightly compiler flags (-Zsanitizer). This machine kind has one toolchain
# and can fetch no other, so the stable compiler is told to accept them (RUSTC_BOOTSTRAP=1),
# the usual way for a pinned stable toolchain; cargo-fuzz itself is installed from crates.io
# once, into FUZZ_TOOLS (default /var/tmp/chat-tools).
set -euo pipefail
cd "$(dirname "$0")/../.."
ROOT=$(pwd)
SECONDS_BUDGET=${FUZZ_SECONDS:-60}
TOOLS=${FUZZ_TOOLS:-/var/tmp/chat-tools}
CARGO_FUZZ_VERSION=0.13.2
export PATH="$TOOLS/bin:$PATH"
export RUSTC_BOOTSTRAP=1

if ! cargo fuzz --version 2>/dev/null | grep -qF "$CARGO_FUZZ_VERSION"; then
  echo "installing cargo-fuzz $CARGO_FUZZ_VERSION into $TOOLS"
  cargo install --quiet --locked --root "$TOOLS" cargo-fuzz --version "$CARGO_FUZZ_VERSION"
fi

work=$(mktemp -d /tmp/chat-fuzz.XXXXXX)
cleanup() { rm -rf "$work"; }
trap cleanup EXIT
mkdir -p "$work/new"

cd "$ROOT/fuzz"
cargo fuzz build client_frame
log="$work/fuzz.log"
# libFuzzer writes new inputs to the first corpus directory only; -timeout fails a single input
# that takes over 10 s, -rss_limit_mb one that balloons memory.
if ! cargo fuzz run client_frame "$work/new" corpus/client_frame -- \
  -dict=client_frame.dict -max_total_time="$SECONDS_BUDGET" -timeout=10 -rss_limit_mb=2048 \
  -artifact_prefix="$work/" -print_final_stats=1 >"$log" 2>&1; then
  tail -n 60 "$log"
  for crash in "$work"/crash-* "$work"/leak-* "$work"/timeout-* "$work"/oom-*; do
    [ -e "$crash" ] || continue
    mkdir -p "$ROOT/fuzz/artifacts"
    cp "$crash" "$ROOT/fuzz/artifacts/"
    echo "fuzz: failing input kept in fuzz/artifacts/$(basename "$crash")" \
      "(replay: RUSTC_BOOTSTRAP=1 cargo fuzz run client_frame fuzz/artifacts/$(basename "$crash"), from fuzz/)"
  done
  echo "fuzz: the client_frame target failed" >&2
  exit 1
fi
runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
new=$(ls "$work/new" | wc -l)
echo "fuzz: client_frame ran ${runs:-?} inputs in ${SECONDS_BUDGET}s without a failure" \
  "($(ls corpus/client_frame | wc -l) committed, $new new this run)"
