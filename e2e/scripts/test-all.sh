#!/usr/bin/env bash
# The whole test suite: formatting, lints, the quick-start smoke test, then every unit,
# integration and end-to-end test in the workspace, including the suite against a real
# Kubernetes API server (built once from Debian's sources and cached, then started here).
# `make test` and CI (.ci/run) run this.
#
# Last, the node stage: Kanali as pods on a real single-node cluster (e2e/node/test-node.sh).
#
# Env: KANALI_E2E_KUBECONFIG=path uses an API server you already run (kind, or e2e/k8s/start.sh);
#      SKIP_K8S=1 runs everything but the API-server suite (its tests then skip, loudly);
#      SKIP_NODE=1 leaves out the node stage (it needs root and ~3 min warm, ~10 cold).
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { printf '\n== %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "build binaries (the e2e suites run them as processes)"
cargo build -q --bins
step "quick start (README)"
./e2e/scripts/smoke-demo.sh

if [ -n "${KANALI_E2E_KUBECONFIG:-}" ]; then
  step "Kubernetes API server: using $KANALI_E2E_KUBECONFIG"
  export REQUIRE_K8S=1
elif [ "${SKIP_K8S:-0}" != 1 ]; then
  step "Kubernetes API server (v1.20.2; first run builds it, ~7 min)"
  ./e2e/k8s/provision.sh
  k8s=$(mktemp -d)
  trap './e2e/k8s/stop.sh "$k8s" >/dev/null 2>&1 || true; rm -rf "$k8s"' EXIT
  ./e2e/k8s/start.sh "$k8s"
  export KANALI_E2E_KUBECONFIG=$k8s/kubeconfig REQUIRE_K8S=1
fi

step "doc tests"
cargo test -q --workspace --doc
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi

# The node runs its own API server: stop the suite's first (ports differ, but memory and CPU
# are better spent on the node).
if [ -n "${k8s:-}" ]; then ./e2e/k8s/stop.sh "$k8s" >/dev/null 2>&1 || true; fi
if [ "${SKIP_NODE:-0}" != 1 ]; then
  step "Kanali as pods on a single-node cluster (first run builds kubelet & co, ~5 min)"
  ./e2e/node/test-node.sh
else
  step "node stage skipped (SKIP_NODE=1)"
fi
