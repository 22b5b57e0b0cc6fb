#!/usr/bin/env bash
# The whole test suite: formatting, lints, the quick-start smoke test, then every unit,
# integration and end-to-end test in the workspace. `make test` and CI (.ci/run) run this.
set -euo pipefail
cd "$(dirname "$0")/../.."
step() { printf '\n== %s\n' "$*"; }

step "rustfmt"
cargo fmt --all -- --check
step "clippy"
cargo clippy --workspace --all-targets -- -D warnings
step "quick start (README)"
./e2e/scripts/smoke-demo.sh
step "doc tests"
cargo test -q --workspace --doc
step "tests"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --no-fail-fast
else
  cargo test --workspace --no-fail-fast
fi
