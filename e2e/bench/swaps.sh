#!/usr/bin/env bash
# Snapshot swaps under full load (issue #12): one kanali-proxy (1 worker, pinned to PROXY_CPU)
# under wrk on /api/ (wrk and two upstream nginx on LOAD_CPU). In each round three runs:
#   steady   no changes;
#   control  the manifests of a second controller, which no proxy follows, change SWAPS times:
#            the same writer and controller work on LOAD_CPU, nothing for the proxy to apply;
#   swaps    the proxy's own manifests change SWAPS times, one every INTERVAL_MS: every change
#            moves /api/ to the other upstream (18080 <-> 18090) and replaces one of EXTRA other
#            routes. The controller (standalone, 5 ms debounce) compiles and streams each
#            change; the proxy's log says how many it applied.
# On two cores the controller, the writer, wrk and the upstreams share LOAD_CPU, so changes slow
# the load side too; `control` shows how much, and swaps vs control is what applying costs the
# proxy. Goal: no failed or reset request, and p99 within 1.1x of the run without swaps.
# Usage: e2e/bench/swaps.sh   (env: SWAPS=100 INTERVAL_MS=50 EXTRA=1000 PER_FILE=500
#        DURATION=8s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1; MOVE=0 keeps /api/ on one
#        upstream, so that only the other routes change: the applies' cost without the move)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
SWAPS=${SWAPS:-100} INTERVAL_MS=${INTERVAL_MS:-50} EXTRA=${EXTRA:-1000}
DURATION=${DURATION:-8s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
tmp=$(mktemp -d); chmod 755 "$tmp"
pids=()
source "$root/e2e/bench/stop.sh"
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT
for port in 18080 18090 18083 18084 19080 19443 19081 19444; do
  if ss -ltnH "sport = :$port" | grep -q .; then echo "port $port already in use" >&2; exit 1; fi
done

for side in a b; do
  mkdir -p "$tmp/$side/www"
  port=$([ $side = a ] && echo 18080 || echo 18090)
  sed "s/18080/$port/" "$BENCH_DIR/conf/upstream.conf" > "$tmp/$side/upstream.conf"
  taskset -c "$LOAD_CPU" nginx -p "$tmp/$side" -e "$tmp/$side/err.log" -c "$tmp/$side/upstream.conf" -g 'daemon off;' & pids+=($!)
done
mkdir "$tmp/manifests"
# write STEP: the manifests as of change STEP (atomic renames, as a GitOps tool would do).
cat > "$tmp/write.py" <<'PY'
import os, sys, time
d, extra, per = sys.argv[1], int(sys.argv[2]), int(os.environ.get("PER_FILE", "500"))
def route(name, path, port):
    return (f"apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: {name}, namespace: bench}}\n"
            f"spec:\n  source: {{path: {path}}}\n"
            f"  target: {{path: /, backend: {{endpoint: \"http://127.0.0.1:{port}\"}}}}\n---\n")
def put(name, text):
    tmp = os.path.join(d, "." + name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
    os.replace(tmp, os.path.join(d, name))
def extra_file(k, changed=None, step=0):  # PER_FILE documents a file (the controller reads at most 1 024)
    put(f"extra-{k:03}.yaml", "".join(
        route(f"r{i}", f"/r{i}-{step}" if i == changed else f"/r{i}", 18080)
        for i in range(k * per, min(extra, (k + 1) * per))))
def write(step):
    moves = os.environ.get("MOVE", "1") != "0"
    put("api.yaml", route("api", "/api", 18080 if step % 2 == 0 or not moves else 18090))
    changed = step % extra
    extra_file(changed // per, changed, step)
if sys.argv[3] == "once":
    write(0)
    for k in range((extra + per - 1) // per):
        extra_file(k)
else:
    swaps, interval = int(sys.argv[3]), int(sys.argv[4]) / 1000
    start = time.monotonic()
    for step in range(1, swaps + 1):
        write(step)
        time.sleep(max(0, start + step * interval - time.monotonic()))
PY
python3 "$tmp/write.py" "$tmp/manifests" "$EXTRA" once
cp -r "$tmp/manifests" "$tmp/control"
# The controller and the writer share LOAD_CPU with wrk: the proxy's core is the one measured.
# Their logs count the snapshots each compiled: a controller that falls behind merges changes
# (the debounce), and then its CPU per run hides a higher cost per change.
taskset -c "$LOAD_CPU" "$bin/kanali-controller" --manifests "$tmp/manifests" --manifests-debounce-ms 5 \
  --grpc-listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 --log info 2> "$tmp/manifests.log" & controller=$!; pids+=($controller)
taskset -c "$LOAD_CPU" "$bin/kanali-controller" --manifests "$tmp/control" --manifests-debounce-ms 5 \
  --grpc-listen 127.0.0.1:19444 --admin-listen 127.0.0.1:19081 --log info 2> "$tmp/control.log" & control=$!; pids+=($control)
taskset -c "$PROXY_CPU" "$bin/kanali-proxy" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 \
  --admin-listen 127.0.0.1:18084 --worker-threads 1 --log info --log-json > "$tmp/proxy.log" 2>&1 & proxy=$!; pids+=($proxy)
for _ in $(seq 100); do
  code=$(curl -s -o /dev/null -w '%{http_code}' http://127.0.0.1:18083/api/ || true)
  [ "$code" = 200 ] && break; sleep 0.1
done
[ "$code" = 200 ] || { echo "/api/ answers $code" >&2; exit 1; }

applied() { grep -c '"applied update"' "$tmp/proxy.log" || true; }
compiled() { grep -c 'new snapshot' "$tmp/$1.log" || true; }
ticks() { awk '{print $14 + $15}' "/proc/${1:-$proxy}/stat"; }
run() { # kind -> tsv line: kind rps p99 requests non2xx socket-errors applied cpu-us/req controller-cpu-ms compiled
  local before out t0 c0 s0 dir=manifests c=$controller w=; before=$(applied); t0=$(ticks)
  [ "$1" = control ] && { dir=control; c=$control; }
  c0=$(ticks "$c") s0=$(compiled "$dir")
  if [ "$1" != steady ]; then
    (sleep 0.5; taskset -c "$LOAD_CPU" python3 "$tmp/write.py" "$tmp/$dir" "$EXTRA" "$SWAPS" "$INTERVAL_MS") & w=$!
  fi
  out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency http://127.0.0.1:18083/api/)
  [ -n "$w" ] && wait "$w"
  sleep 0.5
  printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$1" \
    "$(awk '/Requests\/sec/ {print $2}' <<<"$out")" "$(awk '$1 == "99%" {print $2}' <<<"$out")" \
    "$(awk '/requests in/ {print $1}' <<<"$out")" "$(awk '/Non-2xx/ {print $NF}' <<<"$out")" \
    "$(awk -F'[ ,]+' '/Socket errors/ {print $5 + $7 + $9 + $11}' <<<"$out")" "$(( $(applied) - before ))" \
    "$(awk -v t=$(( $(ticks) - t0 )) -v hz="$(getconf CLK_TCK)" -v n="$(awk '/requests in/ {print $1}' <<<"$out")" 'BEGIN{printf "%.2f", t * 1e6 / hz / n}')" \
    "$(( ($(ticks "$c") - c0) * 1000 / $(getconf CLK_TCK) ))" "$(( $(compiled "$dir") - s0 ))"
}
for round in $(seq "$ROUNDS"); do run steady; run control; run swaps; done > "$tmp/results.tsv"

echo "## $SWAPS snapshot swaps every $INTERVAL_MS ms under load ($EXTRA other routes; $ROUNDS rounds)"
echo
echo "| run | req/s | p99 | requests | non-2xx | socket errors | updates applied | proxy CPU µs/req | controller CPU ms | snapshots compiled | controller ms per snapshot |"
echo "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
python3 - "$tmp/results.tsv" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
p99 = {}
for r in rows:
    per = f"{int(r[8]) / int(r[9]):.1f}" if int(r[9]) else "-"
    print(f"| {r[0]} | {float(r[1]):.0f} | {ms(r[2]):.2f} ms | {r[3]} | {r[4] or 0} | {r[5] or 0} | {r[6]} | {r[7]} | {r[8]} | {r[9]} | {per} |")
for kind in ("steady", "control", "swaps"):
    p99[kind] = st.median(ms(r[2]) for r in rows if r[0] == kind)
print(f"\nmedian p99: {p99['steady']:.2f} ms steady, {p99['control']:.2f} ms control "
      f"({p99['control'] / p99['steady']:.2f}x), {p99['swaps']:.2f} ms with swaps "
      f"({p99['swaps'] / p99['steady']:.2f}x steady, {p99['swaps'] / p99['control']:.2f}x control); "
      f"failed requests: {sum(int(r[4] or 0) + int(r[5] or 0) for r in rows if r[0] == 'swaps')}")
PY
