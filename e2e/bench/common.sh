# Sourced by the load scripts (compare.sh, compare-tls.sh, h2.sh): the team's harness, a
# release build, the bench controller and the kanali-proxy command they all run.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
BENCH_DIR=${BENCH_DIR:-$root/../shared/bench}
[ -x "$BENCH_DIR/compare.sh" ] || { echo "no load harness at $BENCH_DIR (set BENCH_DIR)" >&2; exit 1; }
"$BENCH_DIR/setup.sh" >/dev/null
cd "$root"
cargo build -q --release --bins
bin=${CARGO_TARGET_DIR:-$root/target}/release
# One worker thread, like the harness's nginx and HAProxy; scripts append listener flags.
proxy_cmd="$bin/kanali-proxy --controller http://127.0.0.1:19443 --listen 127.0.0.1:18083 --admin-listen 127.0.0.1:18084 --worker-threads 1 --log warn"

# Starts the controller the proxies subscribe to, in the background (standalone, on the
# bench's manifests); the caller records $! to stop it.
start_controller() {
  "$bin/kanali-controller" --manifests e2e/bench/manifests --grpc-listen 127.0.0.1:19443 \
    --admin-listen 127.0.0.1:19080 --log warn &
}
