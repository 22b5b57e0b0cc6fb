//! How the suites configure the controllers and proxies they start in-process: on loopback,
//! on ports the kernel picks, with delays short enough that a change shows in milliseconds.
//! A suite changes what it tests with struct update syntax (`..setup::proxy(grpc, "p")`).

use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use kanali_controller::source::watch::Debounce;
use kanali_controller::{Controller, StandaloneConfig};
use kanali_dataplane::control::client::ClientConfig;
use kanali_dataplane::workers::Workers;
use kanali_dataplane::{ProxyConfig, RunningProxy};

/// Any free port on 127.0.0.1.
pub const ANY: SocketAddr = SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::LOCALHOST), 0);

/// A manifest change compiled within ~30 ms of the last write, 200 ms at most.
pub fn debounce() -> Debounce {
    Debounce {
        quiet: Duration::from_millis(30),
        max_delay: Duration::from_millis(200),
        resync: Duration::from_secs(5),
    }
}

/// A standalone controller reading `manifests`, without TLS or a decryption key.
pub fn controller(manifests: impl Into<PathBuf>) -> StandaloneConfig {
    StandaloneConfig {
        manifests: manifests.into(),
        grpc_listen: ANY,
        admin_listen: ANY,
        debounce: debounce(),
        grpc_tls: None,
        decryption: Default::default(),
    }
}

/// A proxy called `id`, subscribed to the controller at `grpc` over plain gRPC (reconnecting
/// within 200 ms, reporting key use every 200 ms), serving from the caller's runtime.
pub fn proxy(grpc: SocketAddr, id: &str) -> ProxyConfig {
    ProxyConfig {
        listen: ANY,
        admin_listen: ANY,
        client: ClientConfig {
            controllers: vec![format!("http://{grpc}")],
            proxy_id: id.to_owned(),
            min_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_millis(200),
            tls: None,
            tls_server_name: None,
            usage_interval: Duration::from_millis(200),
        },
        server: Default::default(),
        upstream: Default::default(),
        rate_limits: Default::default(),
        plugins: Default::default(),
        workers: Workers::Caller,
    }
}

/// A manifest of one ApiProxy, `api` in namespace `shop`: `/api` to the HTTP upstream at
/// `upstream`, its path prefix stripped.
pub fn api_route(upstream: SocketAddr) -> String {
    format!(
        r#"apiVersion: kanali.io/v2
kind: ApiProxy
metadata: {{name: api, namespace: shop}}
spec:
  source: {{path: /api}}
  target:
    path: /
    backend: {{endpoint: "http://{upstream}"}}
"#
    )
}

/// Waits until `proxy` serves the snapshot `controller` has compiled, and returns its version.
pub async fn applied(proxy: &RunningProxy, controller: &Controller) -> String {
    let version = controller
        .shared
        .version()
        .unwrap_or_else(|| panic!("the controller has compiled no snapshot"));
    crate::check::eventually("the proxy applies the snapshot", || async {
        proxy.version().as_deref() == Some(version.as_str())
    })
    .await;
    version
}
