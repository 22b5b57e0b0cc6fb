#!/usr/bin/env bash
# The node stage of the test suite (test-all.sh runs it last; `make test-node` alone): Kanali
# as pods on a real single-node cluster. Provisions the node's binaries (cached in
# ~/.cache/kanali/k8s-v1.20.2), starts a node in a temp dir (always stopped again, and the host
# restored), builds the images from the local binaries with image.sh and imports them into
# the node's containerd, then runs e2e/tests/node (install, examples, scale to 4, and zero lost
# requests under load while proxies roll, controllers roll, the Lease holder's pod and a backend
# pod are deleted). The figures of each event are printed at the end.
#
# Env: PROFILE=debug (default: the binaries test-all.sh already built) or release;
#      KANALI_E2E_NODE_RATE requests per second of the load (default 40);
#      KEEP_NODE=1 keeps the node running afterwards (stop it with stop-node.sh DIR).
# Needs root (bridge, iptables, containerd). Cold: ~5 min of Go build for the node binaries
# (plus e2e/k8s/provision.sh's when that is cold too); warm: ~4 min, most of it the scenario.
set -euo pipefail
cd "$(dirname "$0")/../.."
PROFILE=${PROFILE:-debug}
t0=$(date +%s)
step() { printf '\n== [node %ds] %s\n' "$(( $(date +%s) - t0 ))" "$*"; }

step "provision (cached after the first run)"
./e2e/k8s/provision.sh
./e2e/node/provision-node.sh
step "build the binaries ($PROFILE)"
bins=(--bin kanali-controller --bin kanali-proxy --bin kanali-echo)
if [ "$PROFILE" = release ]; then cargo build -q --release "${bins[@]}"; else cargo build -q "${bins[@]}"; fi
bin=${CARGO_TARGET_DIR:-target}/$PROFILE

D=$(mktemp -d /tmp/kanali-node.XXXXXX)
ok=
finish() {
  if [ -z "$ok" ] && [ -f "$D/kubeconfig" ]; then
    echo "== node stage failed: pods and logs (node dir $D kept)" >&2
    kubectl --kubeconfig "$D/kubeconfig" get pods -A -o wide >&2 || true
    kubectl --kubeconfig "$D/kubeconfig" logs -n kanali-system -l app.kubernetes.io/part-of=kanali \
      --prefix --tail=40 --max-log-requests=20 >&2 || true
  fi
  if [ "${KEEP_NODE:-0}" = 1 ]; then echo "node kept: KUBECONFIG=$D/kubeconfig; stop: e2e/node/stop-node.sh $D"; return; fi
  # The pods' veths, to check that none outlives the stop (a pod namespace something still
  # holds keeps its veth on the host).
  local veths left=()
  veths=$(ip -o link show master "${BRIDGE:-kanali-br0}" 2>/dev/null | awk -F': ' '{print $2}' | cut -d@ -f1)
  ./e2e/node/stop-node.sh "$D" >/dev/null 2>&1 || true
  for v in $veths; do ip link show "$v" >/dev/null 2>&1 && left+=("$v"); done
  if [ ${#left[@]} -gt 0 ]; then
    echo "== the stopped node left ${#left[@]} veth(s) on the host: ${left[*]} (deleted now)" >&2
    for v in "${left[@]}"; do ip link del "$v" 2>/dev/null; done
    ok=
  fi
  if [ -n "$ok" ]; then rm -rf "$D"; else rm -rf "$D/containerd/root" "$D/kubelet" "$D/images" 2>/dev/null || true; fi
  # A leak fails the stage even when the scenario passed.
  if [ ${#left[@]} -gt 0 ]; then exit 1; fi
}
trap finish EXIT
step "start the node in $D"
./e2e/node/start-node.sh "$D"
export CONTAINERD_ADDRESS=$D/containerd/containerd.sock
step "images from the $PROFILE binaries"
# Stripped copies: the debug binaries' symbols would be most of the image.
mkdir -p "$D/images"
for b in kanali-controller kanali-proxy kanali-echo; do
  strip -o "$D/images/$b" "$bin/$b" 2>/dev/null || cp "$bin/$b" "$D/images/$b"
  ./e2e/node/image.sh "ghcr.io/kanali/$b:e2e" "$D/images/$b"
done
step "e2e/tests/node"
KANALI_E2E_NODE_KUBECONFIG=$D/kubeconfig REQUIRE_NODE=1 \
  cargo test -q -p kanali-e2e --test node -- --nocapture --test-threads=1
ok=1
step "done"
