#!/usr/bin/env bash
# --worker-threads: one worker beside WORKERS workers, thread per core (the default: one
# current-thread runtime and SO_REUSEPORT socket per worker) and --work-stealing (one
# multi-thread runtime over them), all pinned to the same PROXY_CPU by the harness, in one run.
# On a 2-core machine wrk and the upstream take the other core, so this shows what each way
# costs per request on one core, not how it scales across cores.
# Usage: e2e/bench/workers.sh   (env: WORKERS=2, and the harness's DURATION, ROUNDS, ...)
source "$(dirname "$0")/common.sh"
start_controller
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null' EXIT
n=${WORKERS:-2}
at() { # PORT ADMIN_PORT EXTRA...: the bench proxy on other ports, with EXTRA flags
  local port=$1 admin=$2; shift 2
  local cmd="${proxy_cmd/--listen 127.0.0.1:18083 --admin-listen 127.0.0.1:18084 --worker-threads 1/--listen 127.0.0.1:$port --admin-listen 127.0.0.1:$admin}"
  echo "$cmd $*"
}
export CMD_kanali="$proxy_cmd"
CMD_kanali_per_core=$(at 18093 18094 --worker-threads "$n")
CMD_kanali_stealing=$(at 18095 18096 --worker-threads "$n" --work-stealing)
export CMD_kanali_per_core CMD_kanali_stealing
"$BENCH_DIR/compare.sh" kanali=http://127.0.0.1:18083/api/ \
  kanali_per_core=http://127.0.0.1:18093/api/ kanali_stealing=http://127.0.0.1:18095/api/
