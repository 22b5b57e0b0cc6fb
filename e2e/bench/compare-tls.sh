#!/usr/bin/env bash
# HTTPS load comparison with the team's harness: kanali-proxy's TLS listener (1 worker thread)
# vs nginx terminating TLS, both pinned to the same core, HTTP/1.1 keep-alive (wrk), next to
# the harness's plain-HTTP peers. Usage: e2e/bench/compare-tls.sh (harness env passes through).
source "$(dirname "$0")/common.sh"
work=$(mktemp -d)
"$root/e2e/bench/tls-setup.sh" "$work"
start_controller
ctl=$!
trap 'kill $ctl 2>/dev/null; wait $ctl 2>/dev/null; rm -rf "$work"' EXIT
# The harness checks every target with curl first; trust the bench CA there (wrk does not verify).
export CURL_CA_BUNDLE=$work/ca.pem
export CMD_kanali_tls="$proxy_cmd --tls-listen 127.0.0.1:18443 --tls-cert-file $work/cert.pem --tls-key-file $work/key.pem"
export CMD_nginx_tls="nginx -p $work -c $work/nginx-tls.conf -g 'daemon off;'"
"$BENCH_DIR/compare.sh" kanali_tls=https://127.0.0.1:18443/api/ nginx_tls=https://127.0.0.1:18444/api/
