#!/usr/bin/env bash
# Load comparison: kanali-proxy (1 worker thread) vs nginx vs HAProxy on the same pinned core,
# using the team's harness (BENCH_DIR, default ../shared/bench: setup.sh + compare.sh).
# Usage: e2e/bench/compare.sh   (env for the harness passes through: DURATION, ROUNDS, ...)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
[ -x "$BENCH_DIR/compare.sh" ] || { echo "no load harness at $BENCH_DIR (set BENCH_DIR)" >&2; exit 1; }
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
"$bin/kanali-controller" --manifests e2e/bench/manifests --grpc-listen 127.0.0.1:19443 \
  --admin-listen 127.0.0.1:19080 --log warn &
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null' EXIT
export CMD_kanali="$bin/kanali-proxy --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn"
"$BENCH_DIR/compare.sh" kanali=http://127.0.0.1:18083/api/
