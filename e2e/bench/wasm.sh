#!/usr/bin/env bash
# What a trivial Wasm plugin costs (issue #11): one kanali-proxy (1 worker, pinned to
# PROXY_CPU) serving two routes to the same nginx upstream (on LOAD_CPU, with wrk):
#   /api/     no plugin
#   /plugin/  one proxy-wasm plugin adding a request and a response header (the example module
#             of manifests/plugins/, decoded from its ConfigMap)
# Prints req/s, p99 and the proxy's CPU µs per request per route, over ROUNDS interleaved runs.
# Goal: /plugin/ at 0.8x the req/s of /api/ or better.
# Usage: e2e/bench/wasm.sh   (env: DURATION=10s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1)
DURATION=${DURATION:-10s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3} PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
source "$(dirname "$0")/common.sh"
tmp=$(mktemp -d); chmod 755 "$tmp"
pids=()
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT

for port in 18080 18083 18084 19080 19443; do
  if ss -ltnH "sport = :$port" | grep -q .; then echo "port $port already in use" >&2; exit 1; fi
done
mkdir "$tmp/manifests" "$tmp/www" "$tmp/plugins"
awk '/add-header.wasm:/ {print $2}' manifests/plugins/plugins-configmap.yaml | base64 -d > "$tmp/plugins/add-header.wasm"
{
  route plain /api ""
  route plugin /plugin "$(printf '  plugins:\n  - {name: add-header}\n')"
} > "$tmp/manifests/bench.yaml"

taskset -c "$LOAD_CPU" nginx -p "$tmp" -e "$tmp/upstream.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
"$bin/kanali-controller" --manifests "$tmp/manifests" --grpc-listen 127.0.0.1:19443 --admin-listen 127.0.0.1:19080 --log warn & pids+=($!)
taskset -c "$PROXY_CPU" "$bin/kanali-proxy" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 \
  --admin-listen 127.0.0.1:18084 --worker-threads 1 --plugins-dir "$tmp/plugins" --shutdown-delay-secs 0 --log warn & proxy=$!; pids+=($proxy)
for path in api plugin; do
  for _ in $(seq 100); do
    code=$(curl -s -o /dev/null -w '%{http_code}' "http://127.0.0.1:18083/$path/" || true)
    [ "$code" = 200 ] && break; sleep 0.1
  done
  [ "$code" = 200 ] || { echo "/$path/ answers $code" >&2; exit 1; }
done
curl -s -D - -o /dev/null http://127.0.0.1:18083/plugin/ | grep -qi '^x-kanali-plugin: example' \
  || { echo "/plugin/ does not run the plugin" >&2; exit 1; }

wrk_args=()
measure_routes "$proxy" api plugin
