#!/usr/bin/env bash
# HTTP/2 load comparison (h2load, from Debian's nghttp2-client): kanali-proxy (1 worker thread)
# vs nginx, both pinned to PROXY_CPU, load on LOAD_CPU, against the harness's upstream.
#   kanali-h2    HTTP/2 over TLS (ALPN h2) to kanali's TLS listener
#   nginx-h2     the same to nginx
#   kanali-h2c   HTTP/2 cleartext (prior knowledge) to kanali's plain listener
# Knobs: DURATION=10 CONNS=64 STREAMS=10 ROUNDS=3 PROXY_CPU=0 LOAD_CPU=1.
set -euo pipefail
DURATION=${DURATION:-10} CONNS=${CONNS:-64} STREAMS=${STREAMS:-10} ROUNDS=${ROUNDS:-3}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
source "$(dirname "$0")/common.sh"
work=$(mktemp -d); chmod 755 "$work"   # nginx workers read www/ in it
OUT=${OUT:-${TMPDIR:-/tmp}/kanali-bench/h2-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$OUT"
"$root/e2e/bench/tls-setup.sh" "$work"
mkdir -p "$work/www" && head -c 16384 /dev/urandom > "$work/www/big"   # the upstream's /big
pids=()
trap 'kill "${pids[@]}" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"' EXIT
taskset -c "$LOAD_CPU" nginx -p "$work" -e "$work/upstream.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
start_controller; pids+=($!)
# $proxy_cmd is split into words on purpose (paths from mktemp/cargo have no spaces).
# shellcheck disable=SC2086
taskset -c "$PROXY_CPU" $proxy_cmd --tls-listen 127.0.0.1:18443 --tls-cert-file "$work/cert.pem" \
  --tls-key-file "$work/key.pem" & pids+=($!)
taskset -c "$PROXY_CPU" nginx -p "$work" -c "$work/nginx-tls.conf" -g 'daemon off;' & pids+=($!)
for u in https://127.0.0.1:18443/api/ https://127.0.0.1:18444/api/ http://127.0.0.1:18083/api/; do
  for _ in $(seq 100); do
    [ "$(curl -s --cacert "$work/ca.pem" -o /dev/null -w '%{http_code}' "$u")" = 200 ] && break; sleep 0.1
  done
done
run() { # log-name url -> "req/s mean max succeeded failed"; the h2load log is kept in $OUT
  taskset -c "$LOAD_CPU" h2load -D "$DURATION" --warm-up-time 2 -c "$CONNS" -m "$STREAMS" -t 1 "$2" > "$OUT/$1.log" 2>&1
  cat "$OUT/$1.log" |
    awk '/finished in/ {for (i=1;i<=NF;i++) if ($i ~ /req\/s/) rps=$(i-1)}
         /^time for request:/ {mean=$6; max=$5}
         /requests:/ {for (i=1;i<=NF;i++) if ($i=="succeeded,") ok=$(i-1); for (i=1;i<=NF;i++) if ($i=="failed,") bad=$(i-1)}
         END {print rps, mean, max, ok, bad}'
}
printf '| target | case | req/s (median of %s) | mean latency | failed |\n|---|---|---:|---:|---:|\n' "$ROUNDS"
for t in "kanali-h2 https://127.0.0.1:18443/api/" "nginx-h2 https://127.0.0.1:18444/api/" "kanali-h2c http://127.0.0.1:18083/api/"; do
  set -- $t
  for case in small big; do
    path=$2; [ $case = big ] && path=${2}big
    results=()
    for r in $(seq "$ROUNDS"); do results+=("$(run "$1-$case-$r" "$path")"); done
    median=$(printf '%s\n' "${results[@]}" | sort -n -k1 | sed -n "$(( (ROUNDS + 1) / 2 ))p")
    read -r rps mean max ok bad <<<"$median"
    printf '| %s | %s | %s | %s | %s |\n' "$1" "$case" "$rps" "$mean" "$bad"
  done
done
echo "h2load logs: $OUT"
