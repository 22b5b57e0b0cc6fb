#!/usr/bin/env bash
# Instructions per request, counted by callgrind: a per-request regression guard that does not
# depend on the wall clock (valgrind counts the same instructions however busy the machine is).
#
# One kanali-proxy (release, 1 worker) runs under `valgrind --tool=callgrind` in front of the
# harness's nginx upstream; a keep-alive client sends WARM requests, then the counters are
# zeroed, then N requests are sent and the counters dumped: instructions / N is the figure.
#
# Usage: e2e/bench/callgrind.sh [PATH]   (PATH default /api/; N=5000 WARM=500;
#        LIMIT=instructions fails the run when the figure is higher, for CI or a pre-push check;
#        ANNOTATE=1 prints the top functions; KEEP=file keeps the callgrind dump;
#        CONNS=64 loads it with wrk over that many connections for DURATION=15s instead, as the
#        load comparison does: the runtime then parks once for many requests, not for each;
#        VALGRIND_ARGS adds callgrind options, e.g. --dump-instr=yes to see costs by address)
#
# `make test` runs it with a LIMIT (e2e/scripts/test-all.sh). Only the proxy is built for
# release: the controller that serves it its routes is the debug build, whose speed the figure
# does not see, and a release build of it (kube, k8s-openapi) would cost CI minutes.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
N=${N:-5000} WARM=${WARM:-500} path=${1:-/api/}
for tool in valgrind nginx; do
  command -v $tool >/dev/null ||
    { echo "$tool is needed: apt-get install $tool (.ci/run installs it)" >&2; exit 1; }
done
cd "$root"
cargo build -q --release -p kanali-dataplane --bin kanali-proxy
cargo build -q -p kanali-controller --bin kanali-controller
bin=${CARGO_TARGET_DIR:-$root/target}/release
controller=${CARGO_TARGET_DIR:-$root/target}/debug/kanali-controller
tmp=$(mktemp -d); chmod 755 "$tmp"
pids=()
source "$root/e2e/bench/stop.sh"
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT

nginx -p "$tmp" -e "$tmp/upstream.err" -c "$root/e2e/bench/callgrind-upstream.conf" -g 'daemon off;' & pids+=($!)
"$controller" --manifests e2e/bench/manifests --grpc-listen 127.0.0.1:19443 \
  --admin-listen 127.0.0.1:19080 --log warn & pids+=($!)
valgrind --tool=callgrind --callgrind-out-file="$tmp/cg.out" --instr-atstart=yes ${VALGRIND_ARGS:-} \
  "$bin/kanali-proxy" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 \
  --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn 2>"$tmp/valgrind.log" & proxy=$!; pids+=($proxy)
up=0
for _ in $(seq 300); do
  curl -fsS -o /dev/null "http://127.0.0.1:18083$path" 2>/dev/null && { up=1; break; }
  sleep 0.2
done
[ "$up" = 1 ] || { echo "the proxy never answered $path with a 2xx" >&2; cat "$tmp/valgrind.log" >&2; exit 1; }

# A keep-alive client: one connection, N sequential requests.
send() {
  python3 - "$1" "$path" <<'PY'
import http.client, sys
n, path = int(sys.argv[1]), sys.argv[2]
c = http.client.HTTPConnection("127.0.0.1", 18083)
for _ in range(n):
    c.request("GET", path)
    r = c.getresponse(); r.read()
    if r.status != 200: sys.exit(f"status {r.status}")
PY
}
# Under valgrind the proxy serves a few thousand requests a second: wrk's count over the
# zeroed window is the N to divide by.
load() {
  local out
  out=$(wrk -t1 -c"$CONNS" -d"$1" "http://127.0.0.1:18083$path")
  grep -q "Non-2xx" <<<"$out" && { echo "$out" >&2; exit 1; }
  awk '/requests in/ {print $1}' <<<"$out"
}
if [ -n "${CONNS:-}" ]; then
  command -v wrk >/dev/null || { echo "CONNS= needs wrk" >&2; exit 1; }
  load 3s >/dev/null
  callgrind_control -z "$proxy" >/dev/null
  N=$(load "${DURATION:-15s}")
else
  send "$WARM"
  callgrind_control -z "$proxy" >/dev/null
  send "$N"
fi
callgrind_control -d "$proxy" >/dev/null
sleep 0.5
dump=$(ls -t "$tmp"/cg.out.* | head -1)
total=$(awk '/^summary:|^totals:/ {print $2; exit}' "$dump")
per=$((total / N))
echo "instructions per request: $per ($total over $N keep-alive GETs of $path${CONNS:+, $CONNS connections})"
if [ "${ANNOTATE:-0}" = 1 ]; then
  callgrind_annotate --threshold=95 "$dump" 2>/dev/null | grep -E '^ *[0-9,]+ ' | sed -n '2,40p'
fi
[ -z "${KEEP:-}" ] || cp "$dump" "$KEEP"
if [ -n "${LIMIT:-}" ] && [ "$per" -gt "$LIMIT" ]; then
  echo "regression: $per > LIMIT=$LIMIT instructions per request" >&2
  exit 1
fi
