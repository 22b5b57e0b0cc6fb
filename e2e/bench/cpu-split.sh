#!/usr/bin/env bash
# User and system CPU per request, kanali-proxy beside nginx (or beside another kanali-proxy
# build): where the CPU goes, which the harness's single CPU µs/req column does not show.
#
# Both proxies run at once on PROXY_CPU (one worker each) in front of the harness's upstream
# nginx; wrk (on LOAD_CPU) loads one, then the other, ROUNDS times per case; each run reads the
# proxy's utime/stime from /proc/PID/stat around it.
#
# Usage: e2e/bench/cpu-split.sh            kanali (this tree, release) vs nginx
#        OTHER=path/to/kanali-proxy e2e/bench/cpu-split.sh   this build vs another build
#        RATE=40000 e2e/bench/cpu-split.sh   both at the same offered load (h2load --h1 --rps,
#                                             from nghttp2-client), below either's saturation
# Env: DURATION=8s CONNS=64 ROUNDS=3 CASES="small big" PROXY_CPU=0 LOAD_CPU=1 RATE=
#
# Why RATE: with wrk, a proxy that answers in bigger batches lets wrk (which shares its core
# with the upstream) spend less per request, so it gets more req/s, and more requests per
# epoll_wait, than the other proxy in the same round: the two are not measured at the same
# load. At a fixed rate both serve the same req/s, and CPU per request compares directly.
source "$(dirname "$0")/common.sh"
DURATION=${DURATION:-8s} CONNS=${CONNS:-64} ROUNDS=${ROUNDS:-3} CASES=${CASES:-small big}
PROXY_CPU=${PROXY_CPU:-0} LOAD_CPU=${LOAD_CPU:-1}
# RATE= loads with h2load; installed as h2.sh does, before anything is started.
[ -z "${RATE:-}" ] || command -v h2load >/dev/null || apt-get install -y -qq nghttp2-client >/dev/null
tmp=$(mktemp -d); chmod 755 "$tmp"; mkdir -p "$tmp/www"
head -c 16384 /dev/zero | tr '\0' x > "$tmp/www/big"
pids=()
cleanup() { stop_started; rm -rf "$tmp"; }
trap cleanup EXIT
for port in 18080 18081 18083 18084 18093 18094 19080 19443; do
  if ss -ltnH "sport = :$port" | grep -q .; then echo "port $port already in use" >&2; exit 1; fi
done

taskset -c "$LOAD_CPU" nginx -p "$tmp" -e "$tmp/up.err" -c "$BENCH_DIR/conf/upstream.conf" -g 'daemon off;' & pids+=($!)
start_controller; pids+=($!)
taskset -c "$PROXY_CPU" $proxy_cmd & kanali=$!; pids+=($kanali)
if [ -n "${OTHER:-}" ]; then
  other_name=other other_port=18093
  taskset -c "$PROXY_CPU" "$OTHER" --controller http://127.0.0.1:19443 --listen 127.0.0.1:18093 \
    --admin-listen 127.0.0.1:18094 --worker-threads 1 --log warn & other=$!; pids+=($other)
else
  other_name=nginx other_port=18081
  taskset -c "$PROXY_CPU" nginx -p "$tmp" -e "$tmp/proxy.err" -c "$BENCH_DIR/conf/nginx-proxy.conf" -g 'daemon off;' &
  master=$!; pids+=($master)
fi
for port in 18083 "$other_port"; do
  for _ in $(seq 100); do curl -fsS -o /dev/null "http://127.0.0.1:$port/api/" 2>/dev/null && break; sleep 0.1; done
done
# nginx's CPU is its worker's, not its master's.
[ -n "${master:-}" ] && other=$(pgrep -P "$master" | head -1)

# load DURATION URL: runs the load, prints how many requests were answered.
load() {
  if [ -z "${RATE:-}" ]; then
    taskset -c "$LOAD_CPU" wrk -t1 -c"$CONNS" -d"$1" "$2" | awk '/requests in/ {print $1}'
    return
  fi
  local out
  out=$(taskset -c "$LOAD_CPU" h2load --h1 -c"$CONNS" -m1 --rps=$((RATE / CONNS)) -D "${1%s}" "$2")
  # Every request answered with a 2xx, or the run does not count.
  awk '/^requests:/ && ($10 + $12 + $14 != 0) { exit 1 } /^status codes:/ && $5 + $7 + $9 != 0 { exit 1 }' <<<"$out" ||
    { echo "$out" >&2; exit 1; }
  awk '/^requests:/ {print $8}' <<<"$out"
}
hz=$(getconf CLK_TCK)
printf 'case\ttarget\tround\treq/s\tuser_us\tsys_us\ttotal_us\n'
for case in $CASES; do
  suffix=; [ "$case" = big ] && suffix=big
  for r in $(seq "$ROUNDS"); do
    for t in kanali:$kanali:18083 "$other_name:$other:$other_port"; do
      IFS=: read -r name pid port <<<"$t"
      url="http://127.0.0.1:$port/api/$suffix"
      load 1s "$url" >/dev/null
      read -r u0 s0 < <(awk '{print $14, $15}' "/proc/$pid/stat")
      n=$(load "$DURATION" "$url")
      read -r u1 s1 < <(awk '{print $14, $15}' "/proc/$pid/stat")
      secs=${DURATION%s}
      awk -v c="$case" -v t="$name" -v r="$r" -v n="$n" -v s="$secs" -v du=$((u1 - u0)) -v ds=$((s1 - s0)) -v hz="$hz" \
        'BEGIN { printf "%s\t%s\t%d\t%.0f\t%.2f\t%.2f\t%.2f\n", c, t, r, n / s, du / hz * 1e6 / n, ds / hz * 1e6 / n, (du + ds) / hz * 1e6 / n }'
    done
  done
done | tee "$tmp/raw"
echo
echo "| case | target | user µs/req | sys µs/req |"
echo "|---|---|---:|---:|"
awk -F'\t' '{ k = $1 "\t" $2; n[k]++; u[k] += $5; s[k] += $6 }
  END { for (k in n) { split(k, p, "\t"); printf "| %s | %s | %.2f | %.2f |\n", p[1], p[2], u[k] / n[k], s[k] / n[k] } }' "$tmp/raw" | sort
