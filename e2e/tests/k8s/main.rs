//! Cluster mode end to end, against a real Kubernetes API server: the `kanali-controller` and
//! `kanali-proxy` executables run as child processes on 127.0.0.1, the resources are applied,
//! patched and deleted with `kubectl`, and requests go through the proxies to in-process echo
//! upstreams (on 127.0.0.1, or on a test host in a network namespace of the test's when a
//! Service's Endpoints lead to them).
//!
//! Configuration (environment):
//! - `KANALI_E2E_KUBECONFIG`: an admin kubeconfig (`e2e/k8s/start.sh DIR` writes
//!   `DIR/kubeconfig`). Unset: every test prints "skipped" and passes, unless `REQUIRE_K8S=1`,
//!   which makes them fail instead.
//! - `KUBECTL`: the kubectl to run (default: `kubectl` on the PATH).
//! - `KANALI_E2E_KEEP=1`: keep each test's namespace (for debugging).
//!
//! The binaries are taken from the target directory of this test (`cargo build --bins` first).
//! Each test works in its own namespace (`kanali-e2e-<test>-<random>`, deleted at the end) with
//! its own controller Lease, so the tests run in parallel. Every wait has a deadline; a test that
//! fails prints the last thing it observed and the logs of its controllers and proxies.
//!
//! Layout: [`support`] starts the world of one test (namespace, processes, upstreams) and
//! checks what it answers; each other module is one concern's scenarios.

#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

mod support;

mod api_keys;
mod install;
mod lifecycle;
mod plugins;
mod replicas;
mod services;
mod upstream_tls;
