#!/usr/bin/env bash
# What the apikey plugin and a rate limit cost (issue #9): one kanali-proxy (1 worker, pinned
# to PROXY_CPU) serving three routes to the same nginx upstream (on LOAD_CPU, with wrk):
#   /api/     no plugin
#   /keyed/   the apikey plugin (a key checked, rule evaluated)
#   /limited/ the same plus a rate limit (high enough never to refuse)
# Prints req/s, p99 and the proxy's CPU µs per request per route, over ROUNDS interleaved runs.
# Usage: e2e/bench/apikey.sh   (env: DURATION=10s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1)
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
DURATION=${DURATION:-10s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3} PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
tmp=$(mktemp -d); chmod 755 "$tmp"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; rm -rf "$tmp"; }
trap cleanup EXIT

mkdir "$tmp/manifests" "$tmp/www"
"$bin/kanalictl" keypair generate --public-key-out "$tmp/pub.pem" --private-key-out "$tmp/key.pem" >/dev/null 2>&1
key=bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
data=$(printf '%s' "$key" | "$bin/kanalictl" apikey encrypt --public-key "$tmp/pub.pem")
route() { # name, path, plugin yaml (lines)
  printf 'apiVersion: kanali.io/v2\nkind: ApiProxy\nmetadata: {name: %s, namespace: bench}\nspec:\n  source: {path: %s}\n  target: {path: /, backend: {endpoint: "http://127.0.0.1:18080"}}\n' "$1" "$2"
  [ -z "$3" ] || printf '%s\n' "$3"
  printf -- '---\n'
}
plugin() { printf '  plugins:\n  - {name: apikey, config: {apiKeyBindingName: %s}}\n' "$1"; }
{
  printf 'apiVersion: kanali.io/v2\nkind: ApiKey\nmetadata: {name: bench}\nspec:\n  revisions:\n  - {status: Active, data: %s}\n---\n' "$data"
  printf 'apiVersion: kanali.io/v2\nkind: ApiKeyBinding\nmetadata: {name: open, namespace: bench}\nspec:\n  keys:\n  - {name: bench, defaultRule: {global: true}}\n---\n'
  printf 'apiVersion: kanali.io/v2\nkind: ApiKeyBinding\nmetadata: {name: limited, namespace: bench}\nspec:\n  keys:\n  - {name: bench, defaultRule: {global: true}, rate: {amount: 1000000000, unit: SECOND}}\n---\n'
  route plain /api ""
  route keyed /keyed "$(plugin open)"
  route limited /limited "$(plugin limited)"
} > "$tmp/manifests/bench.yaml"

taskset -c "$LOAD_CPU" nginx -p "$tmp" -e "$tmp/upstream.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
"$bin/kanali-controller" --manifests "$tmp/manifests" --grpc-listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 \
  --decryption-key-file "$tmp/key.pem" --log warn & pids+=($!)
taskset -c "$PROXY_CPU" "$bin/kanali-proxy" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 \
  --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn & proxy=$!; pids+=($proxy)
for path in api keyed limited; do
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' -H "apikey: $key" "http://127.0.0.1:18083/$path/" || true)
    [ "$code" = 200 ] && break; sleep 0.1
  done
  [ "$code" = 200 ] || { echo "/$path/ answers $code" >&2; exit 1; }
done

ticks() { awk '{print $14 + $15}' "/proc/$proxy/stat"; }
hz=$(getconf CLK_TCK)
printf 'route\tround\treq/s\tp99_ms\tcpu_us_per_req\n' | tee "$tmp/raw.tsv"
for r in $(seq "$ROUNDS"); do
  for path in api keyed limited; do
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d2s -H "apikey: $key" "http://127.0.0.1:18083/$path/" >/dev/null
    a=$(ticks)
    out=$(taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$DURATION" --latency -H "apikey: $key" "http://127.0.0.1:18083/$path/")
    b=$(ticks)
    rps=$(awk '/Requests\/sec/ {print $2}' <<<"$out")
    total=$(awk '/requests in/ {print $1}' <<<"$out")
    p99=$(awk '$1 == "99%" {v=$2; if (v ~ /us$/) {sub(/us/,"",v); v/=1000} else if (v ~ /ms$/) {sub(/ms/,"",v)} else if (v ~ /s$/) {sub(/s/,"",v); v*=1000}; print v}' <<<"$out")
    non2xx=$(awk '/Non-2xx/ {print $NF}' <<<"$out")
    [ -z "$non2xx" ] || { echo "/$path/: $non2xx non-2xx answers" >&2; exit 1; }
    cpu=$(awk -v a="$a" -v b="$b" -v n="$total" -v hz="$hz" 'BEGIN{printf "%.2f", (b - a) / hz * 1e6 / n}')
    printf '%s\t%s\t%s\t%s\t%s\n' "/$path/" "$r" "$rps" "$p99" "$cpu" | tee -a "$tmp/raw.tsv"
  done
done
echo
awk -F'\t' 'NR > 1 { n[$1]++; rps[$1] += $3; p99[$1] += $4; cpu[$1] += $5 }
  END { printf "| route | req/s | p99 ms | CPU µs/req | req/s vs /api/ |\n|---|---:|---:|---:|---:|\n"
        for (r in n) order[r] = r
        split("/api/ /keyed/ /limited/", o, " ")
        for (i = 1; i <= 3; i++) { r = o[i]; printf "| %s | %.0f | %.2f | %.2f | %.2f× |\n", r, rps[r]/n[r], p99[r]/n[r], cpu[r]/n[r], (rps[r]/n[r])/(rps["/api/"]/n["/api/"]) } }' "$tmp/raw.tsv"
