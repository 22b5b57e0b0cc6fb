#!/usr/bin/env bash
# Checks that the README's quick start works: runs run-demo.sh on copies of the examples (on
# free ports) and asserts the four answers the README promises.
set -euo pipefail
cd "$(dirname "$0")/../.."
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
dir=$(mktemp -d)
echo_port=$(free_port)
cp manifests/examples/demo-decryption-key.pem "$dir/"
for f in manifests/examples/*.yaml; do sed -e "s/127.0.0.1:18000/127.0.0.1:$echo_port/g" -e "s/port: 18000/port: $echo_port/g" "$f" > "$dir/$(basename "$f")"; done
export EXAMPLES=$dir ECHO=127.0.0.1:$echo_port PROXY=127.0.0.1:$(free_port) PROXY_ADMIN=127.0.0.1:$(free_port)
export GRPC=127.0.0.1:$(free_port) ADMIN=127.0.0.1:$(free_port)
./e2e/scripts/run-demo.sh > "$dir/demo.log" 2>&1 &
demo=$!
trap 'kill $demo 2>/dev/null; wait $demo 2>/dev/null; rm -rf "$dir"' EXIT
for _ in $(seq 600); do
  grep -q "Kanali is running" "$dir/demo.log" && break
  kill -0 $demo 2>/dev/null || { cat "$dir/demo.log"; exit 1; }
  sleep 0.2
done
fail=0
check() { # path, expected status, expected text in body, curl options...
  local out code path=$1 status=$2 text=$3
  shift 3
  out=$(curl -s -w '\n%{http_code}' "$@" "http://$PROXY$path")
  code=${out##*$'\n'}
  if [ "$code" = "$status" ] && grep -qF -- "$text" <<<"$out"; then echo "ok   $path -> $code"; else echo "FAIL $path -> $code: $out"; fail=1; fi
}
check "/api/hello?x=1" 200 '"query":"x=1"'
check "/mock/users" 200 '"name":"ada"'
check "/nothing" 404 '"code":0,'
check "/orders" 404 '"code":2,'
check "/svc/hello" 200 '"path":"/hello"'
check "/tracks/x" 200 '"path":"/x"' -H 'x-track: stable'
check "/tracks/x" 500 '"code":10,' -H 'x-track: nightly'
check "/keyed/hi" 200 '"path":"/hi"' -H 'apikey: kanali-demo-key'
check "/keyed/hi" 403 '"code":12,'
check "/keyed/hi" 401 '"code":13,' -H 'apikey: wrong'
# Read whole before grep: `grep -q` stops at the first match, and a curl still writing then
# fails with EPIPE, which pipefail makes the pipeline's status.
status=$(curl -s "http://$ADMIN/status")
grep -qF MockTargetNotFound <<<"$status" && echo "ok   /status reports MockTargetNotFound" || { echo "FAIL /status: $status"; fail=1; }
[ $fail = 0 ] && echo "smoke: 11 passed, 0 failed" || { cat "$dir/demo.log"; echo "smoke: failed"; exit 1; }
