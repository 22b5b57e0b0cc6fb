#!/usr/bin/env bash
# Flat at 10 000 routes (issue #12). Two measurements on one release build:
#  1. Memory: a fresh kanali-proxy per route count in MEM_ROUTES (default 0 1000 10000 50000),
#     its RSS once the snapshot is applied, KB per route, and the apply time the proxy logs.
#  2. CPU per request: two proxies side by side (each 1 worker, both pinned to PROXY_CPU; wrk and
#     the upstream nginx on LOAD_CPU), one serving SMALL routes and one LARGE, each loaded with
#     requests spread evenly at random over all of its routes; ROUNDS interleaved runs, medians.
# Routes are mixed: half plain paths (/r<i>, a third of them two segments deep), half virtual
# hosts (v<i % 97>.bench.test, path /v<i>); every one forwards to the harness's upstream.
# Usage: e2e/bench/routes.sh   (env: MEM_ROUTES, SMALL=10 LARGE=10000 DURATION=10s CONNS=64
#        ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1 SKIP_MEM=1 SKIP_CPU=1)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
MEM_ROUTES=${MEM_ROUTES:-0 1000 10000 50000} SMALL=${SMALL:-10} LARGE=${LARGE:-10000}
DURATION=${DURATION:-10s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
tmp=$(mktemp -d); chmod 755 "$tmp"; mkdir -p "$tmp/www"
pids=()
stop() { local p; for p in "$@"; do kill "$p" 2>/dev/null || true; wait "$p" 2>/dev/null || true; done; }
cleanup() { stop "${pids[@]}"; rm -rf "$tmp"; }
trap cleanup EXIT
for port in 18080 18083 18084 18085 18086 19080 19081 19443 19444; do
  if ss -ltnH "sport = :$port" | grep -q .; then echo "port $port already in use" >&2; exit 1; fi
done

# manifests DIR N: N ApiProxies in DIR/routes-*.yaml; the request list in DIR/requests.txt.
manifests() {
  mkdir -p "$1"
  python3 - "$1" "$2" <<'PY'
import sys
d, n = sys.argv[1], int(sys.argv[2])
# 500 documents a file: the controller reads at most 1 024 from one file.
files = {}
with open(f"{d}/requests.txt", "w") as r:
    for i in range(n):
        y = files.get(i // 500) or files.setdefault(i // 500, open(f"{d}/routes-{i // 500:03}.yaml", "w"))
        if i % 2 == 0:
            path, host, vhost = (f"/r{i}/deep" if i % 3 == 0 else f"/r{i}"), "bench", ""
        else:
            path, host = f"/v{i}", f"v{i % 97}.bench.test"
            vhost = f"  virtualHost: {host}\n"
        y.write(f"apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {{name: r{i}, namespace: bench}}\n"
                f"spec:\n{vhost}  source: {{path: {path}}}\n"
                f"  target: {{path: /, backend: {{endpoint: \"http://127.0.0.1:18080\"}}}}\n---\n")
        r.write(f"{host} {path}/x\n")
PY
}

# start DIR SLOT: a controller and a proxy (slot 0 or 1 picks the ports); sets ctl and proxy.
start() {
  local dir=$1 slot=$2
  "$bin/kanali-controller" --manifests "$dir" --grpc-listen "127.0.0.1:$((19443 + slot))" \
    --admin-listen "127.0.0.1:$((19080 + slot))" --log warn & ctl=$!; pids+=("$ctl")
  taskset -c "$PROXY_CPU" "$bin/kanali-proxy" --controller "http://127.0.0.1:$((19443 + slot))" \
    --listen "127.0.0.1:$((18083 + 2 * slot))" --admin-listen "127.0.0.1:$((18084 + 2 * slot))" \
    --worker-threads 1 --log info --log-json > "$dir/proxy.log" 2>&1 & proxy=$!; pids+=("$proxy")
  local n; n=$(wc -l < "$dir/requests.txt")
  for _ in $(seq 1200); do
    grep -qE "applied update.*\"routes\":$n[,}]" "$dir/proxy.log" 2>/dev/null && return
    sleep 0.1
  done
  echo "proxy on $dir never applied $n routes:" >&2; tail -5 "$dir/proxy.log" >&2; exit 1
}
rss() { awk '/^VmRSS/ {print $2}' "/proc/$1/status"; }
apply_ms() { grep -o '"apply_ms":[0-9.]*' "$1/proxy.log" | tail -1 | cut -d: -f2 | xargs printf "%.1f"; }

if [ "${SKIP_MEM:-}" != 1 ]; then
  echo "## Proxy memory by route count"
  echo
  echo "| routes | RSS KiB | KB per route (vs 0) | apply ms |"
  echo "|---:|---:|---:|---:|"
  base=
  for n in $MEM_ROUTES; do
    manifests "$tmp/mem$n" "$n"
    start "$tmp/mem$n" 0
    sleep 2
    r=$(rss "$proxy"); ms=$(apply_ms "$tmp/mem$n")
    [ -n "$base" ] || base=$r
    per=$([ "$n" -gt 0 ] && awk -v r="$r" -v b="$base" -v n="$n" 'BEGIN{printf "%.2f", (r - b) * 1.024 / n}' || echo -)
    echo "| $n | $r | $per | ${ms:--} |"
    stop "$proxy" "$ctl"
  done
  echo
fi

[ "${SKIP_CPU:-}" = 1 ] && exit 0
taskset -c "$LOAD_CPU" nginx -p "$tmp" -e "$tmp/upstream.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
manifests "$tmp/small" "$SMALL"; start "$tmp/small" 0; small_pid=$proxy
manifests "$tmp/large" "$LARGE"; start "$tmp/large" 1; large_pid=$proxy
# wrk: requests spread at random over every route of the list.
cat > "$tmp/spread.lua" <<'LUA'
local reqs = {}
function init(args)
  for line in io.lines(args[1]) do
    local host, path = line:match("^(%S+) (%S+)$")
    reqs[#reqs + 1] = wrk.format("GET", path, { Host = host })
  end
  math.randomseed(os.time())
end
function request() return reqs[math.random(#reqs)] end
LUA
# Every route answers 200 through the proxy before load.
for slot in 0 1; do
  dir=$([ $slot = 0 ] && echo "$tmp/small" || echo "$tmp/large")
  while read -r host path; do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "Host: $host" "http://127.0.0.1:$((18083 + 2 * slot))$path")
    [ "$code" = 200 ] || { echo "$host $path via slot $slot answers $code" >&2; exit 1; }
  done < <(awk 'NR % 500 == 1' "$dir/requests.txt")
done
ticks() { awk '{print $14, $15}' "/proc/$1/stat"; }
hz=$(getconf CLK_TCK)
results=$tmp/results.tsv
for round in $(seq "$ROUNDS"); do
  for slot in 0 1; do
    name=$([ $slot = 0 ] && echo small || echo large); pid=$([ $slot = 0 ] && echo $small_pid || echo $large_pid)
    read -r u0 s0 < <(ticks "$pid")
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency -s "$tmp/spread.lua" \
      "http://127.0.0.1:$((18083 + 2 * slot))" -- "$tmp/$name/requests.txt")
    read -r u1 s1 < <(ticks "$pid")
    reqs=$(awk '/requests in/ {print $1}' <<<"$out")
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    p99=$(awk '$1 == "99%" {print $2}' <<<"$out")
    bad=$(awk '/Non-2xx/ {print $NF} /Socket errors/ {print "sock:" $0}' <<<"$out" | xargs)
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$name" "$rps" "$p99" \
      "$(awk -v t=$((u1 - u0)) -v n="$reqs" -v hz="$hz" 'BEGIN{printf "%.2f", t * 1e6 / hz / n}')" \
      "$(awk -v t=$((s1 - s0)) -v n="$reqs" -v hz="$hz" 'BEGIN{printf "%.2f", t * 1e6 / hz / n}')" \
      "${bad:-0}" "$round" >> "$results"
  done
done
echo "## CPU per request, requests spread over every route ($ROUNDS rounds, medians)"
echo
echo "| routes | req/s | p99 | user µs/req | sys µs/req | CPU µs/req | vs $SMALL routes | errors |"
echo "|---:|---:|---:|---:|---:|---:|---:|---|"
python3 - "$results" "$SMALL" "$LARGE" <<'PY'
import sys, statistics as st
rows = [l.rstrip("\n").split("\t") for l in open(sys.argv[1])]
def med(name, i, f=float): return st.median(f(r[i].rstrip("ms").rstrip("u")) for r in rows if r[0] == name)
def ms(v):
    return float(v[:-2]) if v.endswith("ms") else float(v[:-2]) / 1000 if v.endswith("us") else float(v[:-1]) * 1000
cpu = {}
for name, n in (("small", sys.argv[2]), ("large", sys.argv[3])):
    sel = [r for r in rows if r[0] == name]
    rps = st.median(float(r[1]) for r in sel)
    p99 = st.median(ms(r[2]) for r in sel)
    u = st.median(float(r[3]) for r in sel); s = st.median(float(r[4]) for r in sel)
    cpu[name] = st.median(float(r[3]) + float(r[4]) for r in sel)
    errs = ",".join(sorted({r[5] for r in sel}))
    ratio = cpu[name] / cpu["small"]
    print(f"| {n} | {rps:.0f} | {p99:.2f} ms | {u:.2f} | {s:.2f} | {cpu[name]:.2f} | {ratio:.3f} | {errs} |")
# Each round loads the two proxies back to back: their ratio in a round is a paired measurement,
# steadier than the ratio of medians when the machine's load drifts between rounds.
by_round = {}
for r in rows:
    by_round.setdefault(r[6], {})[r[0]] = float(r[3]) + float(r[4])
pairs = [v["large"] / v["small"] for _, v in sorted(by_round.items(), key=lambda kv: int(kv[0])) if len(v) == 2]
if pairs:
    print()
    print(f"{sys.argv[3]} vs {sys.argv[2]} routes, CPU per request round by round: "
          + " ".join(f"{x:.3f}" for x in pairs)
          + f" (median {st.median(pairs):.3f}; within 5 % in {sum(x <= 1.05 for x in pairs)} of {len(pairs)})")
PY
