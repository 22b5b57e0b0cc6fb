#!/usr/bin/env bash
# --worker-threads: one worker (tokio's current-thread runtime) beside WORKERS workers (the
# work-stealing multi-thread runtime), both pinned to the same PROXY_CPU by the harness, in one
# run. On a 2-core machine wrk and the upstream take the other core, so this shows what the
# multi-thread runtime costs per request on one core, not how it scales across cores.
# Usage: e2e/bench/workers.sh   (env: WORKERS=2, and the harness's DURATION, ROUNDS, ...)
source "$(dirname "$0")/common.sh"
start_controller
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null' EXIT
n=${WORKERS:-2}
export CMD_kanali="$proxy_cmd"
export CMD_kanali_mt="${proxy_cmd/--listen 127.0.0.1:18083 --admin-listen 127.0.0.1:18084 --worker-threads 1/--listen 127.0.0.1:18093 --admin-listen 127.0.0.1:18094 --worker-threads $n}"
"$BENCH_DIR/compare.sh" kanali=http://127.0.0.1:18083/api/ kanali_mt=http://127.0.0.1:18093/api/
