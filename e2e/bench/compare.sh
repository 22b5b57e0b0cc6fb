#!/usr/bin/env bash
# Load comparison: kanali-proxy (1 worker thread) vs nginx vs HAProxy on the same pinned core,
# using the team's harness (BENCH_DIR, default ../shared/bench: setup.sh + compare.sh).
# Usage: e2e/bench/compare.sh   (env for the harness passes through: DURATION, ROUNDS, ...)
#        OTHER=path/to/kanali-proxy e2e/bench/compare.sh   adds that build as "other", same run
# After the harness's table (medians over rounds), rounds.py pairs each round's targets with
# nginx's: ratios round by round, and how reliably they are under 1.0.
source "$(dirname "$0")/common.sh"
start_controller
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null' EXIT
export CMD_kanali="$proxy_cmd"
targets=(kanali=http://127.0.0.1:18083/api/)
if [ -n "${OTHER:-}" ]; then
  export CMD_other="$OTHER --controller http://127.0.0.1:19443 --listen 127.0.0.1:18093 --admin-listen 127.0.0.1:18094 --worker-threads 1 --log warn"
  targets+=(other=http://127.0.0.1:18093/api/)
fi
export OUT=${OUT:-${TMPDIR:-/tmp}/kanali-bench/$(date +%Y%m%d-%H%M%S)}
"$BENCH_DIR/compare.sh" "${targets[@]}"
echo
python3 "$root/e2e/bench/rounds.py" "$OUT/raw.tsv"
