#!/usr/bin/env bash
# What the apikey plugin and a rate limit cost (issue #9): one kanali-proxy (1 worker, pinned
# to PROXY_CPU) serving three routes to the same nginx upstream (on LOAD_CPU, with wrk):
#   /api/     no plugin
#   /keyed/   the apikey plugin (a key checked, rule evaluated)
#   /limited/ the same plus a rate limit (high enough never to refuse)
# Prints req/s, p99 and the proxy's CPU µs per request per route, over ROUNDS interleaved runs.
# Usage: e2e/bench/apikey.sh   (env: DURATION=10s CONNS=64 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1)
DURATION=${DURATION:-10s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3} PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
source "$(dirname "$0")/common.sh"
tmp=$(mktemp -d); chmod 755 "$tmp"
pids=()
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT

mkdir "$tmp/manifests" "$tmp/www"
"$bin/kanalictl" keypair generate --public-key-out "$tmp/pub.pem" --private-key-out "$tmp/key.pem" >/dev/null 2>&1
key=bench-$(head -c 12 /dev/urandom | od -An -tx1 | tr -d ' \n')
data=$(printf '%s' "$key" | "$bin/kanalictl" apikey encrypt --public-key "$tmp/pub.pem")
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

wrk_args=(-H "apikey: $key")
measure_routes "$proxy" api keyed limited
