# Sourced by the load scripts (compare.sh, compare-tls.sh, h2.sh, apikey.sh, wasm.sh): the
# team's harness, a release build, the bench controller and the kanali-proxy command they all run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
[ -x "$BENCH_DIR/compare.sh" ] || { echo "no load harness at $BENCH_DIR (set BENCH_DIR)" >&2; exit 1; }
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
# A bench proxy has no load balancer to leave: it exits at once when stopped, not after the
# 5 s during which a pod's proxy still answers while its endpoints are taken out.
export KANALI_SHUTDOWN_DELAY_SECS=0
# One worker thread, like the harness's nginx and HAProxy; scripts append listener flags.
proxy_cmd="$bin/kanali-proxy --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn"

source "$root/e2e/bench/stop.sh"

# Starts the controller the proxies subscribe to, in the background (standalone, on the
# bench's manifests); the caller records $! to stop it.
start_controller() {
  "$bin/kanali-controller" --manifests e2e/bench/manifests --grpc-listen 127.0.0.1:19443 \
    --admin-listen 127.0.0.1:19080 --log warn &
}

# measure_routes PID PATH... : ROUNDS interleaved wrk runs (after a 2 s warm-up each) on
# http://127.0.0.1:18083/PATH/ with the extra wrk arguments in the array wrk_args, pinned to
# LOAD_CPU; prints req/s, p99 and PID's CPU µs per request per route, against the first route.
# A non-2xx answer fails the run. Used by apikey.sh and wasm.sh.
measure_routes() {
  local pid=$1; shift
  local raw hz r path a b out rps total p99 non2xx cpu
  raw=$(mktemp); hz=$(getconf CLK_TCK)
  ticks() { awk '{print $14 + $15}' "/proc/$pid/stat"; }
  printf 'route\tround\treq/s\tp99_ms\tcpu_us_per_req\n' | tee "$raw"
  for r in $(seq "$ROUNDS"); do
    for path in "$@"; do
      taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s "${wrk_args[@]}" "http://127.0.0.1:18083/$path/" >/dev/null
      a=$(ticks)
      out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency "${wrk_args[@]}" "http://127.0.0.1:18083/$path/")
      b=$(ticks)
      rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
      total=$(awk '/requests in/ {print $1}' <<<"$out")
      p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
      non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
      [ -z "$non2xx" ] || { echo "/$path/: $non2xx non-2xx answers" >&2; rm -f "$raw"; return 1; }
      cpu=$(awk -v a="$a" -v b="$b" -v n="$total" -v hz="$hz" 'BEGIN{printf "%.2f", (b - a) / hz * 1e6 / n}')
      printf '%s\t%s\t%s\t%s\t%s\n' "/$path/" "$r" "$rps" "$p99" "$cpu" | tee -a "$raw"
    done
  done
  echo
  awk -F'\t' -v order="$(printf '/%s/ ' "$@")" 'NR > 1 { n[$1]++; rps[$1] += $3; p99[$1] += $4; cpu[$1] += $5 }
    END { k = split(order, o, " "); base = o[1]
          printf "| route | req/s | p99 ms | CPU µs/req | req/s vs %s | added p99 ms |\n|---|---:|---:|---:|---:|---:|\n", base
          for (i = 1; i <= k; i++) { r = o[i]; printf "| %s | %.0f | %.2f | %.2f | %.2f× | %+.2f |\n", r, rps[r]/n[r], p99[r]/n[r], cpu[r]/n[r], (rps[r]/n[r])/(rps[base]/n[base]), p99[r]/n[r] - p99[base]/n[base] } }' "$raw"
  rm -f "$raw"
}

# route NAME PATH [PLUGINS_YAML]: an ApiProxy in namespace bench from PATH to the harness's
# upstream, with the given `plugins:` lines, as one YAML document.
route() {
  printf 'apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {name: %s, namespace: bench}\nspec:\n  source: {path: %s}\n  target: {path: /, backend: {endpoint: "http://127.0.0.1:18080"}}\n' "$1" "$2"
  [ -z "${3:-}" ] || printf '%s\n' "$3"
  printf -- '---\n'
}
