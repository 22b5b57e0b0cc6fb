#!/usr/bin/env bash
# Runs Kanali on the bundled examples: a demo upstream (kanali-echo), the controller in
# standalone mode on manifests/examples, and one proxy on 127.0.0.1:8080. Ctrl-C stops it all.
# Edit a file in manifests/examples while it runs: the proxy serves the change within a second.
#
# Env: PROFILE=release for optimised binaries (slower first build); addresses ECHO, PROXY,
# PROXY_ADMIN, GRPC, ADMIN and the EXAMPLES directory can be overridden (the smoke test does).
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-debug}
EXAMPLES=${EXAMPLES:-manifests/examples}
ECHO=${ECHO:-127.0.0.1:18000} PROXY=${PROXY:-127.0.0.1:8080} PROXY_ADMIN=${PROXY_ADMIN:-127.0.0.1:8081}
GRPC=${GRPC:-127.0.0.1:9443} ADMIN=${ADMIN:-127.0.0.1:9080}

if [ "$PROFILE" = release ]; then cargo build -q --release --bins; else cargo build -q --bins; fi
bin=${CARGO_TARGET_DIR:-target}/$PROFILE
pids=()
cleanup() { kill "${pids[@]}" 2>/dev/null || true; wait 2>/dev/null || true; }
trap cleanup EXIT
trap 'exit 0' INT TERM

"$bin/kanali-echo" --listen "$ECHO" & pids+=($!)
# The demo key pair (manifests/examples/apikey.yaml explains it): never use it for real keys.
"$bin/kanali-controller" --manifests "$EXAMPLES" --grpc-listen "$GRPC" --admin-listen "$ADMIN" \
  --decryption-key-file "$EXAMPLES/demo-decryption-key.pem" & pids+=($!)
# No load balancer sends the demo traffic: stop at once instead of the 5 s drain delay. The
# access log shows each request below as it is answered.
"$bin/kanali-proxy" --controller "http://$GRPC" --listen "$PROXY" --admin-listen "$PROXY_ADMIN" --shutdown-delay-secs 0 \
  --access-log & pids+=($!)

ready=0
for _ in $(seq 100); do
  if curl -fsS -o /dev/null "http://$PROXY_ADMIN/readyz" 2>/dev/null; then ready=1; break; fi
  sleep 0.1
done
[ "$ready" = 1 ] || { echo "the proxy did not become ready; see the logs above" >&2; exit 1; }
cat <<MSG

Kanali is running. Try:
  curl -i http://$PROXY/api/hello?x=1      # 200, proxied to the echo upstream
  curl -i http://$PROXY/mock/users         # 200, answered by the users-mock MockTarget
  curl -i http://$PROXY/nothing            # 404, Kanali error 00 (no ApiProxy matches)
  curl -i http://$PROXY/orders             # 404, Kanali error 02 (its MockTarget is missing)
  curl -i -H 'apikey: kanali-demo-key' http://$PROXY/keyed/hi   # 200, the API key checked
  curl -i http://$PROXY/keyed/hi           # 403, Kanali error 12 (no API key)
  curl -s http://$ADMIN/status             # every resource's conditions, as JSON
  curl -s http://$PROXY_ADMIN/metrics      # the proxy's Prometheus metrics
Ctrl-C to stop.
MSG
wait -n "${pids[@]}"
