#!/usr/bin/env bash
# Apply-to-serving latency: time from `kubectl patch` of one ApiProxy (among 1 000 more) to both
# of two kanali-proxy processes serving the change, p50/p90/p99/max over 50 edits, against a
# real API server. A measurement, not a test. Builds the binaries, makes sure an API server is
# up (starts e2e/k8s/start.sh $K8S_DIR if KUBECONFIG does not answer, and stops it afterwards
# unless KEEP_K8S=1), then runs kanali-apply-latency, which prints the table.
#
# Usage: e2e/bench/apply-latency.sh [kanali-apply-latency options, e.g. --edits 100 --routes 5000]
# Env: PROFILE=release (default) or debug; KUBECONFIG (default $K8S_DIR/kubeconfig);
#      K8S_DIR (default /tmp/kanali-k8s); KUBECTL.
set -euo pipefail
root=$(cd "$(dirname "$0")/../.." && pwd)
cd "$root"
PROFILE=${PROFILE:-release}
K8S_DIR=${K8S_DIR:-/tmp/kanali-k8s}
export KUBECONFIG=${KUBECONFIG:-$K8S_DIR/kubeconfig}
KUBECTL=${KUBECTL:-kubectl}

case $PROFILE in
  release) cargo build -q --release --bins ;;
  debug) cargo build -q --bins ;;
  *) echo "PROFILE must be release or debug, not $PROFILE" >&2; exit 2 ;;
esac

if ! "$KUBECTL" --kubeconfig "$KUBECONFIG" get --raw /readyz >/dev/null 2>&1; then
  echo "no API server answers for $KUBECONFIG: starting one in $K8S_DIR" >&2
  e2e/k8s/provision.sh >&2
  e2e/k8s/start.sh "$K8S_DIR" >&2
  export KUBECONFIG=$K8S_DIR/kubeconfig
  [ "${KEEP_K8S:-}" = 1 ] || trap 'e2e/k8s/stop.sh "$K8S_DIR" >/dev/null 2>&1 || true' EXIT
fi

bin=${CARGO_TARGET_DIR:-$root/target}/$PROFILE
"$bin/kanali-apply-latency" --bin-dir "$bin" --kubeconfig "$KUBECONFIG" "$@"
