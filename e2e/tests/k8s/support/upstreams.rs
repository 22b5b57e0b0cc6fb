//! Upstreams behind Services. The API server refuses Endpoints addresses in the loopback range
//! (`may not be in the loopback range (127.0.0.0/8)`), and tests send traffic only to loopback
//! or to hosts they create: so an upstream a Service leads to listens on a [`TestHost`], a
//! network namespace of the test's own.

use kanali_e2e::netns::TestHost;

/// A new test host for the upstreams of one scenario.
///
/// # Panics
/// If it cannot be made (the suite runs as root, with iproute2).
pub fn test_host() -> TestHost {
    TestHost::create().unwrap_or_else(|e| {
        panic!("cannot create a test host in a network namespace (needs root and iproute2): {e}")
    })
}
