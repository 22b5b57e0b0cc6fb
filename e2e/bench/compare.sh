#!/usr/bin/env bash
# Load comparison: kanali-proxy (1 worker thread) vs nginx vs HAProxy on the same pinned core,
# using the team's harness (BENCH_DIR, default ../shared/bench: setup.sh + compare.sh).
# Usage: e2e/bench/compare.sh   (env for the harness passes through: DURATION, ROUNDS, ...)
source "$(dirname "$0")/common.sh"
start_controller
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null' EXIT
export CMD_kanali="$proxy_cmd"
"$BENCH_DIR/compare.sh" kanali=http://127.0.0.1:18083/api/
